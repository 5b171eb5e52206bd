"""Depth Anything 3's geometry head: the DualDPT (depth and ray maps from the 4 normalised levels; VGGT's depth head is
the same DPT without the ray branch) and the camera decoder (a pose encoding from the last level's camera token).

References (arXiv): DA3 2511.10647 (ByteDance-Seed/Depth-Anything-3), DPT 2103.13413, VGGT 2503.11651.
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cameras
from constants import PATCH


def add_uv(x, aspect):
    """x (B',c,h,w) + 0.1 DA3's UV embedding: sin/cos (base 100) of centred, diagonal-normalised u and v."""
    (c, h, w), sx, sy = x.shape[1:], aspect / math.hypot(aspect, 1), 1 / math.hypot(aspect, 1)
    u = torch.linspace(-sx * (w - 1) / w, sx * (w - 1) / w, w, device=x.device)
    v = torch.linspace(-sy * (h - 1) / h, sy * (h - 1) / h, h, device=x.device)
    om = 100.0 ** -(torch.arange(c // 4, device=x.device).float() / (c // 4))
    uu, vv = (u[None, :, None] * om).expand(h, w, -1), (v[:, None, None] * om).expand(h, w, -1)
    return x + 0.1 * torch.cat([uu.sin(), uu.cos(), vv.sin(), vv.cos()], -1).permute(2, 0, 1).to(x.dtype)


def conv3(cin, cout, bias=True):
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


class ResidualConvUnit(nn.Module):
    def __init__(self, f, relu_skip=False):
        super().__init__()
        self.conv1, self.conv2, self.relu_skip = conv3(f, f), conv3(f, f), relu_skip  # relu_skip: VGGT's in-place ReLU

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(F.relu(x))))
        return y + (F.relu(x) if self.relu_skip else x)


class FusionBlock(nn.Module):
    def __init__(self, f, lateral=True, relu_skip=False):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(f, relu_skip) if lateral else None
        self.resConfUnit2 = ResidualConvUnit(f, relu_skip)
        self.out_conv = nn.Conv2d(f, f, 1)

    def forward(self, x, lateral=None, size=None):
        if lateral is not None:
            x = x + self.resConfUnit1(lateral)
        x = self.resConfUnit2(x)
        size = size or (2 * x.shape[2], 2 * x.shape[3])
        return self.out_conv(F.interpolate(x, size=size, mode='bilinear', align_corners=True))


class ChannelLayerNorm(nn.LayerNorm):
    def forward(self, x):  # x (B',c,h,w)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DualDPT(nn.Module):
    """DA3's head: depth, depth_conf (H x W), ray, ray_conf (8h x 8w; aux 0-2: keys only). aux=False: VGGT's."""

    def __init__(self, dim_in, f, out_channels, aux=True, relu_skip=False):
        super().__init__()
        c, self.norm = out_channels, nn.LayerNorm(dim_in, eps=1e-5)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, ci, 1) for ci in c)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], 4, 4),
                nn.ConvTranspose2d(c[1], c[1], 2, 2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], 3, 2, 1),
            ]
        )
        sc = self.scratch = nn.Module()
        for s in range(4):
            setattr(sc, f'layer{s + 1}_rn', conv3(c[s], f, bias=False))
            for suffix in ('', '_aux') if aux else ('',):
                setattr(sc, f'refinenet{s + 1}{suffix}', FusionBlock(f, lateral=s < 3, relu_skip=relu_skip))
        sc.output_conv1 = conv3(f, f // 2)
        sc.output_conv2 = nn.Sequential(conv3(f // 2, 32), nn.ReLU(), nn.Conv2d(32, 2, 1))
        self.aux = aux
        if not aux:
            return
        sc.output_conv1_aux = nn.ModuleList(
            nn.Sequential(conv3(f, f // 2), conv3(f // 2, f), conv3(f, f // 2), conv3(f // 2, f), conv3(f, f // 2))
            for _ in range(4)
        )
        ln = ChannelLayerNorm(32, eps=1e-5)  # one LN shared by the 4 aux outputs, as in DA3
        # indices 1 and 3 are DA3's permutes (no weights): the keys stay output_conv2_aux.i.{0,2,5}
        sc.output_conv2_aux = nn.ModuleList(
            nn.Sequential(conv3(f // 2, 32), nn.Identity(), ln, nn.Identity(), nn.ReLU(), nn.Conv2d(32, 7, 1))
            for _ in range(4)
        )

    def fuse(self, rn, suffix):  # the 4 resized levels, deepest first -> (B',f,8h,8w)
        x = getattr(self.scratch, 'refinenet4' + suffix)(rn[3], size=rn[2].shape[2:])
        for s in (2, 1, 0):
            x = getattr(self.scratch, f'refinenet{s + 1}{suffix}')(x, rn[s], size=rn[s - 1].shape[2:] if s else None)
        return x

    def forward(self, levels, H, W):
        """4 normalised levels (B,V,T,2C) -> depth, depth_conf (B,V,H,W), ray (B,V,8h,8w,6), ray_conf; fp32 as DA3."""
        (B, V, T, D), h, w, aspect, sc = levels[0].shape, H // PATCH, W // PATCH, W / H, self.scratch
        with torch.autocast(levels[0].device.type, enabled=False):
            rn = []
            for s, x in enumerate(levels):
                x = self.norm(x.float().reshape(B * V, T, D)).transpose(1, 2).reshape(B * V, D, h, w)
                x = self.resize_layers[s](add_uv(self.projects[s](x), aspect))
                rn.append(getattr(sc, f'layer{s + 1}_rn')(x))
            main = sc.output_conv1(self.fuse(rn, ''))
            main = F.interpolate(main, size=(h * PATCH, w * PATCH), mode='bilinear', align_corners=True)
            main = sc.output_conv2(add_uv(main, aspect)).unflatten(0, (B, V))  # (B,V,2,H,W)
            out = {'depth': main[:, :, 0].exp(), 'depth_conf': main[:, :, 1].exp() + 1}
            if not self.aux:
                return out
            aux = add_uv(sc.output_conv1_aux[3](self.fuse(rn, '_aux')), aspect)
            aux = sc.output_conv2_aux[3](aux).permute(0, 2, 3, 1).unflatten(0, (B, V))  # (B,V,8h,8w,7)
            return {**out, 'ray': aux[..., :6], 'ray_conf': aux[..., 6].exp() + 1}


class CameraDec(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t, self.fc_qvec = nn.Linear(dim, 3), nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, tok):  # last-level token 0 (B,V,2C) -> pose encoding (B,V,9) [t, quat xyzw, fov_h, fov_w]
        f = self.backbone(tok).float()
        return torch.cat([self.fc_t(f), self.fc_qvec(f), self.fc_fov(f)], -1)


def decode_pose(pose, H, W, eps=None):
    """Pose encoding (...,9) [t, quat xyzw, fov_h, fov_w] -> pose (...,4,4), centred pixel K; tan(fov/2) >= eps."""
    T = cameras.make_pose(cameras.quat_to_rotmat(pose[..., [6, 3, 4, 5]]), pose[..., :3])  # xyzw -> wxyz
    tan = torch.tan(pose[..., 7:9] / 2)
    tan = tan if eps is None else tan.clamp_min(eps)
    K = torch.zeros(*pose.shape[:-1], 3, 3, device=pose.device)
    K[..., 0, 0], K[..., 1, 1] = (W / 2) / tan[..., 1], (H / 2) / tan[..., 0]
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = W / 2, H / 2, 1.0
    return T, K
