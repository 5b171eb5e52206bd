"""Draws the README's pictures: `python docs/plots.py`.

- docs/convergence.png (the paper's Fig. 1c in miniature) and docs/curves_level1.png (the bundled M1's runs end to end):
  held-out `val_psnr` (8 test scenes, N=2 -> 6, 10 Euler steps; `val_mean_psnr`: 1 step) vs training steps, from
  docs/logs/*.csv (README).
- docs/trajectories.png: sample.py's --traj presets (cameras.preset_trajectory) seen from above, sources blue.
- docs/scaling.png: the scaling probe (recipes/scaling.sh) against CPU minutes and training FLOPs.
- docs/reprojection.png: test scenes with GLD's targets beside the reprojection baseline's (the bundled models).
"""

import csv
import os
import sys

import torch
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import cameras  # noqa: E402
import data  # noqa: E402
import export  # noqa: E402
import metrics  # noqa: E402
import model  # noqa: E402
import pipeline  # noqa: E402

CONVERGENCE_PNG = os.path.join(HERE, 'convergence.png')
CURVES_PNG = os.path.join(HERE, 'curves_level1.png')
TRAJECTORIES_PNG = os.path.join(HERE, 'trajectories.png')
SCALING_PNG = os.path.join(HERE, 'scaling.png')
REPROJECTION_PNG = os.path.join(HERE, 'reprojection.png')
COLOURS = [
    (200, 60, 40),
    (30, 90, 200),
    (40, 150, 60),
    (150, 60, 170),
    (230, 140, 20),
    (0, 150, 150),
    (120, 120, 120),
    (0, 0, 0),
]
RUNS = {name: (f'convergence_{name}.csv', 0) for name in ('da3-tiny', 'da3-tiny-recon', 'vae-tiny')}  # log, first step
M1_RUNS = {
    '240 scenes, lr 5e-4': ('level1_continued.csv', 0),
    'lr 1e-4': ('level1_cooldown.csv', 4410),
    '1,200 scenes, lr 5e-4': ('level1_1200.csv', 5410),
    '1,200 scenes, gaps 2-3, bf16, lr 3e-4': ('level1_gap23.csv', 8723),
    'the same, 1 step (posterior mean)': ('level1_gap23.csv', 8723, 'val_mean_psnr'),
    '13,000 steps more, the same': ('level1_long.csv', 13223),
    'the same, 1 step': ('level1_long.csv', 13223, 'val_mean_psnr'),
    'cool-down (cosine lr), 1 step': ('level1_cooldown_cosine.csv', 26223, 'val_mean_psnr'),
}


PROBE = {preset: f'probe_{preset}.csv' for preset in ('gld-tiny', 'gld-tiny-2x', 'gld-tiny-4x')}


def read_series(runs, x='step'):
    """{name: (log, first step[, metric])} -> {name: [(x, metric)]}; metric val_psnr (10 Euler steps) unless named."""
    series = {}
    for name, (log, s0, *key) in runs.items():
        key = key[0] if key else 'val_psnr'
        with open(os.path.join(HERE, 'logs', log)) as f:
            rows = [r for r in csv.DictReader(f) if r.get(key)]
        series[name] = [(s0 + float(r[x]), float(r[key])) for r in rows]
    return series


def draw_curves(series, path, title, W=640, H=360, m=50):
    """One panel of PSNR curves {name: [(x, PSNR)]}, a grid line per dB, a tick per quarter of x."""
    pts = [p for s in series.values() for p in s]
    x1 = max(x for x, _ in pts)
    y0 = min(v for _, v in pts) - 0.5
    y1 = max(v for _, v in pts) + 0.5

    def xy(x, v):  # (x, PSNR) -> pixel
        return (m + x / x1 * (W - 2 * m), H - m - (v - y0) / (y1 - y0) * (H - 2 * m))

    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline='black')
    for v in range(int(y0) + 1, int(y1) + 1):
        d.line([xy(0, v), xy(x1, v)], fill=(225, 225, 225))
        d.text((m - 22, xy(0, v)[1] - 6), str(v), fill='black')
    for i in range(5):
        x = x1 * i / 4
        label = f'{x:.0f}' if x1 >= 10 else f'{x:.2g}'
        d.text((xy(x, y0)[0] - 10, H - m + 6), label, fill='black')
    d.text((m, 12), f'held-out PSNR (dB, {y0:.1f} .. {y1:.1f}) vs {title}', fill='black')
    for i, (name, s) in enumerate(series.items()):
        d.line([xy(*p) for p in s], fill=COLOURS[i], width=2)
        for x, y in (xy(*p) for p in s):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[i])
        d.text((m + 10, m + 8 + 14 * i), f'{name}: {s[-1][1]:.2f} dB, at {s[-1][0]:.5g}', fill=COLOURS[i])
    img.save(path)
    print(f'wrote {path}')


def convergence(path=CONVERGENCE_PNG, runs=RUNS, what='same gld-tiny DiT'):
    series = read_series(runs)
    steps = max(x for s in series.values() for x, _ in s)
    draw_curves(series, path, f'training steps (0 .. {steps:.0f}), {what}')


def scaling(path=SCALING_PNG, tokens=512, batch=4):
    """The scaling probe (recipes/scaling.sh): val_mean_psnr against CPU minutes and against training FLOPs
    (3x the forward FLOPs of model.flops_per_token, 8 views of 8x8 tokens, batch 4), one panel above the other."""
    by_time = {}
    by_flops = {}
    for preset, log in PROBE.items():
        cfg = model.PRESETS[preset]
        with torch.device('meta'):
            params = sum(p.numel() for p in model.GLD(cfg).parameters()) / 1e6
        name = f'{preset} ({params:.1f}M)'
        by_time[name] = read_series({name: (log, 0, 'val_mean_psnr')}, x='train_min')[name]
        flop_per_step = 3 * model.flops_per_token(cfg, tokens) * tokens * batch
        by_step = read_series({name: (log, 0, 'val_mean_psnr')})[name]
        by_flops[name] = [(step * flop_per_step / 1e15, v) for step, v in by_step]
    draw_curves(by_time, path + '.time.png', 'training minutes (CPU time, 1 thread)')
    draw_curves(by_flops, path + '.flops.png', 'training PFLOP')
    sheet = Image.new('RGB', (640, 720), 'white')
    for i, part in enumerate(('time', 'flops')):
        with Image.open(f'{path}.{part}.png') as panel:
            sheet.paste(panel, (0, 360 * i))
        os.remove(f'{path}.{part}.png')
    sheet.save(path)
    print(f'wrote {path}')


def reprojection_grid(path=REPROJECTION_PNG, scenes=(0, 2, 10), ckpt_dir=None):
    """docs/reprojection.png: test scenes as sample.py --eval sees them (N=2, the bundled sampler), three rows each:
    the true views (sources first), GLD's targets, the reprojection baseline's targets."""
    pipe = pipeline.load_pipeline(ckpt_dir, log=lambda *_: None)
    pipe.progress = False
    dataset = data.SceneDataset('data_synth', split='test', num_views=8, eval=True)
    rows = []
    for i in scenes:
        item = data.collate_one(dataset[i])
        generator = torch.Generator().manual_seed(i)  # as sample.py --eval with --seed 0
        scene = data.split_views(item, 2, mode='ends', generator=generator)
        images, c2w, K = scene['images'], scene['c2w'], scene['K']
        out = pipe.generate(images, c2w, K, 2, steps=1, cfg_scale=1.0, seed=i)
        _, mean = metrics.baselines(images, c2w, 2)
        reprojected, _ = metrics.reprojection(pipe.enc, images, c2w, K, 2, mean)
        for views in (images[0], out['images'][0], torch.cat([images[0, :2], reprojected[0]])):
            rows.append(torch.cat(list(views), -1))
    export.save_image(torch.cat(rows, -2), path)
    print(f'wrote {path}')


def trajectories(path=TRAJECTORIES_PNG):
    centre, up = torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, -1.0, 0.0])
    two = cameras.look_at(torch.tensor([[-1.2, 0.0, 0.3], [1.2, 0.0, 0.3]]), centre.expand(2, 3), up)
    K = torch.tensor([[0.8, 0, 0.5], [0, 0.8, 0.5], [0, 0, 1]]).expand(2, 3, 3)
    panels = [
        ('interp (2 sources)', two, 'interp', None),
        ('orbit (2 sources)', two, 'orbit', None),
        ('orbit --arc 360', two, 'orbit', 360.0),
        ('orbit (1 source)', two[:1], 'orbit', None),
        ('spiral (1 source)', two[:1], 'spiral', None),
        ('forward (1 source)', two[:1], 'forward', None),
    ]
    sheet = Image.new('RGB', (3 * 256, 2 * 256), 'white')
    for i, (title, src, traj, arc) in enumerate(panels):
        c2w, _ = cameras.preset_trajectory(src, K[: len(src)], traj, 12, arc)
        export.draw_topdown(path + f'.{i}.png', src, c2w, title=title)
        with Image.open(path + f'.{i}.png') as tile:
            sheet.paste(tile, (256 * (i % 3), 256 * (i // 3)))
        os.remove(path + f'.{i}.png')
    sheet.save(path)
    print(f'wrote {path}')


if __name__ == '__main__':
    convergence()
    convergence(CURVES_PNG, M1_RUNS, 'M1 on the N=2 protocol, batch 4')
    trajectories()
    scaling()
    reprojection_grid()
