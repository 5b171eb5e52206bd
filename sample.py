"""sample.py: the GLD cascade (pipeline.Pipeline, paper Sec. 4) on a scene or a user's photos.

`python sample.py` (bundled tiny models, a synthetic test scene -> out/sample/), `--images ...
--cameras ... --traj`, `--eval` (N=2 -> 6, two baselines beside GLD; Table 3), `--boundary k` /
`--independent` ablations, `--recon` for Stage 1 (Table 6), `--official DIR` (the released models,
docs/official.md), 3D exports. One run per --out at a time; its output set replaces the previous
one whole (safety.py). Shape legend: B batch, V views (N sources, M targets), H W image.
"""

import argparse
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
import diffusion
import export
import metrics
import official
import pipeline
import safety
import synth
import view
from cli import UserError
from constants import DEFAULT_ENCODER
from export import save_image


# ----------------------------------------------------------------------------- evaluation
def run_eval(pipe, dataset, n_src, sampler, steps, cfg_scale, seed, out_dir, n_scenes, lpips=None):
    """The paper's protocol: N sources (N=2: the ends), the rest targets; GLD beside 2 baselines."""
    n = min(n_scenes, len(dataset))
    per_scene = []
    bar = cli.progress(desc='eval scenes', total=n, every=0)  # a scene takes long: a line for each
    mode = 'ends' if n_src == 2 else 'random'
    for i in range(n):
        item = data.collate_one(dataset[i])
        generator = torch.Generator().manual_seed(seed + i)
        scene = data.split_views(item, n_src, mode=mode, generator=generator)
        sampling = {'sampler': sampler, 'steps': steps, 'cfg_scale': cfg_scale, 'seed': seed + i}
        rows, _ = metrics.evaluate_scene(pipe, scene, n_src, **sampling, lpips=lpips, gt_geometry=True)
        key = scene['key'][0]
        psnr = rows['gld']['psnr']
        nearest = rows['nearest source']['psnr']
        bar.set_postfix_str(f'{key}: PSNR {psnr:.2f} (nearest source {nearest:.2f})', refresh=False)
        bar.update()
        for method, scores in rows.items():
            per_scene.append({'scene': key, 'method': method, **scores})
    bar.close()
    title = f'method (N={n_src}, {n} scenes, {steps} steps)'
    return metrics.write_table(per_scene, out_dir, f'eval_n{n_src}', title)


def run_recon(enc, dec, dataset, out_dir, n_scenes, lpips=None):
    """Stage 1 in miniature (paper Table 6): the decoder on all levels of DA3 features, and each."""
    n = min(n_scenes, len(dataset))
    per_scene = []
    for i in cli.progress(range(n), desc='recon scenes', every=0):
        scene = data.collate_one(dataset[i])
        images = scene['images']  # (1,V,3,H,W)
        levels = enc.normalize_levels(enc.encode(images))
        hw = (images.shape[-2] // enc.patch, images.shape[-1] // enc.patch)
        decoded = decoder_lib.reconstruct_per_level(dec, levels, hw)  # {'all' or a level: images}
        for name, im in decoded.items():
            method = 'all levels' if name == 'all' else f'level {name}'
            scores = metrics.image_metrics(im.clamp(0, 1), images, lpips)
            per_scene.append({'scene': scene['key'][0], 'method': method, **scores})
    return metrics.write_table(per_scene, out_dir, 'recon', f'decoder input ({n} scenes)')


def ensure_data(spec):
    """The default synthetic test scenes are rendered on first use (the seeds of data.py synth)."""
    if spec == 'data_synth' and not os.path.isdir(os.path.join(spec, 'test')):
        print('rendering the synthetic test scenes into data_synth/test (first run only)')
        synth.write_synth(spec, 0, 16)
    elif not os.path.isdir(spec.split(':')[-1]):
        fix = f'pass --data FOLDER or make one: {pipeline.COMMANDS["data"]}'
        raise UserError(f'{spec}: no such dataset folder; {fix}')


# ----------------------------------------------------------------------------- writing outputs
# what a run writes (write_outputs, export.write_scene, write_table): a new set replaces these
OUTPUTS = (
    *('grid.png', 'trajectory.png', 'video.mp4', 'video.gif', 'metrics.json'),
    *('depth.npy', 'depth_[0-9]*.png', 'points.ply', 'transforms.json', 'scene.glb'),
    *('images/source_[0-9]*.png', 'images/target_[0-9]*.png'),
    *(f'sparse/0/{n}.{e}' for n in ('cameras', 'images', 'points3D') for e in ('bin', 'txt')),
    *(f'{t}{e}' for t in ('eval_n[0-9]*', 'recon') for e in ('.md', '.json', '_scenes.csv')),
)


def our_files(folder):
    patterns = [os.path.join(glob.escape(folder), pattern) for pattern in OUTPUTS]
    return sorted(f for pattern in patterns for f in glob.glob(pattern))


def earlier_outputs(folder):
    """What an earlier run wrote into folder (OUTPUTS), relative to it: a new set drops them."""
    stale = [os.path.relpath(f, folder) for f in our_files(folder)]
    if stale:
        kept = '(other files there are kept)'
        print(f'note: removed {len(stale)} outputs of an earlier run from {folder}/ {kept}')
    return stale


def save_depth_maps(depth, out_dir):  # (V,H,W) -> depth.npy, and depth_VVV.png: inverse depth
    np.save(os.path.join(out_dir, 'depth.npy'), depth.cpu().numpy())
    for v, inv in enumerate(1 / depth.clamp_min(1e-6)):
        x = (inv - inv.min()) / (inv.max() - inv.min() + 1e-9)
        rgb = torch.stack([x.sqrt(), x**1.5 * 0.8, 0.5 * (1 - x) + 0.3 * x])  # a perceptual ramp
        save_image(rgb, os.path.join(out_dir, f'depth_{v:03d}.png'))


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
    """grid.png, trajectory.png, video, depth maps, metrics.json, and export.write_scene's 3D."""
    os.makedirs(out_dir, exist_ok=True)
    pred = res['images'][0]
    geo = res['geometry']
    grid = export.make_grid(images[0, :n_src], pred, frames_gt)
    save_image(grid, os.path.join(out_dir, 'grid.png'))
    title = f'{n_src} sources (blue), {pred.shape[0] - n_src} targets (orange)'
    c2w_src = c2w[0, :n_src]
    c2w_tgt = c2w[0, n_src:]
    export.draw_topdown(os.path.join(out_dir, 'trajectory.png'), c2w_src, c2w_tgt, title=title)
    export.write_video(list(pred[n_src:]), os.path.join(out_dir, 'video'))
    summary = 'none: this latent has no geometry head (no depth, cameras or 3D)'  # DINOv2, the VAE
    if 'depth' in geo and 'c2w' in geo:
        depth = geo['depth'][0]
        save_depth_maps(depth, out_dir)
        views = torch.cat([images[0, :n_src], pred[n_src:]])  # sources as given, generated targets
        conf = geo['depth_conf'][0]
        c2w_pred = geo['c2w'][0]
        summary = export.write_scene(
            out_dir, views, depth, conf, c2w[0], K[0], c2w_pred, n_src, formats, units, frame=frame
        )
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump({**(scores or {}), 'export': summary}, f, indent=1)


# ----------------------------------------------------------------------------- inputs
def read_images(paths):
    """A user's photos -> (1,N,3,H,W) in [0,1]; one size for all."""
    ims = []
    for p in paths:
        try:
            ims.append(data.decode_image(p))
        except data.FrameError as e:
            fix = 'pass PNG or JPEG files to --images'
            raise UserError(f'{p}: cannot read the image ({e}); {fix}') from e
    H, W = ims[0].shape[-2:]
    if any(im.shape[-2:] != (H, W) for im in ims):
        sizes = ', '.join(f'{p} {im.shape[-1]}x{im.shape[-2]}' for p, im in zip(paths, ims))
        raise UserError(f'the images differ in size ({sizes}); resize them to one size first')
    return torch.stack(ims)[None]


def file_stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def same_bytes(path_a, path_b):
    with open(path_a, 'rb') as a, open(path_b, 'rb') as b:
        return a.read() == b.read()


def match_cameras(paths, cams, where):
    """Each image's frame in cams (export.read_cameras), by file name, else stem; a file must match."""
    names = cams['names']
    idx = []
    for p in paths:
        hits = [i for i, n in enumerate(names) if os.path.basename(n) == os.path.basename(p)]
        if not hits:
            hits = [i for i, n in enumerate(names) if file_stem(n) == file_stem(p)]
        if not hits:
            more = ' ...' if len(names) > 6 else ''
            raise UserError(
                f'{where}: no camera for {p} (frames: {names[:6]}{more}); '
                'give one frame per image, named like the image file'
            )
        if len(hits) > 1:
            matches = [names[i] for i in hits]
            raise UserError(f'{where}: several frames match {p} ({matches}); keep one frame per image')
        f = cams['files'][hits[0]]
        if f and os.path.isfile(f) and not os.path.samefile(f, p) and not same_bytes(f, p):
            raise UserError(
                f'{where}: the frame for {os.path.basename(p)} is {f}, not the image {p} '
                "(other content): cameras of other photos; pass these images' own "
                '(edited copies: write one beside them)'
            )
        idx.append(hits[0])
    return idx


def given_cameras(paths, cams_path, H, W):
    """--cameras for the photos (H x W) -> c2w (1,N,4,4), K (1,N,3,3), the name of their world."""
    cams = export.read_cameras(cams_path, image_size=(H, W))
    idx = match_cameras(paths, cams, cams_path)
    if cams['size'] and abs(cams['size'][1] / cams['size'][0] - W / H) > 0.01 * W / H:
        raise UserError(
            f'{cams_path}: its intrinsics are for {cams["size"][1]}x{cams["size"][0]} images, '
            f'the photos are {W}x{H} (another aspect ratio); crop the photos back or pass their '
            'own cameras'
        )
    frame = f'the given cameras ({cams["format"]} {cams_path})'
    return cams['c2w'][idx][None], cams['K'][idx][None], frame


def estimate_cameras(images, enc, check):
    """No --cameras: the frozen encoder's geometry head estimates them (checked if check)."""
    name = enc.cfg.name
    if not enc.has_geometry:
        raise UserError(f'no --cameras: {name} has no geometry head to estimate cameras; pass --cameras')
    print(f'no --cameras: estimating the cameras of the photos with the frozen {name} geometry head')
    H, W = images.shape[-2:]
    levels, cls = enc.encode(images, return_cls=True)
    levels = enc.normalize_levels(levels)
    geo = enc.geometry(levels, H, W, cls_last=cls[-1])
    c2w, K = geo['c2w'], geo['K']
    if not torch.isfinite(c2w).all() or not torch.isfinite(K).all():
        raise UserError('the DA3 camera estimate for --images holds NaN or inf values; pass --cameras')
    if check:
        cameras.check_estimate(c2w[0], K[0], geo['depth'][0], H, W)
    return c2w, K, "DA3's estimated cameras (no --cameras)"


def user_scene(paths, cams_path, size, enc, check=True):
    """A user's photos with the cameras of cams_path (export.read_cameras), else DA3's estimate
    (checked if check) -> images (1,N,3,H,W), c2w (1,N,4,4), K (1,N,3,3), frame (the world)."""
    images = read_images(paths)
    H, W = images.shape[-2:]
    P = enc.patch  # image sides: multiples of the encoder's patch
    if size is None:
        size = (max(P, H // P * P), max(P, W // P * P))
    tH, tW = size
    c2w = None
    K = None
    if cams_path:
        c2w, K, frame = given_cameras(paths, cams_path, H, W)
    if (H, W) != (tH, tW):
        print(f'note: resizing {W}x{H} -> {tW}x{tH} (sides must be multiples of 14)')
        K_in = torch.eye(3).expand(len(paths), 3, 3) if K is None else K[0]
        images, K_out = data.resize_and_crop(images[0], K_in, (tH, tW))
        images = images[None]
        if K is not None:
            K = K_out[None]
    if c2w is None:
        c2w, K, frame = estimate_cameras(images, enc, check)
    return images, c2w, K, frame


def photo_scene(args, n_src, size, enc, device):
    """--images -> a scene: images, cameras, 'held' (out targets), 'traj', world 'frame' and 'units'."""
    check = not args.keep_estimate
    images, c2w, K, frame = user_scene(args.images, args.cameras, size, enc, check=check)
    scene = {'images': images.to(device), 'c2w': c2w.to(device), 'K': K.to(device)}
    scene['held'] = images.shape[1] - n_src  # images after the first n_src: targets at their cameras
    scene['traj'] = args.traj
    if not args.traj and not scene['held']:  # no held-out images: interp, orbit for one source
        scene['traj'] = 'interp' if n_src > 1 else 'orbit'
    scene['frame'] = frame
    scene['units'] = 'poses' if args.cameras else 'da3'  # DA3 estimated them: its own depth scale
    return scene


def dataset_scene(args, n_src, device):
    """--scene of --data: n_src sources (N=2: the ends) and targets; the keys of photo_scene's."""
    ensure_data(args.data)
    dataset = read_dataset(args)
    idx = int(args.scene) if args.scene.isdigit() else dataset.index_of(args.scene)
    if idx >= len(dataset):
        fix = f'pass an index 0..{len(dataset) - 1} or a key'
        raise UserError(f'--scene {args.scene}: the split has {len(dataset)} scenes, {fix}')
    mode = 'ends' if n_src == 2 else 'random'
    scene = data.split_views(data.collate_one(dataset[idx]), n_src, mode=mode)
    scene = {k: v.to(device) if torch.is_tensor(v) else v for k, v in scene.items()}
    V, _, H, W = scene['images'].shape[1:]
    print(f'scene {scene["key"][0]}: {n_src} sources -> {V - n_src} targets at {W}x{H}')
    return {**scene, 'held': 0, 'traj': args.traj, 'frame': 'the dataset cameras', 'units': 'poses'}


def read_dataset(args):  # the --data split with fixed views per scene
    return data.SceneDataset(args.data, split=args.split, num_views=args.views, eval=True, seed=args.seed)


# ----------------------------------------------------------------------------- generating
def join_chunks(parts, n_src):  # per chunk (1,N+M_c,...) -> (1,N+M,...): the sources once
    return torch.cat([parts[0][:, :n_src]] + [x[:, n_src:] for x in parts], 1)


def generate_in_chunks(pipe, images_src, c2w_src, K_src, c2w_tgt, K_tgt, chunk, **kw):
    """Long trajectories as SEVA does: every chunk holds all sources plus up to `chunk` targets."""
    N = images_src.shape[1]
    M = c2w_tgt.shape[0]
    n_chunks = -(-M // chunk)
    outs = []
    for c, i in enumerate(range(0, M, chunk)):
        c2w_chunk = c2w_tgt[i : i + chunk]
        K_chunk = K_tgt[i : i + chunk]
        if n_chunks > 1:
            pipe.log(f'chunk {c + 1}/{n_chunks}: targets {i}..{i + c2w_chunk.shape[0] - 1}')
        # only the sources' images are read: the targets' slots repeat the first source
        slots = images_src[:, :1].expand(1, c2w_chunk.shape[0], *images_src.shape[2:])
        images = torch.cat([images_src, slots], 1)
        c2w = torch.cat([c2w_src, c2w_chunk[None]], 1)
        K = torch.cat([K_src, K_chunk[None]], 1)
        outs.append(pipe.generate(images, c2w, K, N, **kw))
    geo = {}
    for k in ('depth', 'depth_conf', 'c2w', 'K'):
        if k in outs[0]['geometry']:
            geo[k] = join_chunks([o['geometry'][k] for o in outs], N)
    return {'images': join_chunks([o['images'] for o in outs], N), 'geometry': geo}


def target_cameras(args, scene, n_src):
    """The held-out images' cameras (held,4,4), (held,3,3), then the trajectory's (--traj)."""
    held = scene['held']
    c2w = scene['c2w'][0, n_src : n_src + held]
    K = scene['K'][0, n_src : n_src + held]
    if scene['traj']:
        sources = (scene['c2w'][0, :n_src], scene['K'][0, :n_src])
        c2w_path, K_path = cameras.preset_trajectory(*sources, scene['traj'], args.frames, args.arc)
        c2w = torch.cat([c2w, c2w_path])
        K = torch.cat([K, K_path])
    return c2w, K


def describe_targets(args, scene, n_src, n_targets):  # a line saying what --images become
    images = scene['images']
    held = scene['held']
    parts = []
    if held:
        parts.append(f'{held} held-out targets at their cameras')
    if scene['traj']:
        parts.append(f'{n_targets - held} targets on the {scene["traj"]} trajectory')
    size = f'{images.shape[-1]}x{images.shape[-2]}'
    targets = ', '.join(parts)
    print(f'{len(args.images)} images at {size}: {n_src} sources -> {targets}; world: {scene["frame"]}')


def generate(args, pipe, scene, n_src, lpips):
    """The held-out and trajectory targets (--images, --traj), else the scene's own, evaluated ->
    the result, c2w and K of all views, the true targets (or None) and their scores."""
    images, c2w, K = scene['images'], scene['c2w'], scene['K']
    sampling = {'sampler': args.sampler, 'steps': args.steps, 'cfg_scale': args.cfg_scale, 'seed': args.seed}
    if not (args.images or scene['traj']):
        rows, res = metrics.evaluate_scene(pipe, scene, n_src, **sampling, lpips=lpips)
        psnrs = [f'{m}: PSNR {r["psnr"]:.2f}' for m, r in rows.items() if 'psnr' in r]
        print('  ' + ', '.join(psnrs))
        return res, c2w, K, images[0, n_src:], rows
    c2w_tgt, K_tgt = target_cameras(args, scene, n_src)
    if args.images:
        describe_targets(args, scene, n_src, len(c2w_tgt))
    sources = (images[:, :n_src], c2w[:, :n_src], K[:, :n_src])
    res = generate_in_chunks(pipe, *sources, c2w_tgt, K_tgt, args.chunk, **sampling)
    c2w = torch.cat([c2w[:, :n_src], c2w_tgt[None]], 1)
    K = torch.cat([K[:, :n_src], K_tgt[None]], 1)
    held = scene['held']
    if not held:
        return res, c2w, K, None, None
    generated = res['images'][:, n_src : n_src + held]
    scores = {'gld': metrics.image_metrics(generated, images[:, n_src:], lpips)}
    return res, c2w, K, images[0, n_src:], scores


# (Euler steps, CFG scale) when --steps / --cfg-scale are left unset. The bundled tiny models sample their posterior
# mean: at 3.7M parameters their 50-step samples place per-token detail at random (README, "The main job").
# The released GLD (VGGT) is evaluated with 100 time-grid points (its VGGT_common_eval.yaml).
SAMPLER_DEFAULTS = {'paper': (50, 1.5), 'bundled': (1, 1.0), 'vggt release': (100, 1.5)}


def default_sampler(args):
    """Fill --steps and --cfg-scale left unset: the posterior mean for the bundled models, else the paper's."""
    if args.sampler == 'mean':
        if args.steps is not None or args.cfg_scale is not None:
            raise UserError('--sampler mean takes one step without CFG: drop --steps and --cfg-scale')
        # one step without CFG; --official counts time-grid points, so one step is 2 points
        args.steps = 2 if args.official else 1
        args.cfg_scale = 1.0
        return
    bundled = not (args.ckpt_dir or args.official) and args.encoder == DEFAULT_ENCODER
    defaults = 'bundled' if bundled else 'paper'
    if args.official and official_latent(args) == 'vggt':
        defaults = 'vggt release'
    steps, cfg_scale = SAMPLER_DEFAULTS[defaults]
    if args.steps is None:
        args.steps = steps
    if args.cfg_scale is None:
        args.cfg_scale = cfg_scale
    if bundled and (args.steps, args.cfg_scale) == SAMPLER_DEFAULTS['bundled'] and not args.recon:
        print(
            'note: the bundled tiny models sample their posterior mean (1 Euler step, no CFG; README "The main job"); '
            "--steps 50 --cfg-scale 1.5 is the paper's sampler"
        )


def build_parser():
    p = argparse.ArgumentParser(description='GLD sampling', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        '--ckpt-dir',
        default=None,
        help='folder of training runs (runs/level1/ckpt_*.pt, ...) or of exports '
        '(weights/mine/level1.safetensors, ...); default: weights/tiny',
    )
    p.add_argument(
        '--official',
        nargs='?',
        const=official.OFFICIAL_HUB,
        default='',
        help=f'the released models: a folder, or alone: the hub {official.OFFICIAL_HUB} (docs/official.md); '
        '--encoder vggt-1b: GLD (VGGT)',
    )
    p.add_argument('--official-stats', default=None, help="the release's model_stats/ (in its git clone)")
    p.add_argument('--encoder', default=DEFAULT_ENCODER, help='the latent encoder of the models (train.py --encoder)')
    p.add_argument('--encoder-weights', default='auto', help='its weights: a file or a hub name (train.py)')
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
    p.add_argument(
        '--sampler',
        default='euler',
        choices=list(diffusion.SAMPLERS),
        help="diffusion.SAMPLERS: euler, the paper's Euler steps with CFG; mean, the posterior mean in one step "
        'without CFG (what the bundled default, 1 Euler step, computes)',
    )
    p.add_argument('--steps', type=int, default=None, help='Euler steps (SAMPLER_DEFAULTS); --official: num_steps')
    p.add_argument('--cfg-scale', type=float, default=None, help='CFG scale over cameras, 1 = off (SAMPLER_DEFAULTS)')
    p.add_argument('--seed', type=int, default=0, help='sampling seed')
    p.add_argument('--eval', action='store_true', help="the paper's protocol on the split: tables, JSON, per-scene CSV")
    p.add_argument('--eval-scenes', type=int, default=16, help='scenes evaluated')
    p.add_argument('--recon', action='store_true', help='Stage-1 reconstruction table: all levels and each level alone')
    p.add_argument('--lpips', action='store_true', help='add LPIPS (needs the lpips package and its weights)')
    p.add_argument('--out', default='out/sample', help='output folder')
    p.add_argument('--view', action='store_true', help='then show the outputs in a browser (view.py)')
    p.add_argument(
        '--export',
        default=','.join(export.DEFAULT_FORMATS),
        type=export.parse_formats,
        help='3D outputs, comma-separated: ply, colmap, nerfstudio, glb; "": none',
    )
    return p


def count_sources(args):
    """The source views N (--src), checked against --images or --views before any model loads."""
    n_images = len(args.images) if args.images else 0
    n_src = args.src or n_images or 2
    if args.images and not 0 < n_src <= n_images:
        raise UserError(f'--src {args.src}: with {n_images} --images pass 1..{n_images} sources')
    if args.images and n_src < n_images and not args.cameras:
        raise UserError(
            f'--src {n_src} with {n_images} --images holds images out as targets at their cameras: '
            'pass --cameras, or drop --src to use every image as a source'
        )
    if not args.images and not 0 < n_src < args.views:
        V = args.views
        raise UserError(f'--src {n_src}: a scene of --views {V} needs 1..{V - 1} source views')
    return n_src


def load_decoder(args, device):  # --recon: the frozen encoder and its RGB decoder
    enc = pipeline.load_encoder(args.encoder, args.encoder_weights, device, ckpt_dir=args.ckpt_dir)
    if enc.has_rgb_decoder:
        return enc, enc.rgb_decoder()
    name = pipeline.model_name('decoder', args.encoder)
    checkpoint = pipeline.find_checkpoint(name, args.ckpt_dir)
    return enc, pipeline.load_decoder(checkpoint, device, enc)


def official_latent(args):
    """--official: the release of --encoder's family, 'da3' (the default) or 'vggt'."""
    latent = args.encoder.split('-')[0]
    if latent not in official.OFFICIAL_FILES:
        fix = 'the release has da3 and vggt models; pass one'
        raise UserError(f'--encoder {args.encoder} with --official: {fix}')
    return latent


def load_pipe(args, device):  # the released models (--official), or ours
    if args.official:
        latent = official_latent(args)
        return pipeline.load_official_pipeline(args.official, device, stats=args.official_stats, latent=latent)
    models = (args.ckpt_dir, args.boundary, args.independent)
    return pipeline.load_pipeline(*models, device, args.encoder, args.encoder_weights)


@torch.no_grad()
def main(argv=None):
    args = build_parser().parse_args(argv)
    default_sampler(args)
    size = data.parse_size(args.size)  # bad input is reported before any model is loaded
    n_src = count_sources(args)
    if args.view and (args.eval or args.recon or not {'ply', 'nerfstudio'} <= set(args.export)):
        fix = 'drop --eval, --recon; keep --export ply,nerfstudio'
        raise UserError(f'--view shows the points and cameras of a scene: {fix}')
    if args.view:
        view.import_viser()
    data.make_output_dir(args.out)
    with safety.lock_folder(args.out):
        return run(args, size, n_src)


def run(args, size, n_src):
    """The outputs go into a temporary sibling of --out that replaces the earlier outputs whole when
    complete (safety.replaced_folder): a failed or killed run leaves the earlier set."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    t_start = time.time()
    lpips = metrics.lpips_fn(device) if args.lpips else None
    if args.recon or args.eval:
        ensure_data(args.data)
    if args.recon:
        enc, dec = load_decoder(args, device)
        dataset = read_dataset(args)
        with safety.replaced_folder(args.out, earlier_outputs) as out_dir:
            return run_recon(enc, dec, dataset, out_dir, args.eval_scenes, lpips)
    pipe = load_pipe(args, device)
    if args.eval:
        dataset = read_dataset(args)
        sampling = (args.sampler, args.steps, args.cfg_scale, args.seed)
        with safety.replaced_folder(args.out, earlier_outputs) as out_dir:
            return run_eval(pipe, dataset, n_src, *sampling, out_dir, args.eval_scenes, lpips)
    if args.images:
        scene = photo_scene(args, n_src, size, pipe.enc, device)
    else:
        scene = dataset_scene(args, n_src, device)
    res, c2w, K, gt, scores = generate(args, pipe, scene, n_src, lpips)
    images = scene['images']
    export_as = (args.export, scene['units'], scene['frame'])
    with safety.replaced_folder(args.out, earlier_outputs) as out_dir:
        write_outputs(out_dir, images, res, c2w, K, n_src, gt, scores, *export_as)
    print(f'wrote {args.out}/ ({len(our_files(args.out))} files) in {time.time() - t_start:.1f}s')
    if args.view:
        view.show(args.out)
    return res


if __name__ == '__main__':
    cli.run_cli(main)
