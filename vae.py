"""The Stable Diffusion VAE (KL autoencoder, 8x downsampling, 4 latent channels): the GLD paper's SD-VAE baseline.

CompVis ldm's AutoencoderKL, loaded strictly from the ORIGINAL ldm layout (sd-vae-ft-mse-original, or an SD 1.x
checkpoint's first_stage_model.*), not diffusers'. ONE level: the posterior mean x 0.18215 of images in [-1,1], 2x2
latent patches per token (DiT's patch 2); its own RGB decoder. Presets 'vae' (kl-f8, 83.7M) and 'vae-tiny' (CPU).
References: LDM (arXiv 2112.10752), VAE (arXiv 1312.6114), DiT (arXiv 2212.09748), GLD (arXiv 2603.22275).
Shape legend: B batch, V views, H W image, h w token grid (h = H/16), C channels, T tokens (h*w).
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


PRESETS = {'vae': VAEConfig(), 'vae-tiny': VAEConfig('vae-tiny', 32, (1, 1, 2, 2), 1, 4, 8)}


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class AttnBlock(nn.Module):  # single-head self-attention over the pixels
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # x (N,c,h,w)
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (N,1,hw,c)
        o = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(o)


def mid_block(c, groups):
    return nn.Sequential(
        OrderedDict(block_1=ResnetBlock(c, c, groups), attn_1=AttnBlock(c, groups), block_2=ResnetBlock(c, c, groups))
    )


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, n, widths = cfg.groups, cfg.num_res_blocks, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        for i, (cin, c) in enumerate(zip([cfg.ch] + widths, widths)):
            level = nn.Module()
            level.block = nn.Sequential(*(ResnetBlock(cin if j == 0 else c, c, g) for j in range(n)))
            if i < len(widths) - 1:  # stride 2, padded right/bottom only
                level.downsample = nn.ModuleDict({'conv': nn.Conv2d(c, c, 3, 2, 0)})
            self.down.append(level)
        self.mid = mid_block(c, g)
        self.norm_out, self.conv_out = nn.GroupNorm(g, c, eps=1e-6), nn.Conv2d(c, 2 * cfg.z_channels, 3, 1, 1)

    def forward(self, x):  # (N,3,H,W) in [-1,1] -> (N,2z,H/8,W/8)
        x = self.conv_in(x)
        for level in self.down:
            x = level.block(x)
            if hasattr(level, 'downsample'):
                x = level.downsample.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, n, widths = cfg.groups, cfg.num_res_blocks + 1, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, 1, 1)
        self.mid = mid_block(widths[-1], g)
        up = []
        for i in reversed(range(len(widths))):  # built deepest first, indexed by level
            cin, c, level = widths[min(i + 1, len(widths) - 1)], widths[i], nn.Module()
            level.block = nn.Sequential(*(ResnetBlock(cin if j == 0 else c, c, g) for j in range(n)))
            if i > 0:
                level.upsample = nn.ModuleDict({'conv': nn.Conv2d(c, c, 3, 1, 1)})
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = nn.GroupNorm(g, c, eps=1e-6), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):  # (N,z,h,w) -> (N,3,8h,8w) in [-1,1]
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level.block(x)
            if hasattr(level, 'upsample'):
                x = level.upsample.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(encoder_lib.LatentEncoder):
    """AutoencoderKL (ldm layout) with GLD's latent interface."""

    has_rgb_decoder = True

    def __init__(self, cfg):
        super().__init__()
        self.cfg, p = cfg, cfg.token_patch
        self.dim, self.patch = cfg.z_channels * p * p, 8 * p
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def posterior(self, x):
        """x (N,3,H,W) in [0,1] -> mean, logvar (N,z,H/8,W/8), log-variance clamped to [-30, 20] as ldm."""
        mean, logvar = self.quant_conv(self.encoder(2 * x - 1)).chunk(2, 1)
        return mean, logvar.clamp(-30, 20)

    def decode_latent(self, z):
        """Unscaled latent (N,z,h,w) -> images (N,3,8h,8w) in [0,1] (not clamped)."""
        return (self.decoder(self.post_quant_conv(z)) + 1) / 2

    def encode(self, images):
        """images (B,V,3,H,W) in [0,1] -> [level 0 (B,V,T,z p p)], p x p latent patches, channels (z, py, px)."""
        B, V, _, H, W = images.shape
        self.check_size(H, W)
        z, p = self.posterior(images.flatten(0, 1))[0] * self.cfg.scale, self.cfg.token_patch  # (BV,z,H/8,W/8)
        z = z.unflatten(2, (H // self.patch, p)).unflatten(4, (W // self.patch, p))  # (BV,z,h,p,w,p)
        return [z.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2).unflatten(0, (B, V))]

    def rgb_decoder(self):
        return VAEDecoder(self)

    def reconstruct(self, images):
        return self.rgb_decoder()(self.encode(images), tuple(d // self.patch for d in images.shape[-2:]))

    def training_loss(self, batch, kl_weight=1e-6):
        """train.py --stage encoder: L1 of a decoded posterior sample + kl_weight x KL to N(0, I) (no LPIPS / GAN)."""
        images = batch['images'].flatten(0, 1)
        mean, logvar = self.posterior(images)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = (self.decode_latent(z) - images).abs().mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        return rec + kl_weight * kl, {'l1': rec.detach(), 'kl': kl.detach()}


class VAEDecoder(nn.Module):
    """The VAE's own decoder with the RGB decoder's call: levels [(B,V,T,dim)], hw (token grid) -> (B,V,3,H,W)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, levels, hw, keep=None):
        (B, V, _, _), (h, w), p, cfg = levels[0].shape, hw, self.vae.cfg.token_patch, self.vae.cfg
        z = levels[0].reshape(B * V, h, w, cfg.z_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        z = z.reshape(B * V, cfg.z_channels, h * p, w * p) / cfg.scale
        return self.vae.decode_latent(z).unflatten(0, (B, V))


def load_weights(enc, weights):
    """The ldm AutoencoderKL layout (a bare VAE file, or an SD checkpoint's first_stage_model.*) into enc, strictly."""
    sd = encoder_lib.read_state_dict(weights, strip=r'^module\.')
    if any(k.startswith('first_stage_model.') for k in sd):
        sd = {k[len('first_stage_model.') :]: v for k, v in sd.items() if k.startswith('first_stage_model.')}
    sd = encoder_lib.skip_keys(sd, ('loss.',), 'vae', 'the training loss, not the model')
    return encoder_lib.load_strict(enc, sd, enc.cfg.name)
