"""synth.py: the synthetic indoor scenes that are gld's embedded default data, ray cast in numpy, and
the writer of the Re10K chunk layout that stores them (data.py reads it; `python data.py synth`).

Textured box rooms with boxes, spheres and cylinders, Lambertian point lights, smooth walkthrough
camera paths, exact cameras and metric z-depth; a scene is a function of its seed. Modelling frame:
y up, floor y = 0; the stored world is turned 180 degrees about x (y down, as OpenCV worlds).
Shape legend: H W image, N rays/points, F frames.
"""

import io
import json
import os

import numpy as np
import torch
from PIL import Image

import cameras
import cli

# five RGB colours in [0, 1] per palette; a texture mixes two of one palette
PALETTES = {
    'warm': [(0.86, 0.76, 0.60), (0.62, 0.42, 0.26), (0.92, 0.86, 0.76), (0.72, 0.32, 0.22), (0.45, 0.30, 0.20)],
    'cool': [(0.56, 0.66, 0.76), (0.30, 0.40, 0.56), (0.82, 0.86, 0.90), (0.22, 0.30, 0.36), (0.60, 0.72, 0.66)],
    'pastel': [(0.96, 0.80, 0.82), (0.80, 0.92, 0.84), (0.82, 0.84, 0.96), (0.98, 0.94, 0.78), (0.88, 0.80, 0.94)],
    'vivid': [(0.90, 0.20, 0.20), (0.20, 0.50, 0.90), (0.95, 0.75, 0.10), (0.20, 0.70, 0.35), (0.60, 0.25, 0.75)],
    'earth': [(0.50, 0.42, 0.30), (0.34, 0.40, 0.24), (0.70, 0.62, 0.48), (0.26, 0.20, 0.16), (0.80, 0.74, 0.64)],
}
TEXTURE_KINDS = ('checker', 'stripes', 'noise', 'marble', 'bricks', 'gradient')
# the kinds of object, boxes twice as likely as the others
OBJECT_KINDS = ['box', 'box', 'sphere', 'cylinder']
# a ray parameter below this is the ray's own surface, not a hit
T_MIN = 1e-6
# the surface coordinates (u, v) on a face normal to x, y, z
FACE_UV = np.array([[2, 1], [0, 2], [0, 1]])


# ----------------------------------------------------------------------------------------- textures
def _random_texture(rng, palette):
    """Two jittered colours of `palette` and a pattern: its kind, scale in metres, angle, noise grid."""
    picks = rng.choice(5, 2, replace=False)
    jitter = rng.normal(0, 0.05, (2, 3))
    colours = np.array(PALETTES[palette])[picks] + jitter
    return {
        'kind': rng.choice(TEXTURE_KINDS),
        'c1': colours[0].clip(0, 1),
        'c2': colours[1].clip(0, 1),
        'scale': rng.uniform(0.15, 0.6),
        'angle': rng.uniform(0, np.pi),
        'grid': rng.random((16, 16)),
    }


def _value_noise(uv, grid):
    """Smooth periodic value noise of uv (N,2) on a (n,n) random grid -> (N,) in [0,1]."""
    n = grid.shape[0]
    cell = np.floor(uv).astype(int)
    frac = uv - cell
    # smoothstep weights: the noise has no kinks at the cell borders
    f = frac * frac * (3 - 2 * frac)
    fx, fy = f.T
    x0, y0 = cell.T % n
    x1, y1 = (cell.T + 1) % n
    # the grid's values at the cell's corners
    g00 = grid[y0, x0]
    g01 = grid[y0, x1]
    g10 = grid[y1, x0]
    g11 = grid[y1, x1]
    top = g00 * (1 - fx) + g01 * fx
    bottom = g10 * (1 - fx) + g11 * fx
    return top * (1 - fy) + bottom * fy


def _fbm(uv, grid, octaves=3):
    """Fractal noise in [0,1]: `octaves` of value noise, each of twice the frequency, half the weight."""
    total = 0
    for k in range(octaves):
        octave = _value_noise(uv * 2**k + 7.3 * k, grid)
        total = total + 0.5**k * octave
    # the sum of the weights 1, 1/2, 1/4, ...
    return total / (2 - 0.5 ** (octaves - 1))


def _texture(texture, uv):
    """Albedo (N,3) of the surface coordinates uv (N,2), in metres."""
    kind = texture['kind']
    scale = texture['scale']
    angle = texture['angle']
    grid = texture['grid']
    u, v = uv.T
    # the coordinate across stripes, in stripe widths
    across = (u * np.cos(angle) + v * np.sin(angle)) / scale
    # mix: 0 is colour c1, 1 is colour c2
    if kind == 'checker':
        column = np.floor(u / scale)
        row = np.floor(v / scale)
        mix = (column + row) % 2
    elif kind == 'stripes':
        mix = (across % 1 < 0.5).astype(float)
    elif kind == 'noise':
        mix = _fbm(uv / scale * 2, grid)
    elif kind == 'marble':
        veins = 6 * _fbm(uv / scale, grid)
        mix = 0.5 + 0.5 * np.sin(2 * across + veins)
    elif kind == 'bricks':
        # bricks 2 scale x 1 scale, every other row shifted by half a brick
        row = np.floor(v / scale)
        along = u / (2 * scale) + 0.5 * (row % 2)
        mortar = (along % 1 < 0.06) | (v / scale % 1 < 0.1)
        brick = np.stack([np.floor(along), row], 1)
        # a shade per brick
        shade = _value_noise(brick * 3.1, grid)
        mix = np.where(mortar, 1.0, 0.3 * shade)
    else:
        # a gradient with a little noise
        ramp = 0.5 + 0.5 * np.tanh(across / 4)
        mix = ramp * 0.85 + 0.15 * _fbm(uv / scale, grid)
    mix = mix[:, None]
    return texture['c1'] * (1 - mix) + texture['c2'] * mix


# -------------------------------------------------------------------------------------- ray casting
def _hit_room(o, d, size):
    """Rays o + t d (N,3) inside the room [0, size] -> where they leave it: t (N,), the inward
    normal (N,3), uv (N,2) and the face (N,) (0 floor, 1 ceiling, 2..5 walls)."""
    rays = np.arange(len(o))
    with np.errstate(divide='ignore', invalid='ignore'):
        # (N,3) the distance to the wall that each axis moves towards
        t_high = (size - o) / d
        t_low = -o / d
        t_axis = np.where(d > 0, t_high, t_low)
    ahead = np.isfinite(t_axis) & (t_axis > 0)
    t_axis = np.where(ahead, t_axis, np.inf)
    axis = t_axis.argmin(1)
    t = t_axis[rays, axis]
    positive = d[rays, axis] > 0
    # the faces normal to x: walls 2 and 3, to y: floor 0 and ceiling 1, to z: walls 4 and 5
    face = np.array([2, 0, 4])[axis] + positive
    normal = np.zeros_like(o)
    normal[rays, axis] = np.where(positive, -1.0, 1.0)
    p = o + t[:, None] * d
    uv = np.take_along_axis(p, FACE_UV[axis], 1)
    return t, normal, uv, face


def _hit_box(o, d, box):
    """Rays o + t d (N,3) vs a box turned by `yaw` about y -> t (N,) (inf: a miss), normal, uv."""
    N = len(o)
    rays = np.arange(N)
    half = box['half']
    cos = np.cos(box['yaw'])
    sin = np.sin(box['yaw'])
    # box -> world
    R = np.array(
        [
            [cos, 0, sin],
            [0, 1, 0],
            [-sin, 0, cos],
        ]
    )
    o_box = (o - box['center']) @ R
    d_box = d @ R
    with np.errstate(divide='ignore', invalid='ignore'):
        t1 = (-half - o_box) / d_box
        t2 = (half - o_box) / d_box
    # slabs: a ray is inside the box after entering all three and before leaving any
    t_enter = np.minimum(t1, t2)
    t_leave = np.maximum(t1, t2)
    t_near = np.nanmax(t_enter, 1)
    t_far = np.nanmin(t_leave, 1)
    hit = (t_near <= t_far) & (t_near > T_MIN)
    t = np.where(hit, t_near, np.inf)
    axis = np.nanargmax(t_enter, 1)
    normal = np.zeros((N, 3))
    normal[rays, axis] = -np.sign(d_box[rays, axis])
    t_hit = np.where(np.isfinite(t), t, 0)
    # the hit point from the box's corner
    p = o_box + t_hit[:, None] * d_box + half
    uv = np.take_along_axis(p, FACE_UV[axis], 1)
    return t, normal @ R.T, uv


def _hit_sphere(o, d, sphere):
    """Rays o + t d (N,3) vs a sphere -> t (N,) (inf: a miss), normal (N,3), uv (N,2)."""
    r = sphere['radius']
    oc = o - sphere['center']
    # |oc + t d|^2 = r^2 as a t^2 + 2 b t + c = 0
    a = (d * d).sum(1)
    b = (oc * d).sum(1)
    c = (oc * oc).sum(1) - r**2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    hit = (disc > 0) & (t > T_MIN)
    t = np.where(hit, t, np.inf)
    t_hit = np.where(np.isfinite(t), t, 0)
    normal = (oc + t_hit[:, None] * d) / r
    nx, ny, nz = normal.T
    longitude = np.arctan2(nx, nz)
    uv = np.stack([longitude * r, ny * r], 1)
    return t, normal, uv


def _hit_cylinder(o, d, cylinder):
    """Rays o + t d (N,3) vs an upright cylinder, centre at its base -> t (N,) (inf: a miss), normal, uv."""
    r = cylinder['radius']
    h = cylinder['height']
    ox, oy, oz = (o - cylinder['center']).T
    dx, dy, dz = d.T
    # the side: |o + t d|^2 = r^2 in the xz plane, as a t^2 + 2 b t + c = 0
    a = dx**2 + dz**2
    b = ox * dx + oz * dz
    c = ox**2 + oz**2 - r * r
    disc = b * b - a * c
    with np.errstate(divide='ignore', invalid='ignore'):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        # the top cap, at height h above the base
        t_top = (h - oy) / dy
    y_side = oy + t_side * dy
    within_height = (y_side >= 0) & (y_side <= h)
    on_side = (disc > 0) & (t_side > T_MIN) & within_height
    t_side = np.where(on_side, t_side, np.inf)
    t_cap = np.nan_to_num(t_top, posinf=0, neginf=0)
    x_top = ox + t_cap * dx
    z_top = oz + t_cap * dz
    on_top = (t_top > T_MIN) & (x_top**2 + z_top**2 <= r * r)
    t_top = np.where(on_top, t_top, np.inf)
    side = (t_side <= t_top)[:, None]
    t = np.minimum(t_side, t_top)
    t_hit = np.where(np.isfinite(t), t, 0)
    x = ox + t_hit * dx
    y = oy + t_hit * dy
    z = oz + t_hit * dz
    normal_side = np.stack([x / r, 0 * y, z / r], 1)
    normal = np.where(side, normal_side, [0.0, 1.0, 0.0])
    around = np.arctan2(x, z) * r
    uv_side = np.stack([around, y], 1)
    uv_top = np.stack([x, z], 1)
    uv = np.where(side, uv_side, uv_top)
    return t, normal, uv


# the ray caster of each kind of object
HIT = {
    'box': _hit_box,
    'sphere': _hit_sphere,
    'cylinder': _hit_cylinder,
}


def render(scene, c2w, K, H, W):
    """c2w (F,4,4) OpenCV, modelling frame, K (F,3,3) normalised -> rgb (F,H,W,3) in [0,1], z-depth."""
    F = len(c2w)
    u = (np.arange(W) + 0.5) / W
    v = (np.arange(H) + 0.5) / H
    # (HW,3) normalised pixel centres, y outer
    u_grid, v_grid = np.meshgrid(u, v)
    ones = np.ones((H, W))
    pixels = np.stack([u_grid, v_grid, ones], -1).reshape(-1, 3)
    # (F,HW,3) at camera z = 1: the ray parameter t is the z-depth
    d_cam = np.einsum('fij,nj->fni', np.linalg.inv(K), pixels)
    rotations = c2w[:, :3, :3]
    centres = c2w[:, :3, 3]
    d = np.einsum('fij,fnj->fni', rotations, d_cam).reshape(-1, 3)
    o = np.repeat(centres, H * W, 0)
    rgb, t = cast_rays(scene, o, d)
    images = rgb.reshape(F, H, W, 3)
    depths = t.reshape(F, H, W)
    return images, depths


def cast_rays(scene, o, d):
    """Rays o + t d (N,3), modelling frame -> colour (N,3) in [0,1] and the hit parameter t (N,)."""
    t, normal, uv, surface = _hit_room(o, d, scene['room'])
    # surfaces: the room's six faces, then the objects
    for k, ob in enumerate(scene['objects']):
        t_ob, normal_ob, uv_ob = HIT[ob['kind']](o, d, ob)
        nearer = t_ob < t
        t[nearer] = t_ob[nearer]
        normal[nearer] = normal_ob[nearer]
        uv[nearer] = uv_ob[nearer]
        surface[nearer] = 6 + k
    object_textures = [ob['texture'] for ob in scene['objects']]
    textures = scene['room_textures'] + object_textures
    albedo = np.zeros_like(o)
    for k in np.unique(surface):
        on_k = surface == k
        albedo[on_k] = _texture(textures[k], uv[on_k])
    p = o + t[:, None] * d
    shade = np.full(len(o), scene['ambient'])
    for light in scene['lights']:
        to_light = light['pos'] - p
        dist = np.linalg.norm(to_light, axis=1)
        cosine = (normal * to_light).sum(1) / dist
        facing = np.maximum(cosine, 0)
        falloff = 1 + 0.08 * dist**2
        shade += light['power'] * facing / falloff
    colour = albedo * shade[:, None]
    return colour.clip(0, 1), t


# ------------------------------------------------------------------------------------ random scenes
def _camera_path(rng, room, frames):
    """A walkthrough c2w (F,4,4); None if it leaves the room or faces a wall. Keeps the rng's order."""
    # the path at 64 points s in [0, 1]
    s = np.linspace(0, 1, 64)
    start_x = rng.uniform(0.6, room[0] - 0.6)
    start_y = rng.uniform(1.1, 1.7)
    start_z = rng.uniform(0.6, room[2] - 0.6)
    start = np.array([start_x, start_y, start_z])
    # the walk sets off roughly towards the room's centre, turns and sways
    to_centre = room / 2 - start
    towards_centre = np.arctan2(to_centre[0], to_centre[2])
    heading = towards_centre + rng.uniform(-0.5, 0.5)
    turn = rng.uniform(-0.8, 0.8)
    sway = rng.uniform(-0.3, 0.3)
    sway_cycles = rng.uniform(1, 2)
    yaw = heading + turn * s + sway * np.sin(np.pi * s * sway_cycles)
    step = rng.uniform(1.2, 2.6) / len(s)
    direction = np.stack([np.sin(yaw), 0 * s, np.cos(yaw)], 1)
    path = start + np.cumsum(direction * step, 0)
    bob = rng.uniform(-0.1, 0.1)
    path[:, 1] += bob * np.sin(np.pi * s)
    # the walk stays 0.4 from the walls
    x, _, z = path.T
    inside_x = 0.4 <= x.min() and x.max() <= room[0] - 0.4
    inside_z = 0.4 <= z.min() and z.max() <= room[2] - 0.4
    if not (inside_x and inside_z):
        return None
    # the gaze wanders about the walking direction
    glance = rng.uniform(-0.25, 0.25)
    glance_cycles = rng.uniform(0.3, 1)
    glance_phase = rng.uniform(0, 6)
    look_yaw = yaw + glance * np.sin(2 * np.pi * s * glance_cycles + glance_phase)
    tilt = rng.uniform(-0.2, 0.05)
    nod = rng.uniform(-0.08, 0.08)
    nod_cycles = rng.uniform(0.3, 1)
    pitch = tilt + nod * np.sin(2 * np.pi * s * nod_cycles)
    # the frames: evenly spaced along the path
    knots = np.arange(len(s))
    at = np.linspace(0, len(s) - 1, frames)
    resampled = [np.interp(at, knots, coordinate) for coordinate in path.T]
    pos = np.stack(resampled, 1)
    frame_yaw = np.interp(at, knots, look_yaw)
    frame_pitch = np.interp(at, knots, pitch)
    fwd_x = np.cos(frame_pitch) * np.sin(frame_yaw)
    fwd_z = np.cos(frame_pitch) * np.cos(frame_yaw)
    fwd = np.stack([fwd_x, np.sin(frame_pitch), fwd_z], 1)
    right = np.cross([0.0, -1.0, 0.0], fwd)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    # columns x right, y down, z forward
    rotation = np.stack([right, down, fwd], 2)
    c2w[:, :3, :3] = rotation
    c2w[:, :3, 3] = pos
    # keep a view into the room, not into a nearby wall
    ahead = _hit_room(pos, fwd, room)[0]
    if ahead.min() > 1.8:
        return c2w
    return None


def _random_shape(rng, kind):
    """The size of a `kind` -> (its parameters, its footprint's radius, the height of its centre)."""
    if kind == 'box':
        half = rng.uniform([0.2, 0.2, 0.2], [0.7, 0.8, 0.7])
        yaw = rng.uniform(0, np.pi)
        foot = np.hypot(half[0], half[2])
        return {'half': half, 'yaw': yaw}, foot, half[1]
    if kind == 'sphere':
        radius = rng.uniform(0.2, 0.55)
        return {'radius': radius}, radius, radius
    radius = rng.uniform(0.15, 0.4)
    height = rng.uniform(0.4, 2.2)
    # a cylinder's centre is the centre of its base, on the floor
    return {'radius': radius, 'height': height}, radius, 0.0


def _random_objects(rng, room, path, palette):
    """5..10 objects on the floor, clear of the camera path (F,3) and of each other."""
    n = rng.integers(5, 11)
    objects = []
    # (x, z, footprint radius) of each object
    placed = []
    for _ in range(80):
        if len(objects) >= n:
            break
        kind = rng.choice(OBJECT_KINDS)
        shape, foot, y = _random_shape(rng, kind)
        x = rng.uniform(foot + 0.05, room[0] - foot - 0.05)
        z = rng.uniform(foot + 0.05, room[2] - foot - 0.05)
        path_distance = np.hypot(path[:, 0] - x, path[:, 2] - z)
        near_path = path_distance.min() < foot + 0.45
        near_other = any(np.hypot(x - px, z - pz) < foot + pr + 0.05 for px, pz, pr in placed)
        if near_path or near_other:
            continue
        placed.append((x, z, foot))
        # half the objects take colours from any palette, half from the room's
        own_palette = palette
        if rng.random() < 0.5:
            own_palette = rng.choice(list(PALETTES))
        ob = {
            **shape,
            'kind': kind,
            'center': np.array([x, y, z]),
            'texture': _random_texture(rng, own_palette),
        }
        objects.append(ob)
    return objects


def _random_light(rng, room):
    """A point light 0.2 below the ceiling, at least 0.5 from the walls."""
    x = rng.uniform(0.5, room[0] - 0.5)
    z = rng.uniform(0.5, room[2] - 0.5)
    pos = np.array([x, room[1] - 0.2, z])
    return {
        'pos': pos,
        'power': rng.uniform(0.6, 1.0),
    }


def synth_scene(seed, frames=24, size=112):
    """Scene `seed` (int or ints) -> {'images' (F,H,W,3) uint8, 'depths', 'c2w' (F,4,4), 'K', 'scene'}."""
    rng = np.random.default_rng(seed)
    width = rng.uniform(4, 7)
    height = rng.uniform(2.5, 3.2)
    length = rng.uniform(4, 7)
    # the room spans [0, room] on x, y, z
    room = np.array([width, height, length])
    c2w = None
    while c2w is None:
        c2w = _camera_path(rng, room, frames)
    palette = rng.choice(list(PALETTES))
    floor = _random_texture(rng, palette)
    ceiling = _random_texture(rng, palette)
    wall = _random_texture(rng, palette)
    accent = _random_texture(rng, palette)
    walls = [wall, wall, wall, wall]
    walls[rng.integers(4)] = accent
    ambient = rng.uniform(0.3, 0.45)
    objects = _random_objects(rng, room, c2w[:, :3, 3], palette)
    n_lights = rng.integers(1, 3)
    lights = [_random_light(rng, room) for _ in range(n_lights)]
    scene = {
        'room': room,
        'room_textures': [floor, ceiling] + walls,
        'ambient': ambient,
        'objects': objects,
        'lights': lights,
    }
    f = rng.uniform(0.55, 0.85)
    K_frame = np.array(
        [
            [f, 0, 0.5],
            [0, f, 0.5],
            [0, 0, 1],
        ]
    )
    K = np.tile(K_frame, (frames, 1, 1))
    # rounded to float32 before rendering: the stored cameras are exact
    c2w = c2w.astype(np.float32).astype(np.float64)
    K = K.astype(np.float32).astype(np.float64)
    rgb, depth = render(scene, c2w, K, size, size)
    # 180 degrees about x: the y-up modelling frame -> a y-down world
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    return {
        'images': (rgb * 255).round().astype(np.uint8),
        'depths': depth.astype(np.float32),
        'c2w': torch.from_numpy(flip @ c2w).float(),
        'K': torch.from_numpy(K).float(),
        'scene': scene,
    }


def eval_window(rng, frames, views=8):
    """The paper's protocol on a clip: context = the ends of a window of `views` frames, targets between."""
    widest = (frames - 1) // (views - 1)
    stride = max(1, min(3, widest))
    span = min(stride * (views - 1), frames - 1)
    start = int(rng.integers(0, frames - span))
    offsets = [round(k * span / (views - 1)) for k in range(views)]
    idx = sorted({start + offset for offset in offsets})
    return {
        'context': [idx[0], idx[-1]],
        'target': idx[1:-1],
    }


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
        bar = cli.progress(desc=f'rendering {split} scenes', total=n)
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
                bar.update()
            write_re10k_chunk(os.path.join(folder, name), chunk, quality)
        bar.close()
        with open(os.path.join(folder, 'index.json'), 'w') as f:
            json.dump(index, f)
        if split == 'test':
            with open(os.path.join(folder, 'eval_index.json'), 'w') as f:
                json.dump(evals, f)
