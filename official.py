"""The released GLD checkpoints (hub repo SeonghuJeon/GLD) as our modules, and their conventions.

File discovery, every layout the release saves, strict conversion and `OfficialConventions`; `sample.py --official
DIR` runs them, docs/official.md has the download steps and tables. Legend: B batch, V views, H W image, C channels.
"""

import argparse
import os
import re

import torch

import cameras
import decoder as decoder_lib
import diffusion
import latents
import model as model_lib
import safety

OFFICIAL_HUB = 'SeonghuJeon/GLD'
OFFICIAL_FILES = {  # latent -> role -> path in the release (its README.md; model_stats/ comes with its git repository)
    'da3': {
        'encoder': 'pretrained_models/da3/model.safetensors',
        'head': 'pretrained_models/da3/dpt_decoder.pt',
        'decoder': 'pretrained_models/mae_decoder.pt',  # the RGB decoder (GeneralDecoder_Variable)
        'level1': 'checkpoints/da3_level1.pt',
        'cascade': 'checkpoints/da3_cascade.pt',  # DDT.py, DDT_old.py
        **{f'stats{l}': f'model_stats/da3/normalization_stats_level{l}.pt' for l in (0, 1)},
    },
    'vggt': {
        'decoder': 'pretrained_models/vggt/mae_decoder.pt',
        'level1': 'checkpoints/vggt_level1.pt',
        'cascade': 'checkpoints/vggt_cascade.pt',  # found, not loaded
        **{
            f'{role}{l}': f'model_stats/vggt/{name}_stats_level{l}.pt'
            for role, name in (('stats', 'normalization'), ('special', 'special'))
            for l in (0, 1)
        },
    },
}
OFFICIAL_LAYOUTS = {  # kind -> (wrapper keys, preferred first; key prefixes kept and stripped); which release code
    'encoder': ((), ('model.',)),  # writes or reads each: docs/official.md, "Files and layouts loaded"
    'decoder': (('ema', 'model', 'ema_decoder', 'decoder'), ('decoder.',)),
    'head': (('model',), ('decoder.', 'pred.')),
    'model': (('ema', 'model'), ()),
    'stats': ((), ()),
}


def describe_layouts(kind):
    """The layouts of OFFICIAL_LAYOUTS[kind] in words (error messages, docs/official.md)."""
    wrappers, prefixes = OFFICIAL_LAYOUTS[kind]
    out = [f'{{{k!r}: state dict, ...}}' for k in wrappers] + ['a flat state dict']
    keys = f"; keys bare{''.join(f' or {p!r}-prefixed' for p in prefixes)}, with or without 'module.'"
    return ', '.join(out) + keys


def official_state_dict(obj, kind, name='', log=print):
    """A released file's contents in an OFFICIAL_LAYOUTS[kind] -> flat state dict (EMA first, prefixes stripped)."""
    wrappers, prefixes = OFFICIAL_LAYOUTS[kind]
    seen = sorted(map(str, obj))[:12] if isinstance(obj, dict) else type(obj).__name__
    unknown = ValueError(
        f'{name}: unknown layout for a {kind} file; top-level keys: {seen}; known layouts: {describe_layouts(kind)}'
    )
    if not isinstance(obj, dict):
        raise unknown
    key = next((k for k in wrappers if isinstance(obj.get(k), dict)), None)
    if key is not None:
        skipped = [k for k in wrappers if k != key and isinstance(obj.get(k), dict)]
        log(f'{name}: using its {key!r} weights' + (f' (not {skipped})' if skipped else ''))
        obj = obj[key]
    sd = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in obj.items()}
    if any(k.startswith(prefixes) for k in sd):
        if others := sorted({k.split('.')[0] for k in sd if not k.startswith(prefixes)}):
            log(f'{name}: skipping the entries of {others}, not part of the {kind}')
        sd = {k.split('.', 1)[1]: v for k, v in sd.items() if k.startswith(prefixes)}
    if not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise unknown
    return sd


def read_official(path, kind, log=print):
    """A released .safetensors or .pt -> official_state_dict; a .pt is read without running code:
    its training args (argparse.Namespace) allowed, other objects refused (safety.load_plain)."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file

        return official_state_dict(load_file(str(path)), kind, path, log)
    obj = safety.load_plain(path, allowed=[argparse.Namespace])
    return official_state_dict(obj, kind, path, log)


def load_official_stats(path, dim=None, log=print):
    """GLD's normalization_stats_level{l}.pt (mean, var [, std] of dim channels) in a folder or list -> LatentStats."""
    if isinstance(path, (str, os.PathLike)):
        path = (
            [os.path.join(path, f) for f in sorted(os.listdir(path)) if re.search(r'level\d+\.pt$', f)]
            if os.path.isdir(path)
            else [path]
        )
    mean, var = {}, {}
    for p in path:
        sd = read_official(p, 'stats', log)
        wrong = dim is not None and any(v.numel() != dim for v in sd.values())
        if wrong or not {'mean', 'var'} <= set(sd) <= {'mean', 'var', 'std'}:
            raise ValueError(
                f'{p}: expected mean, var (and std) of {dim or "C"} channels each, got '
                f'{ {k: tuple(v.shape) for k, v in sd.items()} }'
            )
        level = int(re.search(r'level(\d+)', os.path.basename(str(p))).group(1))
        mean[level], var[level] = sd['mean'], sd['var']
    return latents.LatentStats(mean, var)


def official_prope_K(P, P_inv):
    """K' (...,3,3) from the official PRoPE matrices: P P_inv = lift(K') w2c c2w lift(K') = lift(K'^2), and per axis
    K'^2 maps x -> f^2 x + (f + 1) c: f is the root of its diagonal, c its offset / (f + 1)."""
    sq = (P @ P_inv)[..., :3, :3]
    f = sq.diagonal(dim1=-2, dim2=-1)[..., :2].sqrt()  # (...,2): fx', fy'
    K = torch.zeros_like(sq)
    K[..., 0, 0], K[..., 1, 1], K[..., 2, 2] = f[..., 0], f[..., 1], 1
    K[..., :2, 2] = sq[..., :2, 2] / (f + 1)
    return K


class OfficialConventions:
    """Where the released models' training and evaluation differ from our default (sources: docs/official.md):
    1. poses relative to the last view, largest |t| component = 1: cameras.normalize_poses(by='max_abs');
    2. the Plücker map samples pixel (u, v) at (u - 0.5, v + 0.5): latents.camera_inputs(official=True);
    3. PRoPE's key/value matrix is c2w lift(K'), so P_inv P != I: latents.camera_inputs(official=True);
    4. the cascade M1->0 (DDT_old.py) normalises K by a fixed 504 x 504 image: model_cameras;
    5. CFG's unconditional cameras: M1 viewmats I4 and K = I3 in pixels, the cascade I4 and K kept: model_cameras;
    6. the decoder's output is ImageNet-normalised: DecoderConfig.imagenet_output (decoder.convert_official);
    7. num_steps counts time-grid points from 1 to 0.001, the shift takes an 18 x 18 token grid: time_schedule.
    Not reproduced: the release's bf16 autocast."""

    def __init__(self, cascade_levels=(0,), cascade_image_size=504, shift_image_size=252, patch=14, t_end=0.001):
        self.cascade_levels = set(cascade_levels)  # levels whose model is the released cascade (DDT_old.py)
        self.cascade_image_size = cascade_image_size  # DDT_old.py's cam_input_size
        self.shift_tokens = (shift_image_size // patch) ** 2  # h w of the release's shift: its configured size
        self.t_end = t_end  # where the release's time grid stops

    def time_schedule(self, num_steps, V, C):
        """The release's sampling of V views of C channels -> (Euler steps, shift a, end time), item 7."""
        assert num_steps >= 2, 'the release counts time-grid points: num_steps >= 2 (one Euler step)'
        return num_steps - 1, diffusion.shift_alpha(V * self.shift_tokens * C), self.t_end

    def model_cameras(self, level, cams, uncond_cams):
        """Our official=True cams and CFG's uncond_cams -> those the released model of `level` sees: items 4 and 5."""
        H, W = cams['plucker'].shape[-2:]
        Kc = official_prope_K(cams['P'], cams['P_inv'])  # (B,V,3,3) K' normalised by W, H
        if level in self.cascade_levels:
            S, K = self.cascade_image_size, Kc.clone()
            K[..., :2, 2] += 0.5  # our normalised K
            K_fixed = cameras.prope_K(cameras.K_to_normalized(cameras.K_to_pixels(K, H, W), S, S))  # K' by S x S
            Kc_inv = torch.linalg.inv(Kc)
            cams = {
                **cams,
                'P': cameras.lift(K_fixed @ Kc_inv) @ cams['P'],  # lift(K'_S) w2c
                'P_inv': cams['P_inv'] @ cameras.lift(Kc_inv @ K_fixed),
            }  # c2w lift(K'_S)
            P_uncond = cameras.lift(K_fixed)  # viewmats I4, K kept
        else:
            eye = torch.eye(3, dtype=Kc.dtype, device=Kc.device)  # viewmats I4, K = I3 in pixels
            P_uncond = cameras.lift(cameras.prope_K(cameras.K_to_normalized(eye, H, W))).expand_as(cams['P'])
        return cams, {**uncond_cams, 'P': P_uncond, 'P_inv': P_uncond}


def find_official_files(folder, latent='da3'):
    """Role -> OFFICIAL_FILES[latent] found by name under folder (not at another latent's path; release path first)."""
    get = f'huggingface-cli download {OFFICIAL_HUB} --local-dir {folder} (see docs/official.md)'
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder}: no such folder; download the release with: {get}')
    by_name = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for f in files:
            by_name.setdefault(f, []).append(os.path.join(root, f))
    at = lambda path, rel: ('/' + path.replace(os.sep, '/')).endswith('/' + rel)  # path lies at release path rel
    others = [rel for other, roles in OFFICIAL_FILES.items() if other != latent for rel in roles.values()]
    paths = {}
    for role, rel in OFFICIAL_FILES[latent].items():
        hits = [h for h in by_name.get(os.path.basename(rel), []) if not any(at(h, o) for o in others)]
        exact = [h for h in hits if at(h, rel)]
        if not hits:
            raise FileNotFoundError(
                f'{folder}: no {os.path.basename(rel)} (release path {rel}); download it from '
                f'https://huggingface.co/{OFFICIAL_HUB} or with: {get}'
            )
        if len(hits) > 1 and len(exact) != 1:
            raise ValueError(
                f'{folder}: {len(hits)} candidates for {latent} {role} ({os.path.basename(rel)}): '
                f'{hits}; keep the one at {rel}'
            )
        paths[role] = exact[0] if exact else hits[0]
    return paths


def load_models(folder, device, encoder_preset='da3-base', heads=16, log=print):
    """The released GLD (DA3) models, strictly -> (DA3, RGB decoder, {1: (M1, meta), 0: (M1->0, meta)}) for Pipeline."""
    files = find_official_files(folder, 'da3')
    head = {'head.' + k: v for k, v in read_official(files['head'], 'head', log).items()}
    enc = latents.build_encoder(encoder_preset, weights={**read_official(files['encoder'], 'encoder', log), **head})
    enc = enc.to(device).freeze()
    stats = load_official_stats([files['stats0'], files['stats1']], enc.dim, log)

    def convert(role, kind, converter, build, **kw):
        path = files[role]
        sd = read_official(path, kind, log)
        try:
            cfg, sd = converter(sd, heads=heads, **kw)
        except (AssertionError, KeyError, ValueError) as e:  # the converters' strict checks
            raise ValueError(
                f'{path}: does not convert ({type(e).__name__}: {e}); the layouts known for a {kind} '
                f'file: {describe_layouts(kind)}'
            ) from e
        dim = cfg.feat_dim if role == 'decoder' else cfg.latent_dim
        if dim != enc.dim:
            raise ValueError(
                f'{path}: levels of {dim} channels, but encoder {encoder_preset!r} gives {enc.dim}; '
                f'pass the matching encoder_preset'
            )
        net = build(cfg)
        net.load_state_dict(sd, strict=True)
        return net

    dec, models = convert('decoder', 'decoder', decoder_lib.convert_official, decoder_lib.RGBDecoder), {}
    for level, role, upper in ((1, 'level1', None), (0, 'cascade', 1)):
        net = convert(role, 'model', model_lib.convert_official, model_lib.GLD, cascade=upper is not None)
        models[level] = (net.to(device).eval(), {'level': level, 'upper_level': upper, 'stats': stats})
        log(
            f'{os.path.basename(files[role])}: {model_lib.count_params(net) / 1e6:.1f}M params as M'
            f'{"" if upper is None else f"{upper}->"}{level}'
        )
    return enc, dec.to(device).eval(), models
