"""Stage 1 of GLD: the RGB decoder D_rgb, a ViT turning DA3's frozen feature levels into images.

Levels concatenated per token, CLS + resized sin-cos table, pre-LN ViT per view, 14x14x3 patches
out; level-wise dropout with mask tokens (Sec. 4.2, Tab. 6), RAE noise, L1 + LPIPS + optional GAN (a
spectral-norm PatchGAN: the release's frozen-DINO D cannot be fetched). References: GLD (arXiv
2603.22275, A.1-A.2) and its decoder.py; RAE; MAE (sin-cos); pix2pix (PatchGAN); VQGAN (adaptive
weight). Shapes: B batch, V views, h w token grid, T tokens, p patch, H W image (H = p*h).
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from constants import IMAGENET_MEAN, IMAGENET_STD
from model import Attention

NUM_LEVELS = 4


@dataclass
class DecoderConfig:
    feat_dim: int = 192  # channels of one level (2C = local + global); 1536 for DA3-Base
    width: int = 128  # transformer width D
    depth: int = 4  # number of ViT blocks
    heads: int = 4
    mlp: int = 512  # MLP hidden size
    patch: int = 14  # pixels per token side (DA3's patch)
    base_grid: int = 8  # side of the square token grid the position table is defined on
    ln_eps: float = 1e-6
    imagenet_output: bool = False  # True: ImageNet-normalised output, de-normalised (official)
    noise_tau: float = 0.0  # RAE noise augmentation of the input features (training only)
    num_levels: int = NUM_LEVELS  # levels of the latent (1 for DINOv2: RAE's decoder)
    refine: int = 0  # channels of a residual 3-conv filter on the image (seams); 0: the linear head


PRESETS = {
    'tiny': DecoderConfig(),
    'small': DecoderConfig(width=256, depth=6, mlp=1024, refine=16),  # bundled, 5.1M parameters
    'xl': DecoderConfig(
        feat_dim=1536,
        width=1152,
        depth=28,
        heads=16,
        mlp=4096,
        base_grid=36,
        ln_eps=1e-12,
    ),
}


def sincos_pos_embed(dim, grid):
    """MAE 2-D sin-cos table (1+grid^2, dim): row 0 (CLS) zeros, [0,dim/2) encode x, the rest y."""
    assert dim % 4 == 0, 'width must be divisible by 4'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing='ij')
    angles = [pos.flatten()[:, None] * omega[None] for pos in (x, y)]  # (grid*grid, dim/4) each
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)
    return torch.cat([table.new_zeros(1, dim), table]).float()


def conv3x3(c_in, c_out):  # sees across the patch borders
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Block(nn.Module):  # pre-LN ViT block, exact GELU
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):  # (N,T,D)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class RGBDecoder(nn.Module):
    """cfg.num_levels (4) feature levels (B,V,T,F) -> images (B,V,3,H,W), each view on its own."""

    def __init__(self, cfg='tiny', feat_dim=None):
        super().__init__()
        if isinstance(cfg, str):
            cfg = PRESETS[cfg]
        if feat_dim is not None:
            cfg = replace(cfg, feat_dim=feat_dim)
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Linear(cfg.num_levels * cfg.feat_dim, D)
        self.mask_tokens = nn.Parameter(torch.zeros(cfg.num_levels, cfg.feat_dim))  # dropped levels
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer('pos_embed', sincos_pos_embed(D, cfg.base_grid)[None])  # (1,1+g*g,D)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.head = nn.Linear(D, cfg.patch * cfg.patch * 3)
        self.refine = None
        if cfg.refine:
            c = cfg.refine
            layers = [conv3x3(3, c), nn.GELU(), conv3x3(c, c), nn.GELU(), conv3x3(c, 3)]
            self.refine = nn.Sequential(*layers)
        for name, value in (('rgb_mean', IMAGENET_MEAN), ('rgb_std', IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value).view(3, 1, 1), persistent=False)
        self.init_weights()

    def init_weights(self):
        """MAE-style: xavier Linears, zero biases, unit LayerNorms, CLS ~ N(0, 0.02), zero masks."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.mask_tokens)
        if self.refine is not None:  # a zero last conv: the filter starts as the identity
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    def pos_embed_at(self, h, w):
        """The base table bicubically resized to an h x w token grid: (1,1+h*w,D)."""
        g = self.cfg.base_grid
        grid = rearrange(self.pos_embed[:, 1:], 'b (gy gx) d -> b d gy gx', gy=g)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)
        table = rearrange(grid, 'b d h w -> b (h w) d')
        return torch.cat([self.pos_embed[:, :1], table], 1)

    def fuse(self, levels, keep=None, generator=None):
        """4 x (B,V,T,F) -> (B,V,T,4F); noised (training: drawn from generator, the run's stream, on its device);
        masked where keep (B,[V,]4) is False."""
        x = torch.cat(levels, -1)  # (B,V,T,4F)
        B, V = x.shape[:2]
        L = self.cfg.num_levels
        if self.training and self.cfg.noise_tau > 0:
            dev = generator.device if generator is not None else x.device
            sigma = self.cfg.noise_tau * torch.rand(B, V, 1, 1, generator=generator, device=dev)
            eps = torch.randn(x.shape, generator=generator, device=dev)
            x = x + (sigma * eps).to(x)
        if keep is not None:
            keep = keep.to(x.device).reshape(B, -1, L).expand(B, V, L)
            keep = keep.repeat_interleave(self.cfg.feat_dim, -1)[:, :, None]  # (B,V,1,4F)
            x = torch.where(keep, x, self.mask_tokens.flatten().to(x.dtype))
        return x

    def forward(self, levels, hw, keep=None, generator=None):
        """levels: 4 x (B,V,T,F) in the heads' form; hw = (h, w), the token grid -> (B,V,3,H,W); generator: the
        training noise's random stream (None: torch's global one)."""
        B, V, T, _ = levels[0].shape
        h, w = hw
        p = self.cfg.patch
        assert T == h * w, f'{T} tokens do not form a {h}x{w} grid'
        tokens = rearrange(self.fuse(levels, keep, generator), 'b v t f -> (b v) t f')
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(B * V, -1, -1).to(x.dtype), x], 1)
        x = x + self.pos_embed_at(h, w).to(x.dtype)  # (BV,1+T,D)
        x = self.blocks(x)
        patches = self.head(self.norm(x)[:, 1:])  # (BV,T,p*p*3): (py, px, rgb) as released
        pattern = 'bv (h w) (py px c) -> bv c (h py) (w px)'
        images = rearrange(patches, pattern, h=h, py=p, px=p, c=3)
        if self.refine is not None:
            images = images + self.refine(images)
        if self.cfg.imagenet_output:
            images = images * self.rgb_std + self.rgb_mean
        return rearrange(images, '(b v) c H W -> b v c H W', b=B)


def sample_level_keep(B, p=0.5, generator=None, levels=NUM_LEVELS):
    """Level-dropout keep mask (B,levels), CPU: each dropped with chance p, empty rows redrawn."""
    assert 0 <= p < 1, 'p must be in [0, 1)'
    keep = torch.rand(B, levels, generator=generator) >= p
    empty = ~keep.any(1)
    while empty.any():
        keep[empty] = torch.rand(int(empty.sum()), levels, generator=generator) >= p
        empty = ~keep.any(1)
    return keep


@torch.no_grad()
def reconstruct_per_level(decoder, levels, hw):
    """Paper Tab. 6: {'all': images from all levels, l: from level l alone (the others masked)}."""
    B = levels[0].shape[0]
    L = len(levels)
    alone = torch.eye(L, dtype=torch.bool, device=levels[0].device)  # row l: keep level l only
    images = {'all': decoder(levels, hw)}
    for level in range(L):
        images[level] = decoder(levels, hw, keep=alone[level].expand(B, L))
    return images


# ----------------------------------------------------------------------------- losses
def decoder_loss(pred, gt, lpips=None):
    """L1 (+ LPIPS, a callable on [0,1] pairs) of (B,V,3,H,W) -> (loss, parts)."""
    l1 = (pred - gt).abs().mean()
    loss = l1
    parts = {'l1': l1.detach()}
    if lpips is not None:
        perceptual = lpips(pred.flatten(0, -4), gt.flatten(0, -4)).mean()
        loss = loss + perceptual
        parts['lpips'] = perceptual.detach()
    return loss, parts


class PatchDiscriminator(nn.Module):
    """PatchGAN, spectral norm, LeakyReLU 0.2: [0,1] images (...,3,H,W) -> logits (N,1,h',w')."""

    def __init__(self, ch=64, n_down=3):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers = []
        c_in = 3
        for i in range(n_down):
            c_out = ch * 2**i
            layers += [sn(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers += [
            sn(nn.Conv2d(c_in, c_in, 4, 1, 1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(c_in, 1, 4, 1, 1)),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, images):
        return self.net(images.flatten(0, -4) * 2 - 1)


def adversarial_step(decoder, disc, disc_opt, pred, gt, rec_loss, disc_weight=0.75, max_weight=1e4):
    """A hinge-loss D step -> (G's non-saturating loss x disc_weight x adaptive weight, parts)."""
    d_loss = F.relu(1 - disc(gt)).mean() + F.relu(1 + disc(pred.detach())).mean()
    disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    disc_opt.step()
    disc.requires_grad_(False)
    g_loss = F.softplus(-disc(pred)).mean()
    disc.requires_grad_(True)
    # VQGAN's adaptive weight: the gradient norms at the last layer (DDP-wrapped or not)
    last = getattr(decoder, 'module', decoder).head.weight
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()
    parts = {'gan_d': d_loss.detach(), 'gan_g': g_loss.detach(), 'gan_weight': weight}
    return disc_weight * weight * g_loss, parts


# ----------------------------------------------------------------------------- the official checkpoint (mae_decoder.pt)
_OFFICIAL_PARAMS = {
    'cls_token': ['trainable_cls_token'],
    'pos_embed': ['decoder_pos_embed'],
    'mask_tokens': [],
}
_OFFICIAL_TOP = {'embed': 'decoder_embed', 'norm': 'decoder_norm', 'head': 'decoder_pred'}
_OFFICIAL_BLOCK = {
    'norm1': ['layernorm_before'],
    'norm2': ['layernorm_after'],
    'fc1': ['intermediate.dense'],
    'fc2': ['output.dense'],
    'attn.proj': ['attention.output.dense'],
    'attn.qkv': [f'attention.attention.{n}' for n in ('query', 'key', 'value')],
}  # fused: 3 keys


def official_names(key):
    """The official key(s) of ours: query, key, value for the fused qkv; none for mask tokens."""
    if key in _OFFICIAL_PARAMS:
        return _OFFICIAL_PARAMS[key]
    module, param = key.rsplit('.', 1)
    if module in _OFFICIAL_TOP:
        return [f'{_OFFICIAL_TOP[module]}.{param}']
    _, i, sub = module.split('.', 2)  # blocks.{i}.{sub}
    return [f'decoder_layers.{i}.{n}.{param}' for n in _OFFICIAL_BLOCK[sub]]


def convert_official(state_dict, heads=16):
    """Official mae_decoder.pt state dict -> (DecoderConfig, state dict); mask tokens at 0."""
    for k in (
        'decoder_embed.weight',
        'decoder_layers.0.intermediate.dense.weight',
        'decoder_pred.weight',
        'decoder_pos_embed',
    ):
        if k not in state_dict:
            raise ValueError(
                f'not an official GLD decoder state dict: no {k!r} (a file as released is '
                f'unwrapped first: official.read_official(path, "decoder"))'
            )
    width, in_dim = state_dict['decoder_embed.weight'].shape
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('decoder_layers.'))
    cfg = DecoderConfig(
        feat_dim=in_dim // NUM_LEVELS,
        width=width,
        depth=depth,
        heads=heads,
        mlp=state_dict['decoder_layers.0.intermediate.dense.weight'].shape[0],
        patch=math.isqrt(state_dict['decoder_pred.weight'].shape[0] // 3),
        base_grid=math.isqrt(state_dict['decoder_pos_embed'].shape[1] - 1),
        ln_eps=1e-12,
        imagenet_output=True,
    )
    with torch.device('meta'):
        reference = RGBDecoder(cfg).state_dict()
    names = {k: official_names(k) for k in reference}
    expected = {n for v in names.values() for n in v}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        details = f'missing: {missing}\n  unexpected: {unexpected}'
        raise ValueError(f'official decoder state dict does not match {cfg}:\n  {details}')
    like = state_dict['decoder_embed.weight']
    ours = {}
    wrong = []
    for k, ref in reference.items():
        official = [state_dict[n] for n in names[k]]  # none for the mask tokens
        ours[k] = torch.cat(official) if official else like.new_zeros(ref.shape)
        if ours[k].shape != ref.shape:
            got = tuple(ours[k].shape)
            wrong.append(f'{k}: expected {tuple(ref.shape)}, got {got} from {names[k]}')
    if wrong:
        raise ValueError('official decoder shapes do not match:\n  ' + '\n  '.join(wrong))
    return cfg, ours
