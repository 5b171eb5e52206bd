"""Frozen VGGT-1B aggregator as GLD's latent space ("GLD (VGGT)"), its depth and camera heads.

DINOv2-L/14 (4 registers) patch embed, then [camera, 4 registers, patches] per frame through 24
frame/global block pairs; RAW levels at pairs (4, 11, 17, 23), `propagate`, DPT depth and adaLN
camera heads, facebook/VGGT-1B weights. As in GLD's release, a level leads with each view's 5
special tokens (camera, 4 registers): the DiTs diffuse them with the patches, propagation resumes
from them and the camera head reads them. Built after the official code,
github.com/facebookresearch/vggt @ 44b3afb
(vggt/models/aggregator.py, vggt/heads/), and GLD's VGGT encoder
(github.com/cvlab-kaist/Geometric-Latent-Diffusion, src/stage1/encoders/vggt.py).
References (arXiv): VGGT 2503.11651, GLD 2603.22275.
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w),
P = 5 + T tokens of a frame (and of a level).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
    'vggt-tiny': VGGTConfig(
        'vggt-tiny',
        embed_dim=64,
        depth=8,
        heads=2,
        dino_depth=2,
        dino_heads=2,
        out_layers=(1, 3, 5, 7),
        pos_grid=8,
        features=32,
        out_channels=(16, 32, 64, 64),
        cam_depth=2,
        cam_heads=2,
    ),
}


def block(dim, heads, qk_norm):
    return encoder_lib.Block(dim, heads, qk_norm, swiglu=False, eps=1e-5)


class Aggregator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.embed_dim
        self.cfg = cfg
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C) * 0.02)  # [frame 0, other frames]
        self.register_token = nn.Parameter(torch.randn(1, 2, SPECIAL - 1, C) * 0.02)
        self.patch_embed = dinov2.DinoViT(
            C,
            cfg.dino_depth,
            cfg.dino_heads,
            registers=4,
            pos_grid=cfg.pos_grid,
        )
        frame_blocks = [block(C, cfg.heads, qk_norm=True) for _ in range(cfg.depth)]
        self.frame_blocks = nn.ModuleList(frame_blocks)
        global_blocks = [block(C, cfg.heads, qk_norm=True) for _ in range(cfg.depth)]
        self.global_blocks = nn.ModuleList(global_blocks)

    def special_tokens(self, B, V):
        """(B,V,5,C): [camera, 4 registers]; frame 0 takes index 0, frames 1.. index 1."""
        tokens = torch.cat([self.camera_token, self.register_token], 2)[0]  # (2,5,C)
        index = (torch.arange(V, device=tokens.device) > 0).long()
        return tokens[index].expand(B, V, -1, -1)

    def tokens(self, images):
        """images (B,V,3,H,W) in [0,1] -> the initial state (B,V,P,C) [special tokens, patches]."""
        B, V = images.shape[:2]
        x = rearrange(encoder_lib.imagenet_normalize(images), 'b v c h w -> (b v) c h w')
        patches = self.patch_embed(x.to(self.camera_token.dtype))
        patches = rearrange(patches, '(b v) t c -> b v t c', b=B)
        special = self.special_tokens(B, V).to(patches.dtype)
        return torch.cat([special, patches], 2)

    def run(self, x, start, hw):
        """Pairs start.. on the state x (B,V,P,C) -> levels (B,V,P,2C) of the out layers."""
        cfg = self.cfg
        B, V, P, C = x.shape
        pos = encoder_lib.rope_positions(hw, SPECIAL, x.device)  # (P,2)
        frame_rope = encoder_lib.rope_tables(pos, C // cfg.heads)
        # every frame keeps its positions in the global blocks
        global_rope = encoder_lib.rope_tables(pos.repeat(V, 1), C // cfg.heads)
        levels = []
        for i in range(start, cfg.depth):
            # frame attention: every frame on its own
            frames = rearrange(x, 'b v p c -> (b v) p c')
            frames = self.frame_blocks[i](frames, frame_rope)
            frames = rearrange(frames, '(b v) p c -> b v p c', b=B)
            # global attention: one sequence per scene
            x = rearrange(frames, 'b v p c -> b (v p) c')
            x = self.global_blocks[i](x, global_rope)
            x = rearrange(x, 'b (v p) c -> b v p c', v=V)
            if i in cfg.out_layers:
                levels.append(torch.cat([frames, x], -1))
        return levels


class CameraHead(nn.Module):
    def __init__(self, dim, depth, heads, iters=4):
        super().__init__()
        self.iters = iters
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.adaln_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.embed_pose = nn.Linear(9, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.trunk = nn.Sequential(*(block(dim, heads, qk_norm=False) for _ in range(depth)))
        fc1 = nn.Linear(dim, dim // 2)
        fc2 = nn.Linear(dim // 2, 9)
        self.pose_branch = nn.ModuleDict({'fc1': fc1, 'fc2': fc2})

    def forward(self, tok):
        """Last-pair camera tokens (B,V,2C) -> pose encoding (B,V,9) [t, quat, fov_h, fov_w]."""
        B, V, _ = tok.shape
        tokens = self.token_norm(tok)
        pred = None
        # the same tokens every iteration, modulated by the prediction so far; the deltas accumulate
        for _ in range(self.iters):
            if pred is None:
                pose_in = self.empty_pose_tokens.expand(B, V, 9)
            else:
                pose_in = pred.detach()
            modulation = self.poseLN_modulation(self.embed_pose(pose_in))
            shift, scale, gate = modulation.chunk(3, -1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            x = self.trunk(x)  # attention over the V camera tokens of a scene
            hidden = F.gelu(self.pose_branch.fc1(self.trunk_norm(x)))
            delta = self.pose_branch.fc2(hidden)
            pred = delta if pred is None else pred + delta
        return torch.cat([pred[..., :7], F.relu(pred[..., 7:])], -1)  # fov >= 0


def with_special(levels, return_cls):
    """Levels (B,V,P,2C) [+ their special tokens (B,V,5,2C)]."""
    if not return_cls:
        return levels
    return levels, [level[:, :, :SPECIAL] for level in levels]


class VGGT(encoder_lib.LatentEncoder):
    """Aggregator, depth and camera heads with GLD's latent interface (latents.build_encoder)."""

    num_levels = 4
    has_geometry = True
    can_propagate = True
    special = SPECIAL  # a level's leading special tokens, diffused with its patches (GLD's release)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dim = 2 * cfg.embed_dim
        self.patch = PATCH
        self.aggregator = Aggregator(cfg)
        self.depth_head = geometry_head.DualDPT(
            self.dim,
            cfg.features,
            cfg.out_channels,
            aux=False,
            relu_skip=True,
        )
        self.camera_head = CameraHead(self.dim, cfg.cam_depth, cfg.cam_heads)

    def encode(self, images, return_cls=False):
        """images (B,V,3,H,W) in [0,1] -> 4 raw levels (B,V,P,2C) [+ special tokens (B,V,5,2C)]."""
        H, W = images.shape[-2:]
        self.check_size(H, W)
        hw = (H // PATCH, W // PATCH)
        levels = self.aggregator.run(self.aggregator.tokens(images), 0, hw)
        return with_special(levels, return_cls)

    def propagate(self, level_k, k, cls, hw, return_cls=False):
        """Raw level k (B,V,P,2C) -> raw levels k+1..3 (B,V,P,2C), resumed from level k's own
        special tokens (cls: None; the learned initial tokens or another view's diverge, notes
        section 6.4)."""
        assert cls is None, "VGGT's levels carry their special tokens: pass cls=None"
        T = level_k.shape[2] - SPECIAL
        self.check_propagate(k, T, hw)
        # the running state is the global half of the level: [special tokens, patches]
        state = level_k[..., self.cfg.embed_dim :]  # (B,V,P,C)
        start = self.cfg.out_layers[k] + 1  # the pair after level k's
        levels = self.aggregator.run(state, start, hw)
        return with_special(levels, return_cls)

    def normalize_levels(self, levels):
        """Raw levels (B,V,P,2C) -> what the heads and the RGB decoder read: the raw patch tokens
        (B,V,T,2C)."""
        return [level[:, :, SPECIAL:] for level in levels]

    def geometry(self, levels, H, W, cls_last=None):
        """Levels -> depth, depth_conf [+ 'extrinsics' (w2c), 'intrinsics', c2w, K from cls_last
        (B,V[,5],2C)], in fp32."""
        with torch.autocast(levels[0].device.type, enabled=False):
            out = self.depth_head(levels, H, W)
            if cls_last is not None:
                camera_token = cls_last[:, :, 0] if cls_last.dim() == 4 else cls_last  # (B,V,2C)
                pose_encoding = self.camera_head(camera_token.float()).float()
                w2c, K = geometry_head.decode_pose(pose_encoding, H, W)  # no clamp, as VGGT
                out['extrinsics'] = w2c[..., :3, :]
                out['intrinsics'] = K
                out['c2w'] = cameras.rigid_inverse(w2c)
                out['K'] = cameras.K_to_normalized(K, H, W)
        return out


def load_weights(enc, weights):
    """VGGT()'s state dict (file or dict) into enc, strictly; point_head.*, track_head.* skipped."""
    sd = encoder_lib.read_state_dict(weights, strip=r'^module\.')
    sd = encoder_lib.skip_keys(sd, IGNORED_PREFIXES, 'vggt', 'not used by GLD')
    return encoder_lib.load_strict(enc, sd, enc.cfg.name)
