"""export.py: a generated scene in the formats other tools open (COLMAP, nerfstudio, PLY, MP4), cameras read in.

COLMAP sparse/0/ (w2c as Hamilton quaternion (w, x, y, z) + t, PINHOLE in pixels) with the fused points, nerfstudio
transforms.json (OpenGL c2w, ply_file_path for splatfacto), points.ply, video.mp4; units: those of the cameras sampling
used. References: COLMAP, nerfstudio and PLY format docs. Shape legend: V views, H W image, N points.
"""

import argparse
import json
import os
import struct

import numpy as np
import torch
from PIL import Image

import cameras
import cli
import encoder as encoder_lib

FORMATS = DEFAULT_FORMATS = ('ply', 'colmap', 'nerfstudio')  # sample.py's --export: the choices, all by default
UNITS = {
    'poses': "the source cameras' units (dataset poses or --cameras); DA3 depth rescaled to them",
    'da3': "DA3's relative depth scale (cameras estimated by DA3: no --cameras given)",
}  # by the cameras' source
SOURCE_RGB, TARGET_RGB = (25, 114, 255), (255, 114, 12)  # camera colours of draw_topdown


def parse_formats(text):  # 'ply,colmap' -> ['ply', 'colmap'] ('' -> []): sample.py's --export type
    formats = [f.strip() for f in text.split(',') if f.strip()]
    if unknown := sorted(set(formats) - set(FORMATS)):
        raise argparse.ArgumentTypeError(f'unknown export format(s) {unknown}; choose from {",".join(FORMATS)}')
    return formats


def view_names(V, n_src):  # sources first, zero-padded: sorting by name keeps the view order
    d = max(3, len(str(V)))
    return [f'source_{v:0{d}d}.png' if v < n_src else f'target_{v - n_src:0{d}d}.png' for v in range(V)]


def depth_scale(images, depth, c2w, K, c2w_da3, n_src):
    """(scale of DA3's depth to c2w's units, how): 2+ sources apart: photo-consistency (the pixels, not a pose head:
    the tiny head's centres were 8x off); else Umeyama of DA3's centres when they resolve a baseline; else none (1)."""
    spread = lambda p: float((p - p.mean(0)).norm(dim=-1).max()) if len(p) > 1 else 0.0
    if n_src < 2 or spread(c2w[:n_src, :3, 3]) < 1e-9:
        if spread(c2w_da3[:, :3, 3]) >= 0.01 * float(depth.median()) and spread(c2w[:, :3, 3]) >= 1e-9:
            return float(cameras.umeyama(c2w_da3[:, :3, 3].double(), c2w[:, :3, 3].double())[0]), 'da3 cameras'
        return 1.0, 'none'
    pairs = [(i, j) for i in range(n_src) for j in range(n_src) if i != j]
    cost = lambda s: sum(photo_error(images, depth * s, c2w, K, i, j) for i, j in pairs)
    best = 1.0
    for grid in (torch.logspace(-3, 3, 121, dtype=torch.float64), torch.logspace(-0.05, 0.05, 41, dtype=torch.float64)):
        grid = grid * best
        best = float(grid[torch.stack([cost(float(s)) for s in grid]).argmin()])
    return best, 'source photo-consistency'


def photo_error(images, depth, c2w, K, i, j):
    """Median colour difference of view i's pixels carried by depth (V,H,W) into view j; 1 if < 5% land in j."""
    _, _, H, W = images.shape
    pts = encoder_lib.depth_to_points(depth[i].double(), c2w[i].double(), K[i].double()).reshape(-1, 3)  # (HW,3)
    w2c = cameras.c2w_to_w2c(c2w[j].double())
    uvz = (pts @ w2c[:3, :3].T + w2c[:3, 3]) @ cameras.K_to_pixels(K[j].double(), H, W).T  # (HW,3) [z u, z v, z]
    xy = uvz[:, :2] / uvz[:, 2:].clamp_min(1e-9) / uvz.new_tensor([W, H]) * 2 - 1  # grid_sample's [-1, 1] coordinates
    ok = (uvz[:, 2] > 0) & (xy.abs() < 1).all(-1)
    if ok.double().mean() < 0.05:
        return torch.tensor(1.0, dtype=torch.float64)
    seen = torch.nn.functional.grid_sample(images[j][None].double(), xy[ok][None, None], align_corners=False)[0, :, 0]
    return (seen.T - images[i].flatten(1).T[ok].double()).abs().mean(-1).median()


def fuse_points(images, depth, conf, c2w, K, keep=0.7):
    """The `keep` most confident pixels unprojected -> {'xyz' (N,3), 'rgb' (N,3) uint8, 'view', 'uv' (N,2)}, by view."""
    pts = encoder_lib.depth_to_points(depth.double(), c2w.double(), K.double())  # (V,H,W,3)
    mask = conf >= conf.flatten().quantile(1 - keep)  # (V,H,W)
    v, y, x = mask.nonzero(as_tuple=True)  # row-major: view, then y, then x
    rgb = (images.permute(0, 2, 3, 1)[mask].clamp(0, 1) * 255 + 0.5).to(torch.uint8)  # (N,3), as to_uint8
    return {'xyz': pts[mask], 'rgb': rgb, 'view': v, 'uv': torch.stack([x, y], -1).double() + 0.5}


# ----------------------------------------------------------------------------------------------- images, video and PLY
def to_uint8(img):  # (3,H,W) in [0,1] -> (H,W,3) uint8 numpy
    return (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_image(img, path):  # (3,H,W) in [0,1] -> PNG (or the format Pillow infers from the name)
    Image.fromarray(to_uint8(img)).save(path)


def write_video(frames, stem, fps=8):  # (3,H,W) frames in [0,1] -> stem.mp4 (H.264), or stem.gif without imageio-ffmpeg
    arr = [to_uint8(f) for f in frames]
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # raises when the bundled binary is missing
    except (ImportError, RuntimeError) as e:
        print(f'note: no MP4 ({e}); wrote {stem}.gif instead (pip install imageio imageio-ffmpeg)')
        ims = [Image.fromarray(a) for a in arr]
        ims[0].save(stem + '.gif', save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
        return stem + '.gif'
    # yuv420p plays everywhere but needs even sides: macro_block_size 2 keeps our sizes (multiples of 14) as they are
    imageio.mimsave(stem + '.mp4', arr, fps=fps, macro_block_size=2, pixelformat='yuv420p')
    return stem + '.mp4'


def write_ply(path, xyz, rgb, comments=()):
    """Binary little-endian PLY: xyz (N,3), rgb (N,3) float in [0,1] or uint8; `comments` go in the header."""
    xyz = torch.as_tensor(xyz).reshape(-1, 3).float().cpu().numpy()
    rgb = torch.as_tensor(rgb).reshape(-1, 3)
    rgb = (rgb if rgb.dtype == torch.uint8 else (rgb.float().clamp(0, 1) * 255).round()).cpu().numpy()
    props = [(c, '<f4', 'float') for c in 'xyz'] + [(c, 'u1', 'uchar') for c in ('red', 'green', 'blue')]
    verts = np.rec.fromarrays([*xyz.T, *rgb.T], dtype=[p[:2] for p in props])
    header = (
        'ply\nformat binary_little_endian 1.0\n'
        + ''.join(f'comment {c}\n' for c in comments)
        + f'element vertex {len(verts)}\n'
        + ''.join(f'property {t} {c}\n' for c, _, t in props)
        + 'end_header\n'
    )
    with open(path, 'wb') as f:
        f.write(header.encode('ascii') + verts.tobytes())


# -------------------------------------------------------------------------------------------------------------- COLMAP
def write_colmap(folder, c2w, K, H, W, names, points):
    """Binary COLMAP model: a PINHOLE camera per view (id view + 1), fuse_points' points seen once, at their pixel."""
    os.makedirs(folder, exist_ok=True)
    V, N = len(names), len(points['view'])
    w2c = cameras.c2w_to_w2c(c2w.double())
    qvec, tvec = cameras.rotmat_to_quat(w2c[:, :3, :3]), w2c[:, :3, 3]
    Kp = cameras.K_to_pixels(K.double(), H, W)  # COLMAP, like us, puts pixel centres at +0.5: no offset
    params = torch.stack([Kp[:, 0, 0], Kp[:, 1, 1], Kp[:, 0, 2], Kp[:, 1, 2]], -1)  # PINHOLE fx fy cx cy
    view, rgb, xyz, uv = (points[k].numpy() for k in ('view', 'rgb', 'xyz', 'uv'))
    first = np.searchsorted(view, np.arange(V + 1))  # points of view v: first[v]:first[v+1]
    pid, idx = np.arange(1, N + 1), np.arange(N) - first[view]  # point3D ids, index among its image's 2D points
    obs = np.empty(N, dtype=[('xy', '<f8', 2), ('point3D_id', '<i8')])  # the 2D points of all images, by image
    obs['xy'], obs['point3D_id'] = uv, pid
    rec = np.empty(
        N,
        dtype=[
            ('id', '<u8'),
            ('xyz', '<f8', 3),
            ('rgb', 'u1', 3),
            ('error', '<f8'),
            ('track_length', '<u8'),
            ('image_id', '<i4'),
            ('point2D_idx', '<i4'),
        ],
    )
    rec['id'], rec['xyz'], rec['rgb'], rec['error'], rec['track_length'] = pid, xyz, rgb, 0.0, 1
    rec['image_id'], rec['point2D_idx'] = view + 1, idx
    cams = [struct.pack('<iiQQ4d', v + 1, 1, W, H, *params[v].tolist()) for v in range(V)]  # model 1: PINHOLE
    images = [
        struct.pack('<I4d3dI', v + 1, *qvec[v].tolist(), *tvec[v].tolist(), v + 1)
        + names[v].encode()
        + b'\0'
        + struct.pack('<Q', first[v + 1] - first[v])
        + obs[first[v] : first[v + 1]].tobytes()
        for v in range(V)
    ]
    for name, n, rows in (('cameras.bin', V, cams), ('images.bin', V, images), ('points3D.bin', N, [rec.tobytes()])):
        with open(os.path.join(folder, name), 'wb') as f:  # a table: its row count (uint64), then the rows
            f.write(struct.pack('<Q', n) + b''.join(rows))


# COLMAP camera models, id: (name, number of params); the perspective ones start with f or fx fy, then cx cy
COLMAP_MODELS = {
    0: ('SIMPLE_PINHOLE', 3),
    1: ('PINHOLE', 4),
    2: ('SIMPLE_RADIAL', 4),
    3: ('RADIAL', 5),
    4: ('OPENCV', 8),
    5: ('OPENCV_FISHEYE', 8),
    6: ('FULL_OPENCV', 12),
    7: ('FOV', 5),
    8: ('SIMPLE_RADIAL_FISHEYE', 4),
    9: ('RADIAL_FISHEYE', 5),
    10: ('THIN_PRISM_FISHEYE', 12),
}
COLMAP_PERSPECTIVE = ('SIMPLE_PINHOLE', 'PINHOLE', 'SIMPLE_RADIAL', 'RADIAL', 'OPENCV', 'FULL_OPENCV')


def read_colmap(folder):
    """COLMAP model folder (.bin or .txt) -> {'c2w', 'Kpix' (pixels), 'sizes' [(H, W)], 'names'}; distortion ignored."""
    cams, images = {}, []  # camera id -> (model name, W, H, params); images: (qvec, tvec, camera id, name)
    if os.path.isfile(os.path.join(folder, 'cameras.bin')):
        with open(os.path.join(folder, 'cameras.bin'), 'rb') as f:
            for _ in range(struct.unpack('<Q', f.read(8))[0]):
                cid, model, W, H = struct.unpack('<iiQQ', f.read(24))
                name, n = COLMAP_MODELS[model]
                cams[cid] = (name, W, H, struct.unpack(f'<{n}d', f.read(8 * n)))
        with open(os.path.join(folder, 'images.bin'), 'rb') as f:
            for _ in range(struct.unpack('<Q', f.read(8))[0]):
                rec = struct.unpack('<I4d3dI', f.read(64))
                name = b''.join(iter(lambda: f.read(1), b'\0')).decode()
                f.seek(24 * struct.unpack('<Q', f.read(8))[0], 1)  # the 2D points: x, y (doubles), point3D id (int64)
                images.append((rec[1:5], rec[5:8], rec[8], name))
    else:
        for line in open(os.path.join(folder, 'cameras.txt')):
            if line.strip() and not line.startswith('#'):
                cid, model, W, H, *params = line.split()
                cams[int(cid)] = (model, int(W), int(H), tuple(map(float, params)))
        lines = (l for l in open(os.path.join(folder, 'images.txt')) if not l.startswith('#'))
        for head in lines:  # two lines per image, the second (its 2D points) possibly empty
            if head.strip():
                _, *qt, cid, name = head.split()
                images.append((tuple(map(float, qt[:4])), tuple(map(float, qt[4:])), int(cid), name))
                next(lines, None)
    if not images:
        raise cli.UserError(f'{folder}: the COLMAP model holds no images')
    Kpix, sizes = [], []
    for _, _, cid, name in images:
        model, W, H, prm = cams[cid]
        if model not in COLMAP_PERSPECTIVE:
            raise cli.UserError(
                f'{folder}: camera {cid} of {name} is a {model} camera; undistort the model to '
                'PINHOLE first (colmap image_undistorter)'
            )
        if model not in ('PINHOLE', 'SIMPLE_PINHOLE'):
            print(f'note: {folder}: camera {cid} is {model}; its lens distortion is ignored (undistort for exact rays)')
        two_focals = model in ('PINHOLE', 'OPENCV', 'FULL_OPENCV')  # fx fy cx cy ...; the others: f cx cy ...
        fx, fy, cx, cy = prm[:4] if two_focals else (prm[0], prm[0], prm[1], prm[2])
        Kpix.append([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
        sizes.append((H, W))
    qvec, tvec = (torch.tensor([im[k] for im in images], dtype=torch.float64) for k in (0, 1))
    c2w = cameras.w2c_to_c2w(cameras.make_pose(cameras.quat_to_rotmat(qvec), tvec))
    return {
        'c2w': c2w,
        'Kpix': torch.tensor(Kpix, dtype=torch.float64),
        'sizes': sizes,
        'names': [im[3] for im in images],
    }


# -------------------- nerfstudio, and cameras in: every format a user's photos come with, as OpenCV c2w + normalised K
def write_transforms(path, c2w, K, H, W, files, is_source, extra=None):
    """nerfstudio transforms.json, `files` relative to its folder; `extra` adds top-level keys."""
    Kp, gl = cameras.K_to_pixels(K.double(), H, W), cameras.opengl_to_opencv(c2w.double())  # the flip is an involution
    frames = [
        {
            'file_path': files[v],
            'transform_matrix': gl[v].tolist(),
            'fl_x': float(Kp[v, 0, 0]),
            'fl_y': float(Kp[v, 1, 1]),
            'cx': float(Kp[v, 0, 2]),
            'cy': float(Kp[v, 1, 2]),
            'is_source': bool(is_source[v]),
        }
        for v in range(len(files))
    ]
    with open(path, 'w') as f:
        json.dump({'camera_model': 'OPENCV', 'w': W, 'h': H, **(extra or {}), 'frames': frames}, f, indent=1)


CAMERA_FORMATS = (
    'a COLMAP model folder (sparse/0, .bin or .txt), a nerfstudio transforms.json, or a folder of '
    'per-frame NAME.npz (c2w: 4x4 OpenCV camera-to-world, K: 3x3 in pixels, H and W optional)'
)


def read_cameras(path, image_size=None):
    """Cameras in any of CAMERA_FORMATS -> {'c2w', 'K', 'names', 'files' (or None), 'size' (H, W) or None, 'format'}."""
    import data  # bottom layer: the nerfstudio reader that datasets use too

    sparse = next(
        (
            d
            for d in (path, os.path.join(path, 'sparse', '0'), os.path.join(path, 'sparse'))
            if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f'cameras.{e}')) for e in ('bin', 'txt'))
        ),
        None,
    )
    if sparse:
        m = read_colmap(sparse)
        if len(set(m['sizes'])) > 1:
            raise cli.UserError(
                f'{sparse}: cameras of different image sizes {sorted(set(m["sizes"]))}; give photos of one size'
            )
        (H, W), root = m['sizes'][0], os.path.dirname(os.path.dirname(os.path.abspath(sparse)))
        out = {
            'c2w': m['c2w'],
            'K': cameras.K_to_normalized(m['Kpix'], H, W),
            'names': m['names'],
            'files': [os.path.join(root, 'images', n) for n in m['names']],
            'size': (H, W),
            'format': 'COLMAP',
        }
    elif path.endswith('.json') or os.path.isfile(os.path.join(path, 'transforms.json')):
        json_path = path if path.endswith('.json') else os.path.join(path, 'transforms.json')
        t = data.read_transforms(json_path)
        files = [os.path.join(os.path.dirname(os.path.abspath(json_path)), f) for f in t['files']]
        out = {'c2w': t['c2w'], 'K': t['K'], 'names': t['files'], 'files': files, 'size': None, 'format': 'nerfstudio'}
    elif os.path.isdir(path) and any(f.endswith('.npz') for f in os.listdir(path)):
        c2w, K, names, size = [], [], [], None
        for f in sorted(f for f in os.listdir(path) if f.endswith('.npz')):
            z = np.load(os.path.join(path, f))
            size = (int(z['H']), int(z['W'])) if 'H' in z and 'W' in z else image_size
            if 'c2w' not in z or 'K' not in z or size is None:
                raise cli.UserError(
                    f'{os.path.join(path, f)}: needs arrays c2w (4x4 OpenCV camera-to-world), K (3x3, '
                    f'pixels) and H, W (the image size of K) where no photo states it; it has '
                    f'{sorted(z.files)}: add H and W or the missing arrays'
                )
            c2w.append(torch.as_tensor(z['c2w'], dtype=torch.float64))
            K.append(cameras.K_to_normalized(torch.as_tensor(z['K'], dtype=torch.float64), *size))
            names.append(f[: -len('.npz')])
        out = {
            'c2w': torch.stack(c2w),
            'K': torch.stack(K),
            'names': names,
            'files': [None] * len(names),
            'size': size,
            'format': 'npz',
        }
    else:
        raise cli.UserError(f'{path}: no cameras found; pass {CAMERA_FORMATS}')
    out['c2w'], out['K'] = out['c2w'].float(), out['K'].float()
    cameras.check_cameras(out['c2w'], out['K'], path)
    return out


# --------------------------------------------------------------------------------- the whole scene, and pictures of it
def draw_topdown(path, c2w_src, c2w_tgt, size=256, title=''):
    """Top-down PNG of source (blue) and target (orange, joined, first ringed) cameras, the first source facing up."""
    from PIL import ImageDraw

    up, right = -c2w_src[0, :3, 1].double(), c2w_src[0, :3, 0].double()
    fwd = torch.linalg.cross(up, right)  # horizontal viewing direction of the first source
    plane = lambda p: torch.stack([p @ right, -(p @ fwd)], -1)  # (...,3) -> (...,2) page coordinates
    both = torch.cat([c2w_src.double(), c2w_tgt.double()])
    centres, dirs = plane(both[:, :3, 3]), plane(both[:, :3, 2])
    lo, hi = centres.min(0).values, centres.max(0).values
    tick = 0.12 * float((hi - lo).max().clamp_min(1e-6))
    tips = centres + tick * dirs  # (V,2) the ends of the ticks
    lo, hi = torch.minimum(lo, tips.min(0).values), torch.maximum(hi, tips.max(0).values)
    scale = (size - 40) / float((hi - lo).max().clamp_min(1e-6))
    px = lambda p: tuple(((p - (lo + hi) / 2) * scale + size / 2).tolist())
    im, n = Image.new('RGB', (size, size), 'white'), len(c2w_src)
    d = ImageDraw.Draw(im)
    if len(c2w_tgt) > 1:
        d.line([px(c) for c in centres[n:]], fill=(255, 190, 140), width=1)
    for v in range(len(both)):
        x, y = px(centres[v])
        colour, r = (SOURCE_RGB, 5) if v < n else (TARGET_RGB, 3)
        d.line([(x, y), px(tips[v])], fill=colour, width=2)
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        if v == n:
            d.ellipse([x - 7, y - 7, x + 7, y + 7], outline=colour)
    d.text((6, 4), title, fill=(0, 0, 0))
    im.save(path)


def make_grid(src, pred, gt=None):  # rows sources | + pred[N:] | + gt (if given), white where none -> (3,rows*H,V*W)
    N = src.shape[0]
    blank = torch.ones_like(pred[N:])  # white where there is no image
    rows = [torch.cat([src, blank]), torch.cat([src, pred[N:]])]
    if gt is not None:
        rows.append(torch.cat([src, gt, blank[gt.shape[0] :]]))
    return torch.cat([torch.cat(list(r), -1) for r in rows], -2)


def write_scene(
    out_dir,
    images,
    depth,
    conf,
    c2w,
    K,
    c2w_da3,
    n_src,
    formats=DEFAULT_FORMATS,
    units='poses',
    keep=0.7,
    frame='the cameras sampling used',
):
    """Images (V,3,H,W) (sources first) and the scene from DA3's depth, conf in `formats` -> a metrics.json summary."""
    parse_formats(','.join(formats))  # fails on an unknown name
    images, depth, conf, c2w, K, c2w_da3 = (t.detach().cpu() for t in (images, depth, conf, c2w, K, c2w_da3))
    V, _, H, W = images.shape
    names = view_names(V, n_src)
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    for v in range(V):
        save_image(images[v], os.path.join(out_dir, 'images', names[v]))
    scale, how = depth_scale(images, depth, c2w, K, c2w_da3, n_src) if units == 'poses' else (1.0, 'none')
    pts = fuse_points(images, depth * scale, conf, c2w, K, keep)
    info = {'frame': frame, 'units': UNITS[units], 'depth_scale': scale, 'depth_scale_from': how}
    if 'ply' in formats:
        note = f'units: {UNITS[units]}; DA3 depth x {scale:.6g} ({how})'
        write_ply(os.path.join(out_dir, 'points.ply'), pts['xyz'], pts['rgb'], comments=[note])
    if 'colmap' in formats:
        write_colmap(os.path.join(out_dir, 'sparse', '0'), c2w, K, H, W, names, pts)
    if 'nerfstudio' in formats:
        extra = {f'gld_{k}': v for k, v in info.items()}
        if 'ply' in formats:
            extra['ply_file_path'] = 'points.ply'  # splatfacto starts from these points
        write_transforms(
            os.path.join(out_dir, 'transforms.json'),
            c2w,
            K,
            H,
            W,
            ['images/' + n for n in names],
            torch.arange(V) < n_src,
            extra,
        )
    written = {'ply': 'points.ply', 'colmap': 'sparse/0/', 'nerfstudio': 'transforms.json'}
    return {**info, 'points': len(pts['xyz']), 'files': sorted({'images/'} | {written[f] for f in formats})}
