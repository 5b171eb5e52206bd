"""The Stable Diffusion VAE (KL autoencoder, 8x downsampling, 4 latent channels): the GLD paper's
SD-VAE baseline.

CompVis ldm's AutoencoderKL, loaded strictly from the ORIGINAL ldm layout (sd-vae-ft-mse-original,
or an SD 1.x checkpoint's first_stage_model.*), not diffusers'. ONE level: the posterior mean x
0.18215 of images in [-1,1], 2x2 latent patches per token (DiT's patch 2); its own RGB decoder.
Presets 'vae' (kl-f8, 83.7M) and 'vae-tiny' (CPU).
References (arXiv): LDM 2112.10752, VAE 1312.6114, DiT 2212.09748, GLD 2603.22275.
Shape legend: B batch, V views, H W image, h w token grid (h = H/16), C channels, T tokens (h*w).
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import encoder as encoder_lib


@dataclass
class VAEConfig:
    name: str = 'vae'
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)  # 3 downsamples: 8x
    num_res_blocks: int = 2
    z_channels: int = 4
    groups: int = 32  # GroupNorm groups
    token_patch: int = 2  # latent pixels per token side
    scale: float = 0.18215  # SD's latent scale factor


PRESETS = {
    'vae': VAEConfig(),
    'vae-tiny': VAEConfig(
        'vae-tiny',
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        z_channels=4,
        groups=8,
    ),
}


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        skip = self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x
        return skip + y


class AttnBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        """x (N,c,h,w) -> x + single-head self-attention over its pixels."""
        h = x.shape[2]
        normed = self.norm(x)
        q = rearrange(self.q(normed), 'n c h w -> n 1 (h w) c')
        k = rearrange(self.k(normed), 'n c h w -> n 1 (h w) c')
        v = rearrange(self.v(normed), 'n c h w -> n 1 (h w) c')
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, 'n 1 (h w) c -> n c h w', h=h)
        return x + self.proj_out(out)


def mid_block(c, groups):
    blocks = OrderedDict(
        block_1=ResnetBlock(c, c, groups),
        attn_1=AttnBlock(c, groups),
        block_2=ResnetBlock(c, c, groups),
    )
    return nn.Sequential(blocks)


def resnet_blocks(cin, c, n, groups):
    """n ResnetBlocks: cin -> c, then c -> c."""
    blocks = [ResnetBlock(cin if j == 0 else c, c, groups) for j in range(n)]
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        inputs = [cfg.ch] + widths[:-1]
        for i, (cin, c) in enumerate(zip(inputs, widths)):
            level = nn.Module()
            level.block = resnet_blocks(cin, c, cfg.num_res_blocks, cfg.groups)
            if i < len(widths) - 1:  # stride 2, padded right/bottom only
                level.downsample = nn.ModuleDict({'conv': nn.Conv2d(c, c, 3, 2, 0)})
            self.down.append(level)
        self.mid = mid_block(widths[-1], cfg.groups)
        self.norm_out = nn.GroupNorm(cfg.groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        """x (N,3,H,W) in [-1,1] -> (N,2z,H/8,W/8)."""
        x = self.conv_in(x)
        for level in self.down:
            x = level.block(x)
            if hasattr(level, 'downsample'):
                x = level.downsample.conv(F.pad(x, (0, 1, 0, 1)))
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, 1, 1)
        self.mid = mid_block(widths[-1], cfg.groups)
        up = []
        for i in reversed(range(len(widths))):  # built deepest first, indexed by level
            cin = widths[min(i + 1, len(widths) - 1)]
            c = widths[i]
            level = nn.Module()
            level.block = resnet_blocks(cin, c, cfg.num_res_blocks + 1, cfg.groups)
            if i > 0:
                level.upsample = nn.ModuleDict({'conv': nn.Conv2d(c, c, 3, 1, 1)})
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(cfg.groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], 3, 3, 1, 1)

    def forward(self, z):
        """z (N,z,h,w) -> (N,3,8h,8w) in [-1,1]."""
        x = self.conv_in(z)
        x = self.mid(x)
        for level in reversed(self.up):
            x = level.block(x)
            if hasattr(level, 'upsample'):
                x = F.interpolate(x, scale_factor=2.0, mode='nearest')
                x = level.upsample.conv(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(encoder_lib.LatentEncoder):
    """AutoencoderKL (ldm layout) with GLD's latent interface."""

    has_rgb_decoder = True

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p = cfg.token_patch
        self.dim = cfg.z_channels * p * p
        self.patch = 8 * p  # image pixels per token side
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def posterior(self, x):
        """x (N,3,H,W) in [0,1] -> mean, logvar (N,z,H/8,W/8), log-variance clamped to [-30, 20] as
        ldm."""
        features = self.encoder(2 * x - 1)
        moments = self.quant_conv(features)  # (N,2z,H/8,W/8): [mean, logvar]
        mean, logvar = moments.chunk(2, 1)
        return mean, logvar.clamp(-30, 20)

    def decode_latent(self, z):
        """Unscaled latent (N,z,h,w) -> images (N,3,8h,8w) in [0,1] (not clamped)."""
        images = self.decoder(self.post_quant_conv(z))  # in [-1,1]
        return (images + 1) / 2

    def encode(self, images):
        """images (B,V,3,H,W) in [0,1] -> [level 0 (B,V,T,z p p)]: p x p latent patches, channels
        (z, py, px)."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        mean, _ = self.posterior(rearrange(images, 'b v c h w -> (b v) c h w'))
        z = mean * self.cfg.scale  # (BV,z,H/8,W/8)
        p = self.cfg.token_patch
        pattern = '(b v) z (h py) (w px) -> b v (h w) (z py px)'
        tokens = rearrange(z, pattern, b=B, py=p, px=p)
        return [tokens]

    def rgb_decoder(self):
        return VAEDecoder(self)

    def reconstruct(self, images):
        hw = tuple(d // self.patch for d in images.shape[-2:])
        return self.rgb_decoder()(self.encode(images), hw)

    def training_loss(self, batch, kl_weight=1e-6, generator=None):
        """train.py --stage encoder: L1 of a decoded posterior sample + kl_weight x KL to N(0, I)
        (no LPIPS / GAN); the sample's noise from generator (the run's stream, on its device)."""
        images = batch['images'].flatten(0, 1)
        mean, logvar = self.posterior(images)
        dev = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=dev).to(mean)
        std = (0.5 * logvar).exp()
        z = mean + noise * std
        decoded = self.decode_latent(z)
        rec = (decoded - images).abs().mean()
        kl_terms = mean**2 + logvar.exp() - 1 - logvar
        kl = 0.5 * kl_terms.sum((1, 2, 3)).mean()
        loss = rec + kl_weight * kl
        return loss, {'l1': rec.detach(), 'kl': kl.detach()}


class VAEDecoder(nn.Module):
    """The VAE's own decoder with the RGB decoder's call: levels [(B,V,T,dim)], hw (token grid) ->
    (B,V,3,H,W)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, levels, hw, keep=None):
        cfg = self.vae.cfg
        B = levels[0].shape[0]
        h, w = hw
        p = cfg.token_patch
        pattern = 'b v (h w) (z py px) -> (b v) z (h py) (w px)'
        z = rearrange(levels[0], pattern, h=h, w=w, py=p, px=p)
        z = z / cfg.scale
        images = self.vae.decode_latent(z)
        return rearrange(images, '(b v) c h w -> b v c h w', b=B)


def load_weights(enc, weights):
    """The ldm AutoencoderKL layout (a bare VAE file, or an SD checkpoint's first_stage_model.*)
    into enc, strictly."""
    sd = encoder_lib.read_state_dict(weights, strip=r'^module\.')
    prefix = 'first_stage_model.'  # the VAE inside an SD checkpoint
    if any(k.startswith(prefix) for k in sd):
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    sd = encoder_lib.skip_keys(sd, ('loss.',), 'vae', 'the training loss, not the model')
    return encoder_lib.load_strict(enc, sd, enc.cfg.name)
