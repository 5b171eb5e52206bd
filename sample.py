"""sample.py: the GLD cascade end to end, geometry export and the paper's evaluation protocol.

    python sample.py                                   # bundled tiny models on a synthetic test scene -> out/sample/
    python sample.py --data re10k:PATH --scene KEY     # a dataset scene
    python sample.py --images a.png b.png --cameras transforms.json --traj orbit --frames 24
    python sample.py --eval                            # N=2 -> 6 targets on the test split: tables, JSON, CSV
    python sample.py --official DIR                    # the released GLD models (see README)

Pipeline (paper Sec. 4, Fig. 2): DA3 encodes the source views alone (leakage-free) -> M1 generates level-1 features
of all V views (rectified flow, Euler, CFG over cameras) -> M1->0 generates level 0 conditioned on them -> the
frozen DA3 blocks after level 1 propagate the generated features to levels 2 and 3 (all views jointly) -> the RGB
decoder turns the four levels into images, and DA3's frozen DualDPT head gives depth, ray maps, cameras and a point
cloud with no extra training. `--boundary k` with independent models reproduces the boundary ablation.

This file also owns the glue that training reuses (train.py imports it; it never imports train.py): building
frozen encoders, latent statistics, the conditioning of one batch, checkpoint loading and export.
"""
import argparse
import contextlib
import csv
import hashlib
import io
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
import model as model_lib

UserError = cameras.UserError
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'tiny')  # the bundled models
COMMANDS = {  # what creates each missing piece (the models level<k>[_ind]: train_command)
    'encoder': 'python train.py --stage encoder', 'decoder': 'python train.py --stage decoder', 'data': 'python data.py synth',
}


def train_command(name):
    """The command that trains the model called name: encoder, decoder, level<k> or level<k>_ind."""
    if name.startswith('level'):
        return f'python train.py --level {name[5]}' + (' --independent' if name.endswith('_ind') else '')
    return COMMANDS[name]


# ----------------------------------------------------------------------------- checkpoints: find, load, export

def find_checkpoint(name, ckpt_dir=None):
    """The newest <ckpt_dir>/<name>/ckpt_*.pt when ckpt_dir is given (none there: a UserError naming the training
    command that makes it; never a fallback), else the bundled weights/tiny/<name>.safetensors."""
    if ckpt_dir:
        folder = os.path.join(ckpt_dir, name)
        ck = sorted(f for f in os.listdir(folder) if f.startswith('ckpt_') and f.endswith('.pt')) if os.path.isdir(folder) else []
        if not ck:
            raise UserError(f'{folder}: no {name} checkpoint (ckpt_*.pt) under --ckpt-dir {ckpt_dir}; create it with: '
                            f'{train_command(name)} --out {folder}')
        return os.path.join(folder, ck[-1])
    path = os.path.join(WEIGHTS, name + '.safetensors')
    if not os.path.exists(path):
        raise UserError(f'{path}: no bundled {name} model; restore it with: git checkout weights/tiny, or pass '
                        f'--ckpt-dir with a run made by: {train_command(name)}')
    return path


def auto_checkpoint(name):
    """train.py's 'auto' encoder and decoder: the newest runs/<name> checkpoint when there is one, else the bundled
    model (load_checkpoint prints which)."""
    folder = os.path.join('runs', name)
    has_run = os.path.isdir(folder) and any(f.startswith('ckpt_') and f.endswith('.pt') for f in os.listdir(folder))
    return find_checkpoint(name, 'runs' if has_run else None)


def load_checkpoint(path, device='cpu'):
    """-> (meta, state_dict), printing the file and its SHA-256 prefix; meta['sha256'] is the file's hash. A training
    checkpoint gives its EMA weights; an export gives fp16 weights + a JSON sidecar. A missing, unreadable or
    altered file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: {"a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint"}; '
                        'pass a ckpt_*.pt of a run or an exported .safetensors')
    raw = open(path, 'rb').read()
    digest = hashlib.sha256(raw).hexdigest()
    print(f'{path} (sha256 {digest[:12]})')
    broken = ('delete it (an older ckpt_*.pt beside it is used then) or re-create it with the training run that '
              'wrote it' if not path.endswith('.safetensors') else
              'restore it with: git checkout weights/tiny' if os.path.dirname(os.path.abspath(path)) == WEIGHTS else
              'export it again with: python train.py ... --export FOLDER')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load as load_safetensors
            sidecar = path[:-len('.safetensors')] + '.json'
            meta = data.read_json(sidecar, 'sidecar of an export (python train.py --export writes it)')
            if meta.get('sha256') and meta['sha256'] != digest:
                raise UserError(f'{path}: checksum mismatch (file is {digest[:12]}, {sidecar} says {meta["sha256"][:12]}); '
                                f'the file is corrupt or was replaced: {broken}')
            sd = {k: v.float().to(device) for k, v in load_safetensors(raw).items()}
            stats = {k[6:]: v for k, v in sd.items() if k.startswith('stats.')}
            meta.update(stats=stats or None, sha256=digest)
            return meta, {k: v for k, v in sd.items() if not k.startswith('stats.')}
        ck = torch.load(io.BytesIO(raw), map_location=device, weights_only=False)
        ck['sha256'] = digest
        return ck, ck['ema']
    except UserError:
        raise
    except Exception as e:  # truncated or foreign files: the readers' errors (of several types) name no file
        reason = (str(e).strip().splitlines() or [''])[0][:120]
        raise UserError(f'{path}: not a loadable checkpoint ({type(e).__name__}: {reason}); {broken}') from None


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


def load_encoder(preset, weights='auto', device='cpu', ckpt_dir=None):
    """A frozen DA3. weights: 'auto' (for da3-tiny: the newest <ckpt_dir>/encoder checkpoint, or the bundled
    weights/tiny/encoder when ckpt_dir is None), 'none', or a file. enc.source = {'weights': the file or 'none',
    'sha256': its hash or None} is what checkpoints record as the encoder that made their latents."""
    if weights == 'auto' and preset == 'da3-tiny':
        weights = find_checkpoint('encoder', ckpt_dir)
    sha = None
    if weights in ('auto', 'none', None, ''):
        if weights == 'auto':
            print(f'note: {preset} with random weights (pass --encoder-weights FILE for the official ones)')
        enc, weights = encoder_lib.build_encoder(preset), 'none'
    elif weights.endswith('.pt') and 'ckpt_' in os.path.basename(weights) or weights.endswith('.safetensors') and \
            os.path.exists(weights[:-len('.safetensors')] + '.json'):
        meta, sd = load_checkpoint(weights)
        enc, sha = encoder_lib.build_encoder(preset), meta['sha256']
        encoder_lib.load_weights(enc, sd, source=weights)  # its diagnostics: the preset the weights are for
    else:
        enc = encoder_lib.build_encoder(preset, weights=weights)
        sha = hashlib.sha256(open(weights, 'rb').read()).hexdigest() if os.path.isfile(weights) else None
        print(f'{weights} (sha256 {sha[:12] if sha else "-"})')
    enc.source = {'weights': weights, 'sha256': sha}
    return enc.to(device).freeze()


def check_encoder(meta, path, enc, name):
    """A model reads latents of the encoder it was trained with: refuse another one (by the file hash the
    checkpoint records; older checkpoints record none and are not checked)."""
    want, have = (meta.get('encoder') or {}).get('sha256'), enc.source['sha256']
    if want and want != have:
        raise UserError(f'{path}: trained on latents of encoder {meta["encoder"]["weights"]} (sha256 {want[:12]}), but '
                        f'the encoder here is {enc.source["weights"]} (sha256 {(have or "none")[:12]}); pass the '
                        '--ckpt-dir whose encoder run made it, or retrain it on this encoder with: '
                        f'{train_command(name)}')


def load_model(path, device='cpu', enc=None, name='level1'):
    """-> (GLD net in eval mode, meta with 'level', 'upper_level', LatentStats 'stats'). enc: refuse a model trained
    on another encoder's latents (check_encoder)."""
    meta, sd = load_checkpoint(path, device)
    if enc is not None:
        check_encoder(meta, path, enc, name)
    net = model_lib.GLD(model_lib.GLDConfig(**meta['config'])).to(device).eval()
    net.load_state_dict(sd)
    meta['stats'] = encoder_lib.LatentStats.from_state_dict(meta['stats'])
    return net, meta


def load_decoder(path, device='cpu', enc=None):
    """-> the RGB decoder in eval mode. enc: refuse a decoder trained on another encoder's features."""
    meta, sd = load_checkpoint(path, device)
    if enc is not None:
        check_encoder(meta, path, enc, 'decoder')
    dec = decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(**meta['config'])).to(device).eval()
    dec.load_state_dict(sd)
    return dec


# ----------------------------------------------------------------------------- conditioning of one batch

def model_cameras(c2w, K, src_mask, hw, official=False):
    """Poses relative to the last view (as the official code), largest camera distance 1 -> the model's camera
    inputs. official=True: the release's conventions (largest |t| component 1, its Plücker grid and PRoPE quirks)."""
    c2w_rel, _ = cameras.normalize_poses(c2w, ref=-1, by='max_abs' if official else 'norm')
    return model_lib.camera_inputs(c2w_rel, K, src_mask, hw, official=official)


def source_condition(enc, images, n_src):
    """Leakage-free condition: DA3 on the n_src source views alone (views 0..n_src-1) -> raw levels (B,V,T,2C),
    zeros at the targets."""
    B, V = images.shape[:2]
    pad = lambda f: torch.cat([f, f.new_zeros(B, V - n_src, *f.shape[2:])], 1)  # (B,N,T,C) -> (B,V,T,C)
    return [pad(f) for f in enc.encode(images[:, :n_src])]


def training_latents(enc, stats, batch, level, upper_level=None, tau=0.0, generator=None):
    """One training batch of M_level: the target is DA3 over all V views jointly, normalised per channel."""
    images, src_mask = batch['images'], batch['src_mask']
    n_src = int(src_mask[0].sum())
    B, V, _, H, W = images.shape
    with torch.no_grad():
        full = enc.encode(images)
        cond = source_condition(enc, images, n_src)[level]
    x = stats.normalize(full[level], level)
    cond = stats.normalize(cond, level) * src_mask[:, :, None, None]
    upper = None
    if upper_level is not None:  # M1->0: ground-truth level 1, optionally noised (sigma ~ |N(0, tau^2)|, variance kept)
        upper = stats.normalize(full[upper_level], upper_level)
        if tau > 0:
            sigma = (torch.randn(B, 1, 1, 1, generator=generator) * tau).abs().to(upper.device)
            eps = torch.randn(upper.shape, generator=generator).to(upper.device)
            upper = (upper + sigma * eps) / torch.sqrt(1 + sigma ** 2)
    cams = model_cameras(batch['c2w'], batch['K'], src_mask, (H // 14, W // 14))
    return {'x': x, 'cond': cond, 'upper': upper, 'cams': cams, 'src_mask': src_mask}


def compute_stats(enc, loader, levels, n_batches, device):
    """Per-channel statistics of the raw levels over n_batches training batches (DDP-aware inside)."""
    def images():
        for i, b in enumerate(loader):
            if i >= n_batches:
                break
            yield b['images'].to(device)
    return encoder_lib.compute_latent_stats(enc, images(), levels)


# ----------------------------------------------------------------------------- the cascade

class Pipeline:
    """Frozen DA3 + RGB decoder + the diffusion models {level: (net, meta)}; boundary k = the deepest generated level."""

    def __init__(self, enc, dec, models, boundary=1, log=print, official=None):
        self.enc, self.dec, self.models, self.boundary, self.log = enc, dec, models, boundary, log
        self.official = official  # None, or the OfficialConventions of the released models (see load_official_pipeline)

    def sample_level(self, level, cond_raw, cams, upper_raw, steps, cfg, generator):
        net, meta = self.models[level]
        stats = meta['stats']
        cond = stats.normalize(cond_raw, level) * cams['src_mask'][:, :, None, None]
        upper = stats.normalize(upper_raw, meta['upper_level']) if meta.get('upper_level') is not None else None
        uncond_cams = model_lib.drop_cameras(cams, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))
        if self.official is not None:  # the release's per-model camera quirks (cascade K by 504, CFG branch)
            cams, uncond_cams = self.official.model_cameras(level, cams, uncond_cams)
        B, V, T, C = cond.shape
        noise = torch.randn(cond.shape, generator=generator).to(cond.device)
        x = diffusion.euler_sample(lambda x_t, t: net(x_t, t, cond, cams, upper=upper), noise, steps=steps,
                                   a=diffusion.shift_alpha(V * T * C), cfg=cfg,
                                   uncond_fn=lambda x_t, t: net(x_t, t, cond, uncond_cams, upper=upper),
                                   t_end=0.001 if self.official is not None else 0.0)  # the release stops at t=0.001
        return stats.denormalize(x, level)

    @torch.no_grad()
    def generate(self, images, c2w, K, n_src, steps=50, cfg=1.5, seed=0, given=None):
        """images (B,V,3,H,W): only views 0..n_src-1 (the sources) are read. c2w (B,V,4,4), K (B,V,3,3) normalised.
        given: {level: raw (B,V,T,C)} ground-truth levels used instead of generating them (tests, evaluation).
        -> {'levels': raw levels, 'images' (B,V,3,H,W), 'geometry': DA3 head outputs}."""
        B, V, _, H, W = images.shape
        hw = (H // 14, W // 14)
        src_mask = (torch.arange(V, device=images.device) < n_src)[None].expand(B, V)
        cams = model_cameras(c2w, K, src_mask, hw, official=self.official is not None)
        cond = source_condition(self.enc, images, n_src)
        gen = torch.Generator().manual_seed(seed)
        levels, given = [None] * 4, dict(given or {})
        for level in range(self.boundary, -1, -1):  # deepest first: M1 before M1->0
            t0 = time.time()
            if level in given:
                levels[level] = given[level]
            elif level in self.models:
                up = self.models[level][1].get('upper_level')
                levels[level] = self.sample_level(level, cond[level], cams, levels[up] if up is not None else None,
                                                  steps, cfg, gen)
                name = f'M{up}->{level}' if up is not None else f'M{level}'
                self.log(f'  {name}: {steps} Euler steps, cfg {cfg}: {time.time() - t0:.2f}s')
        t0 = time.time()
        if self.boundary < 3:  # deeper levels: the generated level k through the remaining frozen DA3 blocks
            cls = self.enc.first_view_cls(images, self.boundary)  # GLD: token 0 of the first source, broadcast
            levels[self.boundary + 1:] = self.enc.propagate(levels[self.boundary], self.boundary, cls, hw)
            self.log(f'  propagate level {self.boundary} -> {self.boundary + 1}..3 through frozen DA3: {time.time() - t0:.2f}s')
        t0 = time.time()
        keep = torch.tensor([l is not None for l in levels], device=images.device)[None].expand(B, 4)
        filled = [l if l is not None else torch.zeros_like(levels[self.boundary]) for l in levels]
        norm = self.enc.normalize_levels(filled)
        rgb = self.dec(norm, hw, keep=keep if not keep.all() else None).clamp(0, 1)
        geo = self.enc.geometry(norm, H, W)
        self.log(f'  decode RGB + geometry head: {time.time() - t0:.2f}s')
        return {'levels': filled, 'images': rgb, 'geometry': geo}


def load_pipeline(ckpt_dir=None, boundary=1, independent=False, device='cpu', encoder='da3-tiny', encoder_weights='auto', log=print):
    """Finds the models by name: encoder, decoder, level{k}..level0 (cascade) or level{l}_ind (independent, ablation)."""
    enc = load_encoder(encoder, encoder_weights, device, ckpt_dir=ckpt_dir)  # None: the bundled weights only
    dec = load_decoder(find_checkpoint('decoder', ckpt_dir), device, enc)
    models = {}
    for level in range(boundary, -1, -1):
        name = f'level{level}' + ('_ind' if independent and level == 0 else '')  # M1..M3 are independent by nature
        models[level] = load_model(find_checkpoint(name, ckpt_dir), device, enc, name)
    return Pipeline(enc, dec, models, boundary, log)


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
    rows['gld'].update(cameras.pose_metrics(geo['c2w'][0], c2w[0]))
    if 'depths' in scene:
        rows['gld'].update(data.depth_metrics(geo['depth'][:, n_src:], scene['depths'][:, n_src:], align='median'))
    if gt_geometry:  # the same head on the ground-truth images: the ceiling of "geometry for free"
        full = pipe.enc.normalize_levels(pipe.enc.encode(images))
        g = pipe.enc.geometry(full, images.shape[-2], images.shape[-1])
        rows['da3 on gt images'] = {**cameras.pose_metrics(g['c2w'][0], c2w[0]),
                                    **(data.depth_metrics(g['depth'][:, n_src:], scene['depths'][:, n_src:], align='median')
                                       if 'depths' in scene else {})}
    return rows, out


def write_table(table, per_scene, out_dir, name, title):
    """{method: {metric: [values]}} -> means as a markdown table, JSON and a per-scene CSV in out_dir/name.*"""
    table = {m: {k: float(np.mean(v)) for k, v in ks.items()} for m, ks in table.items()}
    order = ['psnr', 'ssim', 'lpips', 'ate', 'rpe_r', 'rpe_t', 'absrel', 'rmse', 'delta1']
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
        scene = collate_one(dataset[i])
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
        scene = collate_one(dataset[i])
        images = scene['images']
        levels = enc.normalize_levels(enc.encode(images))
        for name, im in decoder_lib.reconstruct_per_level(dec, levels, (images.shape[-2] // 14, images.shape[-1] // 14)).items():
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
        raise UserError(f'{spec}: no such dataset folder; pass --data FOLDER, or create the synthetic set with: '
                        f'{COMMANDS["data"]}')


def collate_one(item):
    return {k: v[None] if torch.is_tensor(v) else [v] for k, v in item.items()}


def unwrap(net):
    """The plain module inside DDP and torch.compile wrappers (evaluation must not run DDP's collectives)."""
    net = getattr(net, '_orig_mod', net)
    return getattr(net, 'module', net)


def evaluate_during_training(stage, val, a, device, n=8):
    """Periodic evaluation inside train.py, on the first n validation scenes (EMA weights), rank 0 only. Diffusion:
    10 Euler steps, N=2 -> 6; the generated level's MSE on the targets and their PSNR decoded through the rest of
    the cascade (ground-truth deeper levels, no shallower ones), a cheap predictor of sample quality."""
    net = unwrap(stage.net)
    metrics, scenes = {}, [collate_one(val[i]) for i in range(min(n, len(val)))]
    scenes = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in s.items()} for s in scenes]
    scenes = [data.split_views(s, 2, mode='ends') for s in scenes]
    if stage.kind == 'encoder':
        out = [net(s['images']) for s in scenes]
        m = [data.depth_metrics(o['depth'], s['depths'], align='median') for o, s in zip(out, scenes)]
        return {k: float(np.mean([x[k] for x in m])) for k in m[0]}
    if stage.kind == 'decoder':
        ps = []
        for s in scenes:
            lv = stage.enc.normalize_levels(stage.enc.encode(s['images']))
            ps.append(data.psnr(net(lv, (s['images'].shape[-2] // 14, s['images'].shape[-1] // 14)).clamp(0, 1),
                                s['images']).mean())
        return {'recon_psnr': float(torch.stack(ps).mean())}
    if a.decoder_ckpt == 'none':
        return {}
    dec = load_decoder(auto_checkpoint('decoder') if a.decoder_ckpt == 'auto' else a.decoder_ckpt, device)
    meta = {'stats': stage.stats, 'upper_level': stage.upper_level}
    pipe = Pipeline(stage.enc, dec, {stage.level: (net, meta)}, boundary=max(1, stage.level), log=lambda *_: None)
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

def save_image(img, path):
    """img (3,H,W) in [0,1] -> PNG."""
    from PIL import Image
    Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)).save(path)


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


def write_outputs(out_dir, images, res, c2w, K, n_src, frames_gt=None, metrics=None):
    """Every target image, a grid, a video, depth maps (PNG + .npy), a fused PLY and a nerfstudio transforms.json."""
    os.makedirs(out_dir, exist_ok=True)
    pred, geo = res['images'][0], res['geometry']
    V, _, H, W = pred.shape
    for v in range(n_src, V):
        save_image(pred[v], os.path.join(out_dir, f'target_{v - n_src:03d}.png'))
    save_image(make_grid(frames_gt if frames_gt is not None else torch.cat([images[0, :n_src], pred[n_src:]]), pred, n_src),
               os.path.join(out_dir, 'grid.png'))
    write_video([pred[v] for v in range(n_src, V)], os.path.join(out_dir, 'video'))
    depth = geo['depth'][0]
    np.save(os.path.join(out_dir, 'depth.npy'), depth.cpu().numpy())
    for v in range(V):
        save_image(colourise_depth(depth[v]), os.path.join(out_dir, f'depth_{v:03d}.png'))
    pts = encoder_lib.depth_to_points(geo['depth'], geo['c2w'], geo['K'])[0]  # (V,H,W,3) in DA3's world frame
    conf = geo['depth_conf'][0]
    keep = conf >= conf.flatten().quantile(0.3)
    colours = pred.permute(0, 2, 3, 1)
    encoder_lib.write_ply(os.path.join(out_dir, 'points.ply'), pts[keep], colours[keep])
    frames = []
    for v in range(V):
        gl = cameras.opengl_to_opencv(c2w[0, v])  # the flip is its own inverse
        Kp = cameras.K_to_pixels(K[0, v], H, W)
        frames.append({'file_path': f'target_{v - n_src:03d}.png' if v >= n_src else f'source_{v}',
                       'transform_matrix': gl.tolist(), 'fl_x': float(Kp[0, 0]), 'fl_y': float(Kp[1, 1]),
                       'cx': float(Kp[0, 2]), 'cy': float(Kp[1, 2]), 'w': W, 'h': H, 'is_source': v < n_src})
    json.dump({'camera_model': 'OPENCV', 'frames': frames}, open(os.path.join(out_dir, 'transforms.json'), 'w'), indent=1)
    if metrics is not None:
        json.dump(metrics, open(os.path.join(out_dir, 'metrics.json'), 'w'), indent=1)


def write_video(frames, stem, fps=8):
    """MP4 when imageio-ffmpeg is installed, else an animated GIF through Pillow."""
    arr = [(f.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8) for f in frames]
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (only its presence matters)
        imageio.mimsave(stem + '.mp4', arr, fps=fps)
        return stem + '.mp4'
    except ImportError:
        from PIL import Image
        ims = [Image.fromarray(a) for a in arr]
        ims[0].save(stem + '.gif', save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
        return stem + '.gif'


# ----------------------------------------------------------------------------- inputs

def user_scene(paths, cams_path, size, enc):
    """A user's images (+ optional nerfstudio transforms.json); without cameras DA3's head estimates them."""
    from PIL import Image, UnidentifiedImageError
    ims = []
    for p in paths:
        try:
            ims.append(torch.from_numpy(np.asarray(Image.open(p).convert('RGB'), dtype=np.float32) / 255).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f'{p}: cannot read the image ({e}); pass PNG or JPEG files to --images')
    H, W = ims[0].shape[-2:]
    if any(im.shape[-2:] != (H, W) for im in ims):
        raise UserError(f'{paths}: the images differ in size; resize them to one size first')
    images = torch.stack(ims)[None]  # (1,N,3,H,W)
    tH, tW = size or (max(14, H // 14 * 14), max(14, W // 14 * 14))
    if cams_path:  # a transforms.json (or its folder); cameras matched to the images by file name
        path = cams_path if cams_path.endswith('.json') else os.path.join(cams_path, 'transforms.json')
        t = data.read_transforms(path)
        names = [os.path.basename(f) for f in t['files']]
        missing = [p for p in paths if os.path.basename(p) not in names]
        if missing:
            raise UserError(f'{path}: no camera for {missing} (frames: {names}); give one frame per image, by file name')
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
        print('no --cameras: estimating source cameras with the frozen DA3 geometry head')
        g = enc.geometry(enc.normalize_levels(enc.encode(images)), tH, tW)
        c2w, K = g['c2w'], g['K']
    if not torch.isfinite(c2w).all() or not torch.isfinite(K).all():
        raise UserError(f'{cams_path or "the DA3 camera estimate"}: cameras contain NaN or inf values')
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
    geo = {k: cat([o['geometry'][k] for o in outs], N) for k in ('depth', 'depth_conf', 'c2w', 'K')}
    return {'images': cat([o['images'] for o in outs], N), 'geometry': geo}


def build_parser():
    p = argparse.ArgumentParser(description='GLD sampling and evaluation', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt-dir', default=None, help='folder of training runs (runs/encoder, runs/decoder, runs/level1, ...); default: bundled weights/tiny')
    p.add_argument('--official', default='', help='folder with the released GLD files (docs/official.md)')
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
    p.add_argument('--steps', type=int, default=50, help='Euler steps')
    p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance scale over cameras')
    p.add_argument('--seed', type=int, default=0, help='sampling seed')
    p.add_argument('--eval', action='store_true', help="the paper's protocol on the split: tables, JSON, per-scene CSV")
    p.add_argument('--eval-scenes', type=int, default=16, help='scenes evaluated')
    p.add_argument('--recon', action='store_true', help='Stage-1 reconstruction table: all levels and each level alone')
    p.add_argument('--lpips', action='store_true', help='add LPIPS (needs the lpips package and its weights)')
    p.add_argument('--out', default='out/sample', help='output folder')
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)


@torch.no_grad()
def main(argv=None):
    a = get_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    t_start = time.time()
    size = data.parse_size(a.size)  # bad input is reported before any model is loaded
    if not 0 < a.src < a.views:
        raise UserError(f'--src {a.src}: a scene of --views {a.views} needs 1..{a.views - 1} source views')
    data.make_output_dir(a.out)
    lpips = data.lpips_fn(device) if a.lpips else None
    if a.recon or a.eval:
        ensure_data(a.data)
    if a.recon:
        enc = load_encoder('da3-tiny', 'auto', device, ckpt_dir=a.ckpt_dir)
        dec = load_decoder(find_checkpoint('decoder', a.ckpt_dir), device, enc)
        ds = data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
        return run_recon(enc, dec, ds, a.out, a.eval_scenes, lpips)
    if a.official:
        pipe = load_official_pipeline(a.official, device)
    else:
        pipe = load_pipeline(a.ckpt_dir, a.boundary, a.independent, device)
    if a.eval:
        ds = data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
        return run_eval(pipe, ds, a.src, a.steps, a.cfg, a.seed, a.out, a.eval_scenes, lpips)
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
        if idx >= len(ds):
            raise UserError(f'--scene {a.scene}: the split has {len(ds)} scenes, pass an index 0..{len(ds) - 1} or a key')
        scene = data.split_views(collate_one(ds[idx]), a.src, mode='ends' if a.src == 2 else 'random')
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
    write_outputs(a.out, images, res, c2w, K, a.src, frames_gt=gt, metrics=metrics)
    print(f'wrote {a.out}/ ({len(os.listdir(a.out))} files) in {time.time() - t_start:.1f}s')
    return res


# ----------------------------------------------------------------------------- the released models (docs/official.md)

OFFICIAL_HUB = 'SeonghuJeon/GLD'
OFFICIAL_FILES = {  # role -> path in the release
    'encoder': 'pretrained_models/da3/model.safetensors',  # DA3-Base (hub layout)
    'head': 'pretrained_models/da3/dpt_decoder.pt',  # DA3's DualDPT head alone
    'decoder': 'mae_decoder.pt',  # the RGB decoder (GeneralDecoder_Variable)
    'level1': 'da3_level1.pt',  # M1 (DDT.py)
    'cascade': 'da3_cascade.pt',  # M1->0 (run through DDT_old.py by the official evaluation)
    'stats0': 'model_stats/da3/normalization_stats_level0.pt', 'stats1': 'model_stats/da3/normalization_stats_level1.pt'}


def lift(K):
    """PRoPE's lift: K (...,3,3) in the top-left of a 4x4 identity -> (...,4,4)."""
    L = torch.eye(4, dtype=K.dtype, device=K.device).expand(*K.shape[:-2], 4, 4).clone()
    L[..., :3, :3] = K
    return L


def prope_K(K):
    """Normalised K (...,3,3) -> K' of PRoPE: principal point shifted by -0.5 (image centre at 0)."""
    Kc = K.clone()
    Kc[..., :2, 2] -= 0.5
    return Kc


def official_prope_K(P, P_inv):
    """K' (...,3,3) back from the official PRoPE matrices (camera_inputs(official=True)), which hold it twice:
    P P_inv = lift(K') w2c c2w lift(K') = lift(K'^2). Per axis K' maps x -> f x + c, so K'^2 maps
    x -> f^2 x + (f + 1) c: f is the square root of its diagonal and c its offset divided by f + 1."""
    sq = (P @ P_inv)[..., :3, :3]
    f = sq.diagonal(dim1=-2, dim2=-1)[..., :2].sqrt()  # (...,2): fx', fy'
    K = torch.zeros_like(sq)
    K[..., 0, 0], K[..., 1, 1], K[..., 2, 2] = f[..., 0], f[..., 1], 1
    K[..., :2, 2] = sq[..., :2, 2] / (f + 1)
    return K


class OfficialConventions:
    """What the released GLD models were trained and evaluated with, where it differs from our clean default.
    The one list (facts: shared/notes/official-gld-model.md sections 3-8; table: docs/official.md):

    1. Poses relative to the LAST view with translations scaled so the largest |t| COMPONENT is 1 (ours: the
       largest camera distance is 1): model_cameras(official=True) -> cameras.normalize_poses(by='max_abs').
    2. The Plücker map samples pixel (u, v) at (u - 0.5, v + 0.5) (ours: the pixel centre (u + 0.5, v + 0.5)):
       camera_inputs(official=True).
    3. PRoPE's key/value matrix is c2w lift(K') where PRoPE has c2w lift(K'^-1), so P_inv P != I:
       camera_inputs(official=True).
    4. The cascade M1->0 runs through DDT_old.py, which normalises K by a fixed 504 x 504 image whatever the true
       H x W (ours and M1: by W and H): model_cameras below, for the levels in cascade_levels.
    5. The unconditional branch of CFG (ours: Plücker channels 1: zeroed, P = P_inv = I). Both release models zero
       the Plücker channels too, but M1 (DDT.py, cfg_mode new) sets viewmats to I4 AND K to I3 in PIXELS, which
       normalises to fx' = 1/W, fy' = 1/H, cx' = cy' = -0.5, so P = P_inv = lift(K'(I3)); the cascade (DDT_old.py)
       sets viewmats to I4 and keeps K: P = P_inv = lift(K'_504): model_cameras below.
    6. The decoder's output is ImageNet-normalised and de-normalised as rgb * std + mean (ours: [0,1] RGB):
       DecoderConfig.imagenet_output, set by decoder.convert_official.
    The same in both modes (stated so that nobody looks for a switch): the double SiLU on the time embedding in
    the encoder blocks (GLDConfig.double_silu, set by model.convert_official and True in our default too); the
    decoder's input, [local, LayerNorm(global)] per level (encoder.normalize_levels); the latent normalisation
    (x - mean) / sqrt(var + 1e-5); the time shift at sampling a = sqrt(V h w C / 4096) (official evaluation:
    8 views, 18 x 18 tokens, C = 1536 -> a = 31.2; diffusion.shift_alpha); CFG 1.5 on t in [0, 1]; the
    propagation token (level-1 token 0 of the first source view encoded alone).
    7. The Euler grid ends at t = 0.001 (shifted: 0.03 at a = 31.2; ours at 0): Pipeline.sample_level.
    Not reproduced (docs/official.md): the official decoder runs under bf16 autocast and, on GPUs with xformers,
    the DiTs' attention in bf16; we run fp32 unless autocast is asked for.
    """

    def __init__(self, cascade_levels=(0,), cascade_image_size=504):
        self.cascade_levels = set(cascade_levels)  # levels whose model is the released cascade (DDT_old.py)
        self.cascade_image_size = cascade_image_size  # DDT_old.py's cam_input_size

    def model_cameras(self, level, cams, uncond_cams):
        """The camera inputs the released model of `level` sees, from ours built with official=True (cams) and
        drop_cameras (uncond_cams, the unconditional branch of CFG) -> (cams, uncond_cams), items 4 and 5."""
        H, W = cams['plucker'].shape[-2:]
        Kc = official_prope_K(cams['P'], cams['P_inv'])  # (B,V,3,3) K' normalised by W, H
        if level in self.cascade_levels:
            S = self.cascade_image_size
            K = Kc.clone()
            K[..., :2, 2] += 0.5  # our normalised K
            K_fixed = prope_K(cameras.K_to_normalized(cameras.K_to_pixels(K, H, W), S, S))  # (B,V,3,3) K' by S x S
            Kc_inv = torch.linalg.inv(Kc)
            cams = {**cams, 'P': lift(K_fixed @ Kc_inv) @ cams['P'],  # lift(K'_S) w2c
                    'P_inv': cams['P_inv'] @ lift(Kc_inv @ K_fixed)}  # c2w lift(K'_S)
            P_uncond = lift(K_fixed)  # viewmats I4, K kept
        else:
            eye = torch.eye(3, dtype=Kc.dtype, device=Kc.device)
            P_uncond = lift(prope_K(cameras.K_to_normalized(eye, H, W))).expand_as(cams['P'])  # I4 and I3 in pixels
        return cams, {**uncond_cams, 'P': P_uncond, 'P_inv': P_uncond}


def find_official_files(folder):
    """Role -> local path of every OFFICIAL_FILES entry, each searched by name anywhere under folder (hidden
    folders skipped; with several of one name, the one under the release's own path)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder}: no such folder; download the release with: huggingface-cli download '
                                f'{OFFICIAL_HUB} --local-dir {folder} (see docs/official.md)')
    by_name = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for f in files:
            by_name.setdefault(f, []).append(os.path.join(root, f))
    paths = {}
    for role, rel in OFFICIAL_FILES.items():
        hits = by_name.get(os.path.basename(rel), [])
        exact = [h for h in hits if h.replace(os.sep, '/').endswith('/' + rel)]
        if not hits:
            raise FileNotFoundError(f'{folder}: no {os.path.basename(rel)} (release path {rel}); download it from '
                                    f'https://huggingface.co/{OFFICIAL_HUB} or with: huggingface-cli download '
                                    f'{OFFICIAL_HUB} --local-dir {folder} (see docs/official.md)')
        if len(hits) > 1 and len(exact) != 1:
            raise ValueError(f'{folder}: {len(hits)} files named {os.path.basename(rel)}: {hits}; '
                             f'keep the one at {rel}')
        paths[role] = exact[0] if exact else hits[0]
    return paths


def read_official_checkpoint(path, log=print):
    """An official .pt -> a flat state dict. Unwraps {'ema' | 'model' | 'state_dict' | 'module': ...} (the EMA
    weights when present, which is what the release evaluates) and strips the 'module.' (DDP) and '_orig_mod.'
    (torch.compile) prefixes."""
    import pickle
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        log(f'note: {path} also holds Python objects (e.g. training args): loading it fully; do so only with '
            f'files from {OFFICIAL_HUB}')
        obj = torch.load(path, map_location='cpu', weights_only=False)
    wrappers = ('ema', 'model', 'state_dict', 'module')  # in order of preference
    while isinstance(obj, dict):
        key = next((k for k in wrappers if isinstance(obj.get(k), (dict, torch.nn.Module))), None)
        if key is None:
            break
        if key == 'ema':
            ignored = " (its 'model' weights are ignored)" if 'model' in obj else ''
            log(f'{os.path.basename(path)}: using its EMA weights{ignored}')
        obj = obj[key].state_dict() if isinstance(obj[key], torch.nn.Module) else obj[key]
    prefix = ('module.', '_orig_mod.')
    sd = {}
    for k, v in obj.items():
        while k.startswith(prefix):
            k = k.split('.', 1)[1]
        sd[k] = v
    return sd


def load_official_pipeline(folder, device, encoder_preset='da3-base', heads=16, log=print):
    """The released GLD models (hub repo SeonghuJeon/GLD, files OFFICIAL_FILES) converted into our modules and loaded
    strictly -> Pipeline(DA3, RGB decoder, {1: M1, 0: M1->0}, boundary 1, official=OfficialConventions()).
    encoder_preset and heads (not readable from shapes) default to the release: DA3-Base, 16 heads everywhere."""
    files = find_official_files(folder)
    enc = encoder_lib.build_encoder(encoder_preset, weights=[files['encoder'], files['head']]).to(device).freeze()
    per_level = [encoder_lib.load_official_stats(files[role]) for role in ('stats0', 'stats1')]
    stats = encoder_lib.LatentStats({l: s.mean[l] for s in per_level for l in s.mean},
                                    {l: s.var[l] for s in per_level for l in s.var})

    def convert(role, converter, **kw):
        """One official checkpoint -> (config, our state dict), any mismatch reported with the file's path."""
        path = files[role]
        try:
            cfg, sd = converter(read_official_checkpoint(path, log), heads=heads, **kw)
        except (AssertionError, KeyError, ValueError) as e:  # the converters' strict checks
            raise ValueError(f'{path}: does not convert ({type(e).__name__}: {e})') from e
        dim = cfg.feat_dim if role == 'decoder' else cfg.latent_dim
        if dim != enc.dim:
            raise ValueError(f'{path}: levels of {dim} channels, but encoder {encoder_preset!r} gives {enc.dim}; '
                             f'pass the matching encoder_preset')
        return cfg, sd

    cfg, sd = convert('decoder', decoder_lib.convert_official)
    dec = decoder_lib.RGBDecoder(cfg)
    dec.load_state_dict(sd, strict=True)
    models = {}
    for level, role, upper in ((1, 'level1', None), (0, 'cascade', 1)):
        cfg, sd = convert(role, model_lib.convert_official, cascade=upper is not None)
        net = model_lib.GLD(cfg)
        net.load_state_dict(sd, strict=True)
        models[level] = (net.to(device).eval(), {'level': level, 'upper_level': upper, 'stats': stats})
        log(f'{os.path.basename(files[role])}: {model_lib.count_params(net) / 1e6:.1f}M params as M'
            f'{"" if upper is None else f"{upper}->"}{level}')
    return Pipeline(enc, dec.to(device).eval(), models, boundary=1, log=log, official=OfficialConventions())


if __name__ == '__main__':
    cameras.run_cli(main)
