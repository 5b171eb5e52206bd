"""model.py: the GLD multi-view diffusion transformer, a DiT with a wide DDT head (DiT^DH).

M_l predicts the flow velocity of the level-l DA3 features of all views from x_t, t, the source-only
condition, the cameras and (cascade M1->0) the level-1 features, GLD A.2; 3D attention with PRoPE or
3-D / 2-D RoPE. Key names and quirks follow the release's DDT.py. References: GLD (arXiv
2603.22275); DiT; DDT and RAE (DiT^DH); PRoPE (Li et al.); RoFormer. Shape legend: B batch, V views,
H W image, h w token grid, C channels, T = h*w tokens, N = V*T; heads, d: heads, head dims.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


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
    special_tokens: int = 0  # K tokens leading each view's level (GLD (VGGT): 5), outside PRoPE


# parameter counts (count_params, meta device); latent_dim: the DA3 preset's 2C (train.py sets it)
PRESETS = {
    'gld-tiny': GLDConfig(),  # 3.70M, CPU, the embedded default (da3-tiny latents)
    # the scaling probe's wider M1s (docs/log.md): 1.89x and 3.96x gld-tiny's FLOPs per token
    'gld-tiny-2x': GLDConfig(enc_width=192, head_width=320),  # 7.49M
    'gld-tiny-4x': GLDConfig(enc_width=256, head_width=512),  # 16.09M
    'gld-S': GLDConfig(
        latent_dim=768,
        enc_width=384,
        enc_depth=12,
        head_width=1024,
        head_depth=2,
        heads=8,
    ),  # 78.2M
    'gld-B': GLDConfig(
        latent_dim=1536,
        enc_width=768,
        enc_depth=12,
        head_width=2048,
        head_depth=2,
        heads=16,
    ),  # 311.1M
    'gld-paper': GLDConfig(
        latent_dim=1536,
        enc_width=768,
        enc_depth=28,
        head_width=2048,
        head_depth=6,
        heads=16,
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
    ),  # 472.5M = the official M1->0
}


# ----------------------------------------------------------------------------- positional encoding of 3D attention
def rope_rotate(u, cos, sin, inverse=False):
    """1-D RoPE of u (...,N,2f), halves a, b -> [cos a + sin b, -sin a + cos b]; inverse: +angle."""
    a, b = u.chunk(2, -1)
    if inverse:
        sin = -sin
    return torch.cat([cos * a + sin * b, -sin * a + cos * b], -1)


class PositionEncoding:
    """Positions of the V*h*w tokens for head dim d. 'prope': dims [0,d/2) are four-vectors mapped
    by the token's camera (q <- P^T q, k, v <- P_inv k, v, out <- P out), [d/2,3d/4) RoPE on x,
    [3d/4,d) on y (inverse on the output). 'rope3d' / 'rope2d': RoPE over (view, y, x) / (x, y) on q
    and k only; leftover dims not rotated."""

    def __init__(self, kind, d, cams, V, base=100.0):
        h, w = cams['hw']
        n = torch.arange(V * h * w, device=cams['P'].device)  # (N,) tokens, row-major in each view
        x = n % w
        y = (n // w) % h
        view = n // (h * w)
        self.kind = kind
        self.d = d
        self.V = V
        self.mats = None  # PRoPE: camera matrices (B,V,4,4) by role
        self.start = 0  # the first dim after the projective block
        if kind == 'prope':
            assert d % 8 == 0, f'PRoPE needs head dims divisible by 8, got {d}'
            self.mats = {
                'q': cams['P'].mT,
                'kv': cams['P_inv'],
                'out': cams['P'],
            }
            self.start = d // 2
            axes = [(d // 4, x), (d // 4, y)]
        elif kind == 'rope3d':
            axes = [(2 * (d // 6), p) for p in (view, y, x)]
        elif kind == 'rope2d':
            axes = [(d // 2, x), (d // 2, y)]
        else:
            raise ValueError(f"pos must be 'prope', 'rope3d' or 'rope2d', got {kind!r}")
        self.axes = []  # per axis: (size, positions (N,), freqs (size/2,), cos (N,size/2), sin)
        for size, p in axes:
            exponent = -torch.arange(size // 2, device=n.device, dtype=torch.float32) / (size // 2)
            freqs = base**exponent
            angle = p[:, None].float() * freqs  # (N, size/2)
            self.axes.append((size, p, freqs, angle.cos(), angle.sin()))
        # apply rotates every axis at once, rope_rotate's floats in whole-width ops (slices per axis
        # cost 8% of a CPU training step): u cos + swapped sin, swapped turning each axis's
        # halves [a, b] into [b, a], the sines signed [sin, -sin]; a kind's axes have one size
        self.end = self.start + sum(size for size, *_ in self.axes)
        self.half = axes[0][0] // 2  # half an axis
        cosines = [torch.cat([cos, cos], -1) for _, _, _, cos, _ in self.axes]
        sines = [torch.cat([sin, -sin], -1) for _, _, _, _, sin in self.axes]
        self.cos = torch.cat(cosines, -1)  # (N, end - start)
        self.sin = torch.cat(sines, -1)

    def apply(self, u, role):
        """u (B,heads,N,d) in the role 'q' | 'kv' | 'out' -> the same with the positions applied."""
        # one split, not three slices: its backward is one cat, not three zero-padded gradients
        sizes = [self.start, self.end - self.start, u.shape[-1] - self.end]
        projective, rotary, rest = u.split(sizes, -1)
        parts = []
        if self.mats is not None:
            # projective block: the 4-vectors of a token in view v are mapped by M_v
            pattern = 'b heads (v t) (m four) -> b heads v t m four'
            blocks = rearrange(projective, pattern, v=self.V, four=4)
            M = self.mats[role].to(u.dtype)
            mapped = torch.einsum('bvij,bhvtmj->bhvtmi', M, blocks)
            parts.append(rearrange(mapped, 'b heads v t m four -> b heads (v t) (m four)'))
        swapped = rotary.unflatten(-1, (len(self.axes), -1)).roll(self.half, -1).flatten(-2)
        sin = self.sin.to(u.dtype)
        if role == 'out':  # the inverse rotation
            sin = -sin
        parts.append(rotary * self.cos.to(u.dtype) + swapped * sin)
        parts.append(rest)
        return torch.cat(parts, -1)

    def attend(self, q, k, v):
        """The fast path: q, k (and for PRoPE v and the output) transformed around SDPA."""
        q = self.apply(q, 'q')
        k = self.apply(k, 'kv')
        if self.kind != 'prope':
            return attention(q, k, v)
        y = attention(q, k, self.apply(v, 'kv'))
        return self.apply(y, 'out')

    def relative(self):
        """Per-pair M_ij (B,N,N,d,d): blockdiag(P_a P_inv_b, rotations by theta_i - theta_j, I)."""
        N = self.axes[0][1].shape[0]
        B = self.mats['q'].shape[0] if self.mats is not None else 1
        device = self.axes[0][1].device
        eye = torch.eye(self.d, dtype=torch.float32, device=device)
        M = eye.repeat(B, N, N, 1, 1)
        if self.mats is not None:
            view = torch.arange(N, device=device) // (N // self.V)
            # (B,N,N,4,4): P_a P_inv_b
            rel = self.mats['out'][:, view, None] @ self.mats['kv'][:, None, view]
            for first in range(0, self.start, 4):
                M[..., first : first + 4, first : first + 4] = rel
        i = self.start
        for size, p, freqs, _, _ in self.axes:
            delta = (p[:, None] - p[None, :]).float()  # (N,N)
            angle = delta[..., None] * freqs  # (N,N,size/2)
            for f in range(size // 2):
                a = i + f
                b = i + size // 2 + f
                cos = angle[..., f].cos()
                sin = angle[..., f].sin()
                M[..., a, a] = cos
                M[..., a, b] = -sin
                M[..., b, a] = sin
                M[..., b, b] = cos
            i += size
        return M


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v by SDPA; in bf16 on CPU by two matmuls and a softmax instead:
    there PyTorch's flash kernel has a slow backward, 1.3-1.7x their time here (docs/log.md)."""
    if q.device.type != 'cpu' or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v)
    logits = (q * q.shape[-1] ** -0.5) @ k.mT
    return logits.softmax(-1) @ v


def reference_attention(q, k, v, pe):
    """Textbook attention for tests: logits_ij = q_i^T M_ij k_j / sqrt(d);
    out_i = sum_j p_ij M_ij v_j (PRoPE), else sum_j p_ij v_j."""
    M = pe.relative().to(q.dtype)  # (B,N,N,d,d)
    logits = torch.einsum('bhid,bijde,bhje->bhij', q, M, k) / math.sqrt(q.shape[-1])
    probs = logits.softmax(-1)
    if pe.kind == 'prope':
        return torch.einsum('bhij,bijde,bhje->bhid', probs, M, v)
    return probs @ v


class SpecialTokenPositions:
    """pe over V views that each lead with K special tokens (V*(K+T) tokens): the special
    tokens skip it (identity transforms, the release's num_prefix_tokens) and join the
    attention."""

    attend = PositionEncoding.attend  # the same steps around SDPA, with this apply

    def __init__(self, pe, special):
        self.pe = pe
        self.special = special
        self.kind = pe.kind

    def apply(self, u, role):
        """u (B,heads,V*(K+T),d) -> the patch tokens through pe, the special tokens as they are."""
        K = self.special
        V = self.pe.V
        views = rearrange(u, 'b heads (v p) d -> b heads v p d', v=V)
        patches = rearrange(views[:, :, :, K:], 'b heads v t d -> b heads (v t) d')
        patches = self.pe.apply(patches, role)
        patches = rearrange(patches, 'b heads (v t) d -> b heads v t d', v=V)
        tokens = torch.cat([views[:, :, :, :K], patches], 3)
        return rearrange(tokens, 'b heads v p d -> b heads (v p) d')

    def relative(self):
        """Per-pair M_ij = Q_i^T A_j (B,N,N,d,d), Q and A the transforms of queries and of
        keys, per token (reference_attention)."""
        Q = self.token_transforms('q')
        A = self.token_transforms('kv')
        return Q.mT[:, :, None] @ A[:, None]

    def token_transforms(self, role):
        """(B,V*(K+T),d,d): a patch token's transform in `role` as a matrix, I for a special
        token."""
        pe = self.pe
        K = self.special
        d = pe.d
        B = pe.mats['q'].shape[0] if pe.mats is not None else 1
        n_patches = pe.axes[0][1].shape[0]
        device = pe.axes[0][1].device
        M = torch.eye(d, device=device).repeat(B, n_patches, 1, 1)  # (B,V*T,d,d)
        if pe.mats is not None:
            view = torch.arange(n_patches, device=device) // (n_patches // pe.V)
            mat = pe.mats[role][:, view].float()  # (B,V*T,4,4)
            for first in range(0, pe.start, 4):
                M[..., first : first + 4, first : first + 4] = mat
        i = pe.start
        # rope_rotate: (a, b) -> (cos a + sin b, -sin a + cos b)
        for size, _, _, cos, sin in pe.axes:
            for f in range(size // 2):
                a = i + f
                b = i + size // 2 + f
                M[..., a, a] = cos[:, f]
                M[..., a, b] = sin[:, f]
                M[..., b, a] = -sin[:, f]
                M[..., b, b] = cos[:, f]
            i += size
        per_view = rearrange(M, 'b (v t) i j -> b v t i j', v=pe.V)
        special = torch.eye(d, device=device).expand(B, pe.V, K, d, d)
        return rearrange(torch.cat([special, per_view], 2), 'b v p i j -> b (v p) i j')


# ----------------------------------------------------------------------------- transformer parts
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # statistics in fp32
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * inv_rms * self.weight).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)  # 2048 for 768, 5461 for 2048 (as released)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Multi-head self-attention, fused QKV, over N tokens: positions from pe, else plain SDPA."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.reference = False  # True: the textbook path (tests)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pe=None):  # x (B,N,D)
        qkv = self.qkv(x)
        pattern = 'b n (three heads d) -> three b heads n d'
        q, k, v = rearrange(qkv, pattern, three=3, heads=self.heads)
        if pe is None:
            y = attention(q, k, v)
        elif self.reference:
            y = reference_attention(q, k, v, pe)
        else:
            y = pe.attend(q, k, v)
        return self.proj(rearrange(y, 'b heads n d -> b n (heads d)'))  # head-major channels


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """DiT block, 6 adaLN modulations from c: (B,1,D) in the encoder (time), (B,N,D) in the head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, pe):  # x (B,N,D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), pe)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier features [sin(2 pi t W), cos(2 pi t W)], 256 fixed random W, then an MLP."""

    def __init__(self, dim, freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(freqs), requires_grad=False)  # frozen, in the state dict
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t (B,) in [0,1], 1 = noise -> (B,D)
        f = 2 * math.pi * t[:, None].float() * self.W[None]
        features = torch.cat([f.sin(), f.cos()], -1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def token_embedder(cin, dim):  # patch size 1: a linear map (a 1x1 conv 'proj' in the release)
    return nn.Sequential(OrderedDict(proj=nn.Linear(cin, dim)))


class CameraEmbedder(nn.Module):
    """Plücker + mask map (B,V,7,H,W) -> (B,N,D) by a patch x patch conv, for the encoder."""

    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(7, dim, patch, patch)

    def forward(self, plucker):
        B = plucker.shape[0]
        maps = rearrange(plucker, 'b v c H W -> (b v) c H W')
        e = self.proj(maps.to(self.proj.weight.dtype))
        return rearrange(e, '(b v) d h w -> b (v h w) d', b=B)  # row-major, view after view


class FinalLayer(nn.Module):
    """Per-token adaLN (shift, scale) from c, RMSNorm, linear to C; zero-initialised."""

    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- the model
class GLD(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.latent_dim
        C1 = cfg.enc_width
        C2 = cfg.head_width
        assert C1 % cfg.heads == 0 and C2 % cfg.heads == 0, 'widths must divide into heads'
        s_in = C + (cfg.upper_dim or C)  # encoder reads [cond | x_t], the cascade [cond | F1]
        if cfg.separate_embedders:
            # chosen per view by the source mask; '_ref' = source views, the release's name
            self.x_embedder_ref = token_embedder(2 * C, C2)
            self.x_embedder_tgt = token_embedder(2 * C, C2)
            self.s_embedder_ref = token_embedder(s_in, C1)
            self.s_embedder_tgt = token_embedder(s_in, C1)
        else:
            self.x_embedder = token_embedder(2 * C, C2)
            self.s_embedder = token_embedder(s_in, C1)
        self.s_projector = nn.Linear(C1, C2)
        self.t_embedder = TimestepEmbedder(C1)
        self.camera_embedder = CameraEmbedder(C1, cfg.cam_patch)
        encoder = [Block(C1, cfg.heads) for _ in range(cfg.enc_depth)]
        head = [Block(C2, cfg.heads) for _ in range(cfg.head_depth)]
        self.blocks = nn.ModuleList(encoder + head)
        self.final_layer = FinalLayer(C2, C)
        K = cfg.special_tokens
        # the special tokens' embedders and positions on both halves, their output projection
        # (the release's names)
        if K:
            self.special_s_embedder = nn.Linear(2 * C, C1)
            self.special_pos_embed_s = nn.Parameter(torch.zeros(1, K, C1))
            self.special_x_embedder = nn.Linear(2 * C, C2)
            self.special_pos_embed_x = nn.Parameter(torch.zeros(1, K, C2))
            # after the final layer; the release's Linear(C2, C) works only at C2 = C
            self.special_output_proj = nn.Linear(C, C)
        self.init_weights()

    def init_weights(self):
        """As released: adaLN and the final linear zero; embedders xavier; time MLP N(0, 0.02)."""
        for blk in [*self.blocks, self.final_layer]:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for name, m in self.named_children():
            if name.startswith(('x_embedder', 's_embedder', 'camera_embedder')):
                weight = m.proj.weight
                nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
                nn.init.zeros_(m.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if self.cfg.special_tokens:
            for lin in (self.special_s_embedder, self.special_x_embedder):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(self.special_pos_embed_s, std=0.02)
            nn.init.normal_(self.special_pos_embed_x, std=0.02)
            nn.init.zeros_(self.special_output_proj.weight)
            nn.init.zeros_(self.special_output_proj.bias)

    def embed(self, kind, x, src_mask):
        """(B,V,T,Cin) -> (B,N,D), each view by its source or target embedder (kind 's' or 'x')."""
        if self.cfg.separate_embedders:
            as_source = getattr(self, f'{kind}_embedder_ref')(x)
            as_target = getattr(self, f'{kind}_embedder_tgt')(x)
            tokens = torch.where(src_mask[:, :, None, None], as_source, as_target)
        else:
            tokens = getattr(self, f'{kind}_embedder')(x)
        return rearrange(tokens, 'b v t d -> b (v t) d')

    def with_special(self, kind, tokens, special, V):
        """Embedded patch tokens (B,V*T,D) -> (B,V*(K+T),D): each view led by its special
        tokens' embedding (kind 's' or 'x') of special (B,V,K,2C)."""
        embedder = getattr(self, f'special_{kind}_embedder')
        positions = getattr(self, f'special_pos_embed_{kind}')
        special = embedder(special) + positions  # (B,V,K,D)
        tokens = rearrange(tokens, 'b (v t) d -> b v t d', v=V)
        return rearrange(torch.cat([special, tokens], 2), 'b v p d -> b (v p) d')

    def run_blocks(self, blocks, x, c, pe):
        """x through blocks, each recomputed in backward with cfg.checkpointing."""
        for blk in blocks:
            if self.cfg.checkpointing and self.training:
                x = checkpoint(blk, x, c, pe, use_reentrant=False)
            else:
                x = blk(x, c, pe)
        return x

    def forward(self, x_t, t, cond, cams, upper=None):
        """x_t, cond (B,V,[K+]T,C); t (B,); cams: camera_inputs; upper: M1->0's level 1 ->
        (B,V,[K+]T,C). K = cfg.special_tokens lead each view (the cascade ignores upper's)."""
        cfg = self.cfg
        src = cams['src_mask']  # (B,V) bool
        V = x_t.shape[1]
        K = cfg.special_tokens
        cascade = cfg.upper_dim > 0
        assert (upper is not None) == cascade, 'upper (the level-1 condition) iff cfg.upper_dim > 0'
        xc = torch.cat([cond, x_t], -1)  # (B,V,T,2C)
        te = self.t_embedder(t)  # (B,C1)
        # condition encoder: tokens + camera map, adaLN from time
        s_in = xc if upper is None else torch.cat([cond, upper], -1)
        if K:  # [cond | x_t] of the special tokens; the patches go on alone
            special = xc[:, :, :K]
            xc = xc[:, :, K:]
            s_in = s_in[:, :, K:]
        s = self.embed('s', s_in, src)  # (B,N,C1)
        s = s + self.camera_embedder(cams['plucker'])
        pe_enc = PositionEncoding(cfg.pos, cfg.enc_width // cfg.heads, cams, V, cfg.rope_base)
        if K:
            s = self.with_special('s', s, special, V)
            pe_enc = SpecialTokenPositions(pe_enc, K)
        te_enc = F.silu(te) if cfg.double_silu else te
        s = self.run_blocks(self.blocks[: cfg.enc_depth], s, te_enc[:, None], pe_enc)
        # bridge: the per-token condition of the head
        head_cond = self.s_projector(F.silu(te[:, None] + s))  # (B,N,C2)
        # velocity head: [cond | x_t] tokens modulated per token by head_cond
        pe_head = PositionEncoding(cfg.pos, cfg.head_width // cfg.heads, cams, V, cfg.rope_base)
        x = self.embed('x', xc, src)  # (B,N,C2)
        if K:
            x = self.with_special('x', x, special, V)
            pe_head = SpecialTokenPositions(pe_head, K)
        x = self.run_blocks(self.blocks[cfg.enc_depth :], x, head_cond, pe_head)
        velocity = self.final_layer(x, head_cond)
        velocity = rearrange(velocity, 'b (v t) c -> b v t c', v=V)
        if K:
            special_velocity = self.special_output_proj(velocity[:, :, :K])
            velocity = torch.cat([special_velocity, velocity[:, :, K:]], 2)
        return velocity


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def block_flops(D, N, adaln):
    """Forward FLOPs per token of a block of width D over N tokens: qkv, proj, SwiGLU, attention."""
    flops = 8 * D * D + 6 * D * int(8 * D / 3) + 4 * N * D
    if adaln:
        flops += 12 * D * D  # the head's per-token adaLN
    return flops


def flops_per_token(cfg, N):
    """Forward FLOPs per token of N = V*h*w (2 a multiply-add, x3 to train); norms, RoPE ignored."""
    C = cfg.latent_dim
    C1 = cfg.enc_width
    C2 = cfg.head_width
    return (
        cfg.enc_depth * block_flops(C1, N, False)
        + cfg.head_depth * block_flops(C2, N, True)
        + 2 * 2 * C * (C1 + C2)
        + 2 * 7 * cfg.cam_patch**2 * C1
        + 2 * C1 * C2
        + 2 * C2 * (2 * C2 + C)
    )


PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'B200': 2250.0, 'A100': 312.0}  # dense bf16, per GPU


def peak_tflops(device):
    """Dense bf16 peak (the MFU denominator); None on CPU or an unlisted GPU."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, tflops in PEAK_TFLOPS.items():
        if gpu in name:
            return tflops
    return None


# ----------------------------------------------------------------------------- the released checkpoints
def convert_official(state_dict, cascade=False, heads=16):
    """Released GLD state dict (DDT.py / DDT_old.py; DA3 or VGGT) -> (GLDConfig, our state dict),
    strictly; heads are not in the shapes."""
    single = 'x_embedder.proj.weight' in state_dict
    aliases = ('s_embedder_ref.', 's_embedder_tgt.', 'x_embedder_ref.', 'x_embedder_tgt.')
    sd = {k: v for k, v in state_dict.items() if not (single and k.startswith(aliases))}
    C2, C1 = sd['s_projector.weight'].shape
    assert C1 != C2, 'encoder and head blocks are told apart by their width'
    C = sd['final_layer.linear.weight'].shape[0]
    s_in = sd['s_embedder.proj.weight' if single else 's_embedder_ref.proj.weight'].shape[1]
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    widths = [sd[f'blocks.{i}.norm1.weight'].shape[0] for i in range(depth)]
    # GLD (VGGT): special_{s,x}_embedder, special_pos_embed_{s,x}, special_output_proj
    special_tokens = 0
    if 'special_pos_embed_s' in sd:
        special_tokens = sd['special_pos_embed_s'].shape[1]
    cfg = GLDConfig(
        latent_dim=C,
        enc_width=C1,
        enc_depth=widths.count(C1),
        head_width=C2,
        heads=heads,
        head_depth=depth - widths.count(C1),
        separate_embedders=not single,
        double_silu=True,
        upper_dim=s_in - C if cascade else 0,
        cam_patch=sd['camera_embedder.proj.weight'].shape[-1],
        special_tokens=special_tokens,
    )
    out = {}
    for k, v in sd.items():
        # the release's token embedders are 1x1 convs, ours linears
        embedder = '_embedder' in k and not k.startswith('camera')
        token_conv = embedder and k.endswith('proj.weight') and v.ndim == 4
        out[k] = v.flatten(1) if token_conv else v
    with torch.device('meta'):
        ref = GLD(cfg).state_dict()
    missing = set(ref) - set(out)
    unused = set(out) - set(ref)
    assert not missing, f'convert_official: missing {sorted(missing)[:5]}'
    assert not unused, f'convert_official: unused {sorted(unused)[:5]}'
    bad = [k for k in ref if ref[k].shape != out[k].shape]
    assert not bad, f'convert_official: shape mismatch at {bad[:5]}'
    return cfg, out
