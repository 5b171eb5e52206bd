"""Depth Anything 3's geometry head: the DualDPT (depth and ray maps from the 4 normalised levels;
VGGT's depth head is the same DPT without the ray branch) and the camera decoder (a pose encoding
from the last level's camera token).

References (arXiv): DA3 2511.10647 (ByteDance-Seed/Depth-Anything-3), DPT 2103.13413,
VGGT 2503.11651.
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import cameras
from constants import PATCH


def add_uv(x, aspect):
    """x (B',c,h,w) + 0.1 x DA3's UV embedding: sin/cos (base 100) of centred, normalised u, v."""
    c, h, w = x.shape[1:]
    diagonal = math.hypot(aspect, 1)
    sx = aspect / diagonal
    sy = 1 / diagonal
    u_max = sx * (w - 1) / w  # pixel centres
    v_max = sy * (h - 1) / h
    u = torch.linspace(-u_max, u_max, w, device=x.device)
    v = torch.linspace(-v_max, v_max, h, device=x.device)
    exponents = torch.arange(c // 4, device=x.device).float() / (c // 4)
    omega = 100.0**-exponents  # (c/4,)
    uu = (u[None, :, None] * omega).expand(h, w, -1)  # (h,w,c/4)
    vv = (v[:, None, None] * omega).expand(h, w, -1)
    embedding = torch.cat([uu.sin(), uu.cos(), vv.sin(), vv.cos()], -1)
    return x + 0.1 * rearrange(embedding, 'h w c -> c h w').to(x.dtype)


def conv3(cin, cout, bias=True):
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


class ResidualConvUnit(nn.Module):
    def __init__(self, f, relu_skip=False):
        super().__init__()
        self.conv1 = conv3(f, f)
        self.conv2 = conv3(f, f)
        self.relu_skip = relu_skip  # VGGT's in-place ReLU rectifies the skip too

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(F.relu(x))))
        skip = F.relu(x) if self.relu_skip else x
        return y + skip


class FusionBlock(nn.Module):
    def __init__(self, f, lateral=True, relu_skip=False):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(f, relu_skip) if lateral else None
        self.resConfUnit2 = ResidualConvUnit(f, relu_skip)
        self.out_conv = nn.Conv2d(f, f, 1)

    def forward(self, x, lateral=None, size=None):
        """x (B',f,h,w) [+ a lateral level of its size] -> (B',f,*size), by default twice h, w."""
        if lateral is not None:
            x = x + self.resConfUnit1(lateral)
        x = self.resConfUnit2(x)
        if size is None:
            size = (2 * x.shape[2], 2 * x.shape[3])
        x = F.interpolate(x, size=size, mode='bilinear', align_corners=True)
        return self.out_conv(x)


class ChannelLayerNorm(nn.LayerNorm):
    def forward(self, x):  # x (B',c,h,w)
        x = super().forward(rearrange(x, 'n c h w -> n h w c'))
        return rearrange(x, 'n h w c -> n c h w')


class DualDPT(nn.Module):
    """DA3's head: depth, depth_conf (H x W), ray, ray_conf (8h x 8w; aux 0-2: keys only).
    aux=False: VGGT's depth head."""

    def __init__(self, dim_in, f, out_channels, aux=True, relu_skip=False):
        super().__init__()
        c = out_channels
        self.norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, ci, 1) for ci in c)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], 4, 4),  # 4h x 4w
                nn.ConvTranspose2d(c[1], c[1], 2, 2),  # 2h x 2w
                nn.Identity(),
                nn.Conv2d(c[3], c[3], 3, 2, 1),  # h/2 x w/2
            ]
        )
        self.scratch = nn.Module()
        scratch = self.scratch
        suffixes = ('', '_aux') if aux else ('',)
        for s in range(4):
            setattr(scratch, f'layer{s + 1}_rn', conv3(c[s], f, bias=False))
            for suffix in suffixes:
                fusion = FusionBlock(f, lateral=s < 3, relu_skip=relu_skip)
                setattr(scratch, f'refinenet{s + 1}{suffix}', fusion)
        scratch.output_conv1 = conv3(f, f // 2)
        scratch.output_conv2 = nn.Sequential(
            conv3(f // 2, 32),
            nn.ReLU(),
            nn.Conv2d(32, 2, 1),
        )
        self.aux = aux
        if not aux:
            return
        scratch.output_conv1_aux = nn.ModuleList(
            nn.Sequential(
                conv3(f, f // 2),
                conv3(f // 2, f),
                conv3(f, f // 2),
                conv3(f // 2, f),
                conv3(f, f // 2),
            )
            for _ in range(4)
        )
        ln = ChannelLayerNorm(32, eps=1e-5)  # one LN shared by the 4 aux outputs, as in DA3
        # indices 1 and 3 are DA3's permutes (no weights): the keys stay output_conv2_aux.i.{0,2,5}
        scratch.output_conv2_aux = nn.ModuleList(
            nn.Sequential(
                conv3(f // 2, 32),
                nn.Identity(),
                ln,
                nn.Identity(),
                nn.ReLU(),
                nn.Conv2d(32, 7, 1),
            )
            for _ in range(4)
        )

    def fuse(self, rn, suffix):
        """The 4 resized levels rn, fused deepest first -> (B',f,8h,8w)."""
        deepest = getattr(self.scratch, 'refinenet4' + suffix)
        x = deepest(rn[3], size=rn[2].shape[2:])
        for s in (2, 1, 0):
            fusion = getattr(self.scratch, f'refinenet{s + 1}{suffix}')
            size = rn[s - 1].shape[2:] if s > 0 else None  # the last fusion doubles
            x = fusion(x, rn[s], size=size)
        return x

    def forward(self, levels, H, W):
        """4 normalised levels (B,V,T,2C) -> depth, depth_conf (B,V,H,W), ray (B,V,8h,8w,6) and
        ray_conf, in fp32 as DA3."""
        B = levels[0].shape[0]
        h = H // PATCH
        w = W // PATCH
        aspect = W / H
        scratch = self.scratch
        with torch.autocast(levels[0].device.type, enabled=False):
            rn = []
            for s, x in enumerate(levels):
                x = self.norm(rearrange(x.float(), 'b v t d -> (b v) t d'))
                x = rearrange(x, 'n (h w) d -> n d h w', h=h, w=w)
                x = add_uv(self.projects[s](x), aspect)
                x = self.resize_layers[s](x)
                rn.append(getattr(scratch, f'layer{s + 1}_rn')(x))
            main = self.fuse(rn, '')
            main = scratch.output_conv1(main)
            size = (h * PATCH, w * PATCH)
            main = F.interpolate(main, size=size, mode='bilinear', align_corners=True)
            main = scratch.output_conv2(add_uv(main, aspect))
            main = rearrange(main, '(b v) c h w -> b v c h w', b=B)  # c: [depth, confidence]
            depth = main[:, :, 0].exp()
            depth_conf = main[:, :, 1].exp() + 1
            out = {'depth': depth, 'depth_conf': depth_conf}
            if not self.aux:
                return out
            aux = self.fuse(rn, '_aux')
            aux = scratch.output_conv1_aux[3](aux)
            aux = scratch.output_conv2_aux[3](add_uv(aux, aspect))
            aux = rearrange(aux, '(b v) c h w -> b v h w c', b=B)  # c: [ray (6), confidence]
            out['ray'] = aux[..., :6]
            out['ray_conf'] = aux[..., 6].exp() + 1
            return out


class CameraDec(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.ReLU(),
        )
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, tok):
        """Last-level token 0 (B,V,2C) -> pose encoding (B,V,9) [t, quat xyzw, fov_h, fov_w]."""
        features = self.backbone(tok).float()
        translation = self.fc_t(features)
        quaternion = self.fc_qvec(features)
        fov = self.fc_fov(features)
        return torch.cat([translation, quaternion, fov], -1)


def decode_pose(pose, H, W, eps=None):
    """Pose encoding (...,9) [t, quat xyzw, fov_h, fov_w] -> pose (...,4,4), centred pixel K;
    tan(fov/2) >= eps."""
    quat_wxyz = pose[..., [6, 3, 4, 5]]
    rotation = cameras.quat_to_rotmat(quat_wxyz)
    pose_matrix = cameras.make_pose(rotation, pose[..., :3])
    tan_half_fov = torch.tan(pose[..., 7:9] / 2)  # (...,2) [vertical, horizontal]
    if eps is not None:
        tan_half_fov = tan_half_fov.clamp_min(eps)
    K = torch.zeros(*pose.shape[:-1], 3, 3, device=pose.device)
    K[..., 0, 0] = (W / 2) / tan_half_fov[..., 1]
    K[..., 1, 1] = (H / 2) / tan_half_fov[..., 0]
    K[..., 0, 2] = W / 2
    K[..., 1, 2] = H / 2
    K[..., 2, 2] = 1.0
    return pose_matrix, K
