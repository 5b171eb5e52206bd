"""sample.py: the GLD cascade end to end, geometry export and the paper's evaluation protocol.

    python sample.py                                   # bundled tiny models on a synthetic test scene -> out/sample/
    python sample.py --data re10k:PATH --scene KEY     # a dataset scene
    python sample.py --images a.png b.png --cameras transforms.json --traj orbit --frames 24
    python sample.py --eval                            # N=2 -> 6 targets on the test split: tables, JSON, CSV
    python sample.py --official DIR                    # the released GLD models (see README)
    python sample.py --ckpt-dir runs --encoder vggt-tiny   # models trained on another latent (train.py --encoder)

Pipeline (paper Sec. 4, Fig. 2): DA3 encodes the source views alone (leakage-free) -> M1 generates level-1 features
of all V views (rectified flow, Euler, CFG over cameras) -> M1->0 generates level 0 conditioned on them -> the
frozen DA3 blocks after level 1 propagate the generated features to levels 2 and 3 (all views jointly) -> the RGB
decoder turns the four levels into images, and DA3's frozen DualDPT head gives depth, ray maps, cameras and a point
cloud with no extra training. `--boundary k` with independent models reproduces the boundary ablation.
On another latent (`--encoder`: VGGT, DINOv2, the SD VAE) the same code runs; what the encoder lacks (propagation,
a geometry head, a second level) is skipped as its capability flags say, and said in the log and metrics.json.

This file also owns the glue that training reuses (train.py imports it; it never imports train.py): building
frozen encoders, checkpoint loading and export. What the diffusion models see of DA3 (cameras, the source
condition, training latents, the latent cache) is latents.py.
"""
import argparse
import contextlib
import csv
import hashlib
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

import cameras
import data
import decoder as decoder_lib
import diffusion
import encoder as encoder_lib
import export
import latents
import model as model_lib
import official
from export import save_image

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'tiny')  # the bundled models
COMMANDS = {  # what creates each missing piece
    'encoder': 'python train.py --stage encoder', 'decoder': 'python train.py --stage decoder',
    'level1': 'python train.py --level 1', 'level0': 'python train.py --level 0', 'data': 'python data.py synth',
}


# ----------------------------------------------------------------------------- checkpoints: find, load, export

def find_checkpoint(name, ckpt_dir=None):
    """runs/<name>/ckpt_*.pt (newest) when ckpt_dir is given, else the bundled weights/tiny/<name>.safetensors."""
    if ckpt_dir:
        folder = os.path.join(ckpt_dir, name)
        ck = sorted(f for f in os.listdir(folder) if f.startswith('ckpt_')) if os.path.isdir(folder) else []
        if ck:
            return os.path.join(folder, ck[-1])
    path = os.path.join(WEIGHTS, name + '.safetensors')
    if os.path.exists(path):
        return path
    base, _, encoder = name.partition('-')  # run_name: '<stage>-<encoder>' for latents other than da3-tiny
    raise FileNotFoundError(f'no checkpoint for {name!r} in {ckpt_dir or "-"} nor {path}; create it with: '
                            f'{COMMANDS.get(base, "python train.py")}{" --encoder " + encoder if encoder else ""} (or pass --ckpt-dir)')


def run_name(name, encoder='da3-tiny'):
    """The run folder / export name of a stage on a latent encoder: name for da3-tiny (the bundled default),
    '<name>-<encoder>' for the others, so runs on different latents never pick up each other's models."""
    return name if encoder == 'da3-tiny' else f'{name}-{encoder}'


def load_checkpoint(path, device='cpu'):
    """-> (meta, state_dict). A training checkpoint gives its EMA weights; an export gives fp16 weights + a JSON sidecar."""
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        meta = json.load(open(path[:-len('.safetensors')] + '.json'))
        digest = hashlib.sha256(open(path, 'rb').read()).hexdigest()
        if meta.get('sha256') and meta['sha256'] != digest:
            raise ValueError(f'{path}: checksum mismatch (file is {digest[:12]}, {path[:-12]}.json says '
                             f'{meta["sha256"][:12]}); the file is corrupt or was replaced: restore it with git checkout')
        sd = {k: v.float() for k, v in load_file(path, device=str(device)).items()}
        stats = {k[6:]: v for k, v in sd.items() if k.startswith('stats.')}
        meta['stats'] = stats or None
        return meta, {k: v for k, v in sd.items() if not k.startswith('stats.')}
    ck = torch.load(path, map_location=device, weights_only=False)
    return ck, ck['ema']


def export_weights(kind, net, config, extra, folder, name):
    """EMA weights as fp16 safetensors + a JSON sidecar with the config and a SHA-256, as shipped in weights/tiny."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    if extra.get('stats'):
        sd.update({'stats.' + k: v.half() for k, v in extra['stats'].items()})
    path = os.path.join(folder, name + '.safetensors')
    save_file(sd, path)
    meta = {'kind': kind, 'config': config, **{k: v for k, v in extra.items() if k != 'stats'},
            'sha256': hashlib.sha256(open(path, 'rb').read()).hexdigest()}
    json.dump(meta, open(os.path.join(folder, name + '.json'), 'w'), indent=1)
    print(f'exported {path} ({os.path.getsize(path) / 1e6:.2f} MB)')
    return path


def load_encoder(preset, weights='auto', device='cpu', ckpt_dir='runs'):
    """A frozen latent encoder (encoder.build_encoder). weights: 'auto' (for da3-tiny: <ckpt_dir>/encoder, then
    weights/tiny/encoder, ckpt_dir None: the bundled one only; other presets: <ckpt_dir>/encoder-<preset> when
    trained there, else random), 'none', or a file."""
    if weights == 'auto' and preset == 'da3-tiny':
        weights = find_checkpoint('encoder', ckpt_dir)
    elif weights == 'auto':
        with contextlib.suppress(FileNotFoundError):
            weights = find_checkpoint(run_name('encoder', preset), ckpt_dir)
    if weights in ('auto', 'none', None, ''):
        if weights == 'auto':
            print(f'note: {preset} with random weights (pass --encoder-weights FILE for the official ones)')
        enc = encoder_lib.build_encoder(preset)
    elif weights.endswith('.pt') and 'ckpt_' in os.path.basename(weights) or weights.endswith('.safetensors') and \
            os.path.exists(weights[:-len('.safetensors')] + '.json'):
        meta, sd = load_checkpoint(weights)
        enc = encoder_lib.build_encoder(preset)
        enc.load_state_dict(sd)
    else:
        enc = encoder_lib.build_encoder(preset, weights=weights)
    return enc.to(device).freeze()


def load_model(path, device='cpu'):
    """-> (GLD net in eval mode, meta with 'level', 'upper_level', LatentStats 'stats')."""
    meta, sd = load_checkpoint(path, device)
    net = model_lib.GLD(model_lib.GLDConfig(**meta['config'])).to(device).eval()
    net.load_state_dict(sd)
    meta['stats'] = encoder_lib.LatentStats.from_state_dict(meta['stats'])
    return net, meta


def load_decoder(path, device='cpu'):
    meta, sd = load_checkpoint(path, device)
    dec = decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(**meta['config'])).to(device).eval()
    dec.load_state_dict(sd)
    return dec


# ----------------------------------------------------------------------------- the cascade

class Pipeline:
    """Frozen encoder + RGB decoder + the diffusion models {level: (net, meta)}; boundary k = the deepest generated
    level. What the encoder lacks (propagation, a geometry head) is skipped, as its capabilities say."""

    def __init__(self, enc, dec, models, boundary=1, log=print, official=None):
        self.enc, self.dec, self.models, self.boundary, self.log = enc, dec, models, boundary, log
        self.official = official  # None, or the OfficialConventions of the released models (see load_official_pipeline)

    def time_schedule(self, steps, V, T, C):
        """-> (Euler steps, shift a, end time) of one level's sampling. Ours: `steps` Euler steps from t = 1 to 0 with
        a from the latents being generated (V views x T tokens x C channels); the released models: their own rule
        (OfficialConventions.time_schedule, item 7)."""
        if self.official is not None:
            return self.official.time_schedule(steps, V, C)
        return steps, diffusion.shift_alpha(V * T * C), 0.0

    def sample_level(self, level, cond_raw, cams, upper_raw, steps, cfg, generator):
        net, meta = self.models[level]
        stats = meta['stats']
        cond = stats.normalize(cond_raw, level) * cams['src_mask'][:, :, None, None]
        upper = stats.normalize(upper_raw, meta['upper_level']) if meta.get('upper_level') is not None else None
        uncond_cams = model_lib.drop_cameras(cams, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))
        if self.official is not None:  # the release's per-model camera quirks (cascade K by 504, CFG branch)
            cams, uncond_cams = self.official.model_cameras(level, cams, uncond_cams)
        euler_steps, a, t_end = self.time_schedule(steps, *cond.shape[1:])
        noise = torch.randn(cond.shape, generator=generator).to(cond.device)
        x = diffusion.euler_sample(lambda x_t, t: net(x_t, t, cond, cams, upper=upper), noise, steps=euler_steps,
                                   a=a, cfg=cfg, uncond_fn=lambda x_t, t: net(x_t, t, cond, uncond_cams, upper=upper),
                                   t_end=t_end)
        return stats.denormalize(x, level)

    @torch.no_grad()
    def generate(self, images, c2w, K, n_src, steps=50, cfg=1.5, seed=0, given=None):
        """images (B,V,3,H,W): only views 0..n_src-1 (the sources) are read. c2w (B,V,4,4), K (B,V,3,3) normalised.
        given: {level: raw (B,V,T,C)} ground-truth levels used instead of generating them (tests, evaluation).
        -> {'levels': raw levels, 'images' (B,V,3,H,W), 'geometry': DA3 head outputs}."""
        B, V, _, H, W = images.shape
        enc, L = self.enc, self.enc.num_levels
        hw = (H // enc.patch, W // enc.patch)
        src_mask = (torch.arange(V, device=images.device) < n_src)[None].expand(B, V)
        cams = latents.model_cameras(c2w, K, src_mask, hw, official=self.official is not None, patch=enc.patch)
        cond = latents.source_condition(enc, images, n_src)
        gen = torch.Generator().manual_seed(seed)
        levels, given, cls_last = [None] * L, dict(given or {}), None
        for level in range(self.boundary, -1, -1):  # deepest first: M1 before M1->0
            t0 = time.time()
            if level in given:
                levels[level] = given[level]
            elif level in self.models:
                up = self.models[level][1].get('upper_level')
                levels[level] = self.sample_level(level, cond[level], cams, levels[up] if up is not None else None,
                                                  steps, cfg, gen)
                name = f'M{up}->{level}' if up is not None else f'M{level}'
                n, a, _ = self.time_schedule(steps, *cond[level].shape[1:])
                self.log(f'  {name}: {n} Euler steps (shift {a:.2f}), cfg {cfg}: {time.time() - t0:.2f}s')
        t0 = time.time()
        if self.boundary < L - 1 and enc.can_propagate:  # deeper levels: level k through the remaining frozen blocks
            cls = enc.first_view_cls(images, self.boundary)  # GLD: token 0 of the first source, broadcast
            levels[self.boundary + 1:], cls_deep = enc.propagate(levels[self.boundary], self.boundary, cls, hw, return_cls=True)
            cls_last = cls_deep[-1]
            self.log(f'  propagate level {self.boundary} -> {self.boundary + 1}..{L - 1} through frozen {enc.cfg.name}: {time.time() - t0:.2f}s')
        t0 = time.time()
        keep = torch.tensor([l is not None for l in levels], device=images.device)[None].expand(B, L)
        filled = [l if l is not None else torch.zeros_like(levels[self.boundary]) for l in levels]
        norm = enc.normalize_levels(filled)
        rgb = self.dec(norm, hw, keep=keep if not keep.all() else None).clamp(0, 1)
        geo = enc.geometry(norm, H, W, cls_last=cls_last) if enc.has_geometry else {}
        self.log(f'  decode RGB + geometry head: {time.time() - t0:.2f}s' if enc.has_geometry else
                 f'  decode RGB: {time.time() - t0:.2f}s (no geometry: {enc.cfg.name} has no geometry head)')
        return {'levels': filled, 'images': rgb, 'geometry': geo}


def load_pipeline(ckpt_dir=None, boundary=1, independent=False, device='cpu', encoder='da3-tiny', encoder_weights='auto', log=print):
    """Finds the models by name: encoder, decoder, level{k}..level0 (cascade) or level{l}_ind (independent, ablation)."""
    enc = load_encoder(encoder, encoder_weights, device, ckpt_dir=ckpt_dir)  # None: the bundled weights only
    dec = enc.rgb_decoder() if enc.has_rgb_decoder else load_decoder(find_checkpoint(run_name('decoder', encoder), ckpt_dir), device)
    if boundary >= enc.num_levels:
        log(f'note: {encoder} has levels 0..{enc.num_levels - 1}: boundary {boundary} -> {enc.num_levels - 1}')
        boundary = enc.num_levels - 1
    models = {}
    for level in range(boundary, -1, -1):
        name = run_name(f'level{level}' + ('_ind' if independent and level == 0 else ''), encoder)  # M1..M3: independent
        try:
            models[level] = load_model(find_checkpoint(name, ckpt_dir), device)
        except FileNotFoundError:
            if level == boundary:
                raise
            log(f'note: no {name} model: level {level} is left to the decoder\'s level dropout')
    return Pipeline(enc, dec, models, boundary, log)


def load_official_pipeline(folder, device='cpu', log=print, **kw):
    """The released GLD models (official.load_models; kw: encoder_preset, heads) in our cascade, with the release's
    conventions (docs/official.md)."""
    enc, dec, models = official.load_models(folder, device, log=log, **kw)
    return Pipeline(enc, dec, models, boundary=1, log=log, official=official.OfficialConventions())


# ----------------------------------------------------------------------------- evaluation

def baselines(images, n_src, c2w):
    """'nearest source view' (by camera distance) and 'mean colour' (of the sources) for every target."""
    B, V = images.shape[:2]
    centres = c2w[..., :3, 3]
    d = torch.cdist(centres[:, n_src:], centres[:, :n_src])  # (B,M,N)
    idx = d.argmin(-1)
    nearest = torch.stack([images[b, idx[b]] for b in range(B)])
    mean = images[:, :n_src].mean((1, 3, 4), keepdim=True).expand_as(images[:, n_src:])
    return {'nearest source': nearest, 'mean colour': mean}


def image_metrics(pred, gt, lpips=None):
    out = {'psnr': data.psnr(pred, gt).mean(), 'ssim': data.ssim(pred, gt).mean()}
    if lpips is not None:
        out['lpips'] = lpips(pred.flatten(0, 1), gt.flatten(0, 1)).mean()
    return {k: float(v) for k, v in out.items()}


def evaluate_scene(pipe, scene, n_src, steps, cfg, seed, lpips=None, gt_geometry=False):
    """One scene of the paper's protocol: sources first; metrics on the targets only."""
    images, c2w, K = scene['images'], scene['c2w'], scene['K']
    out = pipe.generate(images, c2w, K, n_src, steps=steps, cfg=cfg, seed=seed)
    pred, gt = out['images'][:, n_src:], images[:, n_src:]
    rows = {'gld': image_metrics(pred, gt, lpips)}
    for name, im in baselines(images, n_src, c2w).items():
        rows[name] = image_metrics(im, gt, lpips)
    geo = out['geometry']
    if 'c2w' in geo:
        rows['gld'].update(cameras.pose_metrics(geo['c2w'][0], c2w[0]))
    if 'depths' in scene and 'depth' in geo:
        rows['gld'].update(data.depth_metrics(geo['depth'][:, n_src:], scene['depths'][:, n_src:], align='median'))
    raw = pipe.enc.encode(images)
    k = pipe.boundary
    if k in pipe.models:  # the generated level k of the targets against DA3 on the true images, normalised units
        stats = pipe.models[k][1]['stats']
        rows['gld']['mse_k'] = float((stats.normalize(out['levels'][k], k) - stats.normalize(raw[k], k))[:, n_src:].pow(2).mean())
    if gt_geometry and pipe.enc.has_geometry:  # the same head on the ground-truth images: the ceiling of "geometry for free"
        raw, cls = pipe.enc.encode(images, return_cls=True)
        g = pipe.enc.geometry(pipe.enc.normalize_levels(raw), images.shape[-2], images.shape[-1], cls_last=cls[-1])
        rows['da3 on gt images'] = {**cameras.pose_metrics(g['c2w'][0], c2w[0]),
                                    **(data.depth_metrics(g['depth'][:, n_src:], scene['depths'][:, n_src:], align='median')
                                       if 'depths' in scene else {})}
    return rows, out


def write_table(table, per_scene, out_dir, name, title):
    """{method: {metric: [values]}} -> means as a markdown table, JSON and a per-scene CSV in out_dir/name.*"""
    table = {m: {k: float(np.mean(v)) for k, v in ks.items()} for m, ks in table.items()}
    order = ['psnr', 'ssim', 'lpips', 'mse_k', 'ate', 'rpe_r', 'rpe_t', 'absrel', 'rmse', 'delta1']
    cols = sorted({k for m in table.values() for k in m}, key=order.index)
    md = [f'| {title} | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    md += [f'| {m} | ' + ' | '.join(f'{t[c]:.4g}' if c in t else '-' for c in cols) + ' |' for m, t in table.items()]
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, f'{name}.md'), 'w').write('\n'.join(md) + '\n')
    json.dump(table, open(os.path.join(out_dir, f'{name}.json'), 'w'), indent=1)
    with open(os.path.join(out_dir, f'{name}_scenes.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['scene', 'method'] + cols)
        w.writeheader(); w.writerows(per_scene)
    print('\n'.join(md))
    return table


def run_eval(pipe, dataset, n_src, steps, cfg, seed, out_dir, n_scenes, lpips=None):
    """The paper's protocol: N sources (N=2: first and last), the rest targets; GLD beside two baselines."""
    per_scene, table, n = [], {}, min(n_scenes, len(dataset))
    for i in range(n):
        scene = data.collate_one(dataset[i])
        scene = data.split_views(scene, n_src, mode='ends' if n_src == 2 else 'random',
                                 generator=torch.Generator().manual_seed(seed + i))
        rows, _ = evaluate_scene(pipe, scene, n_src, steps, cfg, seed + i, lpips, gt_geometry=True)
        for method, m in rows.items():
            per_scene.append({'scene': scene['key'][0], 'method': method, **m})
            for k, v in m.items():
                table.setdefault(method, {}).setdefault(k, []).append(v)
    return write_table(table, per_scene, out_dir, f'eval_n{n_src}', f'method (N={n_src}, {n} scenes, {steps} steps)')


def run_recon(enc, dec, dataset, out_dir, n_scenes, lpips=None):
    """Stage 1 in miniature (paper Table 6): the decoder on DA3 features of all views, all levels and each alone."""
    per_scene, table, n = [], {}, min(n_scenes, len(dataset))
    for i in range(n):
        scene = data.collate_one(dataset[i])
        images = scene['images']
        levels = enc.normalize_levels(enc.encode(images))
        for name, im in decoder_lib.reconstruct_per_level(dec, levels, (images.shape[-2] // enc.patch, images.shape[-1] // enc.patch)).items():
            m = image_metrics(im.clamp(0, 1), images, lpips)
            per_scene.append({'scene': scene['key'][0], 'method': f'level {name}', **m})
            for k, v in m.items():
                table.setdefault(f'level {name}' if name != 'all' else 'all levels', {}).setdefault(k, []).append(v)
    return write_table(table, per_scene, out_dir, 'recon', f'decoder input ({n} scenes)')


def ensure_data(spec):
    """The default synthetic test scenes are rendered on first use (a few seconds; the same seeds as `data.py synth`)."""
    if spec == 'data_synth' and not os.path.isdir(os.path.join(spec, 'test')):
        print('rendering the synthetic test scenes into data_synth/test (first run only)')
        data.write_synth(spec, 0, 16)
    elif not os.path.isdir(spec.split(':')[-1]):
        raise SystemExit(f'{spec}: no such dataset folder; create the synthetic set with: {COMMANDS["data"]}')


def unwrap(net):
    """The plain module inside DDP and torch.compile wrappers (evaluation must not run DDP's collectives)."""
    net = getattr(net, '_orig_mod', net)
    return getattr(net, 'module', net)


def evaluate_during_training(stage, val, a, device, n=8):
    """Periodic evaluation inside train.py, on the first n validation scenes (EMA weights), rank 0 only. Diffusion:
    10 Euler steps, N=2 -> 6; the generated level's MSE on the targets and their PSNR decoded through the rest of
    the cascade (ground-truth deeper levels, no shallower ones), a cheap predictor of sample quality."""
    net = unwrap(stage.net)
    metrics, scenes = {}, [data.collate_one(val[i]) for i in range(min(n, len(val)))]
    scenes = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in s.items()} for s in scenes]
    scenes = [data.split_views(s, 2, mode='ends') for s in scenes]
    if stage.kind == 'encoder' and net.has_rgb_decoder:  # the VAE: reconstruction through its own decoder
        ps = [data.psnr(net.rgb_decoder()(net.encode(s['images']), tuple(d // net.patch for d in s['images'].shape[-2:]))
                        .clamp(0, 1), s['images']).mean() for s in scenes]
        return {'recon_psnr': float(torch.stack(ps).mean())}
    if stage.kind == 'encoder':
        out = [net(s['images']) for s in scenes]
        m = [data.depth_metrics(o['depth'], s['depths'], align='median') for o, s in zip(out, scenes)]
        return {k: float(np.mean([x[k] for x in m])) for k in m[0]}
    if stage.kind == 'decoder':
        ps = []
        for s in scenes:
            lv = stage.enc.normalize_levels(stage.enc.encode(s['images']))
            ps.append(data.psnr(net(lv, (s['images'].shape[-2] // stage.enc.patch, s['images'].shape[-1] // stage.enc.patch)).clamp(0, 1),
                                s['images']).mean())
        return {'recon_psnr': float(torch.stack(ps).mean())}
    try:
        dec = stage.enc.rgb_decoder() if stage.enc.has_rgb_decoder else \
            load_decoder(find_checkpoint(run_name('decoder', a.encoder), 'runs'), device) if a.decoder_ckpt == 'auto' else \
            (load_decoder(a.decoder_ckpt, device) if a.decoder_ckpt != 'none' else None)
    except FileNotFoundError:
        dec = None
    if dec is None:
        return {}
    meta = {'stats': stage.stats, 'upper_level': stage.upper_level}
    boundary = min(max(1, stage.level), stage.enc.num_levels - 1)
    pipe = Pipeline(stage.enc, dec, {stage.level: (net, meta)}, boundary=boundary, log=lambda *_: None)
    ps, mse, grids = [], [], []
    for i, s in enumerate(scenes):
        full = stage.enc.encode(s['images'])
        given = {l: full[l] for l in range(stage.level + 1, pipe.boundary + 1)}  # ground-truth deeper levels
        out = pipe.generate(s['images'], s['c2w'], s['K'], 2, steps=10, cfg=1.5, seed=i, given=given)
        ps.append(data.psnr(out['images'][:, 2:], s['images'][:, 2:]).mean())
        gen, true = (stage.stats.normalize(f, stage.level)[:, 2:] for f in (out['levels'][stage.level], full[stage.level]))
        mse.append((gen - true).pow(2).mean())  # the generated targets' level in normalised units (zeros: about 1)
        grids.append(make_grid(s['images'][0], out['images'][0], 2))
    save_image(torch.cat(grids[:4], 1), os.path.join(a.out, f'val_{a.step + 1:07d}.png'))
    return {'psnr': float(torch.stack(ps).mean()), 'mse': float(torch.stack(mse).mean())}


# ----------------------------------------------------------------------------- writing outputs

def make_grid(gt, pred, n_src):
    """Rows: sources | generated | ground truth (when known); (V,3,H,W) each -> (3, rows*H, V*W)."""
    V = gt.shape[0]
    src = torch.cat([gt[:n_src], torch.ones_like(gt[n_src:])], 0)
    rows = [src, torch.cat([gt[:n_src], pred[n_src:]], 0), gt]
    return torch.cat([torch.cat(list(r), -1) for r in rows], -2)


def colourise_depth(d):
    """(H,W) depth -> (3,H,W) with a simple perceptual ramp of inverse depth."""
    inv = 1 / d.clamp_min(1e-6)
    x = ((inv - inv.min()) / (inv.max() - inv.min() + 1e-9))
    return torch.stack([x.sqrt(), x ** 1.5 * 0.8, 0.5 * (1 - x) + 0.3 * x])


def write_outputs(out_dir, images, res, c2w, K, n_src, frames_gt=None, metrics=None, formats=export.DEFAULT_FORMATS,
                  units='poses'):
    """A grid, a video of the targets, depth maps (PNG + .npy), metrics.json, and through export.write_scene every
    view in images/ with the scene in `formats` (export.FORMATS: a PLY, a COLMAP model, a GLB, transforms.json)."""
    os.makedirs(out_dir, exist_ok=True)
    pred, geo = res['images'][0], res['geometry']
    V = pred.shape[0]
    views = torch.cat([images[0, :n_src], pred[n_src:]])  # the sources as given, the generated targets
    save_image(make_grid(frames_gt if frames_gt is not None else views, pred, n_src), os.path.join(out_dir, 'grid.png'))
    export.write_video(list(pred[n_src:]), os.path.join(out_dir, 'video'))
    if 'depth' not in geo or 'c2w' not in geo:  # a latent without a geometry head (DINOv2, the VAE): images only
        json.dump({**(metrics or {}), 'export': 'none: this latent has no geometry head (no depth, cameras or 3D)'},
                  open(os.path.join(out_dir, 'metrics.json'), 'w'), indent=1)
        return
    depth = geo['depth'][0]
    np.save(os.path.join(out_dir, 'depth.npy'), depth.cpu().numpy())
    for v in range(V):
        save_image(colourise_depth(depth[v]), os.path.join(out_dir, f'depth_{v:03d}.png'))
    summary = export.write_scene(out_dir, views, depth, geo['depth_conf'][0], c2w[0], K[0], geo['c2w'][0], n_src,
                                 formats, units)
    json.dump({**(metrics or {}), 'export': summary}, open(os.path.join(out_dir, 'metrics.json'), 'w'), indent=1)


# ----------------------------------------------------------------------------- inputs

def user_scene(paths, cams_path, size, enc):
    """A user's images (+ optional nerfstudio transforms.json); without cameras DA3's head estimates them."""
    from PIL import Image, UnidentifiedImageError
    ims = []
    for p in paths:
        try:
            ims.append(torch.from_numpy(np.asarray(Image.open(p).convert('RGB'), dtype=np.float32) / 255).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as e:
            raise SystemExit(f'{p}: cannot read the image ({e}); pass PNG or JPEG files')
    H, W = ims[0].shape[-2:]
    if any(im.shape[-2:] != (H, W) for im in ims):
        raise SystemExit(f'{paths}: the images differ in size; resize them to one size first')
    images = torch.stack(ims)[None]  # (1,N,3,H,W)
    tH, tW = size or (max(14, H // 14 * 14), max(14, W // 14 * 14))
    if cams_path:  # a transforms.json (or its folder); cameras matched to the images by file name
        path = cams_path if cams_path.endswith('.json') else os.path.join(cams_path, 'transforms.json')
        t = data.read_transforms(path)
        names = [os.path.basename(f) for f in t['files']]
        missing = [p for p in paths if os.path.basename(p) not in names]
        if missing:
            raise SystemExit(f'{path}: no camera for {missing} (frames: {names}); give one frame per image, by file name')
        idx = [names.index(os.path.basename(p)) for p in paths]
        c2w, K = t['c2w'][idx][None], t['K'][idx][None]
    else:
        c2w, K = None, None
    if (H, W) != (tH, tW):
        print(f'note: resizing {W}x{H} -> {tW}x{tH} (sides must be multiples of 14)')
        Kin = K[0] if K is not None else torch.eye(3).expand(len(paths), 3, 3)
        images, Kin = data.resize_and_crop(images[0], Kin, (tH, tW))
        images = images[None]
        K = Kin[None] if K is not None else None
    if c2w is None:
        if not enc.has_geometry:
            raise SystemExit(f'{enc.cfg.name} has no geometry head to estimate cameras: pass --cameras transforms.json')
        print(f'no --cameras: estimating source cameras with the frozen {enc.cfg.name} geometry head')
        levels, cls = enc.encode(images, return_cls=True)
        g = enc.geometry(enc.normalize_levels(levels), tH, tW, cls_last=cls[-1])
        c2w, K = g['c2w'], g['K']
    if not torch.isfinite(c2w).all() or not torch.isfinite(K).all():
        raise SystemExit(f'{cams_path}: cameras contain NaN or inf values')
    return images, c2w, K


def target_cameras(c2w_src, K_src, traj, n):
    """Target cameras from a preset trajectory around/between the sources: (n,4,4) and (n,3,3)."""
    a, b = c2w_src[0], c2w_src[-1]
    dist = max(float((a[:3, 3] - b[:3, 3]).norm()), 1e-3) if len(c2w_src) > 1 else 1.0  # the scene's scale
    if traj == 'interp':
        c2w = cameras.interpolate_cameras(a, b, n + 2)[1:-1]
    elif traj == 'orbit':  # around the point one scene unit in front of the first source
        centre = a[:3, 3] + a[:3, 2] * dist
        c2w = cameras.orbit(centre, dist, n, up=(-a[:3, 1]).tolist())
    elif traj == 'spiral':
        c2w = cameras.spiral(a, n, radius=0.2 * dist, depth=dist)
    else:
        c2w = cameras.forward_dolly(a, n, distance=0.5 * dist)
    return c2w, K_src[:1].expand(n, 3, 3)


def generate_in_chunks(pipe, images_src, c2w_src, K_src, c2w_tgt, K_tgt, chunk, **kw):
    """Long trajectories as SEVA does: every chunk holds all sources plus up to `chunk` targets."""
    N, outs = images_src.shape[1], []
    for i in range(0, c2w_tgt.shape[0], chunk):
        ct, kt = c2w_tgt[i:i + chunk], K_tgt[i:i + chunk]
        imgs = torch.cat([images_src, images_src[:, :1].expand(1, ct.shape[0], *images_src.shape[2:])], 1)
        res = pipe.generate(imgs, torch.cat([c2w_src, ct[None]], 1), torch.cat([K_src, kt[None]], 1), N, **kw)
        outs.append(res)
    cat = lambda xs, n: torch.cat([xs[0][:, :n]] + [x[:, n:] for x in xs], 1)
    geo = {k: cat([o['geometry'][k] for o in outs], N) for k in ('depth', 'depth_conf', 'c2w', 'K') if k in outs[0]['geometry']}
    return {'images': cat([o['images'] for o in outs], N), 'geometry': geo}


def build_parser():
    p = argparse.ArgumentParser(description='GLD sampling and evaluation', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt-dir', default=None, help='folder of training runs (runs/encoder, runs/decoder, runs/level1, ...); default: bundled weights/tiny')
    p.add_argument('--official', default='', help='folder with the released GLD files (docs/official.md)')
    p.add_argument('--encoder', default='da3-tiny', help='latent encoder the models were trained on (train.py --encoder): '
                   'da3-*, vggt-*, dinov2-*, vae* (encoder.build_encoder)')
    p.add_argument('--data', default='data_synth', help="dataset: chunk folder, 're10k:PATH', 'dl3dv:PATH'")
    p.add_argument('--split', default='test', help='dataset split')
    p.add_argument('--scene', default='0', help='scene key or index in the split')
    p.add_argument('--views', type=int, default=8, help='views of a dataset scene (sources + targets)')
    p.add_argument('--src', type=int, default=2, help='number of source views N')
    p.add_argument('--images', nargs='*', default=None, help="a user's source images")
    p.add_argument('--cameras', default='', help='transforms.json for --images (nerfstudio layout); default: estimated')
    p.add_argument('--size', default='', help='HxW to resize user images to (multiples of 14)')
    p.add_argument('--traj', default='', choices=['', 'interp', 'orbit', 'spiral', 'forward'], help='target trajectory preset')
    p.add_argument('--frames', type=int, default=12, help='target frames of a trajectory')
    p.add_argument('--chunk', type=int, default=6, help='targets generated jointly per chunk')
    p.add_argument('--boundary', type=int, default=1, choices=[0, 1, 2, 3], help='deepest generated level k')
    p.add_argument('--independent', action='store_true', help='independent models M_l instead of the cascade (ablation)')
    p.add_argument('--steps', type=int, default=50, help='Euler steps; with --official the release\'s '
                   'num_steps: time-grid points, one more than its Euler steps (50 -> 49 steps)')
    p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance scale over cameras')
    p.add_argument('--seed', type=int, default=0, help='sampling seed')
    p.add_argument('--eval', action='store_true', help="the paper's protocol on the split: tables, JSON, per-scene CSV")
    p.add_argument('--eval-scenes', type=int, default=16, help='scenes evaluated')
    p.add_argument('--recon', action='store_true', help='Stage-1 reconstruction table: all levels and each level alone')
    p.add_argument('--lpips', action='store_true', help='add LPIPS (needs the lpips package and its weights)')
    p.add_argument('--out', default='out/sample', help='output folder')
    p.add_argument('--export', default=','.join(export.DEFAULT_FORMATS), type=export.parse_formats,
                   help='3D outputs beside images/, comma-separated: ply (points.ply), colmap (sparse/0/*.bin), '
                        'colmap-text (sparse/0/*.txt), glb (scene.glb), nerfstudio (transforms.json); "": none')
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)


@torch.no_grad()
def main(argv=None):
    a = get_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    t_start = time.time()
    lpips = data.lpips_fn(device) if a.lpips else None
    if a.recon or a.eval:
        ensure_data(a.data)
    if a.recon:
        enc = load_encoder(a.encoder, 'auto', device, ckpt_dir=a.ckpt_dir)
        dec = enc.rgb_decoder() if enc.has_rgb_decoder else load_decoder(find_checkpoint(run_name('decoder', a.encoder), a.ckpt_dir), device)
        ds = data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
        return run_recon(enc, dec, ds, a.out, a.eval_scenes, lpips)
    if a.official:
        pipe = load_official_pipeline(a.official, device)
    else:
        pipe = load_pipeline(a.ckpt_dir, a.boundary, a.independent, device, encoder=a.encoder)
    if a.eval:
        ds = data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
        return run_eval(pipe, ds, a.src, a.steps, a.cfg, a.seed, a.out, a.eval_scenes, lpips)
    size = tuple(int(s) for s in a.size.lower().split('x')) if a.size else None
    if a.images:
        images, c2w_src, K_src = user_scene(a.images, a.cameras, size, pipe.enc)
        images, c2w_src, K_src = images.to(device), c2w_src.to(device), K_src.to(device)
        c2w_t, K_t = target_cameras(c2w_src[0], K_src[0], a.traj or 'interp', a.frames)
        res = generate_in_chunks(pipe, images, c2w_src, K_src, c2w_t, K_t, a.chunk, steps=a.steps, cfg=a.cfg, seed=a.seed)
        c2w, K, gt, metrics = torch.cat([c2w_src, c2w_t[None]], 1), torch.cat([K_src, K_t[None]], 1), None, None
        images = torch.cat([images, res['images'][:, images.shape[1]:]], 1)
    else:
        ensure_data(a.data)
        ds = data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
        idx = int(a.scene) if a.scene.isdigit() else ds.index_of(a.scene)
        scene = data.split_views(data.collate_one(ds[idx]), a.src, mode='ends' if a.src == 2 else 'random')
        scene = {k: v.to(device) if torch.is_tensor(v) else v for k, v in scene.items()}
        images, c2w, K = scene['images'], scene['c2w'], scene['K']
        print(f'scene {scene["key"][0]}: {a.src} sources -> {images.shape[1] - a.src} targets at {images.shape[-1]}x{images.shape[-2]}')
        if a.traj:
            c2w_t, K_t = target_cameras(c2w[0, :a.src], K[0, :a.src], a.traj, a.frames)
            res = generate_in_chunks(pipe, images[:, :a.src], c2w[:, :a.src], K[:, :a.src], c2w_t, K_t, a.chunk,
                                     steps=a.steps, cfg=a.cfg, seed=a.seed)
            c2w, K, gt, metrics = torch.cat([c2w[:, :a.src], c2w_t[None]], 1), torch.cat([K[:, :a.src], K_t[None]], 1), None, None
        else:
            rows, res = evaluate_scene(pipe, scene, a.src, a.steps, a.cfg, a.seed, lpips)
            gt, metrics = images[0], rows
            print('  ' + ', '.join(f'{m}: PSNR {r["psnr"]:.2f}' for m, r in rows.items() if 'psnr' in r))
    write_outputs(a.out, images, res, c2w, K, a.src, frames_gt=gt, metrics=metrics, formats=a.export,
                  units='da3' if a.images and not a.cameras else 'poses')  # DA3 estimated the cameras
    print(f'wrote {a.out}/ ({len(os.listdir(a.out))} files) in {time.time() - t_start:.1f}s')
    return res


if __name__ == '__main__':
    main()
