"""The released GLD checkpoints (hub repo SeonghuJeon/GLD) as our modules, and their conventions.

Downloads through huggingface_hub's cache (the release, the encoders' own weights), file discovery,
every layout the release saves, strict conversion and `OfficialConventions`; `sample.py --official`
runs them, docs/official.md has the download steps and tables. Legend: B batch, V views, H W image,
C channels.
"""

import argparse
import os
import re

import torch

import cameras
import cli
import decoder as decoder_lib
import diffusion
import latents
import model as model_lib
import safety

OFFICIAL_HUB = 'SeonghuJeon/GLD'
# the release's git repository: model_stats/ lives here, not on the hub
OFFICIAL_GIT = 'https://github.com/cvlab-kaist/Geometric-Latent-Diffusion'
# --encoder-weights NAME: the encoders' own releases on the hub -> (repo, file, the --encoder of it)
HUB_ENCODERS = {
    'DA3-SMALL': ('depth-anything/DA3-SMALL', 'model.safetensors', 'da3-small'),
    'DA3-BASE': ('depth-anything/DA3-BASE', 'model.safetensors', 'da3-base'),
    'VGGT-1B': ('facebook/VGGT-1B', 'model.pt', 'vggt-1b'),
}
# latent -> role -> path in the release (its README.md; model_stats/ comes with its git repository)
OFFICIAL_FILES = {
    'da3': {
        'encoder': 'pretrained_models/da3/model.safetensors',
        'head': 'pretrained_models/da3/dpt_decoder.pt',
        'decoder': 'pretrained_models/mae_decoder.pt',  # the RGB decoder (GeneralDecoder_Variable)
        'level1': 'checkpoints/da3_level1.pt',
        'cascade': 'checkpoints/da3_cascade.pt',  # DDT.py, DDT_old.py
        **{f'stats{n}': f'model_stats/da3/normalization_stats_level{n}.pt' for n in (0, 1)},
    },
    'vggt': {
        'encoder': 'VGGT-1B/model.pt',  # hub facebook/VGGT-1B (the release's source)
        'decoder': 'pretrained_models/vggt/mae_decoder.pt',
        'level1': 'checkpoints/vggt_level1.pt',
        'cascade': 'checkpoints/vggt_cascade.pt',  # DDT.py in its "new" mode, as M1
        **{
            f'{role}{n}': f'model_stats/vggt/{name}_stats_level{n}.pt'
            for role, name in (('stats', 'normalization'), ('special', 'special'))
            for n in (0, 1)
        },
    },
}
# latent -> the release's encoder preset, and its OfficialConventions where they differ from DA3's
OFFICIAL_ENCODERS = {'da3': 'da3-base', 'vggt': 'vggt-1b'}
OFFICIAL_CONVENTIONS = {'da3': {}, 'vggt': {'cascade_levels': (), 'shift_image_size': 518}}
# the bookkeeping of the statistics files (model_stats/vggt), skipped
STATS_METADATA = ('count', 'level')
# kind -> (wrapper keys, preferred first; key prefixes kept and stripped); which release code writes
# or reads each: docs/official.md, "Files and layouts loaded"
OFFICIAL_LAYOUTS = {
    'encoder': ((), ('model.',)),
    'decoder': (('ema', 'model', 'ema_decoder', 'decoder'), ('decoder.',)),
    'head': (('model',), ('decoder.', 'pred.')),
    'model': (('ema', 'model'), ()),
    'stats': ((), ()),
}


# ------------------------------------------------------------------- downloads through the hub cache
def hub_file(repo, filename, offline_fix):
    """A file of a hub repo -> its path in huggingface_hub's cache (downloaded there when missing);
    HF_HUB_CACHE, HF_HOME and HF_HUB_OFFLINE are honoured. No network and no cached copy: one
    line, ending in offline_fix."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError:
        where = f'the hub is out of reach and the cache {constants.HF_HUB_CACHE} has no copy'
        raise cli.UserError(f'{repo}: cannot get {filename} ({where}); {offline_fix}') from None
    except HfHubHTTPError as e:  # a wrong name, a gated repo
        reason = cli.first_line(e)
        raise cli.UserError(f'{repo}: cannot get {filename} ({reason}); {offline_fix}') from None


def hub_weights(weights, preset):
    """--encoder-weights: a HUB_ENCODERS name or its repo ('DA3-BASE', 'depth-anything/DA3-BASE')
    -> the file in the hub cache; a local path, 'auto' or 'none' unchanged."""
    if not isinstance(weights, str) or os.path.exists(weights):
        return weights
    wanted = weights.upper()
    names = [name for name, (repo, _, _) in HUB_ENCODERS.items() if wanted in (name, repo.upper())]
    if not names:
        return weights
    repo, filename, fits = HUB_ENCODERS[names[0]]
    if preset != fits:
        mismatch = f'weights of --encoder {fits}, not {preset}'
        raise cli.UserError(f'--encoder-weights {weights}: {mismatch}; pass both')
    url = f'https://huggingface.co/{repo}/blob/main/{filename}'
    return hub_file(repo, filename, f'download {url} and pass --encoder-weights FILE')


def release_files(source, stats=None, latent='da3'):
    """--official SOURCE: a folder (find_official_files) or OFFICIAL_HUB (each file through the
    hub cache), with the latent statistics found under `stats` if given (the release keeps
    model_stats/ in its git repository, not on the hub) -> role -> path."""
    roles = OFFICIAL_FILES[latent]
    stat_roles = [role for role, rel in roles.items() if rel.startswith('model_stats/')]
    paths = find_official_files(stats, latent, stat_roles) if stats else {}
    if source != OFFICIAL_HUB:
        others = [role for role in roles if role not in paths]
        return {**paths, **find_official_files(source, latent, others)}
    if not paths:  # before gigabytes of downloads
        missing = f'the latent statistics (model_stats/{latent}/*.pt) are not on the hub {OFFICIAL_HUB}'
        clone = f'git clone {OFFICIAL_GIT} and pass --official-stats {os.path.basename(OFFICIAL_GIT)}'
        raise cli.UserError(f"--official: {missing}: they ship with the release's git repository; {clone}")
    fix = 'download the release where there is network (docs/official.md), pass --official FOLDER'
    for role, rel in roles.items():
        if role in paths:
            continue
        if latent == 'vggt' and role == 'encoder':  # VGGT-1B comes from its own hub repo
            paths[role] = hub_weights('VGGT-1B', OFFICIAL_ENCODERS['vggt'])
        else:
            paths[role] = hub_file(OFFICIAL_HUB, rel, fix)
    return paths


def describe_layouts(kind):
    """The layouts of OFFICIAL_LAYOUTS[kind] in words (error messages, docs/official.md)."""
    wrappers, prefixes = OFFICIAL_LAYOUTS[kind]
    out = [f'{{{k!r}: state dict, ...}}' for k in wrappers] + ['a flat state dict']
    prefixed = ''.join(f' or {p!r}-prefixed' for p in prefixes)
    keys = f"; keys bare{prefixed}, with or without 'module.'"
    return ', '.join(out) + keys


def official_state_dict(obj, kind, name='', log=print):
    """A released file's contents in an OFFICIAL_LAYOUTS[kind] -> flat state dict (EMA first,
    prefixes stripped)."""
    wrappers, prefixes = OFFICIAL_LAYOUTS[kind]
    seen = sorted(map(str, obj))[:12] if isinstance(obj, dict) else type(obj).__name__
    problem = f'{name}: unknown layout for a {kind} file; top-level keys: {seen}'
    unknown = ValueError(f'{problem}; known layouts: {describe_layouts(kind)}')
    if not isinstance(obj, dict):
        raise unknown
    key = next((k for k in wrappers if isinstance(obj.get(k), dict)), None)
    if key is not None:
        skipped = [k for k in wrappers if k != key and isinstance(obj.get(k), dict)]
        note = f' (not {skipped})' if skipped else ''
        log(f'{name}: using its {key!r} weights{note}')
        obj = obj[key]
    sd = {k.removeprefix('module.'): v for k, v in obj.items()}
    if kind == 'stats':
        sd = {k: v for k, v in sd.items() if k not in STATS_METADATA}
    if any(k.startswith(prefixes) for k in sd):
        others = sorted({k.split('.')[0] for k in sd if not k.startswith(prefixes)})
        if others:
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


def read_official_stats(path, dim=None, log=print, prefix='normalization'):
    """GLD's <prefix>_stats_level{l}.pt (mean, var [, std, count, level] of dim channels) in a
    folder or a list -> dicts level -> mean, var."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        pattern = rf'{prefix}_stats_level\d+\.pt'
        names = [f for f in sorted(os.listdir(path)) if re.fullmatch(pattern, f)]
        path = [os.path.join(path, f) for f in names]
    elif isinstance(path, (str, os.PathLike)):
        path = [path]
    mean = {}
    var = {}
    for p in path:
        sd = read_official(p, 'stats', log)
        wrong = dim is not None and any(v.numel() != dim for v in sd.values())
        if wrong or not {'mean', 'var'} <= set(sd) <= {'mean', 'var', 'std'}:
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            expected = f'mean, var (and std) of {dim or "C"} channels each'
            raise ValueError(f'{p}: expected {expected}, got {shapes}')
        level = int(re.search(r'level(\d+)', os.path.basename(str(p))).group(1))
        mean[level] = sd['mean']
        var[level] = sd['var']
    return mean, var


def load_official_stats(path, dim=None, log=print, special=None, special_tokens=0):
    """read_official_stats -> LatentStats; special: the special_stats files (VGGT), one vector
    for the special_tokens tokens of a level."""
    mean, var = read_official_stats(path, dim, log)
    if special is None:
        return latents.LatentStats(mean, var)
    special_mean, special_var = read_official_stats(special, dim, log, prefix='special')
    stats = latents.LatentStats(mean, var)
    for level in special_mean:  # (1,C,1,1) -> the same (C,) for each token
        stats.special_mean[level] = special_mean[level].reshape(1, -1).repeat(special_tokens, 1)
        stats.special_var[level] = special_var[level].reshape(1, -1).repeat(special_tokens, 1)
    return stats


def official_prope_K(P, P_inv):
    """K' (...,3,3) from the official PRoPE matrices: P P_inv = lift(K') w2c c2w lift(K') =
    lift(K'^2), and per axis K'^2 maps x -> f^2 x + (f + 1) c: f is the root of its diagonal, c its
    offset / (f + 1)."""
    sq = (P @ P_inv)[..., :3, :3]
    f = sq.diagonal(dim1=-2, dim2=-1)[..., :2].sqrt()  # (...,2): fx', fy'
    K = torch.zeros_like(sq)
    K[..., 0, 0] = f[..., 0]
    K[..., 1, 1] = f[..., 1]
    K[..., 2, 2] = 1
    K[..., :2, 2] = sq[..., :2, 2] / (f + 1)
    return K


class OfficialConventions:
    """Where the released models' training and evaluation differ from our default (sources:
    docs/official.md):
    1. poses relative to the last view, the largest |t_i| 1: cameras.normalize_poses(by='max_abs');
    2. the Plücker map samples pixel (u, v) at (u - 0.5, v + 0.5): latents.camera_inputs(official=True);
    3. PRoPE's key/value matrix is c2w lift(K'), so P_inv P != I: latents.camera_inputs(official=True);
    4. the DA3 cascade M1->0 (DDT_old.py) normalises K by a fixed 504 x 504 image: model_cameras;
    5. CFG's unconditional cameras: M1 (and the VGGT cascade) viewmats I4 and K = I3 in pixels, the
       DA3 cascade I4 and K kept: model_cameras;
    6. the decoder's output is ImageNet-normalised: DecoderConfig.imagenet_output
       (decoder.convert_official);
    7. num_steps counts time-grid points from 1 to 0.001, the shift takes an 18 x 18 token grid
       (VGGT: 37 x 37): time_schedule;
    8. VGGT: the cascade's level-0 special tokens are normalised with the level-1 special
       statistics: load_models.
    OFFICIAL_CONVENTIONS[latent] sets them per latent. Not reproduced: the release's bf16
    autocast."""

    def __init__(
        self,
        cascade_levels=(0,),
        cascade_image_size=504,
        shift_image_size=252,
        patch=14,
        t_end=0.001,
    ):
        self.cascade_levels = set(cascade_levels)  # levels of the released DDT_old.py cascade
        self.cascade_image_size = cascade_image_size  # DDT_old.py's cam_input_size
        self.shift_tokens = (shift_image_size // patch) ** 2  # h w of the release's shift
        self.t_end = t_end  # where the release's time grid stops

    def time_schedule(self, num_steps, V, C):
        """Sampling V views of C channels as released -> (Euler steps, shift a, t_end), item 7."""
        assert num_steps >= 2, 'the release counts time-grid points: num_steps >= 2 (a step)'
        steps = num_steps - 1
        shift = diffusion.shift_alpha(V * self.shift_tokens * C)
        return steps, shift, self.t_end

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


def at_release_path(path, rel):
    """Whether path lies at the release path rel (its last components)."""
    return ('/' + path.replace(os.sep, '/')).endswith('/' + rel)


def find_official_files(folder, latent='da3', roles=None):
    """Role -> OFFICIAL_FILES[latent] (those of `roles`, default all) found by name under folder
    (not at another latent's path; the release path first)."""
    download = f'huggingface-cli download {OFFICIAL_HUB} --local-dir {folder}'
    get = f'{download}, or pass --official alone (docs/official.md)'
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder}: no such folder; download the release with: {get}')
    by_name = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for f in files:
            by_name.setdefault(f, []).append(os.path.join(root, f))
    other_latents = [roles for other, roles in OFFICIAL_FILES.items() if other != latent]
    others = [rel for roles in other_latents for rel in roles.values()]  # their release paths
    paths = {}
    for role, rel in OFFICIAL_FILES[latent].items():
        if roles is not None and role not in roles:
            continue
        name = os.path.basename(rel)
        hits = [h for h in by_name.get(name, []) if not any(at_release_path(h, o) for o in others)]
        exact = [h for h in hits if at_release_path(h, rel)]
        if not hits:
            raise FileNotFoundError(
                f'{folder}: no {name} (release path {rel}); download it from '
                f'https://huggingface.co/{OFFICIAL_HUB} or with: {get}'
            )
        if len(hits) > 1 and len(exact) != 1:
            candidates = f'{len(hits)} candidates for {latent} {role} ({name}): {hits}'
            raise ValueError(f'{folder}: {candidates}; keep the one at {rel}')
        paths[role] = exact[0] if exact else hits[0]
    return paths


def load_models(files, device, latent='da3', encoder_preset=None, heads=16, log=print):
    """The released GLD (DA3) or GLD (VGGT) models of release_files, strictly -> (encoder, RGB
    decoder, {1: (M1, meta), 0: (M1->0, meta)}) for Pipeline; encoder_preset:
    OFFICIAL_ENCODERS[latent] by default."""
    encoder_preset = encoder_preset or OFFICIAL_ENCODERS[latent]
    weights = files['encoder']
    if 'head' in files:  # DA3: the DPT head of its own file over the one in model.safetensors
        head = {'head.' + k: v for k, v in read_official(files['head'], 'head', log).items()}
        weights = {**read_official(files['encoder'], 'encoder', log), **head}
    enc = latents.build_encoder(encoder_preset, weights=weights)
    enc = enc.to(device).freeze()
    stat_files = [files['stats0'], files['stats1']]
    if enc.special:  # VGGT: its special tokens' own statistics
        special_files = [files['special0'], files['special1']]
        stats = load_official_stats(stat_files, enc.dim, log, special_files, enc.special)
        # item 8: the release's evaluation swaps in level 0's patch statistics only
        stats.special_mean[0] = stats.special_mean[1]
        stats.special_var[0] = stats.special_var[1]
    else:
        stats = load_official_stats(stat_files, enc.dim, log)

    def convert(role, kind, converter, build, **kw):
        path = files[role]
        sd = read_official(path, kind, log)
        try:
            cfg, sd = converter(sd, heads=heads, **kw)
        except (AssertionError, KeyError, ValueError) as e:  # the converters' strict checks
            raise ValueError(
                f'{path}: does not convert ({type(e).__name__}: {e}); the layouts known '
                f'for a {kind} file: {describe_layouts(kind)}'
            ) from e
        dim = cfg.feat_dim if role == 'decoder' else cfg.latent_dim
        if dim != enc.dim:
            raise ValueError(
                f'{path}: levels of {dim} channels, but encoder {encoder_preset!r} gives '
                f'{enc.dim}; pass the matching encoder_preset'
            )
        if role != 'decoder' and cfg.special_tokens != enc.special:
            tokens = f'{cfg.special_tokens} special tokens per view'
            theirs = f'encoder {encoder_preset!r} gives {enc.special}'
            raise ValueError(f'{path}: {tokens}, but {theirs}')
        net = build(cfg)
        net.load_state_dict(sd, strict=True)
        return net

    dec = convert('decoder', 'decoder', decoder_lib.convert_official, decoder_lib.RGBDecoder)
    models = {}
    for level, role, upper in ((1, 'level1', None), (0, 'cascade', 1)):
        cascade = upper is not None
        net = convert(role, 'model', model_lib.convert_official, model_lib.GLD, cascade=cascade)
        meta = {'level': level, 'upper_level': upper, 'stats': stats}
        models[level] = (net.to(device).eval(), meta)
        name = f'M{level}' if upper is None else f'M{upper}->{level}'
        millions = model_lib.count_params(net) / 1e6
        log(f'{os.path.basename(files[role])}: {millions:.1f}M params as {name}')
    return enc, dec.to(device).eval(), models
