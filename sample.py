"""sample.py: the GLD cascade (pipeline.Pipeline, paper Sec. 4) on a scene or a user's photos; outputs, evaluation.

`python sample.py` (bundled tiny models, a synthetic test scene -> out/sample/), `--images ... --cameras ... --traj`,
`--eval` (N=2 -> 6, two baselines beside GLD; Table 3), `--boundary k` / `--independent` ablations, `--recon` for
Stage 1 (Table 6), `--official DIR` (the released models, docs/official.md), 3D exports.
"""

import argparse
import contextlib
import csv
import glob
import json
import os
import time

import numpy as np
import torch

import cameras
import cli
import data
import decoder as decoder_lib
import export
import metrics
import pipeline
import synth
from cli import UserError
from constants import DEFAULT_ENCODER
from export import save_image


# ----------------------------------------------------------------------------- evaluation
def evaluate_scene(pipe, scene, n_src, steps, cfg_scale, seed, lpips=None, gt_geometry=False):
    """One scene of the paper's protocol (sources first): metrics on the targets of GLD and of two baselines."""
    images, c2w, K = scene['images'], scene['c2w'], scene['K']
    out = pipe.generate(images, c2w, K, n_src, steps=steps, cfg_scale=cfg_scale, seed=seed)
    idx = torch.cdist(c2w[:, n_src:, :3, 3], c2w[:, :n_src, :3, 3]).argmin(-1)  # (B,M): each target's nearest source
    nearest = torch.stack([images[b, idx[b]] for b in range(len(images))])  # by camera distance
    mean = images[:, :n_src].mean((1, 3, 4), keepdim=True).expand_as(nearest)  # (B,M,3,H,W): the sources' mean colour
    rows = {
        name: metrics.image_metrics(im, images[:, n_src:], lpips)
        for name, im in [('gld', out['images'][:, n_src:]), ('nearest source', nearest), ('mean colour', mean)]
    }

    def geometry_metrics(geo):  # {} for a latent without a geometry head
        m = metrics.pose_metrics(geo['c2w'][0], c2w[0]) if 'c2w' in geo else {}
        if 'depths' in scene and 'depth' in geo:
            m.update(metrics.depth_metrics(geo['depth'][:, n_src:], scene['depths'][:, n_src:], align='median'))
        return m

    rows['gld'].update(geometry_metrics(out['geometry']))
    raw, cls = pipe.enc.encode(images, return_cls=True) if pipe.enc.has_geometry else (pipe.enc.encode(images), None)
    if (k := pipe.boundary) in pipe.models:  # generated level k of the targets vs DA3 on the true images, normalised
        norm = pipe.models[k][1]['stats'].normalize
        rows['gld']['mse_k'] = float((norm(out['levels'][k], k) - norm(raw[k], k))[:, n_src:].pow(2).mean())
    if gt_geometry and pipe.enc.has_geometry:  # the head on the ground-truth images: the ceiling of "geometry for free"
        g = pipe.enc.geometry(pipe.enc.normalize_levels(raw), *images.shape[-2:], cls_last=cls[-1])
        rows['da3 on gt images'] = geometry_metrics(g)
    return rows, out


def write_table(per_scene, out_dir, name, title):
    """Rows {'scene', 'method', metric: value} -> out_dir/name.md and .json (means per method), name_scenes.csv."""
    table = {}
    for row in per_scene:
        for k, v in row.items():
            if k not in ('scene', 'method'):
                table.setdefault(row['method'], {}).setdefault(k, []).append(v)
    table = {m: {k: float(np.mean(v)) for k, v in ks.items()} for m, ks in table.items()}
    order = ['psnr', 'ssim', 'lpips', 'mse_k', 'ate', 'rpe_r', 'rpe_t', 'absrel', 'rmse', 'delta1']
    cols = sorted({k for m in table.values() for k in m}, key=order.index)
    md = [f'| {title} | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    md += [f'| {m} | ' + ' | '.join(f'{t[c]:.4g}' if c in t else '-' for c in cols) + ' |' for m, t in table.items()]
    open(os.path.join(out_dir, f'{name}.md'), 'w').write('\n'.join(md) + '\n')
    json.dump(table, open(os.path.join(out_dir, f'{name}.json'), 'w'), indent=1)
    with open(os.path.join(out_dir, f'{name}_scenes.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['scene', 'method'] + cols)
        w.writeheader()
        w.writerows(per_scene)
    print('\n'.join(md))
    return table


def run_eval(pipe, dataset, n_src, steps, cfg_scale, seed, out_dir, n_scenes, lpips=None):
    """The paper's protocol: N sources (N=2: first and last), the rest targets; GLD beside two baselines."""
    per_scene, n = [], min(n_scenes, len(dataset))
    bar = cli.Progress('eval scene', n, every=0)  # a scene takes long: a line for each
    for i in range(n):
        scene = data.split_views(
            data.collate_one(dataset[i]),
            n_src,
            mode='ends' if n_src == 2 else 'random',
            generator=torch.Generator().manual_seed(seed + i),
        )
        rows, _ = evaluate_scene(pipe, scene, n_src, steps, cfg_scale, seed + i, lpips, gt_geometry=True)
        bar.step(
            f'{scene["key"][0]}: PSNR {rows["gld"]["psnr"]:.2f} (nearest source {rows["nearest source"]["psnr"]:.2f})'
        )
        per_scene += [{'scene': scene['key'][0], 'method': method, **m} for method, m in rows.items()]
    return write_table(per_scene, out_dir, f'eval_n{n_src}', f'method (N={n_src}, {n} scenes, {steps} steps)')


def run_recon(enc, dec, dataset, out_dir, n_scenes, lpips=None):
    """Stage 1 in miniature (paper Table 6): the decoder on DA3 features of all views, all levels and each alone."""
    per_scene, n = [], min(n_scenes, len(dataset))
    for i in range(n):
        images = (scene := data.collate_one(dataset[i]))['images']  # (1,V,3,H,W)
        levels = enc.normalize_levels(enc.encode(images))
        hw = (images.shape[-2] // enc.patch, images.shape[-1] // enc.patch)
        per_scene += [
            {
                'scene': scene['key'][0],
                'method': f'level {name}' if name != 'all' else 'all levels',
                **metrics.image_metrics(im.clamp(0, 1), images, lpips),
            }
            for name, im in decoder_lib.reconstruct_per_level(dec, levels, hw).items()
        ]
    return write_table(per_scene, out_dir, 'recon', f'decoder input ({n} scenes)')


def ensure_data(spec):
    """The default synthetic test scenes are rendered on first use (the same seeds as `data.py synth`)."""
    if spec == 'data_synth' and not os.path.isdir(os.path.join(spec, 'test')):
        print('rendering the synthetic test scenes into data_synth/test (first run only)')
        synth.write_synth(spec, 0, 16)
    elif not os.path.isdir(spec.split(':')[-1]):
        raise UserError(f'{spec}: no such dataset folder; pass --data FOLDER or make one: {pipeline.COMMANDS["data"]}')


# ----------------------------------------------------------------------------- writing outputs
OUTPUTS = (
    'grid.png',
    'trajectory.png',
    'video.mp4',
    'video.gif',
    'depth.npy',
    'depth_[0-9]*.png',
    'metrics.json',
    'images/source_[0-9]*.png',
    'images/target_[0-9]*.png',
    'points.ply',
    'transforms.json',
    *(f'sparse/0/{n}.{e}' for n in ('cameras', 'images', 'points3D') for e in ('bin', 'txt')),
    'eval_n[0-9]*.md',
    'eval_n[0-9]*.json',
    'eval_n[0-9]*_scenes.csv',
    'recon.md',
    'recon.json',
    'recon_scenes.csv',
)


def our_files(folder):
    return sorted(f for pattern in OUTPUTS for f in glob.glob(os.path.join(glob.escape(folder), pattern)))


def clear_outputs(folder):
    """Remove what an earlier run wrote into folder (only the names in OUTPUTS)."""
    stale = our_files(folder)
    for f in stale:
        os.remove(f)
    for d in ('images', 'sparse/0', 'sparse'):  # now empty, unless they hold files of the user's
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(folder, d))
    if stale:
        print(f'note: removed {len(stale)} outputs of an earlier run from {folder}/ (other files there are kept)')


def write_outputs(
    out_dir,
    images,
    res,
    c2w,
    K,
    n_src,
    frames_gt=None,
    scores=None,
    formats=export.DEFAULT_FORMATS,
    units='poses',
    frame='the dataset cameras',
):
    """grid.png, trajectory.png, video, depth maps (PNG + .npy), metrics.json, and export.write_scene's 3D outputs."""
    os.makedirs(out_dir, exist_ok=True)
    pred, geo = res['images'][0], res['geometry']
    save_image(export.make_grid(images[0, :n_src], pred, frames_gt), os.path.join(out_dir, 'grid.png'))
    export.draw_topdown(
        os.path.join(out_dir, 'trajectory.png'),
        c2w[0, :n_src],
        c2w[0, n_src:],
        title=f'{n_src} sources (blue), {pred.shape[0] - n_src} targets (orange)',
    )
    export.write_video(list(pred[n_src:]), os.path.join(out_dir, 'video'))
    summary = 'none: this latent has no geometry head (no depth, cameras or 3D)'  # DINOv2, the VAE: images only
    if 'depth' in geo and 'c2w' in geo:
        depth = geo['depth'][0]
        np.save(os.path.join(out_dir, 'depth.npy'), depth.cpu().numpy())
        for v, inv in enumerate(1 / depth.clamp_min(1e-6)):  # (H,W) -> (3,H,W): a perceptual ramp of inverse depth
            x = (inv - inv.min()) / (inv.max() - inv.min() + 1e-9)
            rgb = torch.stack([x.sqrt(), x**1.5 * 0.8, 0.5 * (1 - x) + 0.3 * x])
            save_image(rgb, os.path.join(out_dir, f'depth_{v:03d}.png'))
        views = torch.cat([images[0, :n_src], pred[n_src:]])  # the sources as given, the generated targets
        summary = export.write_scene(
            out_dir, views, depth, geo['depth_conf'][0], c2w[0], K[0], geo['c2w'][0], n_src, formats, units, frame=frame
        )
    json.dump({**(scores or {}), 'export': summary}, open(os.path.join(out_dir, 'metrics.json'), 'w'), indent=1)


# ----------------------------------------------------------------------------- inputs
def read_images(paths):
    """A user's photos -> (1,N,3,H,W) in [0,1]; one size for all."""
    ims = []
    for p in paths:
        try:
            ims.append(data.decode_image(p))
        except data.FrameError as e:
            raise UserError(f'{p}: cannot read the image ({e}); pass PNG or JPEG files to --images') from e
    H, W = ims[0].shape[-2:]
    if any(im.shape[-2:] != (H, W) for im in ims):
        raise UserError(f'{paths}: the images differ in size; resize them to one size first')
    return torch.stack(ims)[None]


def match_cameras(paths, cams, where):
    """Each image's frame index in cams (export.read_cameras), by file name, else stem; an existing file must match."""
    names, idx = cams['names'], []
    base, stem = os.path.basename, lambda f: os.path.splitext(os.path.basename(f))[0]
    for p in paths:
        hits = [i for i, n in enumerate(names) if base(n) == base(p)] or [
            i for i, n in enumerate(names) if stem(n) == stem(p)
        ]
        if not hits:
            raise UserError(
                f'{where}: no camera for {p} (frames: {names[:6]}{" ..." if len(names) > 6 else ""}); '
                'give one frame per image, named like the image file'
            )
        if len(hits) > 1:
            raise UserError(f'{where}: several frames match {p} ({[names[i] for i in hits]}); keep one frame per image')
        f = cams['files'][hits[0]]
        if f and os.path.isfile(f) and not os.path.samefile(f, p) and open(f, 'rb').read() != open(p, 'rb').read():
            raise UserError(
                f'{where}: the frame for {os.path.basename(p)} is {f}, not the image {p} (other content): '
                "cameras of other photos; pass these images' own (edited copies: write one beside them)"
            )
        idx.append(hits[0])
    return idx


def user_scene(paths, cams_path, size, enc, check=True):
    """A user's photos with the cameras of cams_path (export.read_cameras), else DA3's estimate (checked unless not
    check) -> images (1,N,3,H,W), c2w (1,N,4,4), K (1,N,3,3) normalised, frame (whose cameras define the world)."""
    images = read_images(paths)
    H, W = images.shape[-2:]
    P = enc.patch  # image sides: multiples of the encoder's patch
    tH, tW = size or (max(P, H // P * P), max(P, W // P * P))
    c2w = K = None
    if cams_path:
        cams = export.read_cameras(cams_path, image_size=(H, W))
        idx = match_cameras(paths, cams, cams_path)
        if cams['size'] and abs(cams['size'][1] / cams['size'][0] - W / H) > 0.01 * W / H:
            raise UserError(
                f'{cams_path}: its intrinsics are for {cams["size"][1]}x{cams["size"][0]} images, the photos '
                f'are {W}x{H} (another aspect ratio); crop the photos back or pass their own cameras'
            )
        c2w, K = cams['c2w'][idx][None], cams['K'][idx][None]
        frame = f'the given cameras ({cams["format"]} {cams_path})'
    if (H, W) != (tH, tW):
        print(f'note: resizing {W}x{H} -> {tW}x{tH} (sides must be multiples of 14)')
        images, Kin = data.resize_and_crop(
            images[0], torch.eye(3).expand(len(paths), 3, 3) if K is None else K[0], (tH, tW)
        )
        images, K = images[None], None if K is None else Kin[None]
    if c2w is None:
        if not enc.has_geometry:
            raise UserError(f'no --cameras: {enc.cfg.name} has no geometry head to estimate cameras; pass --cameras')
        print(f'no --cameras: estimating the cameras of the photos with the frozen {enc.cfg.name} geometry head')
        levels, cls = enc.encode(images, return_cls=True)
        g = enc.geometry(enc.normalize_levels(levels), tH, tW, cls_last=cls[-1])
        c2w, K, frame = g['c2w'], g['K'], "DA3's estimated cameras (no --cameras)"
        if not torch.isfinite(c2w).all() or not torch.isfinite(K).all():
            raise UserError('the DA3 camera estimate for --images holds NaN or inf values; pass --cameras')
        if check:
            cameras.check_estimate(c2w[0], K[0], g['depth'][0], tH, tW)
    return images, c2w, K, frame


def generate_in_chunks(pipe, images_src, c2w_src, K_src, c2w_tgt, K_tgt, chunk, **kw):
    """Long trajectories as SEVA does: every chunk holds all sources plus up to `chunk` targets."""
    N, outs = images_src.shape[1], []
    n_chunks = -(-c2w_tgt.shape[0] // chunk)
    for c, i in enumerate(range(0, c2w_tgt.shape[0], chunk)):
        ct, kt = c2w_tgt[i : i + chunk], K_tgt[i : i + chunk]
        if n_chunks > 1:
            pipe.log(f'chunk {c + 1}/{n_chunks}: targets {i}..{i + ct.shape[0] - 1}')
        imgs = torch.cat([images_src, images_src[:, :1].expand(1, ct.shape[0], *images_src.shape[2:])], 1)
        outs.append(pipe.generate(imgs, torch.cat([c2w_src, ct[None]], 1), torch.cat([K_src, kt[None]], 1), N, **kw))
    cat = lambda xs, n: torch.cat([xs[0][:, :n]] + [x[:, n:] for x in xs], 1)
    geo = {
        k: cat([o['geometry'][k] for o in outs], N)
        for k in ('depth', 'depth_conf', 'c2w', 'K')
        if k in outs[0]['geometry']
    }
    return {'images': cat([o['images'] for o in outs], N), 'geometry': geo}


SAMPLERS = {'paper': (50, 1.5), 'bundled': (1, 1.0)}  # (Euler steps, CFG) by default; why the bundled: README "Results"


def default_sampler(a):  # --steps / --cfg-scale left unset: the bundled tiny models' posterior mean, else the paper's
    bundled = not (a.ckpt_dir or a.official) and a.encoder == DEFAULT_ENCODER
    steps, cfg_scale = SAMPLERS['bundled' if bundled else 'paper']
    a.steps, a.cfg_scale = steps if a.steps is None else a.steps, cfg_scale if a.cfg_scale is None else a.cfg_scale
    if bundled and (a.steps, a.cfg_scale) == SAMPLERS['bundled'] and not a.recon:
        print(
            'note: the bundled tiny models sample their posterior mean (1 Euler step, no CFG; README "Results"); '
            "--steps 50 --cfg-scale 1.5 is the paper's sampler"
        )


def build_parser():
    p = argparse.ArgumentParser(description='GLD sampling', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        '--ckpt-dir',
        default=None,
        help='folder of training runs (runs/level1/ckpt_*.pt, ...) or of exports (weights/mine/level1.safetensors, ...); default: weights/tiny',
    )
    p.add_argument('--official', default='', help='folder with the released GLD files (docs/official.md)')
    p.add_argument('--encoder', default=DEFAULT_ENCODER, help='the latent encoder of the models (train.py --encoder)')
    p.add_argument('--data', default='data_synth', help="dataset: chunk folder, 're10k:PATH', 'dl3dv:PATH'")
    p.add_argument('--split', default='test', help='dataset split')
    p.add_argument('--scene', default='0', help='scene key or index in the split')
    p.add_argument('--views', type=int, default=8, help='views of a dataset scene (sources + targets)')
    p.add_argument(
        '--src',
        type=int,
        default=None,
        help='source views N; default: 2 of a scene, all --images (with --cameras, the rest are held-out targets)',
    )
    p.add_argument('--images', nargs='*', default=None, help="your photos: the sources (README, 'Your own photos')")
    p.add_argument(
        '--cameras', default='', help='cameras of --images: COLMAP, nerfstudio or .npz; default: DA3 estimate'
    )
    p.add_argument('--keep-estimate', action='store_true', help="keep DA3's camera estimate even if implausible")
    p.add_argument('--size', default='', help='HxW to resize user images to (multiples of 14)')
    p.add_argument(
        '--traj',
        default='',
        choices=['', 'interp', 'orbit', 'spiral', 'forward'],
        help='target trajectory; default: interp, orbit for one source, none with held-out images',
    )
    p.add_argument('--arc', type=float, default=None, help='orbit degrees; default: to the last source (30 with one)')
    p.add_argument('--frames', type=int, default=12, help='target frames of a trajectory')
    p.add_argument('--chunk', type=int, default=6, help='targets generated jointly per chunk')
    p.add_argument('--boundary', type=int, default=1, choices=[0, 1, 2, 3], help='deepest generated level k')
    p.add_argument(
        '--independent', action='store_true', help='independent models M_l instead of the cascade (ablation)'
    )
    p.add_argument('--steps', type=int, default=None, help='Euler steps (SAMPLERS); --official: num_steps')
    p.add_argument('--cfg-scale', type=float, default=None, help='CFG scale over cameras, 1 = off (SAMPLERS)')
    p.add_argument('--seed', type=int, default=0, help='sampling seed')
    p.add_argument('--eval', action='store_true', help="the paper's protocol on the split: tables, JSON, per-scene CSV")
    p.add_argument('--eval-scenes', type=int, default=16, help='scenes evaluated')
    p.add_argument('--recon', action='store_true', help='Stage-1 reconstruction table: all levels and each level alone')
    p.add_argument('--lpips', action='store_true', help='add LPIPS (needs the lpips package and its weights)')
    p.add_argument('--out', default='out/sample', help='output folder')
    p.add_argument(
        '--export',
        default=','.join(export.DEFAULT_FORMATS),
        type=export.parse_formats,
        help='3D outputs, comma-separated: ply, colmap, nerfstudio; "": none',
    )
    return p


@torch.no_grad()
def main(argv=None):
    a = build_parser().parse_args(argv)
    default_sampler(a)
    device, t_start = torch.device('cuda' if torch.cuda.is_available() else 'cpu'), time.time()
    size = data.parse_size(a.size)  # bad input is reported before any model is loaded
    n_src = a.src or (len(a.images) if a.images else 2)
    if a.images and not 0 < n_src <= len(a.images):
        raise UserError(f'--src {a.src}: with {len(a.images)} --images pass 1..{len(a.images)} sources')
    if a.images and n_src < len(a.images) and not a.cameras:
        raise UserError(
            f'--src {n_src} with {len(a.images)} --images holds images out as targets at their cameras: '
            'pass --cameras, or drop --src to use every image as a source'
        )
    if not a.images and not 0 < n_src < a.views:
        raise UserError(f'--src {n_src}: a scene of --views {a.views} needs 1..{a.views - 1} source views')
    data.make_output_dir(a.out)
    lpips = metrics.lpips_fn(device) if a.lpips else None
    dataset = lambda: data.SceneDataset(a.data, split=a.split, num_views=a.views, eval=True, seed=a.seed)
    if a.recon or a.eval:
        ensure_data(a.data)
    if a.recon:
        enc = pipeline.load_encoder(a.encoder, 'auto', device, ckpt_dir=a.ckpt_dir)
        dec = (
            enc.rgb_decoder()
            if enc.has_rgb_decoder
            else pipeline.load_decoder(
                pipeline.find_checkpoint(pipeline.model_name('decoder', a.encoder), a.ckpt_dir), device, enc
            )
        )
        ds = dataset()
        clear_outputs(a.out)  # here and below: once the inputs are read, so a failed run leaves the last outputs
        return run_recon(enc, dec, ds, a.out, a.eval_scenes, lpips)
    pipe = (
        pipeline.load_official_pipeline(a.official, device)
        if a.official
        else pipeline.load_pipeline(a.ckpt_dir, a.boundary, a.independent, device, encoder=a.encoder)
    )
    if a.eval:
        ds = dataset()
        clear_outputs(a.out)
        return run_eval(pipe, ds, n_src, a.steps, a.cfg_scale, a.seed, a.out, a.eval_scenes, lpips)
    units, frame, held, traj = 'poses', 'the dataset cameras', 0, a.traj
    if a.images:
        images, c2w, K, frame = user_scene(a.images, a.cameras, size, pipe.enc, check=not a.keep_estimate)
        images, c2w, K = images.to(device), c2w.to(device), K.to(device)
        held = images.shape[1] - n_src  # images after the first n_src: targets at their own cameras
        traj = a.traj or ('' if held else 'interp' if n_src > 1 else 'orbit')
        units = 'poses' if a.cameras else 'da3'  # DA3 estimated the cameras: its own depth scale
    else:
        ensure_data(a.data)
        ds = dataset()
        idx = int(a.scene) if a.scene.isdigit() else ds.index_of(a.scene)
        if idx >= len(ds):
            raise UserError(
                f'--scene {a.scene}: the split has {len(ds)} scenes, pass an index 0..{len(ds) - 1} or a key'
            )
        scene = data.split_views(data.collate_one(ds[idx]), n_src, mode='ends' if n_src == 2 else 'random')
        scene = {k: v.to(device) if torch.is_tensor(v) else v for k, v in scene.items()}
        images, c2w, K = scene['images'], scene['c2w'], scene['K']
        print(
            f'scene {scene["key"][0]}: {n_src} sources -> {images.shape[1] - n_src} targets at '
            f'{images.shape[-1]}x{images.shape[-2]}'
        )
    if a.images or traj:  # targets: the held-out images at their cameras (V = held), then the trajectory's
        c2w_t, K_t = c2w[0, n_src : n_src + held], K[0, n_src : n_src + held]  # (held,4,4), (held,3,3)
        if traj:
            c2w_p, K_p = cameras.preset_trajectory(c2w[0, :n_src], K[0, :n_src], traj, a.frames, a.arc)
            c2w_t, K_t = torch.cat([c2w_t, c2w_p]), torch.cat([K_t, K_p])
        if a.images:
            print(
                f'{len(a.images)} images at {images.shape[-1]}x{images.shape[-2]}: {n_src} sources -> '
                + ', '.join(
                    [f'{held} held-out targets at their cameras'] * bool(held)
                    + [f'{len(c2w_t) - held} targets on the {traj} trajectory'] * bool(traj)
                )
                + f'; world: {frame}'
            )
        res = generate_in_chunks(
            pipe,
            images[:, :n_src],
            c2w[:, :n_src],
            K[:, :n_src],
            c2w_t,
            K_t,
            a.chunk,
            steps=a.steps,
            cfg_scale=a.cfg_scale,
            seed=a.seed,
        )
        gt = images[0, n_src:] if held else None
        scores = (
            {'gld': metrics.image_metrics(res['images'][:, n_src : n_src + held], images[:, n_src:], lpips)}
            if held
            else None
        )
        c2w, K = torch.cat([c2w[:, :n_src], c2w_t[None]], 1), torch.cat([K[:, :n_src], K_t[None]], 1)
    else:
        rows, res = evaluate_scene(pipe, scene, n_src, a.steps, a.cfg_scale, a.seed, lpips)
        gt, scores = images[0, n_src:], rows
        print('  ' + ', '.join(f'{m}: PSNR {r["psnr"]:.2f}' for m, r in rows.items() if 'psnr' in r))
    clear_outputs(a.out)
    write_outputs(a.out, images, res, c2w, K, n_src, gt, scores, a.export, units, frame)
    print(f'wrote {a.out}/ ({len(our_files(a.out))} files) in {time.time() - t_start:.1f}s')
    return res


if __name__ == '__main__':
    cli.run_cli(main)
