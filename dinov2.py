"""DINOv2 ViT/14 as a latent space: the RAE-style baseline of the GLD paper's tables, and VGGT's patch embed.

`DinoViT` in the torch-hub checkpoint layout (dinov2_vit{s,b,l}14[_reg4]_pretrain.pth); `DINOv2`: ONE level, the last
patch tokens after the final LayerNorm WITHOUT its affine (RAE's Dinov2withNorm), per view, at the data's size (RAE:
224 px), decoded by a trained one-level decoder.RGBDecoder. Presets dinov2-{s,b,l}[-reg] (4 registers).
References: DINOv2 (arXiv 2304.07193), registers (arXiv 2309.16588), RAE (arXiv 2510.11690), GLD (2603.22275).
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import encoder as encoder_lib
from constants import PATCH


@dataclass
class DINOv2Config:
    name: str = 'dinov2-b'
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    registers: int = 0
    pos_grid: int = 37  # 518 / 14


PRESETS = {
    f'dinov2-{s}{reg}': DINOv2Config(f'dinov2-{s}{reg}', *dims, registers=4 if reg else 0)
    for s, dims in {'s': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16)}.items()
    for reg in ('', '-reg')
}


class DinoViT(nn.Module):  # the hub's key layout: no qk-norm, no RoPE
    def __init__(self, dim, depth, heads, registers=0, pos_grid=37):
        super().__init__()
        self.dim, self.registers = dim, registers
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoints, unused here
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.patch_embed = nn.ModuleDict({'proj': nn.Conv2d(3, dim, PATCH, PATCH)})
        self.blocks = nn.Sequential(*(encoder_lib.Block(dim, heads, False, False) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.cls_token, self.pos_embed, *([self.register_tokens] if registers else [])):
            nn.init.normal_(p, std=0.02)

    def forward(self, x, affine=True):
        """x (N,3,H,W) ImageNet-normalised -> patch tokens after the final LayerNorm (affine=False: RAE's) (N,T,C)."""
        x = encoder_lib.patch_tokens(self, x, antialias=self.registers > 0)  # the hub's register models antialias
        if self.registers:  # after cls, no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], 1)
        x = self.blocks(x)
        w, b = (self.norm.weight, self.norm.bias) if affine else (None, None)
        return F.layer_norm(x, (self.dim,), w, b, self.norm.eps)[:, 1 + self.registers :]


class DINOv2(encoder_lib.LatentEncoder):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dim, self.patch = cfg, cfg.embed_dim, PATCH
        self.vit = DinoViT(cfg.embed_dim, cfg.depth, cfg.heads, cfg.registers, cfg.pos_grid)

    def encode(self, images):
        """images (B,V,3,H,W) in [0,1] -> [level 0 (B,V,T,C)]: each view on its own."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        x = encoder_lib.imagenet_normalize(images).flatten(0, 1).to(self.vit.pos_embed.dtype)
        return [self.vit(x, affine=False).unflatten(0, (B, V))]


def load_weights(enc, weights):
    """The official DINOv2 file (hub layout, keys as DinoViT) into enc.vit, strictly."""
    encoder_lib.load_strict(enc.vit, encoder_lib.read_state_dict(weights, strip=r'^module\.'), enc.cfg.name)
    return enc
