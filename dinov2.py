"""DINOv2 ViT/14 as a latent space: the GLD paper's RAE-style baseline, and VGGT's patch embed.

`DinoViT` in the torch-hub checkpoint layout (dinov2_vit{s,b,l}14[_reg4]_pretrain.pth); `DINOv2`:
ONE level, the last patch tokens after the final LayerNorm WITHOUT its affine (RAE's
Dinov2withNorm), per view, at the data's size (RAE: 224 px), decoded by a trained one-level
decoder.RGBDecoder. Presets dinov2-{s,b,l}[-reg] (4 registers).
References (arXiv): DINOv2 2304.07193, registers 2309.16588, RAE 2510.11690, GLD 2603.22275.
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
    'dinov2-s': DINOv2Config('dinov2-s', 384, 12, 6),
    'dinov2-s-reg': DINOv2Config('dinov2-s-reg', 384, 12, 6, registers=4),
    'dinov2-b': DINOv2Config('dinov2-b', 768, 12, 12),
    'dinov2-b-reg': DINOv2Config('dinov2-b-reg', 768, 12, 12, registers=4),
    'dinov2-l': DINOv2Config('dinov2-l', 1024, 24, 16),
    'dinov2-l-reg': DINOv2Config('dinov2-l-reg', 1024, 24, 16, registers=4),
}


class DinoViT(nn.Module):  # the hub's key layout: no qk-norm, no RoPE
    def __init__(self, dim, depth, heads, registers=0, pos_grid=37):
        super().__init__()
        self.dim = dim
        self.registers = registers
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoints, unused here
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.patch_embed = nn.ModuleDict({'proj': nn.Conv2d(3, dim, PATCH, PATCH)})
        blocks = [encoder_lib.Block(dim, heads, qk_norm=False, swiglu=False) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        tokens = [self.cls_token, self.pos_embed]
        if registers:
            tokens.append(self.register_tokens)
        for token in tokens:
            nn.init.normal_(token, std=0.02)

    def forward(self, x, affine=True):
        """x (N,3,H,W) ImageNet-normalised -> patch tokens after the final LayerNorm (N,T,C);
        affine=False: without its weight and bias, as RAE."""
        # the hub's register models resize the position grid with antialias
        x = encoder_lib.patch_tokens(self, x, antialias=self.registers > 0)
        if self.registers:  # after cls, without a position embedding
            register_tokens = self.register_tokens.expand(len(x), -1, -1)
            x = torch.cat([x[:, :1], register_tokens, x[:, 1:]], 1)
        x = self.blocks(x)
        if affine:
            x = self.norm(x)
        else:
            x = F.layer_norm(x, (self.dim,), None, None, self.norm.eps)
        return x[:, 1 + self.registers :]  # the patch tokens


class DINOv2(encoder_lib.LatentEncoder):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.embed_dim
        self.patch = PATCH
        self.vit = DinoViT(cfg.embed_dim, cfg.depth, cfg.heads, cfg.registers, cfg.pos_grid)

    def encode(self, images):
        """images (B,V,3,H,W) in [0,1] -> [level 0 (B,V,T,C)]: each view on its own."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        x = rearrange(encoder_lib.imagenet_normalize(images), 'b v c h w -> (b v) c h w')
        tokens = self.vit(x.to(self.vit.pos_embed.dtype), affine=False)
        return [rearrange(tokens, '(b v) t c -> b v t c', b=B)]


def load_weights(enc, weights):
    """The official DINOv2 file (hub layout, keys as DinoViT) into enc.vit, strictly."""
    sd = encoder_lib.read_state_dict(weights, strip=r'^module\.')
    encoder_lib.load_strict(enc.vit, sd, enc.cfg.name)
    return enc
