"""Frozen VGGT-1B aggregator as GLD's latent space ("GLD (VGGT)"), its depth and camera heads.

DINOv2-L/14 (4 registers) patch embed, then [camera, 4 registers, patches] per frame through 24 frame/global block
pairs; RAW levels at pairs (4, 11, 17, 23), `propagate`, DPT depth and adaLN camera heads, facebook/VGGT-1B weights.
Special tokens: the first source view's, not diffused as in GLD's release. Sources: shared/notes/vggt-architecture.md.
References: VGGT (arXiv 2503.11651, github.com/facebookresearch/vggt @ 44b3afb); GLD (arXiv 2603.22275).
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w), P = 5 + T.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cameras
import dinov2
import encoder as encoder_lib
import geometry_head
from constants import PATCH

SPECIAL = 5  # camera token + 4 register tokens per frame
IGNORED_PREFIXES = ('point_head.', 'track_head.')


@dataclass
class VGGTConfig:
    name: str = 'vggt-1b'
    embed_dim: int = 1024  # C (a level has 2C)
    depth: int = 24  # frame/global block pairs
    heads: int = 16
    dino_depth: int = 24  # the DINOv2 patch embed
    dino_heads: int = 16
    out_layers: tuple = (4, 11, 17, 23)  # the pairs that are GLD's levels 0..3
    pos_grid: int = 37
    features: int = 256  # DPT fusion width
    out_channels: tuple = (256, 512, 1024, 1024)
    cam_depth: int = 4  # camera-head trunk blocks (width 2C)
    cam_heads: int = 16


PRESETS = {
    'vggt-1b': VGGTConfig(),
    'vggt-tiny': VGGTConfig('vggt-tiny', 64, 8, 2, 2, 2, (1, 3, 5, 7), 8, 32, (16, 32, 64, 64), 2, 2),
}


class Aggregator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, C = cfg, cfg.embed_dim
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C) * 0.02)  # [frame 0, other frames]
        self.register_token = nn.Parameter(torch.randn(1, 2, SPECIAL - 1, C) * 0.02)
        self.patch_embed = dinov2.DinoViT(C, cfg.dino_depth, cfg.dino_heads, registers=4, pos_grid=cfg.pos_grid)
        self.frame_blocks, self.global_blocks = (
            nn.ModuleList(encoder_lib.Block(C, cfg.heads, True, False, eps=1e-5) for _ in range(cfg.depth))
            for _ in range(2)
        )

    def special_tokens(self, B, V):
        """(B,V,5,C): [camera, 4 registers]; frame 0 takes index 0, frames 1.. index 1."""
        tok = torch.cat([self.camera_token, self.register_token], 2)[0]  # (2,5,C)
        return tok[(torch.arange(V, device=tok.device) > 0).long()].expand(B, V, -1, -1)

    def tokens(self, images):
        """images (B,V,3,H,W) in [0,1] -> the initial state (B,V,P,C) = [special tokens, DINO patch tokens]."""
        B, V, _, H, W = images.shape
        x = encoder_lib.imagenet_normalize(images).flatten(0, 1).to(self.camera_token.dtype)
        patches = self.patch_embed(x).unflatten(0, (B, V))  # (B,V,T,C)
        return torch.cat([self.special_tokens(B, V).to(patches.dtype), patches], 2)

    def run(self, x, start, hw):
        """Pairs start.. on the state x (B,V,P,C) -> levels (B,V,P,2C) at the out layers >= start."""
        cfg, (B, V, P, C) = self.cfg, x.shape
        pos, levels = encoder_lib.rope_positions(hw, SPECIAL, x.device), []
        # every frame keeps its positions in the global blocks
        frame_rope, global_rope = (encoder_lib.rope_tables(p, C // cfg.heads) for p in (pos, pos.repeat(V, 1)))
        for i in range(start, cfg.depth):
            f = self.frame_blocks[i](x.reshape(B * V, P, C), frame_rope).view(B, V, P, C)
            x = self.global_blocks[i](f.reshape(B, V * P, C), global_rope).view(B, V, P, C)
            if i in cfg.out_layers:
                levels.append(torch.cat([f, x], -1))
        return levels


class CameraHead(nn.Module):
    def __init__(self, dim, depth, heads, iters=4):
        super().__init__()
        self.iters, self.empty_pose_tokens = iters, nn.Parameter(torch.zeros(1, 1, 9))
        self.token_norm, self.trunk_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.adaln_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.embed_pose, self.poseLN_modulation = nn.Linear(9, dim), nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.trunk = nn.Sequential(*(encoder_lib.Block(dim, heads, False, False, eps=1e-5) for _ in range(depth)))
        self.pose_branch = nn.ModuleDict({'fc1': nn.Linear(dim, dim // 2), 'fc2': nn.Linear(dim // 2, 9)})

    def forward(self, tok):
        """Camera tokens (B,V,2C) of the last pair -> pose encoding (B,V,9) [t, quat, fov_h, fov_w]."""
        B, V, _ = tok.shape
        t, pred = self.token_norm(tok), None
        for _ in range(self.iters):  # the same token every iteration; the prediction accumulates
            inp = self.empty_pose_tokens.expand(B, V, 9) if pred is None else pred.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(inp)).chunk(3, -1)
            x = gate * (self.adaln_norm(t) * (1 + scale) + shift) + t
            x = self.trunk(x)  # attention over the V camera tokens of a scene
            delta = self.pose_branch.fc2(F.gelu(self.pose_branch.fc1(self.trunk_norm(x))))
            pred = delta if pred is None else pred + delta
        return torch.cat([pred[..., :7], F.relu(pred[..., 7:])], -1)


class VGGT(encoder_lib.LatentEncoder):
    """Aggregator + depth head + camera head with GLD's latent interface (latents.build_encoder's docstring)."""

    num_levels, has_geometry, can_propagate = 4, True, True

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dim, self.patch = cfg, 2 * cfg.embed_dim, PATCH
        self.aggregator = Aggregator(cfg)
        self.depth_head = geometry_head.DualDPT(self.dim, cfg.features, cfg.out_channels, aux=False, relu_skip=True)
        self.camera_head = CameraHead(self.dim, cfg.cam_depth, cfg.cam_heads)

    def encode(self, images, return_cls=False):
        """images (B,V,3,H,W) in [0,1] -> 4 raw levels (B,V,T,2C) [+ their special tokens (B,V,5,2C)]."""
        H, W = images.shape[-2:]
        self.check_size(H, W)
        levels = self.aggregator.run(self.aggregator.tokens(images), 0, (H // PATCH, W // PATCH))
        feats = [lv[:, :, SPECIAL:] for lv in levels]
        return (feats, [lv[:, :, :SPECIAL] for lv in levels]) if return_cls else feats

    def propagate(self, level_k, k, cls, hw, return_cls=False):
        """Raw level k (B,V,T,2C), special tokens cls ((B,5,2C) broadcast, or (B,V,5,2C)) -> raw levels k+1..3."""
        (B, V, T, D), C = level_k.shape, self.cfg.embed_dim
        self.check_propagate(k, T, hw)
        cls = (cls[:, None] if cls.dim() == 3 else cls).expand(B, V, SPECIAL, D)
        levels = self.aggregator.run(torch.cat([cls[..., C:], level_k[..., C:]], 2), self.cfg.out_layers[k] + 1, hw)
        feats = [lv[:, :, SPECIAL:] for lv in levels]
        return (feats, [lv[:, :, :SPECIAL] for lv in levels]) if return_cls else feats

    def geometry(self, levels, H, W, cls_last=None):
        """Levels -> depth, depth_conf [+ 'extrinsics' (w2c), 'intrinsics', c2w, K from cls_last (B,V[,5],2C)]; fp32."""
        with torch.autocast(levels[0].device.type, enabled=False):
            out = self.depth_head(levels, H, W)
            if cls_last is not None:
                tok = cls_last[:, :, 0] if cls_last.dim() == 4 else cls_last
                w2c, K = geometry_head.decode_pose(self.camera_head(tok.float()).float(), H, W)  # no clamp, as VGGT
                out.update(
                    extrinsics=w2c[..., :3, :],
                    intrinsics=K,
                    c2w=cameras.rigid_inverse(w2c),
                    K=cameras.K_to_normalized(K, H, W),
                )
        return out


def load_weights(enc, weights):
    """VGGT()'s state dict (file or dict) into enc, strictly; point_head.* and track_head.* skipped with a note."""
    sd = encoder_lib.read_state_dict(weights, strip=r'^module\.')
    sd = encoder_lib.skip_keys(sd, IGNORED_PREFIXES, 'vggt', 'not used by GLD')
    return encoder_lib.load_strict(enc, sd, enc.cfg.name)
