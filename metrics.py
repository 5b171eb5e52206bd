"""Metrics: every number evaluation reports, in one place, and the paper's protocol on a scene.

Images: PSNR, SSIM (Wang et al. 2004, as skimage) and LPIPS-VGG, as pixelSplat evaluates novel
views. Depth: AbsRel, RMSE and delta < 1.25 after median scaling. Cameras: ATE / RPE after a
similarity alignment (cameras.pose_metrics, re-exported here). Photo-consistency: the sources'
photo error, the depth scale it fits (the exports' units), and the baselines GLD is compared with:
the nearest source, the mean colour, the sources reprojected. Shape legend: B batch, V views (N
sources, M targets), H W image, P points, L the points landing in a target.
"""

import csv
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import cameras

# pose_metrics is cameras' public API; evaluation reads it here with the other metrics
from cameras import pose_metrics  # noqa: F401

# SSIM's constants (K1 L)^2 and (K2 L)^2 for images of range L = 1
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
DEPTH_METRICS = ('absrel', 'rmse', 'delta1')
IMAGE_DIMS = (-3, -2, -1)  # channels, rows, columns of (...,3,H,W)
TABLE_COLUMNS = ('psnr', 'ssim', 'lpips', 'mse_k', 'ate', 'rpe_r', 'rpe_t', 'absrel', 'rmse', 'delta1')


def psnr(pred, gt):  # (...,3,H,W) in [0,1] -> (...,) dB, pred clipped to [0,1] (as pixelSplat)
    error = pred.clamp(0, 1) - gt
    mse = error.pow(2).mean(IMAGE_DIMS)
    # identical images: 100 dB, not infinity
    mse = mse.clamp_min(1e-10)
    return -10 * torch.log10(mse)


def gaussian_blur(x, sigma=1.5):  # (N,1,H,W) -> (N,1,H-10,W-10): an 11x11 window, 'valid'
    offsets = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    row = kernel.view(1, 1, 1, 11)
    column = kernel.view(1, 1, 11, 1)
    return F.conv2d(F.conv2d(x, row), column)


def ssim(pred, gt, sample_covariance=False):
    """(...,3,H,W) in [0,1] -> (...,) SSIM as skimage's (gaussian sigma 1.5, data_range 1), the
    mean over channels; sample_covariance: the window's (n - 1) (co)variances, as pixelSplat's.
    """
    H, W = pred.shape[-2:]
    # every channel an image of its own
    x = pred.reshape(-1, 1, H, W)
    gt = gt.to(pred.dtype)
    y = gt.reshape(-1, 1, H, W)
    mean_x = gaussian_blur(x)
    mean_y = gaussian_blur(y)
    norm = 121 / 120 if sample_covariance else 1.0
    var_x = norm * (gaussian_blur(x * x) - mean_x * mean_x)
    var_y = norm * (gaussian_blur(y * y) - mean_y * mean_y)
    cov_xy = norm * (gaussian_blur(x * y) - mean_x * mean_y)
    luminance_num = 2 * mean_x * mean_y + SSIM_C1
    luminance_den = mean_x * mean_x + mean_y * mean_y + SSIM_C1
    contrast_num = 2 * cov_xy + SSIM_C2
    contrast_den = var_x + var_y + SSIM_C2
    ssim_map = luminance_num * contrast_num / (luminance_den * contrast_den)
    per_channel = ssim_map.mean(IMAGE_DIMS)  # (N,)
    per_channel = per_channel.reshape(pred.shape[:-2])  # (...,3)
    return per_channel.mean(-1)


def lpips_fn(device='cpu'):
    """LPIPS-VGG (as pixelSplat): (N,3,H,W) in [0,1] -> (N,); None (with a notice) without the
    package or its weights."""
    try:
        import lpips

        net = lpips.LPIPS(net='vgg', verbose=False)
        net = net.to(device).eval().requires_grad_(False)
    except Exception as e:  # missing package, or no network to fetch the VGG weights
        fix = '`pip install lpips` with the VGG weights cached to enable it'
        print(f'note: LPIPS disabled ({type(e).__name__}: {e}); {fix}')
        return None

    def distance(pred, gt):  # the package expects images in [-1, 1]
        distances = net(pred * 2 - 1, gt * 2 - 1)  # (N,1,1,1)
        return distances.flatten()

    return distance


def image_metrics(pred, gt, lpips=None):  # (B,V,3,H,W) each -> {'psnr', 'ssim', 'lpips'?} means
    scores = {}
    scores['psnr'] = psnr(pred, gt)
    scores['ssim'] = ssim(pred, gt)
    if lpips is not None:
        # LPIPS takes a batch of images (B*V,3,H,W)
        pred_images = pred.flatten(0, 1)
        gt_images = gt.flatten(0, 1)
        scores['lpips'] = lpips(pred_images, gt_images)
    return {name: float(value.mean()) for name, value in scores.items()}


def depth_metrics(pred, gt, mask=None, align='median'):
    """(...,H,W) depths -> {'absrel', 'rmse', 'delta1'}, the mean over images of the pixels where
    gt > 0, finite and mask; align='median': each prediction scaled to its gt's median first."""
    H, W = pred.shape[-2:]
    pred = pred.detach().double()
    pred = pred.reshape(-1, H * W)  # (images, HW)
    gt = gt.to(pred.device)
    gt = gt.reshape(pred.shape).double()
    valid = (gt > 0) & torch.isfinite(gt)
    if mask is not None:
        mask = mask.to(pred.device)
        valid &= mask.reshape(pred.shape).bool()
    rows = []
    for pred_image, gt_image, valid_image in zip(pred, gt, valid):
        if not valid_image.any():
            continue
        p = pred_image[valid_image]
        g = gt_image[valid_image]
        if align == 'median':
            scale = g.median() / p.median().clamp_min(1e-8)
            p = p * scale
        p = p.clamp_min(1e-8)
        error = p - g
        absrel = (error.abs() / g).mean()
        rmse = error.pow(2).mean().sqrt()
        ratio = torch.maximum(p / g, g / p)
        delta1 = (ratio < 1.25).double().mean()
        rows.append([absrel, rmse, delta1])
    if not rows:  # no valid pixel in any image
        return dict.fromkeys(DEPTH_METRICS, float('nan'))
    means = torch.tensor(rows).mean(0)
    return dict(zip(DEPTH_METRICS, means.tolist()))


# ------------------------------------------ photo-consistency: DA3's depth in the cameras' units
def _spread(points):
    """How far points (N,3) lie from their mean, at most; 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    return float((points - points.mean(0)).norm(dim=-1).max())


def depth_scale(images, depth, c2w, K, c2w_da3, n_src):
    """(scale of DA3's depth to c2w's units, how): 2+ sources apart: photo-consistency (the pixels,
    not a pose head: the tiny head's centres were 8x off); else Umeyama of DA3's centres where they
    resolve a baseline; else none (1). The exports' units and the reprojection baseline's."""
    centres = cameras.translation(c2w)
    centres_da3 = cameras.translation(c2w_da3)
    if n_src < 2 or _spread(centres[:n_src]) < 1e-9:
        da3_baseline = _spread(centres_da3) >= 0.01 * float(depth.median())
        if da3_baseline and _spread(centres) >= 1e-9:
            scale = cameras.umeyama(centres_da3.double(), centres.double())[0]
            return float(scale), 'da3 cameras'
        return 1.0, 'none'
    return fit_scale(images, depth, c2w, K, n_src)[0], 'source photo-consistency'


# fit_scale's searches (log10 of the scale from, to, steps): six decades, then about the best
SCALE_SEARCH = ((-3, 3, 121), (-0.05, 0.05, 41))


def fit_scale(images, depth, c2w, K, n_src, searches=SCALE_SEARCH):
    """The scale of depth under which the n_src sources agree best, and their mean photo error
    there."""
    sources = range(n_src)
    pairs = [(i, j) for i in sources for j in sources if i != j]
    best = 1.0
    for low, high, steps in searches:
        scales = torch.logspace(low, high, steps, dtype=torch.float64) * best
        costs = []
        for s in scales:
            scaled = depth * float(s)
            cost = sum(photo_error(images, scaled, c2w, K, i, j) for i, j in pairs)
            costs.append(cost)
        best = float(scales[torch.stack(costs).argmin()])
    return best, float(min(costs)) / len(pairs)


def photo_error(images, depth, c2w, K, i, j):
    """Median colour error of view i's pixels moved by depth (V,H,W) into view j; 1 if < 5% land."""
    _, _, H, W = images.shape
    images = images.double()
    depth = depth.double()
    c2w = c2w.double()
    K = K.double()
    points = cameras.depth_to_points(depth[i], c2w[i], K[i])
    points = points.reshape(-1, 3)  # (HW,3)
    pixels, z = cameras.project(points, c2w[j], K[j], H, W)
    # grid_sample's [-1, 1] coordinates
    size = pixels.new_tensor([W, H])
    xy = pixels / size * 2 - 1
    in_front = z > 0
    inside = (xy.abs() < 1).all(-1)
    ok = in_front & inside
    if ok.double().mean() < 0.05:
        return torch.tensor(1.0, dtype=torch.float64)
    grid = xy[ok][None, None]
    image_j = images[j][None]
    # (3,n) view j's colours where view i's pixels land
    seen = F.grid_sample(image_j, grid, align_corners=False)[0, :, 0]
    own = images[i].flatten(1).T[ok]
    errors = (seen.T - own).abs().mean(-1)
    return errors.median()


# ------------------------------------------------------------ the reprojection baseline
def forward_warp(colours, depth, c2w_src, K_src, c2w_tgt, K_tgt, fill, sub=2):
    """The sources splatted into the targets with a z-buffer: colours (B,N,C,H,W), z-depth
    (B,N,H,W), c2w (B,N,4,4), normalised K (B,N,3,3) of the sources; c2w_tgt, K_tgt (B,M,...) ->
    targets (B,M,C,H,W), covered (B,M,H,W). Each source pixel is sub x sub points (its colour and
    depth on the rays through its sub-pixels: a surface seen up to sub times larger in a target
    leaves no one-pixel cracks; P = N*H*W*sub^2 points); each lands on the target pixel whose
    centre is nearest its projection; the nearest point wins a pixel; fill (broadcast to
    (B,M,C,H,W)) the pixels none reaches."""
    B, M = c2w_tgt.shape[:2]
    C, H, W = colours.shape[-3:]
    depth = repeat(depth, 'B N H W -> B N (H s) (W t)', s=sub, t=sub)
    colours = repeat(colours, 'B N c H W -> B N c (H s) (W t)', s=sub, t=sub)
    world = cameras.depth_to_points(depth, c2w_src, K_src)  # (B,N,sub*H,sub*W,3)
    points = rearrange(world, 'B N H W c -> B 1 (N H W) c')
    pixels, z = cameras.project(points, c2w_tgt, K_tgt, H, W)  # (B,M,P,2), (B,M,P)
    # the pixel whose centre is nearest: pixel u spans [u, u+1), its centre is u + 0.5
    nearest_pixel = (pixels - 0.5).round().long()
    u, v = nearest_pixel.unbind(-1)
    in_front = z > 0
    inside_columns = (u >= 0) & (u < W)
    inside_rows = (v >= 0) & (v < H)
    lands = in_front & inside_columns & inside_rows
    target = torch.arange(B * M, device=depth.device)
    target = rearrange(target, '(B M) -> B M 1', B=B)
    # (B,M,P) each point's pixel among all the targets' pixels
    pixel = (target * H + v) * W + u
    pixel = pixel[lands]  # (L,)
    z = z[lands]
    point_colours = rearrange(colours, 'B N c H W -> B 1 (N H W) c')
    point_colours = point_colours.expand(B, M, -1, -1)
    point_colours = point_colours[lands]  # (L,C)
    # the z-buffer: each pixel's nearest depth, then the points at it (equal depths: any of them)
    n_pixels = B * M * H * W
    zbuffer = z.new_full((n_pixels,), torch.inf)
    zbuffer = zbuffer.scatter_reduce(0, pixel, z, 'amin')
    front = z == zbuffer[pixel]
    targets = fill.expand(B, M, C, H, W)
    targets = rearrange(targets, 'B M c H W -> (B M H W) c').clone()
    targets[pixel[front]] = point_colours[front]
    targets = rearrange(targets, '(B M H W) c -> B M c H W', B=B, M=M, H=H)
    covered = torch.isfinite(zbuffer)
    covered = covered.view(B, M, H, W)
    return targets, covered


def source_depth(enc, sources, c2w, K):
    """The geometry head's z-depth (B,N,H,W) of sources (B,N,3,H,W) encoded alone, in the units of
    their cameras c2w, K as the exports set them (depth_scale; one source: DA3's own)."""
    N = sources.shape[1]
    H, W = sources.shape[-2:]
    levels, cls = enc.encode(sources, return_cls=True)
    levels = enc.normalize_levels(levels)
    geo = enc.geometry(levels, H, W, cls_last=cls[-1])
    scaled = []
    # one scene at a time: its views, DA3's depth, the given cameras, DA3's
    scenes = zip(sources, geo['depth'], c2w, K, geo['c2w'])
    for images_b, depth, c2w_b, K_b, c2w_da3 in scenes:
        scale, _ = depth_scale(images_b, depth, c2w_b, K_b, c2w_da3, N)
        scaled.append(depth * scale)
    return torch.stack(scaled)


def reprojection(enc, images, c2w, K, n_src, fill):
    """The reprojection baseline's targets (B,M,3,H,W): the n_src sources forward-warped into the
    other views with the geometry head's depth on them (source_depth), fill where none lands; and
    covered (B,M,H,W), the pixels a source point lands on (forward_warp)."""
    sources = images[:, :n_src]
    c2w_src = c2w[:, :n_src]
    K_src = K[:, :n_src]
    depth = source_depth(enc, sources, c2w_src, K_src)
    c2w_tgt = c2w[:, n_src:]
    K_tgt = K[:, n_src:]
    return forward_warp(sources, depth, c2w_src, K_src, c2w_tgt, K_tgt, fill)


# ------------------------------------------------------------ evaluation: the paper's protocol
def baselines(images, c2w, n_src):
    """The baselines' targets (B,M,3,H,W): the nearest source (by camera), the sources' mean colour."""
    sources = c2w[:, :n_src, :3, 3]  # (B,N,3) camera centres
    targets = c2w[:, n_src:, :3, 3]
    idx = torch.cdist(targets, sources).argmin(-1)  # (B,M)
    picked = [views[i] for views, i in zip(images, idx)]
    nearest = torch.stack(picked)
    source_images = images[:, :n_src]
    mean = source_images.mean((1, 3, 4), keepdim=True)  # (B,1,3,1,1)
    return nearest, mean.expand_as(nearest)


def geometry_metrics(geo, scene, n_src):  # cameras, target depths of a geometry head; {} if none
    scores = {}
    if 'c2w' in geo:
        scores = pose_metrics(geo['c2w'][0], scene['c2w'][0])
    if 'depths' in scene and 'depth' in geo:
        depth = geo['depth'][:, n_src:]
        gt_depth = scene['depths'][:, n_src:]
        scores.update(depth_metrics(depth, gt_depth, align='median'))
    return scores


def evaluate_scene(pipe, scene, n_src, steps, cfg_scale, seed, lpips=None, gt_geometry=False, sampler='euler'):
    """One scene of the paper's protocol (sources first): metrics of GLD's and the baselines'
    targets (reprojection: where the encoder has a geometry head); gt_geometry: of the head on the
    true images too."""
    images = scene['images']
    c2w = scene['c2w']
    K = scene['K']
    out = pipe.generate(images, c2w, K, n_src, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
    nearest, mean = baselines(images, c2w, n_src)
    targets = images[:, n_src:]
    generated = out['images'][:, n_src:]
    methods = {'gld': generated, 'nearest source': nearest, 'mean colour': mean}
    enc = pipe.enc
    # the sources forward-warped with the head's depth on them, holes the mean colour
    if enc.has_geometry:
        methods['reprojection'], _ = reprojection(enc, images, c2w, K, n_src, mean)
    rows = {}  # {method: {metric: value}}
    for method, im in methods.items():
        rows[method] = image_metrics(im, targets, lpips)
    gld = rows['gld']
    gld.update(geometry_metrics(out['geometry'], scene, n_src))
    cls = None
    if enc.has_geometry:
        raw, cls = enc.encode(images, return_cls=True)
    else:
        raw = enc.encode(images)
    k = pipe.boundary
    if k in pipe.models:  # generated level k of the targets vs DA3 on the true images, normalised
        normalize = pipe.models[k][1]['stats'].normalize
        generated_k = normalize(out['levels'][k], k)
        true_k = normalize(raw[k], k)
        error = (generated_k - true_k)[:, n_src:]
        gld['mse_k'] = float(error.pow(2).mean())
    if gt_geometry and enc.has_geometry:  # the head on the true images: "geometry for free"
        H, W = images.shape[-2:]
        levels = enc.normalize_levels(raw)
        geo = enc.geometry(levels, H, W, cls_last=cls[-1])
        rows['da3 on gt images'] = geometry_metrics(geo, scene, n_src)
    return rows, out


def write_table(per_scene, out_dir, name, title):
    """Rows {'scene', 'method', metric: value} -> name.md, name.json (means), name_scenes.csv."""
    values = {}  # {method: {metric: [one per scene]}}
    for row in per_scene:
        method = row['method']
        for k, v in row.items():
            if k not in ('scene', 'method'):
                values.setdefault(method, {}).setdefault(k, []).append(v)
    table = {}  # {method: {metric: mean}}
    for method, scores in values.items():
        table[method] = {k: float(np.mean(v)) for k, v in scores.items()}
    names = {k for means in table.values() for k in means}
    cols = sorted(names, key=TABLE_COLUMNS.index)
    header = f'| {title} | ' + ' | '.join(cols) + ' |'
    rule = '|---' * (len(cols) + 1) + '|'
    md = [header, rule]
    for method, means in table.items():
        cells = [f'{means[c]:.4g}' if c in means else '-' for c in cols]
        line = f'| {method} | ' + ' | '.join(cells) + ' |'
        md.append(line)
    path = os.path.join(out_dir, name)
    with open(f'{path}.md', 'w') as f:
        f.write('\n'.join(md) + '\n')
    with open(f'{path}.json', 'w') as f:
        json.dump(table, f, indent=1)
    with open(f'{path}_scenes.csv', 'w', newline='') as f:
        fields = ['scene', 'method'] + cols
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(per_scene)
    print('\n'.join(md))
    return table
