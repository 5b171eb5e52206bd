"""Frozen Depth Anything 3 (DA3) encoder: the latent space of GLD (arXiv 2603.22275), its geometry head and statistics.

DA3 as depth_anything_3==0.1.1 builds it (same keys, outputs to float tolerance; the reference view keeps its place):
alternating DINOv2 ViT/14, RAW levels cat(local_x, x_L), `propagate` (GLD 4.3), DualDPT head, camera decoder, IRLS
`pose_from_rays` (no RANSAC). References (arXiv): DA3 2511.10647 (ByteDance-Seed/Depth-Anything-3), DINOv2 2304.07193,
DPT 2103.13413. Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w).
"""

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import cameras
import cli
import geometry_head
from constants import IMAGENET_MEAN, IMAGENET_STD, PATCH

IGNORED_PREFIXES = ('cam_enc.', 'gs_head.', 'gs_adapter.')  # official parts this module does not build


@dataclass
class EncoderConfig:
    name: str = 'custom'
    embed_dim: int = 768  # C (a level has 2C channels)
    depth: int = 12
    heads: int = 12  # head dim = C / heads (64 for every official size)
    swiglu: bool = False  # giant: SwiGLU FFN instead of the GELU MLP
    out_layers: tuple = (5, 7, 9, 11)  # blocks whose outputs are the 4 levels
    alt_start: int = 4  # camera token + local/global alternation from here
    qknorm_start: int = 4
    rope_start: int = 4
    features: int = 128  # DualDPT fusion width
    out_channels: tuple = (96, 192, 384, 768)
    pos_grid: int = 37  # pos_embed grid (518 / 14)
    objective: str = 'geometry'  # 'reconstruction': a linear pixel head instead (the DINO analogue)


PRESETS = {  # the official sizes' weights: model.safetensors of hub repos depth-anything/DA3-{SMALL,BASE,LARGE,GIANT}
    'da3-tiny': EncoderConfig('da3-tiny', 96, 10, 3, False, (3, 5, 7, 9), 2, 2, 2, 32, (16, 32, 64, 96)),
    'da3-small': EncoderConfig('da3-small', 384, 12, 6, False, (5, 7, 9, 11), 4, 4, 4, 64, (48, 96, 192, 384)),
    'da3-base': EncoderConfig('da3-base', 768, 12, 12, False, (5, 7, 9, 11), 4, 4, 4, 128, (96, 192, 384, 768)),
    'da3-large': EncoderConfig(
        'da3-large', 1024, 24, 16, False, (11, 15, 19, 23), 8, 8, 8, 256, (256, 512, 1024, 1024)
    ),
    'da3-giant': EncoderConfig(
        'da3-giant', 1536, 40, 24, True, (19, 27, 33, 39), 13, 13, 13, 256, (256, 512, 1024, 1024)
    ),
}
# The same ViT as da3-tiny trained for RGB reconstruction only: the latent of the DINO/RAE baseline in miniature.
PRESETS['da3-tiny-recon'] = replace(PRESETS['da3-tiny'], name='da3-tiny-recon', objective='reconstruction')


# ---- Backbone: DINOv2 ViT/14 with DA3's alternating attention --------------------------------
def rope_tables(pos, head_dim, base=100.0):
    """2D RoPE tables for positions pos (N,2)=(y,x) -> cos, sin (N, head_dim): a head's first half by y, second by x."""
    d = head_dim // 2
    inv_freq = base ** -(torch.arange(0, d, 2, device=pos.device).float() / d)  # (d/2,)
    ang = pos.float()[..., None] * inv_freq  # (N,2,d/2)
    ang = torch.cat([ang, ang], -1).flatten(-2)  # (N, head_dim)
    return ang.cos(), ang.sin()


def rope_positions(hw, n_special, device):
    """RoPE positions (y, x) of one view (n_special + T, 2): special tokens at (0,0), patches (y+1, x+1), row-major."""
    ys, xs = torch.meshgrid(torch.arange(hw[0], device=device), torch.arange(hw[1], device=device), indexing='ij')
    grid = torch.stack([ys, xs], -1).reshape(-1, 2) + 1  # (T,2)
    return torch.cat([torch.zeros(n_special, 2, dtype=torch.long, device=device), grid])


def apply_rope(x, cos, sin):
    """x (..., N, head_dim) laid out [y1, y2, x1, x2] -> x*cos + [-y2, y1, -x2, x1]*sin."""
    a, b = x.unflatten(-1, (2, 2, -1)).unbind(-2)
    return x * cos + torch.stack([-b, a], -2).flatten(-3) * sin


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # 4096 for the giant model
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        norm = (lambda: nn.LayerNorm(dim // heads, eps=1e-5)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x, rope=None):  # x (B', N, C)
        Bp, N, C = x.shape
        q, k, v = self.qkv(x).view(Bp, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B',heads,N,hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(Bp, N, C))


class Block(nn.Module):  # DINOv2's, with LayerScale
    def __init__(self, dim, heads, qk_norm, swiglu, eps=1e-6):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = (
            SwiGLU(dim, 4 * dim)
            if swiglu
            else nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        )
        self.ls1, self.ls2 = (nn.ParameterDict({'gamma': nn.Parameter(torch.ones(dim))}) for _ in range(2))

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope) * self.ls1.gamma
        return x + self.mlp(self.norm2(x)) * self.ls2.gamma


def select_reference_view(tok0):
    """DA3's 'saddle_balanced' choice: token 0 tok0 (B,V,C) -> (B,) the view most mid-range in 3 scores."""
    unit, V = F.normalize(tok0, dim=-1, eps=0.0), tok0.shape[1]
    sim = ((unit @ unit.transpose(1, 2)).sum(-1) - 1) / (V - 1)  # (B,V) mean cos to the others
    scores = 0
    for m in (sim, tok0.norm(dim=-1), unit.var(-1)):
        lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
        scores = scores + ((m - lo) / (hi - lo + 1e-8) - 0.5).abs()
    return scores.argmin(1)


def imagenet_normalize(images):
    mean, std = (images.new_tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images - mean) / std


def patch_tokens(vit, x, antialias=False):
    """Normalised x (N,3,H,W) -> [cls, patches] + positions (N,1+T,C) resized as DINOv2 (antialias: register models)."""
    (N, _, H, W), pos = x.shape, vit.pos_embed
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N,T,C)
    G, h, w = math.isqrt(pos.shape[1] - 1), H // PATCH, W // PATCH
    if not h == w == G:
        grid = pos[:, 1:].float().reshape(1, G, G, -1).permute(0, 3, 1, 2)
        size = dict(size=(h, w), antialias=True) if antialias else dict(scale_factor=((h + 0.1) / G, (w + 0.1) / G))
        grid = F.interpolate(grid, mode='bicubic', **size).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        pos = torch.cat([pos[:, :1].float(), grid], 1).to(pos.dtype)
    return torch.cat([vit.cls_token.expand(N, 1, -1), x], 1) + pos


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, C = cfg, cfg.embed_dim
        self.patch_embed = nn.ModuleDict({'proj': nn.Conv2d(3, C, PATCH, PATCH)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, C))  # [reference view, other views]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, C))
        self.blocks = nn.ModuleList(Block(C, cfg.heads, i >= cfg.qknorm_start, cfg.swiglu) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=1e-5)

    def run(self, x, start, hw, local_x=None, ref_view='first'):
        """Blocks start.. on the raw state x (B,V,1+T,C) -> raw levels (B,V,1+T,2C) at out layers >= start."""
        if ref_view not in ('first', 'saddle_balanced'):
            raise ValueError(f"ref_view must be 'first' or 'saddle_balanced', got {ref_view!r}")
        cfg, (B, V, N, C) = self.cfg, x.shape
        local = rope_positions(hw, 1, x.device)  # (1+T,2), token 0 at (0,0)
        glob = torch.cat([local[:1], torch.ones_like(local[1:])]).repeat(V, 1)  # (V(1+T),2), global patches at (1,1)
        local_rope, global_rope = (rope_tables(p, C // cfg.heads) for p in (local, glob))
        ref, levels = torch.zeros(B, dtype=torch.long, device=x.device), []
        for i in range(start, cfg.depth):
            if i == cfg.alt_start - 1 and V >= 3 and ref_view == 'saddle_balanced':
                ref = select_reference_view(x[:, :, 0])
            if i == cfg.alt_start:  # camera tokens replace token 0: [0] for the reference view, [1] for the others
                cam = self.camera_token[0, 1].expand(B, V, -1).clone()  # (B,V,C)
                cam[torch.arange(B, device=x.device), ref] = self.camera_token[0, 0]
                x = torch.cat([cam[:, :, None], x[:, :, 1:]], 2)
            if i >= cfg.alt_start and i % 2 == 1:  # global: one sequence of V(1+T) tokens per scene
                rope = global_rope if i >= cfg.rope_start else None
                x = self.blocks[i](x.reshape(B, V * N, C), rope).view(B, V, N, C)
            else:  # every view on its own
                rope = local_rope if i >= cfg.rope_start else None
                x = local_x = self.blocks[i](x.reshape(B * V, N, C), rope).view(B, V, N, C)
            if i in cfg.out_layers:
                levels.append(torch.cat([local_x, x], -1))
        return levels


# ---- The encoders ----------------------------------------------------------------------------
class LatentEncoder(nn.Module):
    """What the latent encoders share (the interface: latents.build_encoder's docstring)."""

    num_levels, has_geometry, can_propagate, has_rgb_decoder = 1, False, False, False

    def freeze(self):
        return self.eval().requires_grad_(False)

    def normalize_levels(self, levels):
        return list(levels)

    def first_view_cls(self, images, k):
        """GLD's propagation token(s): the special token(s) of level k of view 0 encoded alone -> (B,[n,]2C)."""
        return self.encode(images[:, :1], return_cls=True)[1][k][:, 0]

    def check_size(self, H, W):
        p = self.patch
        if H % p or W % p:
            raise ValueError(
                f'image size {H}x{W}: {self.cfg.name} needs sides that are multiples of {p}; resize or '
                f'crop to e.g. {H // p * p}x{W // p * p} or {round(H / p) * p}x{round(W / p) * p}'
            )

    def check_propagate(self, k, T, hw):
        if not 0 <= k < self.num_levels - 1:
            raise ValueError(f'propagate needs a level k in 0..{self.num_levels - 2}, got {k}')
        if T != hw[0] * hw[1]:
            raise ValueError(f'level has {T} tokens but hw={tuple(hw)} gives {hw[0] * hw[1]}')


class DA3(LatentEncoder):
    """DA3 (backbone + DualDPT head + camera decoder) with GLD's encode / propagate interface."""

    num_levels, has_geometry, can_propagate = 4, True, True

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dim, self.patch = cfg, 2 * cfg.embed_dim, PATCH
        self.backbone = nn.Module()
        self.backbone.pretrained = vit = ViT(cfg)
        if cfg.objective == 'reconstruction':  # all 4 levels of a token -> its 14x14 RGB patch (MAE's linear decoder)
            self.has_geometry, self.pixel_head = False, nn.Linear(4 * self.dim, 3 * PATCH * PATCH)
        else:
            self.head, self.cam_dec = (
                geometry_head.DualDPT(self.dim, cfg.features, cfg.out_channels),
                geometry_head.CameraDec(self.dim),
            )
        # Linear/conv torch defaults, LayerNorm 1/0, LayerScale 1 (DA3's init_values); tokens N(0, 0.02)
        for p in (vit.cls_token, vit.camera_token, vit.pos_embed):
            nn.init.normal_(p, std=0.02)

    def encode(self, images, ref_view='first', return_cls=False):
        """images (B,V,3,H,W) in [0,1] -> 4 raw levels (B,V,T,2C) [+ token 0 (B,V,2C)]; 'saddle_balanced': DA3's."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        vit = self.backbone.pretrained
        x = patch_tokens(vit, imagenet_normalize(images).flatten(0, 1).to(vit.pos_embed.dtype)).unflatten(0, (B, V))
        levels = vit.run(x, 0, (H // PATCH, W // PATCH), ref_view=ref_view)
        feats = [lv[:, :, 1:] for lv in levels]
        return (feats, [lv[:, :, 0] for lv in levels]) if return_cls else feats

    def propagate(self, level_k, k, cls, hw, return_cls=False):
        """Raw level k (B,V,T,2C), token 0 cls ((B,2C) broadcast, or encode's own (B,V,2C)) -> raw levels k+1..3."""
        (B, V, T, D), C = level_k.shape, self.cfg.embed_dim
        self.check_propagate(k, T, hw)
        cls = (cls[:, None] if cls.dim() == 2 else cls).expand(B, V, D)[:, :, None]  # (B,V,1,2C)
        local_x, x = torch.cat([cls, level_k], 2).split(C, -1)  # [local | global] halves of the raw state
        levels = self.backbone.pretrained.run(x, self.cfg.out_layers[k] + 1, hw, local_x)
        feats = [lv[:, :, 1:] for lv in levels]
        return (feats, [lv[:, :, 0] for lv in levels]) if return_cls else feats

    def normalize_levels(self, levels):
        """Raw levels (...,2C) -> DA3's exported form cat(local, final_norm(global)) (what heads read)."""
        C = self.cfg.embed_dim
        return [torch.cat([lv[..., :C], self.backbone.pretrained.norm(lv[..., C:])], -1) for lv in levels]

    def geometry(self, norm_levels, H, W, cls_last=None):
        """Normalised levels -> head outputs, c2w, K from the rays [+ cls_last's 'extrinsics' (w2c), 'intrinsics']."""
        out = self.head(norm_levels, H, W)
        out['c2w'], out['K'] = pose_from_rays(out['ray'], out['ray_conf'])
        if cls_last is not None:
            c2w, K = geometry_head.decode_pose(self.cam_dec(cls_last), H, W, eps=1e-6)
            out['extrinsics'], out['intrinsics'] = cameras.rigid_inverse(c2w)[..., :3, :], K
        return out

    def forward(self, images, ref_view='first'):
        H, W = images.shape[-2:]
        return self.head(self.normalize_levels(self.encode(images, ref_view)), H, W)

    def reconstruct(self, images):
        (B, V, _, H, W), p = images.shape, PATCH
        x = self.pixel_head(torch.cat(self.normalize_levels(self.encode(images)), -1))  # (B,V,T,3pp)
        x = x.view(B, V, H // p, W // p, 3, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # (B,V,3,h,p,w,p)
        return x.reshape(B, V, 3, H, W)

    def training_loss(self, batch):
        """train.py --stage encoder: geometry_loss (or, reconstruction objective, MSE) of a batch -> (loss, parts)."""
        if self.cfg.objective == 'reconstruction':
            mse = F.mse_loss(self.reconstruct(batch['images']), batch['images'])
            return mse, {'mse': mse.detach()}
        return geometry_loss(self(batch['images']), batch['depths'], batch['c2w'], batch['K'])


# ---- Geometry from the head's outputs --------------------------------------------------------
def pixel_grid(h, w, device, dtype=torch.float64):
    """Normalised pixel centres, homogeneous: [(x+0.5)/w, (y+0.5)/h, 1] -> (h,w,3)."""
    xy = cameras.pixel_centres(h, w, device=device, dtype=dtype)  # (h,w,2)
    return torch.cat([xy, torch.ones_like(xy[..., :1])], -1)


def pose_from_rays(ray, conf, iters=8):
    """ray (...,h,w,6) [world direction, origin], conf (...,h,w) -> c2w, K. d ~ A p = R K^-1 p: weighted DLT of d x A p
    = 0, IRLS weights conf / (1 + (e/median e)^2)^2 (chordal e), QR A = R U; centre: conf-weighted mean of origins."""
    *lead, h, w, _ = ray.shape
    d = F.normalize(ray[..., :3].double().flatten(-3, -2), dim=-1)  # (...,P,3) unit
    conf = conf.double().flatten(-2)  # (...,P)
    cond = torch.tensor([[3.0, 0.0, -1.5], [0.0, 3.0, -1.5], [0.0, 0.0, 1.0]], dtype=d.dtype, device=d.device)
    p = pixel_grid(h, w, d.device).reshape(-1, 3) @ cond.T  # (P,3) conditioned
    pp = (p[:, :, None] * p[:, None, :]).flatten(1)  # (P,9)
    dd = (d[..., :, None] * d[..., None, :]).flatten(-2)  # (...,P,9)
    eye, wgt = torch.eye(3, dtype=d.dtype, device=d.device), conf
    for _ in range(iters):
        # sum_i w_i |d_i x A p_i|^2 = vec(A)^T N vec(A), N[(r,c),(s,e)] = sum_i w_i (I - d d^T)_rs (p p^T)_ce
        wn = wgt / wgt.sum(-1, keepdim=True)
        N = eye[:, :, None, None] * (wn @ pp).unflatten(-1, (3, 3))[..., None, None, :, :] - (
            (dd * wn[..., None]).transpose(-1, -2) @ pp
        ).unflatten(-1, (3, 3)).unflatten(-3, (3, 3))
        A = torch.linalg.eigh(N.transpose(-3, -2).reshape(*lead, 9, 9))[1][..., 0].unflatten(-1, (3, 3))
        Ap = torch.einsum('...ij,pj->...pi', A, p)
        A, Ap = (t * (wgt * (d * Ap).sum(-1)).sum(-1).sign()[..., None, None] for t in (A, Ap))
        err = (d - F.normalize(Ap, dim=-1)).norm(dim=-1)  # (...,P)
        wgt = conf / (1 + (err / err.median(-1, keepdim=True).values.clamp_min(1e-12)) ** 2) ** 2
    R, U = torch.linalg.qr(A @ cond)  # A for unconditioned p
    s = torch.diagonal(U, dim1=-2, dim2=-1).sign()
    R, K = R * s[..., None, :], torch.linalg.inv(s[..., :, None] * U)
    K = K / K[..., 2:, 2:]
    centre = (conf[..., None] * ray[..., 3:].double().flatten(-3, -2)).sum(-2) / conf.sum(-1)[..., None]
    return cameras.make_pose(R, centre).to(ray.dtype), K.to(ray.dtype)


def rays_from_cameras(c2w, K, h, w):
    """c2w (...,3|4,4), normalised K (...,3,3) -> DA3-style ray map (...,h,w,6): [R K^-1 [u,v,1], centre]."""
    dirs = torch.einsum('...ij,hwj->...hwi', c2w[..., :3, :3] @ K.inverse(), pixel_grid(h, w, K.device, K.dtype))
    return torch.cat([dirs, c2w[..., None, None, :3, 3].expand_as(dirs)], -1)


def depth_to_points(depth, c2w, K):
    """depth (...,H,W), c2w (...,4,4), normalised K (...,3,3) -> world points (...,H,W,3)."""
    pix = pixel_grid(*depth.shape[-2:], depth.device, depth.dtype)
    cam = torch.einsum('...ij,hwj->...hwi', torch.linalg.inv(K), pix) * depth[..., None]
    return torch.einsum('...ij,...hwj->...hwi', c2w[..., :3, :3], cam) + c2w[..., None, None, :3, 3]


# ---- Weights ---------------------------------------------------------------------------------
def read_tensors(path, what, fix):
    """A .safetensors or torch file of tensors -> dict; an unreadable file is a UserError naming it, with `fix`."""
    path = str(path)
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise cli.UserError(f'{path}: not a readable {what} file ({cli.first_line(e)}); {fix}') from None


def read_state_dict(weights, strip=r'^(module\.|model\.)+'):
    """A weights file or a state dict -> {key: tensor}, {'state_dict'|'model': ...} unwrapped, `strip` removed."""
    sd = (
        dict(weights)
        if isinstance(weights, dict)
        else read_tensors(weights, 'weights', 'download it again or pass another --encoder-weights')
    )
    for key in ('state_dict', 'model'):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {re.sub(strip, '', k): v for k, v in sd.items()}


def read_da3_state_dict(weights):
    """File(s) in the hub, DA3Net or bare sub-module layout (GLD's release) -> one state dict with DA3Net keys."""
    sd = {}
    for path in [weights] if isinstance(weights, (str, os.PathLike)) else weights:
        part = read_state_dict(str(path))
        if not any(k.startswith(('backbone.', 'head.', 'cam_dec.', 'cam_enc.')) for k in part):
            prefix = (
                'head.'
                if any(k.startswith('scratch.') for k in part)
                else 'backbone.'
                if any(k.startswith('pretrained.') for k in part)
                else 'backbone.pretrained.'
            )
            part = {prefix + k: v for k, v in part.items()}
        sd.update(part)
    return sd


def skip_keys(sd, prefixes, who, why):
    if n := sum(k.startswith(prefixes) for k in sd):
        print(f'{who}: ignoring {n} {"/".join(p + "*" for p in prefixes)} tensors ({why})')
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def key_diff(expected, sd, n=12):
    """'' if sd has expected's keys and shapes, else a readable listing of the differences (n names per group)."""
    groups = {
        'missing': [k for k in expected if k not in sd],
        'unexpected': [k for k in sd if k not in expected],
        'shape mismatches': [
            f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
            for k, v in expected.items()
            if k in sd and sd[k].shape != v.shape
        ],
    }
    if not any(groups.values()):
        return ''
    return ''.join(
        f'\n  {title} ({len(items)}):'
        + ''.join(f'\n    {i}' for i in items[:n])
        + (f'\n    ... ({len(items) - n} more)' if len(items) > n else '')
        for title, items in groups.items()
    )


def load_strict(module, sd, name):
    """Load sd into module after a strict key and shape check (a readable diff on mismatch); meta tensors assign."""
    if diff := key_diff(module.state_dict(), sd):
        raise ValueError(f'checkpoint does not fit encoder {name!r}:' + diff)
    module.load_state_dict(sd, assign=any(v.is_meta for v in sd.values()))
    return module


def load_weights(enc, weights, source=None):
    """Official weights (file(s) or a state dict) into enc; a mismatch: UserError naming the preset, or a key diff."""
    if not isinstance(weights, dict):
        source = weights if isinstance(weights, (str, os.PathLike)) else ', '.join(map(str, weights))
    sd = dict(weights) if isinstance(weights, dict) else read_da3_state_dict(weights)
    sd = skip_keys(sd, IGNORED_PREFIXES, 'encoder', 'camera conditioning / Gaussian heads are not built here')
    own, groups = enc.state_dict(), {}
    for k, v in own.items():  # safetensors keeps one name of a tensor shared (DA3's aux-head LayerNorm)
        groups.setdefault(v.data_ptr(), []).append(k)
    for group in groups.values():  # restore the others
        for k in group:
            sd.setdefault(k, next((sd[a] for a in group if a in sd), None))
    sd = {k: v for k, v in sd.items() if v is not None}
    no_cam_dec = hasattr(enc, 'cam_dec') and not any(k.startswith('cam_dec.') for k in sd)
    if no_cam_dec:
        own = {k: v for k, v in own.items() if not k.startswith('cam_dec.')}
    if diff := key_diff(own, sd):
        with torch.device('meta'):
            others = [n for n, cfg in PRESETS.items() if n != enc.cfg.name and not key_diff(DA3(cfg).state_dict(), sd)]
        if others:
            raise cli.UserError(
                f'{source or "checkpoint"}: the weights match preset {others[0]!r}, not '
                f'{enc.cfg.name!r}: pass --encoder {others[0]} (latents.build_encoder({others[0]!r}) '
                'in Python)'
            )
        raise cli.UserError(
            f'{source or "checkpoint"}: does not fit encoder {enc.cfg.name!r}; pass the --encoder '
            'preset the weights were made for:' + diff
        )
    if no_cam_dec:
        print(
            'encoder: the checkpoint has no cam_dec: its extrinsics/intrinsics stay random '
            '(poses from rays in geometry() are unaffected)'
        )
    enc.load_state_dict(sd, strict=False)
    return enc


# ---- Latent statistics (GLD normalises each level per channel) -------------------------------
class LatentStats:
    """Per-level, per-channel mean and variance: normalize(x, l) = (x - mean) / sqrt(var + 1e-5)."""

    eps = 1e-5

    def __init__(self, mean, var):  # dicts level -> (2C,)
        self.mean, self.var = ({int(l): t.float().flatten() for l, t in d.items()} for d in (mean, var))

    def normalize(self, x, level):  # x (...,2C)
        return (x - self.mean[level].to(x)) / torch.sqrt(self.var[level].to(x) + self.eps)

    def denormalize(self, z, level):
        return z * torch.sqrt(self.var[level].to(z) + self.eps) + self.mean[level].to(z)

    def state_dict(self):
        return {**{f'mean{l}': m for l, m in self.mean.items()}, **{f'var{l}': v for l, v in self.var.items()}}

    def save(self, path):
        sd = {k: v.contiguous() for k, v in self.state_dict().items()}
        if str(path).endswith('.safetensors'):
            from safetensors.torch import save_file

            return save_file(sd, str(path))
        torch.save(sd, path)

    @classmethod
    def load(cls, path):
        fix = 'pass --stats a file written by LatentStats.save, or leave it out to compute them'
        return cls.from_state_dict(read_tensors(path, 'statistics', fix))

    @classmethod
    def from_state_dict(cls, sd):
        levels = [int(k[4:]) for k in sd if k.startswith('mean')]
        return cls({l: sd[f'mean{l}'] for l in levels}, {l: sd[f'var{l}'] for l in levels})


@torch.no_grad()
def compute_latent_stats(enc, image_batches, levels=(0, 1)):
    """Batches (images (B,V,3,H,W) or dicts with 'images') -> LatentStats of enc.encode (float64, DDP all-reduced)."""
    device = next(enc.parameters()).device
    sums, count = 0, torch.zeros((), dtype=torch.float64, device=device)
    for batch in image_batches:
        images = batch['images'] if isinstance(batch, dict) else batch
        feats = enc.encode(images.to(device))
        rows = [feats[l].double().flatten(0, -2) for l in levels]  # each (BVT,2C)
        sums = sums + torch.stack([torch.stack([r.sum(0), (r * r).sum(0)]) for r in rows])  # (L,2,2C)
        count += rows[0].shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(count)
    mean = sums[:, 0] / count
    var = (sums[:, 1] / count - mean**2).clamp_min(0)
    return LatentStats(*({l: t[i].cpu() for i, l in enumerate(levels)} for t in (mean, var)))


# ---- Training loss for the tiny encoder (DA3-style) ------------------------------------------
def geometry_loss(out, depths_gt, c2w_gt, K_gt, alpha=0.2, grad_weight=1.0):
    """out = enc(images), depths_gt (B,V,H,W) (<= 0: invalid), c2w_gt, K_gt -> (loss, parts); GT in view 0's frame at
    its mean valid depth. c |d - d*| - alpha log c on valid pixels (+ grad_weight x L1 of its gradient), rays alike."""
    valid = depths_gt > 0
    scale = ((depths_gt[:, 0] * valid[:, 0]).flatten(1).sum(1) / valid[:, 0].flatten(1).sum(1).clamp_min(1))[
        :, None, None, None
    ].clamp_min(1e-6)  # (B,1,1,1)
    depth = depths_gt / scale
    rel = torch.linalg.inv(c2w_gt[:, :1]) @ c2w_gt  # (B,V,4,4) in view 0's frame
    R, centre = rel[..., :3, :3], rel[..., :3, 3] / scale[..., 0]
    conf, err, n = out['depth_conf'], (out['depth'] - depth).abs(), valid.sum().clamp_min(1)
    parts = {'depth': ((conf * err - alpha * conf.log()) * valid).sum() / n}
    if grad_weight:
        diff = (out['depth'] - depth) * valid
        gx = (diff[..., :, 1:] - diff[..., :, :-1]).abs() * (valid[..., :, 1:] & valid[..., :, :-1])
        gy = (diff[..., 1:, :] - diff[..., :-1, :]).abs() * (valid[..., 1:, :] & valid[..., :-1, :])
        parts['grad'] = grad_weight * (gx.sum() + gy.sum()) / n
    ray_gt = rays_from_cameras(torch.cat([R, centre[..., None]], -1), K_gt, *out['ray'].shape[-3:-1])
    parts['ray'] = (out['ray_conf'] * (out['ray'] - ray_gt).abs().sum(-1) - alpha * out['ray_conf'].log()).mean()
    return sum(parts.values()), parts
