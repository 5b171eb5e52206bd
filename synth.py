"""synth.py: the synthetic indoor scenes that are gld's embedded default data, ray cast in numpy, and
the writer of the Re10K chunk layout that stores them (data.py reads it; `python data.py synth`).

Textured box rooms with boxes, spheres and cylinders, Lambertian point lights, smooth walkthrough camera paths, exact
cameras and metric z-depth; a scene is a function of its seed. Modelling frame: y up, floor y = 0; the stored world
is turned 180 degrees about x (y down, as OpenCV worlds). Shape legend: H W image, N rays/points, F frames.
"""

import io
import json
import os

import numpy as np
import torch
from PIL import Image

import cameras
import cli

PALETTES = {
    'warm': [(0.86, 0.76, 0.60), (0.62, 0.42, 0.26), (0.92, 0.86, 0.76), (0.72, 0.32, 0.22), (0.45, 0.30, 0.20)],
    'cool': [(0.56, 0.66, 0.76), (0.30, 0.40, 0.56), (0.82, 0.86, 0.90), (0.22, 0.30, 0.36), (0.60, 0.72, 0.66)],
    'pastel': [(0.96, 0.80, 0.82), (0.80, 0.92, 0.84), (0.82, 0.84, 0.96), (0.98, 0.94, 0.78), (0.88, 0.80, 0.94)],
    'vivid': [(0.90, 0.20, 0.20), (0.20, 0.50, 0.90), (0.95, 0.75, 0.10), (0.20, 0.70, 0.35), (0.60, 0.25, 0.75)],
    'earth': [(0.50, 0.42, 0.30), (0.34, 0.40, 0.24), (0.70, 0.62, 0.48), (0.26, 0.20, 0.16), (0.80, 0.74, 0.64)],
}


def _random_texture(rng, palette):
    cols = np.array(PALETTES[palette])[rng.choice(5, 2, replace=False)] + rng.normal(0, 0.05, (2, 3))
    kinds = ('checker', 'stripes', 'noise', 'marble', 'bricks', 'gradient')
    return {
        'kind': rng.choice(kinds),
        'c1': cols[0].clip(0, 1),
        'c2': cols[1].clip(0, 1),
        'scale': rng.uniform(0.15, 0.6),
        'angle': rng.uniform(0, np.pi),
        'grid': rng.random((16, 16)),
    }


def _value_noise(uv, grid):  # smooth periodic value noise of uv (N,2) on a (n,n) random grid -> (N,) in [0,1]
    n, i = grid.shape[0], np.floor(uv).astype(int)
    f = uv - i
    f = f * f * (3 - 2 * f)
    x0, y0, x1, y1 = i[:, 0] % n, i[:, 1] % n, (i[:, 0] + 1) % n, (i[:, 1] + 1) % n
    top = grid[y0, x0] * (1 - f[:, 0]) + grid[y0, x1] * f[:, 0]
    bottom = grid[y1, x0] * (1 - f[:, 0]) + grid[y1, x1] * f[:, 0]
    return top * (1 - f[:, 1]) + bottom * f[:, 1]


def _fbm(uv, grid, octaves=3):
    return sum(0.5**k * _value_noise(uv * 2**k + 7.3 * k, grid) for k in range(octaves)) / (2 - 0.5 ** (octaves - 1))


def _texture(tex, uv):  # albedo (N,3) of surface coordinates uv (N,2) in metres
    s, a = tex['scale'], tex['angle']
    proj = (uv[:, 0] * np.cos(a) + uv[:, 1] * np.sin(a)) / s  # coordinate across stripes
    kind = tex['kind']
    if kind == 'checker':
        w = (np.floor(uv[:, 0] / s) + np.floor(uv[:, 1] / s)) % 2
    elif kind == 'stripes':
        w = (proj % 1 < 0.5).astype(float)
    elif kind == 'noise':
        w = _fbm(uv / s * 2, tex['grid'])
    elif kind == 'marble':
        w = 0.5 + 0.5 * np.sin(2 * proj + 6 * _fbm(uv / s, tex['grid']))
    elif kind == 'bricks':
        row = np.floor(uv[:, 1] / s)  # bricks 2s x s
        u = uv[:, 0] / (2 * s) + 0.5 * (row % 2)
        mortar = (u % 1 < 0.06) | (uv[:, 1] / s % 1 < 0.1)
        shade = _value_noise(np.stack([np.floor(u), row], 1) * 3.1, tex['grid'])  # per-brick variation
        w = np.where(mortar, 1.0, 0.3 * shade)
    else:  # gradient with a little noise
        w = (0.5 + 0.5 * np.tanh(proj / 4)) * 0.85 + 0.15 * _fbm(uv / s, tex['grid'])
    return tex['c1'] * (1 - w[:, None]) + tex['c2'] * w[:, None]


def _hit_room(o, d, size):  # rays in [0, size] -> exit t, inward normal, uv, face (0 floor, 1 ceiling, 2..5 walls)
    with np.errstate(divide='ignore', invalid='ignore'):
        t_axis = np.where(d > 0, (size - o) / d, -o / d)  # (N,3) distance to the wall each axis moves towards
    t_axis = np.where(np.isfinite(t_axis) & (t_axis > 0), t_axis, np.inf)
    axis = t_axis.argmin(1)
    t = t_axis[np.arange(len(o)), axis]
    positive = d[np.arange(len(o)), axis] > 0
    face = np.select([axis == 1, axis == 0], [1 * positive, 2 + positive], 4 + positive)
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = np.where(positive, -1.0, 1.0)
    p = o + t[:, None] * d
    uv = np.where((axis == 1)[:, None], p[:, [0, 2]], np.where((axis == 0)[:, None], p[:, [2, 1]], p[:, [0, 1]]))
    return t, normal, uv, face


def _hit_object(o, d, ob):  # vs a yawed box, sphere or floor-standing cylinder -> t (N,) (inf: miss), normal, uv
    c, N = ob['center'], len(o)
    if ob['kind'] == 'box':
        cy, sy = np.cos(ob['yaw']), np.sin(ob['yaw'])
        R = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # local -> world
        ol, dl = (o - c) @ R, d @ R
        with np.errstate(divide='ignore', invalid='ignore'):
            t1, t2 = (-ob['half'] - ol) / dl, (ob['half'] - ol) / dl
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        tn, tf = np.nanmax(tmin, 1), np.nanmin(tmax, 1)
        t = np.where((tn <= tf) & (tn > 1e-6), tn, np.inf)
        axis, nl = np.nanargmax(tmin, 1), np.zeros((N, 3))
        nl[np.arange(N), axis] = -np.sign(dl[np.arange(N), axis])
        pl = ol + np.where(np.isfinite(t), t, 0)[:, None] * dl + ob['half']
        uv = np.where((axis == 1)[:, None], pl[:, [0, 2]], np.where((axis == 0)[:, None], pl[:, [2, 1]], pl[:, [0, 1]]))
        return t, nl @ R.T, uv
    oc = o - c
    if ob['kind'] == 'sphere':
        b, cc = (oc * d).sum(1), (oc * oc).sum(1) - ob['radius'] ** 2
        disc = b * b - (d * d).sum(1) * cc
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (d * d).sum(1)
        t = np.where((disc > 0) & (t > 1e-6), t, np.inf)
        n = (oc + np.where(np.isfinite(t), t, 0)[:, None] * d) / ob['radius']
        uv = np.stack([np.arctan2(n[:, 0], n[:, 2]) * ob['radius'], n[:, 1] * ob['radius']], 1)
        return t, n, uv
    # cylinder: side in the xz plane, top cap at y = c_y + height (c is the base centre)
    r, h = ob['radius'], ob['height']
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 2] * d[:, 2]
    cc = oc[:, 0] ** 2 + oc[:, 2] ** 2 - r * r
    disc = b * b - a * cc
    with np.errstate(divide='ignore', invalid='ignore'):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
        tc = (h - oc[:, 1]) / d[:, 1]
    ys = oc[:, 1] + ts * d[:, 1]
    ts = np.where((disc > 0) & (ts > 1e-6) & (ys >= 0) & (ys <= h), ts, np.inf)
    pc = oc + np.nan_to_num(tc, posinf=0, neginf=0)[:, None] * d
    tc = np.where((tc > 1e-6) & (pc[:, 0] ** 2 + pc[:, 2] ** 2 <= r * r), tc, np.inf)
    side, t = ts <= tc, np.minimum(ts, tc)
    p = oc + np.where(np.isfinite(t), t, 0)[:, None] * d
    n = np.where(side[:, None], np.stack([p[:, 0] / r, 0 * p[:, 1], p[:, 2] / r], 1), [0.0, 1.0, 0.0])
    uv = np.where(side[:, None], np.stack([np.arctan2(p[:, 0], p[:, 2]) * r, p[:, 1]], 1), p[:, [0, 2]])
    return t, n, uv


def render(scene, c2w, K, H, W):
    """c2w (F,4,4) OpenCV in the modelling frame, K (F,3,3) normalised -> rgb (F,H,W,3) in [0,1], z-depth (F,H,W)."""
    u, v = (np.arange(W) + 0.5) / W, (np.arange(H) + 0.5) / H
    pix = np.stack([*np.meshgrid(u, v), np.ones((H, W))], -1).reshape(-1, 3)  # (HW,3) normalised, y outer
    d_cam = np.einsum('fij,nj->fni', np.linalg.inv(K), pix)  # (F,HW,3), camera z = 1
    d = np.einsum('fij,fnj->fni', c2w[:, :3, :3], d_cam).reshape(-1, 3)  # (N,3): ray parameter t = z-depth
    o = np.repeat(c2w[:, :3, 3], H * W, 0)  # (N,3)
    rgb, t = cast_rays(scene, o, d)
    return rgb.reshape(len(c2w), H, W, 3), t.reshape(len(c2w), H, W)


def cast_rays(scene, o, d):
    """Rays o + t d (N,3) each, modelling frame -> colour (N,3) in [0,1] and the hit parameter t (N,)."""
    t, normal, uv, sid = _hit_room(o, d, scene['room'])
    for k, ob in enumerate(scene['objects']):
        tk, nk, uvk = _hit_object(o, d, ob)
        m = tk < t
        t[m], normal[m], uv[m], sid[m] = tk[m], nk[m], uvk[m], 6 + k
    textures = scene['room_textures'] + [ob['texture'] for ob in scene['objects']]
    albedo = np.zeros_like(o)
    for k in np.unique(sid):
        albedo[sid == k] = _texture(textures[k], uv[sid == k])
    p, shade = o + t[:, None] * d, np.full(len(o), scene['ambient'])
    for light in scene['lights']:
        to_l = light['pos'] - p
        dist = np.linalg.norm(to_l, axis=1)
        shade += light['power'] * np.maximum((normal * to_l).sum(1) / dist, 0) / (1 + 0.08 * dist**2)
    return (albedo * shade[:, None]).clip(0, 1), t


def _camera_path(rng, room, frames):  # a walkthrough c2w (F,4,4); None if it leaves the room or faces a wall
    s = np.linspace(0, 1, 64)
    start = np.array([rng.uniform(0.6, room[0] - 0.6), rng.uniform(1.1, 1.7), rng.uniform(0.6, room[2] - 0.6)])
    to_centre = room / 2 - start
    heading = np.arctan2(to_centre[0], to_centre[2]) + rng.uniform(-0.5, 0.5)
    yaw = heading + rng.uniform(-0.8, 0.8) * s + rng.uniform(-0.3, 0.3) * np.sin(np.pi * s * rng.uniform(1, 2))
    step = rng.uniform(1.2, 2.6) / len(s)
    pos = start + np.cumsum(np.stack([np.sin(yaw), 0 * s, np.cos(yaw)], 1) * step, 0)
    pos[:, 1] += rng.uniform(-0.1, 0.1) * np.sin(np.pi * s)
    if (pos[:, [0, 2]].min() < 0.4) or (pos[:, 0].max() > room[0] - 0.4) or (pos[:, 2].max() > room[2] - 0.4):
        return None
    look_yaw = yaw + rng.uniform(-0.25, 0.25) * np.sin(2 * np.pi * s * rng.uniform(0.3, 1) + rng.uniform(0, 6))
    pitch = rng.uniform(-0.2, 0.05) + rng.uniform(-0.08, 0.08) * np.sin(2 * np.pi * s * rng.uniform(0.3, 1))
    idx = np.linspace(0, len(s) - 1, frames)

    def interp(x):  # (64, n) path samples -> (frames, n)
        return np.stack([np.interp(idx, np.arange(len(s)), x[:, j]) for j in range(x.shape[1])], 1)

    pos, look_yaw, pitch = interp(pos), interp(look_yaw[:, None])[:, 0], interp(pitch[:, None])[:, 0]
    fwd = np.stack([np.cos(pitch) * np.sin(look_yaw), np.sin(pitch), np.cos(pitch) * np.cos(look_yaw)], 1)
    right = np.cross([0.0, -1.0, 0.0], fwd)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    c2w[:, :3, :3] = np.stack([right, np.cross(fwd, right), fwd], 2)  # columns x right, y down, z forward
    c2w[:, :3, 3] = pos
    ahead = _hit_room(pos, fwd, room)[0]  # keep a view into the room, not into a nearby wall
    return c2w if ahead.min() > 1.8 else None


def _random_objects(rng, room, path, palette):  # 5..10 objects on the floor, clear of the path and of each other
    objects, placed, n = [], [], rng.integers(5, 11)  # placed: (x, z, footprint radius)
    for _ in range(80):
        if len(objects) >= n:
            break
        kind = rng.choice(['box', 'box', 'sphere', 'cylinder'])
        if kind == 'box':
            half = rng.uniform([0.2, 0.2, 0.2], [0.7, 0.8, 0.7])
            ob, foot, y = {'half': half, 'yaw': rng.uniform(0, np.pi)}, np.hypot(half[0], half[2]), half[1]
        elif kind == 'sphere':
            ob = {'radius': rng.uniform(0.2, 0.55)}
            foot, y = ob['radius'], ob['radius']
        else:
            ob = {'radius': rng.uniform(0.15, 0.4), 'height': rng.uniform(0.4, 2.2)}
            foot, y = ob['radius'], 0.0
        x, z = rng.uniform(foot + 0.05, room[0] - foot - 0.05), rng.uniform(foot + 0.05, room[2] - foot - 0.05)
        if np.hypot(path[:, 0] - x, path[:, 2] - z).min() < foot + 0.45 or any(
            np.hypot(x - px, z - pz) < foot + pr + 0.05 for px, pz, pr in placed
        ):
            continue
        placed.append((x, z, foot))
        objects.append(
            {
                **ob,
                'kind': kind,
                'center': np.array([x, y, z]),
                'texture': _random_texture(rng, rng.choice(list(PALETTES)) if rng.random() < 0.5 else palette),
            }
        )
    return objects


def synth_scene(seed, frames=24, size=112):
    """Scene `seed` (an int or ints) -> {'images' (F,H,W,3) uint8, 'depths' (F,H,W), 'c2w' (F,4,4), 'K', 'scene'}."""
    rng = np.random.default_rng(seed)
    room, c2w = np.array([rng.uniform(4, 7), rng.uniform(2.5, 3.2), rng.uniform(4, 7)]), None
    while c2w is None:
        c2w = _camera_path(rng, room, frames)
    palette = rng.choice(list(PALETTES))
    floor, ceiling, wall, accent = (_random_texture(rng, palette) for _ in range(4))
    walls = [wall, wall, wall, wall]
    walls[rng.integers(4)] = accent
    scene = {
        'room': room,
        'room_textures': [floor, ceiling] + walls,
        'ambient': rng.uniform(0.3, 0.45),
        'objects': _random_objects(rng, room, c2w[:, :3, 3], palette),
        'lights': [
            {
                'pos': np.array([rng.uniform(0.5, room[0] - 0.5), room[1] - 0.2, rng.uniform(0.5, room[2] - 0.5)]),
                'power': rng.uniform(0.6, 1.0),
            }
            for _ in range(rng.integers(1, 3))
        ],
    }
    f = rng.uniform(0.55, 0.85)
    K = np.tile(np.array([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]), (frames, 1, 1))
    c2w, K = c2w.astype(np.float32).astype(np.float64), K.astype(np.float32).astype(np.float64)  # exact after storing
    rgb, depth = render(scene, c2w, K, size, size)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])  # 180 degrees about x: the y-up modelling frame -> a y-down world
    return {
        'images': (rgb * 255).round().astype(np.uint8),
        'depths': depth.astype(np.float32),
        'c2w': torch.from_numpy(flip @ c2w).float(),
        'K': torch.from_numpy(K).float(),
        'scene': scene,
    }


def eval_window(rng, frames, views=8):
    """The paper's protocol on one clip: context = first and last frame of a views-frame window, targets between."""
    stride = max(1, min(3, (frames - 1) // (views - 1)))
    span = min(stride * (views - 1), frames - 1)
    start = int(rng.integers(0, frames - span))
    idx = sorted({start + round(k * span / (views - 1)) for k in range(views)})
    return {'context': [idx[0], idx[-1]], 'target': idx[1:-1]}


# ----------------------------------------------------------- writing: the Re10K chunk layout
def encode_jpeg(image, quality=90):  # (3,H,W) float [0,1] or (H,W,3) uint8 array -> JPEG bytes
    if torch.is_tensor(image):
        image = (image.clamp(0, 1) * 255).round().byte()
        image = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=quality)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)  # (bytes,) uint8


def camera_rows(c2w, K):  # c2w (V,4,4), K (V,3,3) -> Re10K camera rows (V,18): fx fy cx cy, 0 0, w2c
    K = K.double()
    w2c = cameras.c2w_to_w2c(c2w.double())
    intrinsics = torch.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], 1)
    zeros = torch.zeros(len(K), 2, dtype=torch.float64)
    rows = torch.cat([intrinsics, zeros, w2c[:, :3].reshape(-1, 12)], 1)
    return rows.float()


def write_re10k_chunk(path, scenes, quality=90):
    """Scenes {'key', 'images' (V frames), 'c2w', 'K', 'timestamps', 'depths'?, 'url'?} -> a chunk."""
    rows = []
    for s in scenes:
        images = s['images']
        if not isinstance(images, list):  # frames to encode
            images = [encode_jpeg(im, quality) for im in images]
        row = {
            'key': s['key'],
            'url': s.get('url', ''),
            'timestamps': torch.as_tensor(s['timestamps']).long(),
            'cameras': camera_rows(s['c2w'], s['K']),
            'images': images,
        }
        if s.get('depths') is not None:
            row['depths'] = torch.as_tensor(s['depths']).half()
        rows.append(row)
    torch.save(rows, path)


def write_synth(out, n_train, n_test, frames=24, size=112, seed=0, per_chunk=8, quality=90):
    """Render the synthetic set into out/{train,test}/*.torch + index.json, out/test/eval_index.json."""
    for split_id, (split, n) in enumerate([('train', n_train), ('test', n_test)]):
        if n == 0:  # e.g. sample.py renders only the test split
            continue
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        index = {}
        evals = {}
        bar = cli.Progress(f'rendering {split} scene', n)
        for c in range(0, n, per_chunk):
            name = f'{c // per_chunk:06d}.torch'
            chunk = []
            for i in range(c, min(c + per_chunk, n)):
                key = f'synth_{split}_{i:05d}'
                scene = synth_scene([seed, split_id, i], frames, size)
                stamps = torch.arange(frames) * 33333  # microseconds at 30 fps
                chunk.append({**scene, 'key': key, 'url': 'synthetic', 'timestamps': stamps})
                evals[key] = eval_window(np.random.default_rng([seed, 2, i]), frames)
                index[key] = name
                bar.step()
            write_re10k_chunk(os.path.join(folder, name), chunk, quality)
        with open(os.path.join(folder, 'index.json'), 'w') as f:
            json.dump(index, f)
        if split == 'test':
            with open(os.path.join(folder, 'eval_index.json'), 'w') as f:
                json.dump(evals, f)
