"""model.py: the GLD multi-view diffusion transformer, a DiT with a wide DDT head (DiT^DH).

M_l predicts the flow velocity of the level-l DA3 features of all views from x_t, t, the source-only condition, the
cameras and (cascade M1->0) the level-1 features, GLD A.2; 3D attention with PRoPE or 3-D / 2-D RoPE. Key names and
quirks follow the release's DDT.py. References: GLD (arXiv 2603.22275); DiT; DDT and RAE (DiT^DH); PRoPE (Li et
al.); RoFormer. Shape legend: B batch, V views, H W image, h w token grid, C channels, T = h*w tokens, N = V*T.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import cameras


@dataclass
class GLDConfig:
    latent_dim: int = 192  # C: channels of one DA3 level (2 x backbone width); da3-tiny -> 192
    enc_width: int = 128  # C1: condition encoder width
    enc_depth: int = 4  # d1
    head_width: int = 224  # C2: the wide DDT head (>= latent_dim, as RAE advises)
    head_depth: int = 2  # d2
    heads: int = 4  # attention heads in both parts; head dims must be multiples of 8 for PRoPE
    pos: str = 'prope'  # 'prope' | 'rope3d' (view, y, x) | 'rope2d' (x, y)
    rope_base: float = 100.0
    separate_embedders: bool = True  # four embedders (source/target x encoder/head) as in the paper
    upper_dim: int = 0  # cascade M1->0: channels of the level-1 condition (0: not a cascade model)
    cam_patch: int = 14  # Plücker map pixels per token (the DA3 patch)
    double_silu: bool = True  # encoder adaLN sees silu(silu(te)), as released
    checkpointing: bool = False  # recompute each block in backward


# parameter counts (count_params, on the meta device); latent_dim is the DA3 preset's 2C (train.py overrides it)
PRESETS = {
    'gld-tiny': GLDConfig(),  # 3.70M, CPU, the embedded default (da3-tiny latents)
    'gld-S': GLDConfig(latent_dim=768, enc_width=384, enc_depth=12, head_width=1024, head_depth=2, heads=8),  # 78.2M
    'gld-B': GLDConfig(latent_dim=1536, enc_width=768, enc_depth=12, head_width=2048, head_depth=2, heads=16),  # 311.1M
    'gld-paper': GLDConfig(
        latent_dim=1536, enc_width=768, enc_depth=28, head_width=2048, head_depth=6, heads=16
    ),  # 783.3M = the official M1
    'gld-paper-cascade': GLDConfig(
        latent_dim=1536,
        enc_width=768,
        enc_depth=28,
        head_width=2048,
        head_depth=2,
        heads=16,
        upper_dim=1536,
        separate_embedders=False,
    ),  # 472.5M = official M1->0
}


# ----------------------------------------------------------------------------- cameras -> model inputs
def camera_inputs(c2w, K, src_mask, hw, patch=14, official=False):
    """Camera inputs of a batch -> {'plucker' (B,V,7,ph,pw): [mask (1 target), d, o x d], 'P', 'P_inv', ...}."""
    h, w = hw
    rays = cameras.plucker_rays(c2w, K, patch * h, patch * w, pixel_offset=(-0.5, 0.5) if official else (0.5, 0.5))
    mask = (~src_mask).to(rays.dtype)[..., None, None, None].expand(*rays.shape[:2], 1, *rays.shape[-2:])
    P, P_inv = cameras.prope_matrices(c2w, K, official=official)
    return {'plucker': torch.cat([mask, rays], 2), 'P': P, 'P_inv': P_inv, 'src_mask': src_mask, 'hw': (h, w)}


def drop_cameras(cams, drop):
    """Camera dropout / CFG's unconditional branch where drop (B,): Plücker rays zeroed (mask kept), P = P_inv = I."""
    plucker = cams['plucker'].clone()
    plucker[:, :, 1:] *= (~drop).to(plucker.dtype)[:, None, None, None, None]
    eye, sel = torch.eye(4, dtype=cams['P'].dtype, device=cams['P'].device), drop[:, None, None, None]
    return {**cams, 'plucker': plucker, **{k: torch.where(sel, eye, cams[k]) for k in ('P', 'P_inv')}}


# ----------------------------------------------------------------------------- positional encoding of 3D attention
def rope_rotate(u, cos, sin, inverse=False):
    """1-D RoPE on u (...,N,2f), split halves a, b: [cos a + sin b, -sin a + cos b] (by -angle); inverse: +angle."""
    a, b = u.chunk(2, -1)
    sin = -sin if inverse else sin
    return torch.cat([cos * a + sin * b, -sin * a + cos * b], -1)


class PositionEncoding:
    """Positions of the V*h*w tokens for head dim d. 'prope': dims [0,d/2) are four-vectors mapped by the token's camera
    (q <- P^T q, k, v <- P_inv k, v, out <- P out), [d/2,3d/4) RoPE on x, [3d/4,d) on y (inverse on the output).
    'rope3d' / 'rope2d': RoPE over (view, y, x) / (x, y) on q and k only; leftover dims not rotated."""

    def __init__(self, kind, d, cams, V, base=100.0):
        h, w = cams['hw']
        n = torch.arange(V * h * w, device=cams['P'].device)
        x, y, view = n % w, (n // w) % h, n // (h * w)  # (N,) token coordinates, row-major within a view
        self.kind, self.d, self.V = kind, d, V
        if kind == 'prope':
            assert d % 8 == 0, f'PRoPE needs head dims divisible by 8, got {d}'
            self.mats = {'q': cams['P'].transpose(-1, -2), 'kv': cams['P_inv'], 'out': cams['P']}  # (B,V,4,4)
            self.start, axes = d // 2, [(d // 4, x), (d // 4, y)]
        elif kind in ('rope3d', 'rope2d'):
            self.mats, self.start = None, 0
            axes = [(2 * (d // 6), p) for p in (view, y, x)] if kind == 'rope3d' else [(d // 2, x), (d // 2, y)]
        else:
            raise ValueError(f"pos must be 'prope', 'rope3d' or 'rope2d', got {kind!r}")
        self.axes = []  # (size, positions (N,), frequencies (size/2,), cos (N,size/2), sin)
        for size, p in axes:
            freqs = base ** (-torch.arange(size // 2, device=n.device, dtype=torch.float32) / (size // 2))
            angle = p[:, None].float() * freqs  # (N, size/2)
            self.axes.append((size, p, freqs, angle.cos(), angle.sin()))

    def apply(self, u, role):  # u (B,nh,N,d); role 'q' | 'kv' | 'out'
        parts = []
        if self.mats is not None:  # projective block: the 4-vectors of a token in view v are mapped by M_v
            blk = rearrange(u[..., : self.start], 'b heads (v t) (m four) -> b heads v t m four', v=self.V, four=4)
            M = self.mats[role].to(u.dtype)
            mapped = torch.einsum('bvij,bhvtmj->bhvtmi', M, blk)
            parts.append(rearrange(mapped, 'b heads v t m four -> b heads (v t) (m four)'))
        i = self.start
        for size, _, _, cos, sin in self.axes:
            parts.append(rope_rotate(u[..., i : i + size], cos.to(u.dtype), sin.to(u.dtype), inverse=role == 'out'))
            i += size
        parts.append(u[..., i:])
        return torch.cat(parts, -1)

    def attend(self, q, k, v):  # fast path: q, k (v, output for PRoPE) transformed around SDPA
        q, k = self.apply(q, 'q'), self.apply(k, 'kv')
        if self.kind != 'prope':
            return F.scaled_dot_product_attention(q, k, v)
        return self.apply(F.scaled_dot_product_attention(q, k, self.apply(v, 'kv')), 'out')

    def relative(self):
        """Per-pair M_ij (B,N,N,d,d): blockdiag(P_a P_inv_b (PRoPE), 2x2 rotations by theta_i - theta_j, identity)."""
        N = self.axes[0][1].shape[0]
        B = self.mats['q'].shape[0] if self.mats is not None else 1
        M = torch.eye(self.d, dtype=torch.float32, device=self.axes[0][1].device).repeat(B, N, N, 1, 1)
        if self.mats is not None:
            view = torch.arange(N, device=M.device) // (N // self.V)
            rel = self.mats['out'][:, view, None] @ self.mats['kv'][:, None, view]  # (B,N,N,4,4): P_a P_inv_b
            for c in range(0, self.start, 4):
                M[..., c : c + 4, c : c + 4] = rel
        i = self.start
        for size, p, freqs, _, _ in self.axes:
            angle = (p[:, None] - p[None, :]).float()[..., None] * freqs  # (N,N,size/2)
            for f in range(size // 2):
                a, b = i + f, i + size // 2 + f
                c, s = angle[..., f].cos(), angle[..., f].sin()
                M[..., a, a], M[..., a, b], M[..., b, a], M[..., b, b] = c, -s, s, c
            i += size
        return M


def reference_attention(q, k, v, pe):
    """Textbook attention for tests: logits_ij = q_i^T M_ij k_j / sqrt(d), out_i = sum_j p_ij M_ij v_j (PRoPE)."""
    M = pe.relative().to(q.dtype)  # (B,N,N,d,d)
    p = (torch.einsum('bhid,bijde,bhje->bhij', q, M, k) / math.sqrt(q.shape[-1])).softmax(-1)
    return torch.einsum('bhij,bijde,bhje->bhid', p, M, v) if pe.kind == 'prope' else p @ v


# ----------------------------------------------------------------------------- transformer parts
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # statistics in fp32
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)  # 2048 for 768, 5461 for 2048 (as released)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Multi-head self-attention, fused QKV: 3D over N = V*h*w tokens with positions from pe, else plain SDPA."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.reference = heads, False  # reference=True: the textbook path (tests)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, pe=None):  # x (B,N,D)
        q, k, v = rearrange(self.qkv(x), 'b n (three heads d) -> three b heads n d', three=3, heads=self.heads)
        y = (
            F.scaled_dot_product_attention(q, k, v)
            if pe is None
            else reference_attention(q, k, v, pe)
            if self.reference
            else pe.attend(q, k, v)
        )
        return self.proj(rearrange(y, 'b heads n d -> b n (heads d)'))  # head-major channel packing


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """DiT block with 6 adaLN modulations. c (B,1,D) for the encoder (from time), (B,N,D) per token in the head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, pe):  # x (B,N,D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), pe)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier features [sin(2 pi t W), cos(2 pi t W)] of 256 fixed random frequencies, then an MLP."""

    def __init__(self, dim, freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(freqs), requires_grad=False)  # frozen, but in the state dict as released
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t (B,) in [0,1], 1 = noise
        f = 2 * math.pi * t[:, None].float() * self.W[None]
        return self.mlp(torch.cat([f.sin(), f.cos()], -1).to(self.mlp[0].weight.dtype))  # (B,D)


def token_embedder(cin, dim):  # patch size 1: a linear map (a 1x1 conv 'proj' in the release)
    return nn.Sequential(OrderedDict(proj=nn.Linear(cin, dim)))


class CameraEmbedder(nn.Module):
    """Plücker + mask map (B,V,7,ph,pw) -> per-token (B,V,T,D) via a patch x patch conv, added to encoder tokens."""

    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(7, dim, patch, patch)

    def forward(self, plucker):
        B = plucker.shape[0]
        e = self.proj(rearrange(plucker, 'b v c H W -> (b v) c H W').to(self.proj.weight.dtype))
        return rearrange(e, '(b v) d h w -> b v (h w) d', b=B)  # row-major tokens


class FinalLayer(nn.Module):
    """Per-token adaLN (shift, scale) from s, RMSNorm, linear to C; zero-initialised."""

    def __init__(self, dim, out):
        super().__init__()
        self.norm_final, self.linear = RMSNorm(dim), nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, s):
        shift, scale = self.adaLN_modulation(s).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- the model
class GLD(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, C1, C2 = cfg.latent_dim, cfg.enc_width, cfg.head_width
        assert C1 % cfg.heads == 0 and C2 % cfg.heads == 0, 'widths must divide into heads'
        s_in = C + (cfg.upper_dim or C)  # encoder reads [cond | x_t], the cascade [cond | F1]
        if cfg.separate_embedders:  # chosen per view by the source mask; '_ref' = source views, the release's name
            self.x_embedder_ref, self.x_embedder_tgt = token_embedder(2 * C, C2), token_embedder(2 * C, C2)
            self.s_embedder_ref, self.s_embedder_tgt = token_embedder(s_in, C1), token_embedder(s_in, C1)
        else:
            self.x_embedder, self.s_embedder = token_embedder(2 * C, C2), token_embedder(s_in, C1)
        self.s_projector, self.t_embedder = nn.Linear(C1, C2), TimestepEmbedder(C1)
        self.camera_embedder = CameraEmbedder(C1, cfg.cam_patch)
        self.blocks = nn.ModuleList(
            [Block(C1, cfg.heads) for _ in range(cfg.enc_depth)] + [Block(C2, cfg.heads) for _ in range(cfg.head_depth)]
        )  # encoder, then head
        self.final_layer = FinalLayer(C2, C)
        self.init_weights()

    def init_weights(self):  # as released: adaLN, final linear zero; embedders xavier; time MLP N(0, 0.02)
        for blk in [*self.blocks, self.final_layer]:
            nn.init.zeros_(blk.adaLN_modulation[1].weight), nn.init.zeros_(blk.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight), nn.init.zeros_(self.final_layer.linear.bias)
        for name, m in self.named_children():
            if name.startswith(('x_embedder', 's_embedder', 'camera_embedder')):
                nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1)), nn.init.zeros_(m.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02), nn.init.zeros_(lin.bias)

    def embed(self, kind, x, src_mask):  # (B,V,T,Cin) -> (B,V*T,D), each view by its source or target embedder
        if not self.cfg.separate_embedders:
            return rearrange(getattr(self, f'{kind}_embedder')(x), 'b v t d -> b (v t) d')
        src, tgt = getattr(self, f'{kind}_embedder_ref')(x), getattr(self, f'{kind}_embedder_tgt')(x)
        return rearrange(torch.where(src_mask[:, :, None, None], src, tgt), 'b v t d -> b (v t) d')

    def run_blocks(self, blocks, x, c, pe):  # each block recomputed in backward with cfg.checkpointing
        ckpt = self.cfg.checkpointing and self.training
        for blk in blocks:
            x = checkpoint(blk, x, c, pe, use_reentrant=False) if ckpt else blk(x, c, pe)
        return x

    def forward(self, x_t, t, cond, cams, upper=None):
        """x_t, cond (B,V,T,C); t (B,); cams: camera_inputs; upper (B,V,T,C_upper) for M1->0 -> v (B,V,T,C)."""
        cfg, src = self.cfg, cams['src_mask']  # src (B,V) bool
        B, V, T, C = x_t.shape
        assert (upper is not None) == (cfg.upper_dim > 0), 'upper (the level-1 condition) iff cfg.upper_dim > 0'
        xc = torch.cat([cond, x_t], -1)  # (B,V,T,2C)
        te = self.t_embedder(t)  # (B,C1)
        # condition encoder: tokens + camera map, adaLN from time
        s = self.embed('s', torch.cat([cond, upper], -1) if upper is not None else xc, src)  # (B,N,C1)
        s = s + rearrange(self.camera_embedder(cams['plucker']), 'b v t d -> b (v t) d')
        pe_enc = PositionEncoding(cfg.pos, cfg.enc_width // cfg.heads, cams, V, cfg.rope_base)
        c = (F.silu(te) if cfg.double_silu else te)[:, None]  # (B,1,C1)
        s = self.run_blocks(self.blocks[: cfg.enc_depth], s, c, pe_enc)
        # bridge: per-token condition of the head
        s = self.s_projector(F.silu(te[:, None] + s))  # (B,N,C2)
        # velocity head: [cond | x_t] tokens modulated per token by s
        pe_head = PositionEncoding(cfg.pos, cfg.head_width // cfg.heads, cams, V, cfg.rope_base)
        x = self.embed('x', xc, src)  # (B,N,C2)
        x = self.run_blocks(self.blocks[cfg.enc_depth :], x, s, pe_head)
        return rearrange(self.final_layer(x, s), 'b (v t) c -> b v t c', v=V)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg, N):
    """Forward FLOPs (2 per multiply-add) per token of N = V*h*w tokens (x3 for training); norms, RoPE ignored."""
    block = lambda D, adaln: 8 * D * D + 6 * D * int(8 * D / 3) + 4 * N * D + (12 * D * D if adaln else 0)
    C, C1, C2 = cfg.latent_dim, cfg.enc_width, cfg.head_width
    return (
        cfg.enc_depth * block(C1, False)
        + cfg.head_depth * block(C2, True)
        + 2 * 2 * C * (C1 + C2)
        + 2 * 7 * cfg.cam_patch**2 * C1
        + 2 * C1 * C2
        + 2 * C2 * (2 * C2 + C)
    )


PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'B200': 2250.0, 'A100': 312.0}  # dense bf16, per GPU


def peak_tflops(device):  # dense bf16 peak (the MFU denominator); None on CPU or an unlisted GPU
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- the released checkpoints
def convert_official(state_dict, cascade=False, heads=16):
    """Released GLD state dict (DDT.py / DDT_old.py) -> (GLDConfig, our state dict), strict; heads is not in shapes."""
    single = 'x_embedder.proj.weight' in state_dict
    aliases = ('s_embedder_ref.', 's_embedder_tgt.', 'x_embedder_ref.', 'x_embedder_tgt.')
    sd = {k: v for k, v in state_dict.items() if not (single and k.startswith(aliases))}
    C2, C1 = sd['s_projector.weight'].shape
    assert C1 != C2, 'encoder and head blocks are told apart by their width'
    C = sd['final_layer.linear.weight'].shape[0]
    s_in = sd['s_embedder.proj.weight' if single else 's_embedder_ref.proj.weight'].shape[1]
    widths = [
        sd[f'blocks.{i}.norm1.weight'].shape[0]
        for i in range(len({k.split('.')[1] for k in sd if k.startswith('blocks.')}))
    ]
    cfg = GLDConfig(
        latent_dim=C,
        enc_width=C1,
        enc_depth=widths.count(C1),
        head_width=C2,
        heads=heads,
        head_depth=len(widths) - widths.count(C1),
        separate_embedders=not single,
        double_silu=True,
        upper_dim=s_in - C if cascade else 0,
        cam_patch=sd['camera_embedder.proj.weight'].shape[-1],
    )
    out = {
        k: v.flatten(1)
        if '_embedder' in k and k.endswith('proj.weight') and v.ndim == 4 and not k.startswith('camera')
        else v
        for k, v in sd.items()
    }
    with torch.device('meta'):
        ref = GLD(cfg).state_dict()
    missing, unused = set(ref) - set(out), set(out) - set(ref)
    assert not missing and not unused, f'convert_official: missing {sorted(missing)[:5]}, unused {sorted(unused)[:5]}'
    bad = [k for k in ref if ref[k].shape != out[k].shape]
    assert not bad, f'convert_official: shape mismatch at {bad[:5]}'
    return cfg, out
