"""What the diffusion models see of the frozen encoder (DA3 by default), for training, sampling and bench alike.

The encoder registry, the latent statistics (each level normalised per channel), the DiT's camera inputs, and its
other inputs (`dit_inputs`): the leakage-free source condition (GLD 4.3), CFG's unconditional cameras and the cascade's
noised level-1 condition (GLD 4.4); the normalised training targets. `latent_cache.py` stores these latents.
Legend: B batch, V views, H W image, h w token grid, C channels (a level has 2C), T tokens (h*w).
"""

import itertools
from dataclasses import dataclass

import torch

import cameras
import cli
import dinov2
import encoder as encoder_lib
import vae
import vggt
from constants import PATCH

FAMILIES = {
    'da3': (encoder_lib, encoder_lib.DA3),
    'vggt': (vggt, vggt.VGGT),
    'dinov2': (dinov2, dinov2.DINOv2),
    'vae': (vae, vae.VAE),
}


def build_encoder(name='da3-base', weights=None):
    """The --encoder registry: da3-* (GLD), vggt-* (GLD (VGGT)), dinov2-* (RAE), vae* (SD-VAE); weights: None (random),
    file(s) or a state dict, official layout. The interface the DiT, training, statistics and the pipeline use:
      dim, patch, num_levels    channels of a level, image pixels per token side, levels 0..num_levels-1
      encode(images)            (B,V,3,H,W) in [0,1] -> num_levels raw levels (B,V,T,dim), T = (H/patch)(W/patch)
      special                   tokens leading each level (VGGT's 5; 0 elsewhere): diffused with the
                                patches, own statistics; encode's levels are (B,V,special+T,dim)
      normalize_levels(levels)  raw levels -> what the heads and the RGB decoder read (patches only)
      can_propagate             propagate(level_k, k, cls, hw) -> levels k+1.., cls from first_view_cls(images, k)
                                (special: None, the level's own)
      has_geometry              geometry(normalised levels, H, W, cls_last) -> depth, depth_conf (B,V,H,W), c2w, K
      has_rgb_decoder           rgb_decoder(): its own, called as decoder.RGBDecoder (else one is trained on the levels)
      freeze(), cfg.name"""
    family = name.split('-')[0]
    lib, cls = FAMILIES.get(family, (None, None))
    if lib is None or name not in lib.PRESETS:
        names = sorted(n for family, _ in FAMILIES.values() for n in family.PRESETS)
        raise cli.UserError(f'--encoder {name}: unknown encoder; pass one of {", ".join(names)}')
    enc = cls(lib.PRESETS[name])
    if weights is not None:
        lib.load_weights(enc, weights)
    return enc


# ----------------------------------------------------------------------------- latent statistics
class LatentStats:
    """Per-level, per-channel mean and variance (dicts level -> (2C,)): normalize(x, l) =
    (x - mean) / sqrt(var + 1e-5). A level that leads with K special tokens (VGGT) has theirs in
    special_mean, special_var (level -> (K,2C); pooled over the K tokens as released: equal rows)."""

    eps = 1e-5
    FIELDS = ('mean', 'var', 'special_mean', 'special_var')  # saved as '<field><level>'

    def __init__(self, mean, var, special_mean=None, special_var=None):
        self.mean = {int(level): m.float().flatten() for level, m in mean.items()}
        self.var = {int(level): v.float().flatten() for level, v in var.items()}
        self.special_mean = {int(level): m.float() for level, m in (special_mean or {}).items()}
        self.special_var = {int(level): v.float() for level, v in (special_var or {}).items()}

    def moments(self, x, level):
        """The mean and std of `level` that x (...,[K+]T,2C) is normalised with, per token and
        channel."""
        mean = self.mean[level].to(x)
        var = self.var[level].to(x)
        if level in self.special_mean:  # the K special tokens first, then the patches
            special_mean = self.special_mean[level].to(x)
            special_var = self.special_var[level].to(x)
            T = x.shape[-2] - len(special_mean)
            mean = torch.cat([special_mean, mean.expand(T, -1)])
            var = torch.cat([special_var, var.expand(T, -1)])
        return mean, torch.sqrt(var + self.eps)

    def normalize(self, x, level):
        """x (...,[K+]T,2C) of `level` -> zero mean and unit variance per channel (what the DiTs
        model)."""
        mean, std = self.moments(x, level)
        return (x - mean) / std

    def denormalize(self, z, level):
        """The inverse of normalize: a generated z (...,[K+]T,2C) -> the encoder's raw level."""
        mean, std = self.moments(z, level)
        return z * std + mean

    def state_dict(self):
        """{'mean<l>', 'var<l>'[, 'special_mean<l>', 'special_var<l>']}: the layout of checkpoints,
        exports and --stats files."""
        sd = {}
        for field in self.FIELDS:
            for level, value in getattr(self, field).items():
                sd[f'{field}{level}'] = value
        return sd

    def save(self, path):
        """A .safetensors file, else a torch file (train.py --stats reads both)."""
        sd = {k: v.contiguous() for k, v in self.state_dict().items()}
        if str(path).endswith('.safetensors'):
            from safetensors.torch import save_file

            return save_file(sd, str(path))
        torch.save(sd, path)

    @classmethod
    def load(cls, path):
        """A file of save; an unreadable one is a UserError naming it."""
        fix = 'pass --stats a file written by LatentStats.save, or leave it out to compute them'
        sd = encoder_lib.read_tensors(path, 'statistics', fix)
        return cls.from_state_dict(sd)

    @classmethod
    def from_state_dict(cls, sd):
        fields = {field: {} for field in cls.FIELDS}
        for key, value in sd.items():
            field = key.rstrip('0123456789')  # e.g. 'special_mean' of 'special_mean1'
            if field in fields:
                level = int(key[len(field) :])
                fields[field][level] = value
        return cls(**fields)


def sums_of(rows):
    """Per level, rows (M,2C) -> (L,2,2C): the sums of x and of x^2 over the rows."""
    return torch.stack([torch.stack([r.sum(0), (r * r).sum(0)]) for r in rows])


def moments_by_level(sums, count, levels):
    """sums_of (L,2,2C) over count rows -> {level: mean (2C,)}, {level: variance (2C,)}."""
    mean = sums[:, 0] / count
    var = (sums[:, 1] / count - mean**2).clamp_min(0)
    means = {level: mean[i].cpu() for i, level in enumerate(levels)}
    variances = {level: var[i].cpu() for i, level in enumerate(levels)}
    return means, variances


@torch.no_grad()
def compute_latent_stats(enc, image_batches, levels=(0, 1)):
    """Batches (images (B,V,3,H,W) or dicts with 'images') -> LatentStats of enc.encode (float64,
    DDP all-reduced); the enc.special tokens leading a level get theirs, pooled over them (as
    released)."""
    device = next(enc.parameters()).device
    K = enc.special
    sums = 0
    count = torch.zeros((), dtype=torch.float64, device=device)
    special_sums = torch.zeros_like(count)  # (L,2,2C) once added to
    special_count = torch.zeros_like(count)
    for batch in image_batches:
        images = batch['images'] if isinstance(batch, dict) else batch
        feats = enc.encode(images.to(device))
        chosen = [feats[level].double() for level in levels]  # each (B,V,K+T,2C)
        rows = [f[:, :, K:].flatten(0, -2) for f in chosen]  # each (BVT,2C)
        sums = sums + sums_of(rows)  # (L,2,2C)
        count += rows[0].shape[0]
        if K:
            special_rows = [f[:, :, :K].flatten(0, -2) for f in chosen]  # each (BVK,2C)
            special_sums = special_sums + sums_of(special_rows)
            special_count += special_rows[0].shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for total in (sums, count, special_sums, special_count):
            torch.distributed.all_reduce(total)
    stats = LatentStats(*moments_by_level(sums, count, levels))
    if K:  # one vector for the K tokens, stored per token
        special_mean, special_var = moments_by_level(special_sums, special_count, levels)
        stats.special_mean = {level: m.float().repeat(K, 1) for level, m in special_mean.items()}
        stats.special_var = {level: v.float().repeat(K, 1) for level, v in special_var.items()}
    return stats


def compute_stats(enc, loader, levels, n_batches, device):
    """compute_latent_stats of the first n_batches batches of a training loader (train.py --stats-batches)."""
    batches = itertools.islice(loader, n_batches)
    images = (b['images'].to(device) for b in batches)
    return compute_latent_stats(enc, images, levels)


# ----------------------------------------------------------------------------- camera inputs of the DiT
def camera_inputs(c2w, K, src_mask, hw, patch=PATCH, official=False):
    """Cameras as given (B,V) -> {'plucker' (B,V,7,ph,pw): [mask (1 target), d, o x d], 'P', 'P_inv' (B,V,4,4) of
    PRoPE, 'src_mask', 'hw'}; official: the release's Plücker offset and P_inv (OfficialConventions 2-3)."""
    h, w = hw
    offset = (-0.5, 0.5) if official else (0.5, 0.5)
    rays = cameras.plucker_rays(c2w, K, patch * h, patch * w, pixel_offset=offset)  # (B,V,6,ph,pw)
    B, V, _, ph, pw = rays.shape
    is_target = (~src_mask).to(rays.dtype)  # (B,V)
    mask = is_target[..., None, None, None].expand(B, V, 1, ph, pw)
    plucker = torch.cat([mask, rays], 2)
    P, P_inv = cameras.prope_matrices(c2w, K, official=official)
    return {
        'plucker': plucker,  # (B,V,7,ph,pw) the camera embedder's input
        'P': P,  # (B,V,4,4) PRoPE's matrices: queries by P^T, outputs by P
        'P_inv': P_inv,  # (B,V,4,4) keys and values
        'src_mask': src_mask,  # (B,V) bool, True at the sources
        'hw': (h, w),  # the token grid
    }


def drop_cameras(cams, drop):
    """Camera dropout / CFG's unconditional branch where drop (B,): Plücker rays zeroed (mask kept), P = P_inv = I."""
    plucker = cams['plucker'].clone()
    keep = (~drop).to(plucker.dtype)
    plucker[:, :, 1:] *= keep[:, None, None, None, None]
    eye = torch.eye(4, dtype=cams['P'].dtype, device=cams['P'].device)
    dropped = drop[:, None, None, None]  # (B,1,1,1) against P (B,V,4,4)
    P = torch.where(dropped, eye, cams['P'])
    P_inv = torch.where(dropped, eye, cams['P_inv'])
    return {**cams, 'plucker': plucker, 'P': P, 'P_inv': P_inv}


def model_cameras(c2w, K, src_mask, hw, official=False, patch=PATCH):
    """The DiT's cameras: poses relative to the last view, largest camera distance 1 (official: largest |t| component
    1, OfficialConventions 1-3) -> camera_inputs."""
    by = 'max_abs' if official else 'norm'
    c2w_rel, _ = cameras.normalize_poses(c2w, ref=-1, by=by)
    return camera_inputs(c2w_rel, K, src_mask, hw, patch=patch, official=official)


# ----------------------------------------------------------------------------- the DiT's inputs
def source_condition(enc, images, n_src):
    """Leakage-free condition: raw levels (B,V,T,2C) of the sources (views 0..n_src-1) encoded alone, zero targets."""
    B, V = images.shape[:2]
    levels = []
    for f in enc.encode(images[:, :n_src]):  # (B,n_src,T,2C) each
        targets = f.new_zeros(B, V - n_src, *f.shape[2:])
        levels.append(torch.cat([f, targets], 1))
    return levels


def encode_batch(enc, batch, levels, cond_level):
    """Raw levels of a batch: {'full': {l: (B,V,T,2C)} of all views jointly, 'cond': source_condition's cond_level}."""
    if 'full' in batch:
        return batch
    images = batch['images']
    n_src = int(batch['src_mask'][0].sum())
    with torch.no_grad():
        full = enc.encode(images)
        cond = source_condition(enc, images, n_src)[cond_level]
        return {'full': {level: full[level] for level in levels}, 'cond': cond}


@dataclass
class DiTInputs:
    """What M_level reads besides x_t and t (GLD A.2), built by dit_inputs; velocity_fn is the one call of the DiT."""

    cond: torch.Tensor  # (B,V,T,C) the normalised source condition, zeros at the targets
    cams: dict  # model_cameras (training: some samples' cameras dropped)
    uncond_cams: dict  # CFG's unconditional branch: every sample's cameras dropped
    upper: torch.Tensor | None  # (B,V,T,C) the normalised upper level of the cascade M1->0, else None

    @property
    def src_mask(self):
        """(B,V) bool, True at the sources: the flow loss reports the source and target views apart."""
        return self.cams['src_mask']

    def velocity_fn(self, net, unconditional=False):
        """net on these inputs as the flow's velocity_fn(x_t, t (B,)) -> v (unconditional: CFG's branch)."""
        cams = self.uncond_cams if unconditional else self.cams

        def velocity(x_t, t):
            return net(x_t, t, self.cond, cams, upper=self.upper)

        return velocity


def dit_inputs(
    stats,  # the model's LatentStats
    level,  # the level it generates
    cond_raw,  # (B,V,T,C) source_condition's level
    cams,  # model_cameras
    upper_level=None,  # the cascade M1->0: the level it is conditioned on (1)
    upper_raw=None,  # (B,V,T,C) that level, raw
    tau=0.0,  # training: > 0 noises the upper level (GLD 4.4)
    cam_drop=None,  # training: each sample's cameras dropped with this probability (a draw even at 0)
    generator=None,  # training: the random stream of tau and cam_drop
):
    """The inputs of M_level for training, sampling (pipeline) and bench alike -> DiTInputs. Here and not in
    diffusion.py: they need this module's statistics and cameras, while the flow (x_t, t, v) knows only tensors."""
    B = cond_raw.shape[0]
    is_source = cams['src_mask'][:, :, None, None]  # (B,V,1,1)
    cond = stats.normalize(cond_raw, level) * is_source  # normalised once, here; the targets stay zeros
    upper = None
    if upper_level is not None:
        upper = stats.normalize(upper_raw, upper_level)
    if upper is not None and tau > 0:  # M1->0: ground-truth level 1 noised by sigma ~ |N(0, tau^2)|, variance kept
        sigma = (torch.randn(B, 1, 1, 1, generator=generator) * tau).abs().to(upper.device)
        eps = torch.randn(upper.shape, generator=generator).to(upper.device)
        upper = (upper + sigma * eps) / torch.sqrt(1 + sigma**2)
    if cam_drop is not None:  # training's camera dropout teaches the unconditional branch of CFG
        drop = torch.rand(B, generator=generator, device='cpu') < cam_drop
        cams = drop_cameras(cams, drop.to(cond.device))
    every_sample = torch.ones(B, dtype=torch.bool, device=cond.device)
    return DiTInputs(cond, cams, drop_cameras(cams, every_sample), upper)


def training_latents(enc, stats, batch, level, upper_level=None, tau=0.0, cam_drop=0.0, generator=None):
    """One training batch of M_level -> (x (B,V,T,C): the encoder over all V views jointly, normalised per channel,
    its DiTInputs with tau's noised upper level and cam_drop's camera dropout)."""
    if 'images' in batch:
        H, W = batch['images'].shape[-2:]
    else:  # a LatentCache batch: the latents without the images
        H, W = batch['size']
    hw = (H // enc.patch, W // enc.patch)
    levels = [level] if upper_level is None else [level, upper_level]
    raw = encode_batch(enc, batch, levels, level)
    x = stats.normalize(raw['full'][level], level)
    cams = model_cameras(batch['c2w'], batch['K'], batch['src_mask'], hw, patch=enc.patch)
    upper_raw = None
    if upper_level is not None:
        upper_raw = raw['full'][upper_level]
    inputs = dit_inputs(stats, level, raw['cond'], cams, upper_level, upper_raw, tau, cam_drop, generator)
    return x, inputs
