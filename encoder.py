"""Frozen Depth Anything 3 (DA3) encoder: GLD's latent space (arXiv 2603.22275), with geometry.

DA3 as depth_anything_3==0.1.1 builds it (same keys, outputs to float tolerance; the reference view
keeps its place): alternating DINOv2 ViT/14, RAW levels cat(local_x, x_L), `propagate` (GLD 4.3),
the DualDPT head and camera decoder (geometry_head.py), IRLS `pose_from_rays` (no RANSAC).
References (arXiv): DA3 2511.10647 (ByteDance-Seed/Depth-Anything-3), DINOv2 2304.07193,
DPT 2103.13413.
Shape legend: B batch, V views, H W image, h w token grid (h = H/14), C channels, T tokens (h*w),
N = 1 + T tokens of a view in the backbone (token 0 first).
"""

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import cameras
import cli
import geometry_head
from constants import IMAGENET_MEAN, IMAGENET_STD, PATCH

# official parts this module does not build
IGNORED_PREFIXES = ('cam_enc.', 'gs_head.', 'gs_adapter.')


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


# The official sizes' weights: model.safetensors of hub repos depth-anything/DA3-{SMALL,BASE,LARGE,
# GIANT}; DA3-BASE's configuration is the defaults.
PRESETS = {
    'da3-tiny': EncoderConfig(
        'da3-tiny',
        embed_dim=96,
        depth=10,
        heads=3,
        out_layers=(3, 5, 7, 9),
        alt_start=2,
        qknorm_start=2,
        rope_start=2,
        features=32,
        out_channels=(16, 32, 64, 96),
    ),
    'da3-small': EncoderConfig(
        'da3-small',
        embed_dim=384,
        heads=6,
        features=64,
        out_channels=(48, 96, 192, 384),
    ),
    'da3-base': EncoderConfig('da3-base'),
    'da3-large': EncoderConfig(
        'da3-large',
        embed_dim=1024,
        depth=24,
        heads=16,
        out_layers=(11, 15, 19, 23),
        alt_start=8,
        qknorm_start=8,
        rope_start=8,
        features=256,
        out_channels=(256, 512, 1024, 1024),
    ),
    'da3-giant': EncoderConfig(
        'da3-giant',
        embed_dim=1536,
        depth=40,
        heads=24,
        swiglu=True,
        out_layers=(19, 27, 33, 39),
        alt_start=13,
        qknorm_start=13,
        rope_start=13,
        features=256,
        out_channels=(256, 512, 1024, 1024),
    ),
}
# The same ViT as da3-tiny trained for RGB reconstruction only: the DINO/RAE baseline in miniature.
PRESETS['da3-tiny-recon'] = replace(
    PRESETS['da3-tiny'],
    name='da3-tiny-recon',
    objective='reconstruction',
)


# ---- Backbone: DINOv2 ViT/14 with DA3's alternating attention --------------------------------
def rope_tables(pos, head_dim, base=100.0):
    """2D RoPE tables of positions pos (N,2)=(y,x) -> cos, sin (N, head_dim): y first, then x."""
    d = head_dim // 2
    exponents = torch.arange(0, d, 2, device=pos.device).float() / d
    inv_freq = base**-exponents  # (d/2,)
    angles = pos.float()[..., None] * inv_freq  # (N,2,d/2)
    angles = torch.cat([angles, angles], -1)  # (N,2,d)
    angles = rearrange(angles, 'n yx d -> n (yx d)')
    return angles.cos(), angles.sin()


def rope_positions(hw, n_special, device):
    """RoPE positions (y, x) of a view (n_special + T, 2): special tokens at (0,0), then the
    patches, row-major, at (y+1, x+1)."""
    h, w = hw
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1)
    patches = rearrange(grid, 'h w yx -> (h w) yx') + 1
    special = torch.zeros(n_special, 2, dtype=torch.long, device=device)
    return torch.cat([special, patches])


def apply_rope(x, cos, sin):
    """x (..., N, head_dim) laid out [y1, y2, x1, x2] -> x*cos + [-y2, y1, -x2, x1]*sin."""
    halves = rearrange(x, '... (yx half d) -> ... yx half d', yx=2, half=2)
    first, second = halves.unbind(-2)  # [y1, x1], [y2, x2]
    rotated = torch.stack([-second, first], -2)
    rotated = rearrange(rotated, '... yx half d -> ... (yx half d)')
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # 4096 for the giant model
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim // heads, eps=1e-5)
            self.k_norm = nn.LayerNorm(dim // heads, eps=1e-5)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()

    def forward(self, x, rope=None):
        """x (B', N, C) with rope = (cos, sin) tables or None -> (B', N, C)."""
        qkv = self.qkv(x)
        q, k, v = rearrange(qkv, 'b n (qkv heads d) -> qkv b heads n d', qkv=3, heads=self.heads)
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, 'b heads n d -> b n (heads d)'))


class Block(nn.Module):  # DINOv2's, with LayerScale
    def __init__(self, dim, heads, qk_norm, swiglu, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm)
        if swiglu:
            self.mlp = SwiGLU(dim, 4 * dim)
        else:
            fc1 = nn.Linear(dim, 4 * dim)
            fc2 = nn.Linear(4 * dim, dim)
            self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(), fc2=fc2))
        self.ls1 = nn.ParameterDict({'gamma': nn.Parameter(torch.ones(dim))})
        self.ls2 = nn.ParameterDict({'gamma': nn.Parameter(torch.ones(dim))})

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope) * self.ls1.gamma
        return x + self.mlp(self.norm2(x)) * self.ls2.gamma


def select_reference_view(tok0):
    """DA3's 'saddle_balanced' choice: token 0 tok0 (B,V,C) -> (B,) the most mid-range view."""
    unit = F.normalize(tok0, dim=-1, eps=0.0)
    V = tok0.shape[1]
    cos = unit @ unit.transpose(1, 2)  # (B,V,V)
    mean_cos = (cos.sum(-1) - 1) / (V - 1)  # (B,V) to the other views
    norms = tok0.norm(dim=-1)
    spread = unit.var(-1)
    scores = 0
    for metric in (mean_cos, norms, spread):
        lo = metric.min(1, keepdim=True).values
        hi = metric.max(1, keepdim=True).values
        scaled = (metric - lo) / (hi - lo + 1e-8)  # in [0, 1] over the views
        scores = scores + (scaled - 0.5).abs()
    return scores.argmin(1)


def imagenet_normalize(images):
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


def patch_tokens(vit, x, antialias=False):
    """Normalised x (N',3,H,W) -> [cls, patches] + positions (N',1+T,C), the position grid resized
    as DINOv2 does (antialias: the register models)."""
    n_images, _, H, W = x.shape
    patches = rearrange(vit.patch_embed.proj(x), 'n c h w -> n (h w) c')
    pos = vit.pos_embed  # (1,1+G*G,C)
    G = math.isqrt(pos.shape[1] - 1)
    h = H // PATCH
    w = W // PATCH
    if not h == w == G:
        grid = rearrange(pos[:, 1:].float(), 'b (gh gw) c -> b c gh gw', gh=G)  # b = 1
        if antialias:
            grid = F.interpolate(grid, mode='bicubic', size=(h, w), antialias=True)
        else:
            scale_factor = ((h + 0.1) / G, (w + 0.1) / G)
            grid = F.interpolate(grid, mode='bicubic', scale_factor=scale_factor)
        grid = rearrange(grid, 'b c h w -> b (h w) c')
        cls_pos = pos[:, :1].float()
        pos = torch.cat([cls_pos, grid], 1).to(pos.dtype)
    cls = vit.cls_token.expand(n_images, 1, -1)
    return torch.cat([cls, patches], 1) + pos


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.embed_dim
        self.cfg = cfg
        self.patch_embed = nn.ModuleDict({'proj': nn.Conv2d(3, C, PATCH, PATCH)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, C))  # [reference view, other views]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, C))
        blocks = (Block(C, cfg.heads, i >= cfg.qknorm_start, cfg.swiglu) for i in range(cfg.depth))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(C, eps=1e-5)

    def insert_camera_tokens(self, x, ref):
        """x (B,V,N,C) -> camera tokens as token 0: [0] for the views ref (B,), [1] for others."""
        B, V, _, _ = x.shape
        cam = self.camera_token[0, 1].expand(B, V, -1).clone()  # (B,V,C)
        batch = torch.arange(B, device=x.device)
        cam[batch, ref] = self.camera_token[0, 0]
        return torch.cat([cam[:, :, None], x[:, :, 1:]], 2)

    def run(self, x, start, hw, local_x=None, ref_view='first'):
        """Blocks start.. on the raw state x (B,V,N,C) -> raw levels (B,V,N,2C) (out layers)."""
        if ref_view not in ('first', 'saddle_balanced'):
            raise ValueError(f"ref_view must be 'first' or 'saddle_balanced', got {ref_view!r}")
        cfg = self.cfg
        B, V, N, C = x.shape
        local_pos = rope_positions(hw, 1, x.device)  # (N,2), token 0 at (0,0)
        # the global blocks keep token 0 at (0,0) and put every patch at (1,1)
        patch_pos = torch.ones_like(local_pos[1:])
        global_pos = torch.cat([local_pos[:1], patch_pos]).repeat(V, 1)  # (V*N,2)
        local_rope = rope_tables(local_pos, C // cfg.heads)
        global_rope = rope_tables(global_pos, C // cfg.heads)
        ref = torch.zeros(B, dtype=torch.long, device=x.device)
        choose_ref = V >= 3 and ref_view == 'saddle_balanced'
        levels = []
        for i in range(start, cfg.depth):
            if i == cfg.alt_start - 1 and choose_ref:
                ref = select_reference_view(x[:, :, 0])
            if i == cfg.alt_start:
                x = self.insert_camera_tokens(x, ref)
            if i >= cfg.alt_start and i % 2 == 1:  # global attention: one sequence per scene
                rope = global_rope if i >= cfg.rope_start else None
                x = rearrange(x, 'b v n c -> b (v n) c')
                x = self.blocks[i](x, rope)
                x = rearrange(x, 'b (v n) c -> b v n c', v=V)
            else:  # per-view attention: every view on its own
                rope = local_rope if i >= cfg.rope_start else None
                x = rearrange(x, 'b v n c -> (b v) n c')
                x = self.blocks[i](x, rope)
                x = rearrange(x, '(b v) n c -> b v n c', b=B)
                local_x = x
            if i in cfg.out_layers:
                levels.append(torch.cat([local_x, x], -1))
        return levels


# ---- The encoders ----------------------------------------------------------------------------
class LatentEncoder(nn.Module):
    """What the latent encoders share (the interface: latents.build_encoder's docstring)."""

    num_levels = 1
    has_geometry = False
    can_propagate = False
    has_rgb_decoder = False
    special = 0  # special tokens leading each level (VGGT: 5, diffused with the patches)

    def freeze(self):
        return self.eval().requires_grad_(False)

    def normalize_levels(self, levels):
        return list(levels)

    def first_view_cls(self, images, k):
        """GLD's propagation token(s): level k's special token(s) of view 0 alone -> (B,[n,]2C)."""
        _, special = self.encode(images[:, :1], return_cls=True)
        return special[k][:, 0]

    def check_size(self, H, W):
        p = self.patch
        if H % p or W % p:
            raise ValueError(
                f'image size {H}x{W}: {self.cfg.name} needs sides that are multiples of {p}; '
                f'resize or crop to e.g. {H // p * p}x{W // p * p} or '
                f'{round(H / p) * p}x{round(W / p) * p}'
            )

    def check_propagate(self, k, T, hw):
        if not 0 <= k < self.num_levels - 1:
            raise ValueError(f'propagate needs a level k in 0..{self.num_levels - 2}, got {k}')
        if T != hw[0] * hw[1]:
            raise ValueError(f'level has {T} tokens but hw={tuple(hw)} gives {hw[0] * hw[1]}')


class DA3(LatentEncoder):
    """DA3 (backbone + DualDPT head + camera decoder) with GLD's encode / propagate interface."""

    num_levels = 4
    has_geometry = True
    can_propagate = True

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dim = 2 * cfg.embed_dim
        self.patch = PATCH
        vit = ViT(cfg)
        self.backbone = nn.Module()
        self.backbone.pretrained = vit
        if cfg.objective == 'reconstruction':
            self.has_geometry = False
            # all 4 levels of a token -> its 14x14 RGB patch (MAE's linear decoder)
            self.pixel_head = nn.Linear(4 * self.dim, 3 * PATCH * PATCH)
        else:
            self.head = geometry_head.DualDPT(self.dim, cfg.features, cfg.out_channels)
            self.cam_dec = geometry_head.CameraDec(self.dim)
        # Linear/conv: torch defaults; LayerNorm 1/0; LayerScale 1 (DA3's init_values);
        # the tokens N(0, 0.02)
        for token in (vit.cls_token, vit.camera_token, vit.pos_embed):
            nn.init.normal_(token, std=0.02)

    def encode(self, images, ref_view='first', return_cls=False):
        """images (B,V,3,H,W) in [0,1] -> 4 raw levels (B,V,T,2C) [+ token 0 (B,V,2C)];
        ref_view='saddle_balanced': DA3's choice of the reference view."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        vit = self.backbone.pretrained
        x = rearrange(imagenet_normalize(images), 'b v c h w -> (b v) c h w')
        x = patch_tokens(vit, x.to(vit.pos_embed.dtype))
        x = rearrange(x, '(b v) n c -> b v n c', b=B)
        hw = (H // PATCH, W // PATCH)
        levels = vit.run(x, 0, hw, ref_view=ref_view)
        return self.split_token0(levels, return_cls)

    def split_token0(self, levels, return_cls):
        """Raw levels (B,V,N,2C) -> patch tokens (B,V,T,2C) [+ token 0 (B,V,2C)]."""
        feats = [level[:, :, 1:] for level in levels]
        if not return_cls:
            return feats
        return feats, [level[:, :, 0] for level in levels]

    def propagate(self, level_k, k, cls, hw, return_cls=False):
        """Raw level k (B,V,T,2C), token 0 cls ((B,2C) for every view, or encode's own (B,V,2C)) ->
        raw levels k+1..3."""
        B, V, T, D = level_k.shape
        self.check_propagate(k, T, hw)
        if cls.dim() == 2:  # one token for every view
            cls = cls[:, None]
        cls = cls.expand(B, V, D)[:, :, None]  # (B,V,1,2C)
        state = torch.cat([cls, level_k], 2)  # (B,V,N,2C)
        local_x, x = state.split(self.cfg.embed_dim, -1)  # [local | global] halves
        start = self.cfg.out_layers[k] + 1  # the block after level k's
        levels = self.backbone.pretrained.run(x, start, hw, local_x)
        return self.split_token0(levels, return_cls)

    def normalize_levels(self, levels):
        """Raw levels (...,2C) -> DA3's exported form cat(local, final_norm(global)) for heads."""
        C = self.cfg.embed_dim
        final_norm = self.backbone.pretrained.norm
        normalized = []
        for level in levels:
            local_half = level[..., :C]
            global_half = final_norm(level[..., C:])
            normalized.append(torch.cat([local_half, global_half], -1))
        return normalized

    def geometry(self, norm_levels, H, W, cls_last=None):
        """Normalised levels -> head outputs, c2w, K from the rays [+ cls_last's 'extrinsics' (w2c)
        and 'intrinsics']."""
        out = self.head(norm_levels, H, W)
        out['c2w'], out['K'] = pose_from_rays(out['ray'], out['ray_conf'])
        if cls_last is not None:
            pose_encoding = self.cam_dec(cls_last)  # (B,V,9)
            c2w, K = geometry_head.decode_pose(pose_encoding, H, W, eps=1e-6)
            out['extrinsics'] = cameras.rigid_inverse(c2w)[..., :3, :]
            out['intrinsics'] = K
        return out

    def forward(self, images, ref_view='first'):
        H, W = images.shape[-2:]
        levels = self.normalize_levels(self.encode(images, ref_view))
        return self.head(levels, H, W)

    def reconstruct(self, images):
        H = images.shape[-2]
        levels = self.normalize_levels(self.encode(images))
        patches = self.pixel_head(torch.cat(levels, -1))  # (B,V,T,3*14*14)
        pattern = 'b v (h w) (c ph pw) -> b v c (h ph) (w pw)'
        return rearrange(patches, pattern, h=H // PATCH, c=3, ph=PATCH, pw=PATCH)

    def training_loss(self, batch, generator=None):
        """train.py --stage encoder: a batch -> (loss, parts): geometry_loss, or pixel MSE (both draw no random
        numbers: generator, the run's stream, is not used)."""
        if self.cfg.objective == 'reconstruction':
            mse = F.mse_loss(self.reconstruct(batch['images']), batch['images'])
            return mse, {'mse': mse.detach()}
        out = self(batch['images'])
        return geometry_loss(out, batch['depths'], batch['c2w'], batch['K'])


# ---- Geometry from the head's outputs --------------------------------------------------------
def pose_from_rays(ray, conf, iters=8):
    """ray (...,h,w,6) [world direction, origin], conf (...,h,w) -> c2w, K. d ~ A p = R K^-1 p:
    weighted DLT of d x A p = 0, IRLS weights conf / (1 + (e/median e)^2)^2 (chordal e), QR A = R U;
    centre: the conf-weighted mean of the origins. P = h*w pixels."""
    *lead, h, w, _ = ray.shape
    directions = rearrange(ray[..., :3].double(), '... h w c -> ... (h w) c')
    d = F.normalize(directions, dim=-1)  # (...,P,3)
    conf = rearrange(conf.double(), '... h w -> ... (h w)')
    # pixels conditioned to [-1.5, 1.5]; cond is undone after the solve
    cond = torch.tensor(
        [
            [3.0, 0.0, -1.5],
            [0.0, 3.0, -1.5],
            [0.0, 0.0, 1.0],
        ],
        dtype=d.dtype,
        device=d.device,
    )
    pixels = rearrange(cameras.pixel_grid(h, w, d.device), 'h w c -> (h w) c')
    p = pixels @ cond.T  # (P,3)
    pp = p[:, :, None] * p[:, None, :]  # (P,3,3) outer products
    pp = rearrange(pp, 'p i j -> p (i j)')
    dd = d[..., :, None] * d[..., None, :]  # (...,P,3,3)
    dd = rearrange(dd, '... p i j -> ... p (i j)')
    eye = torch.eye(3, dtype=d.dtype, device=d.device)
    wgt = conf
    for _ in range(iters):
        # sum_i w_i |d_i x A p_i|^2 = vec(A)^T N vec(A),
        # N[(r,c),(s,e)] = sum_i w_i (I - d d^T)_rs (p p^T)_ce
        wn = wgt / wgt.sum(-1, keepdim=True)
        w_pp = (wn @ pp).unflatten(-1, (3, 3))  # (...,3,3)
        w_dd_pp = (dd * wn[..., None]).transpose(-1, -2) @ pp  # (...,9,9)
        w_dd_pp = rearrange(w_dd_pp, '... (r s) (c e) -> ... r s c e', r=3, c=3)
        identity_pp = eye[:, :, None, None] * w_pp[..., None, None, :, :]  # (...,r,s,c,e)
        N = identity_pp - w_dd_pp
        N = rearrange(N, '... r s c e -> ... (r c) (s e)')
        eigenvectors = torch.linalg.eigh(N)[1]  # columns, by ascending eigenvalue
        A = eigenvectors[..., 0].unflatten(-1, (3, 3))
        Ap = torch.einsum('...ij,pj->...pi', A, p)
        # the sign that points A p along d
        agreement = (wgt * (d * Ap).sum(-1)).sum(-1)
        sign = agreement.sign()[..., None, None]
        A = A * sign
        Ap = Ap * sign
        predicted = F.normalize(Ap, dim=-1)
        err = (d - predicted).norm(dim=-1)  # (...,P)
        median = err.median(-1, keepdim=True).values.clamp_min(1e-12)
        wgt = conf / (1 + (err / median) ** 2) ** 2
    Q, U = torch.linalg.qr(A @ cond)  # A for unconditioned p
    signs = torch.diagonal(U, dim1=-2, dim2=-1).sign()  # a positive diagonal for K
    R = Q * signs[..., None, :]
    K = torch.linalg.inv(signs[..., :, None] * U)
    K = K / K[..., 2:, 2:]
    origins = rearrange(ray[..., 3:].double(), '... h w c -> ... (h w) c')
    weighted_sum = (conf[..., None] * origins).sum(-2)
    centre = weighted_sum / conf.sum(-1)[..., None]
    c2w = cameras.make_pose(R, centre)
    return c2w.to(ray.dtype), K.to(ray.dtype)


def rays_from_cameras(c2w, K, h, w):
    """c2w (...,3|4,4), normalised K (...,3,3) -> DA3's ray map (...,h,w,6) [R K^-1 [u,v,1], c]."""
    pix = cameras.pixel_grid(h, w, K.device, K.dtype)
    pixel_to_world = c2w[..., :3, :3] @ K.inverse()
    dirs = torch.einsum('...ij,hwj->...hwi', pixel_to_world, pix)
    centres = c2w[..., None, None, :3, 3].expand_as(dirs)
    return torch.cat([dirs, centres], -1)


# ---- Weights ---------------------------------------------------------------------------------
def read_tensors(path, what, fix):
    """A .safetensors or torch file of tensors -> dict; unreadable: a UserError naming it, `fix`."""
    path = str(path)
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = cli.first_line(e)
        raise cli.UserError(f'{path}: not a readable {what} file ({reason}); {fix}') from None


def read_state_dict(weights, strip=r'^(module\.|model\.)+'):
    """A weights file or a state dict -> {key: tensor}; {'state_dict'|'model': ...} unwrapped,
    `strip` removed from the keys."""
    if isinstance(weights, dict):
        sd = dict(weights)
    else:
        sd = read_tensors(weights, 'weights', 'download it again or pass another --encoder-weights')
    for key in ('state_dict', 'model'):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {re.sub(strip, '', k): v for k, v in sd.items()}


def da3_prefix(sd):
    """The prefix that gives sd DA3Net's keys: '' for the hub / DA3Net layout, else its module's."""
    if any(k.startswith(('backbone.', 'head.', 'cam_dec.', 'cam_enc.')) for k in sd):
        return ''
    if any(k.startswith('scratch.') for k in sd):
        return 'head.'
    if any(k.startswith('pretrained.') for k in sd):
        return 'backbone.'
    return 'backbone.pretrained.'


def read_da3_state_dict(weights):
    """File(s) in the hub, DA3Net or bare sub-module layout (GLD's release) -> a DA3Net state
    dict."""
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else weights
    sd = {}
    for path in paths:
        part = read_state_dict(str(path))
        prefix = da3_prefix(part)
        sd.update({prefix + k: v for k, v in part.items()})
    return sd


def skip_keys(sd, prefixes, who, why):
    """sd without the keys under prefixes; a note says how many were dropped and why."""
    n_skipped = sum(k.startswith(prefixes) for k in sd)
    if n_skipped:
        print(f'{who}: ignoring {n_skipped} {"/".join(p + "*" for p in prefixes)} tensors ({why})')
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def key_diff(expected, sd, n=12):
    """'' if sd has expected's keys and shapes, else a listing of the differences (n per group)."""
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
    listing = ''
    for title, items in groups.items():
        listing += f'\n  {title} ({len(items)}):'
        listing += ''.join(f'\n    {item}' for item in items[:n])
        if len(items) > n:
            listing += f'\n    ... ({len(items) - n} more)'
    return listing


def load_strict(module, sd, name):
    """sd into module after a strict key and shape check (a diff on mismatch); meta tensors
    assign."""
    diff = key_diff(module.state_dict(), sd)
    if diff:
        raise ValueError(f'checkpoint does not fit encoder {name!r}:' + diff)
    module.load_state_dict(sd, assign=any(v.is_meta for v in sd.values()))
    return module


def restore_shared(own, sd):
    """sd with every name of a shared tensor (DA3's aux-head LayerNorm): safetensors keeps one."""
    groups = {}
    for k, v in own.items():
        groups.setdefault(v.data_ptr(), []).append(k)
    for group in groups.values():
        for k in group:
            sd.setdefault(k, next((sd[a] for a in group if a in sd), None))
    return {k: v for k, v in sd.items() if v is not None}


def matching_presets(sd, exclude):
    """The presets other than `exclude` whose keys and shapes sd has (built on the meta device)."""
    names = []
    with torch.device('meta'):
        for name, cfg in PRESETS.items():
            if name != exclude and not key_diff(DA3(cfg).state_dict(), sd):
                names.append(name)
    return names


def load_weights(enc, weights, source=None):
    """Official weights (file(s) or a state dict) into enc; a mismatch: a UserError naming the
    preset the weights are for, or the key diff."""
    if isinstance(weights, dict):
        sd = dict(weights)
    elif isinstance(weights, (str, os.PathLike)):
        source = weights
        sd = read_da3_state_dict(weights)
    else:  # several files
        source = ', '.join(map(str, weights))
        sd = read_da3_state_dict(weights)
    source = source or 'checkpoint'
    why = 'camera conditioning / Gaussian heads are not built here'
    sd = skip_keys(sd, IGNORED_PREFIXES, 'encoder', why)
    own = enc.state_dict()
    sd = restore_shared(own, sd)
    has_cam_dec_keys = any(k.startswith('cam_dec.') for k in sd)
    no_cam_dec = hasattr(enc, 'cam_dec') and not has_cam_dec_keys
    if no_cam_dec:
        own = {k: v for k, v in own.items() if not k.startswith('cam_dec.')}
    diff = key_diff(own, sd)
    if diff:
        others = matching_presets(sd, enc.cfg.name)
        if others:
            raise cli.UserError(
                f'{source}: the weights match preset {others[0]!r}, not {enc.cfg.name!r}: '
                f'pass --encoder {others[0]} (latents.build_encoder({others[0]!r}) in Python)'
            )
        raise cli.UserError(
            f'{source}: does not fit encoder {enc.cfg.name!r}; '
            'pass the --encoder preset the weights were made for:' + diff
        )
    if no_cam_dec:
        print(
            'encoder: the checkpoint has no cam_dec: its extrinsics/intrinsics stay random '
            '(poses from rays in geometry() are unaffected)'
        )
    enc.load_state_dict(sd, strict=False)
    return enc


# ---- Training loss for the tiny encoder (DA3-style) ------------------------------------------
def geometry_loss(out, depths_gt, c2w_gt, K_gt, alpha=0.2, grad_weight=1.0):
    """out = enc(images), depths_gt (B,V,H,W) (<= 0: invalid), c2w_gt, K_gt -> (loss, parts); GT in
    view 0's frame at its mean valid depth. c |d - d*| - alpha log c on valid pixels (+ grad_weight
    x L1 of its gradient), rays alike."""
    valid = depths_gt > 0
    view0_depth_sum = (depths_gt[:, 0] * valid[:, 0]).flatten(1).sum(1)
    view0_count = valid[:, 0].flatten(1).sum(1).clamp_min(1)
    scale = (view0_depth_sum / view0_count)[:, None, None, None].clamp_min(1e-6)  # (B,1,1,1)
    depth = depths_gt / scale
    rel = torch.linalg.inv(c2w_gt[:, :1]) @ c2w_gt  # (B,V,4,4) in view 0's frame
    R = rel[..., :3, :3]
    centre = rel[..., :3, 3] / scale[..., 0]
    conf = out['depth_conf']
    err = (out['depth'] - depth).abs()
    n_valid = valid.sum().clamp_min(1)
    depth_terms = (conf * err - alpha * conf.log()) * valid
    parts = {'depth': depth_terms.sum() / n_valid}
    if grad_weight:
        diff = (out['depth'] - depth) * valid
        valid_x = valid[..., :, 1:] & valid[..., :, :-1]
        valid_y = valid[..., 1:, :] & valid[..., :-1, :]
        gx = (diff[..., :, 1:] - diff[..., :, :-1]).abs() * valid_x
        gy = (diff[..., 1:, :] - diff[..., :-1, :]).abs() * valid_y
        parts['grad'] = grad_weight * (gx.sum() + gy.sum()) / n_valid
    h, w = out['ray'].shape[-3:-1]
    c2w_rel = torch.cat([R, centre[..., None]], -1)  # (B,V,3,4)
    ray_gt = rays_from_cameras(c2w_rel, K_gt, h, w)
    ray_err = (out['ray'] - ray_gt).abs().sum(-1)
    ray_conf = out['ray_conf']
    parts['ray'] = (ray_conf * ray_err - alpha * ray_conf.log()).mean()
    return sum(parts.values()), parts
