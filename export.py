"""export.py: scenes out in the formats other tools open (COLMAP, nerfstudio, PLY, GLB, MP4),
cameras in, and the given cameras checked against the photos.

COLMAP sparse/0/ (w2c as Hamilton quaternion (w, x, y, z) + t, PINHOLE in pixels) with the fused
points, nerfstudio transforms.json (OpenGL c2w, ply_file_path for splatfacto), points.ply,
scene.glb (the points and the camera frustums, via trimesh), video.mp4; units: those of the
cameras sampling used. References: COLMAP, nerfstudio, PLY and glTF format docs. Shape legend:
V views, H W image, N points.
"""

import argparse
import json
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import cameras
import cli
import data
import metrics

# sample.py's --export: the choices, all of them by default
FORMATS = ('ply', 'colmap', 'nerfstudio', 'glb')
DEFAULT_FORMATS = FORMATS
# the units of a scene, by the source of its cameras
UNITS = {
    'poses': "the source cameras' units (dataset poses or --cameras); DA3 depth rescaled to them",
    'da3': "DA3's relative depth scale (cameras estimated by DA3: no --cameras given)",
}
# draw_topdown's camera colours
SOURCE_RGB = (25, 114, 255)
TARGET_RGB = (255, 114, 12)


def parse_formats(text):
    """'ply,colmap' -> ['ply', 'colmap'] ('' -> []): sample.py's --export type."""
    formats = [f.strip() for f in text.split(',') if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        choices = ','.join(FORMATS)
        raise argparse.ArgumentTypeError(f'unknown export format(s) {unknown}; choose from {choices}')
    return formats


def view_names(V, n_src):
    """V views' image names, sources first, zero-padded: sorting by name keeps the view order."""
    digits = max(3, len(str(V)))
    sources = [f'source_{v:0{digits}d}.png' for v in range(min(n_src, V))]
    targets = [f'target_{v:0{digits}d}.png' for v in range(V - n_src)]
    return sources + targets


def inverted_in_opengl_axes(c2w):
    """The cameras whose OpenGL-axes matrices (transforms.json, the release's pose) are the
    inverses of c2w's."""
    c2w_gl = cameras.opengl_to_opencv(c2w)
    return cameras.opengl_to_opencv(cameras.rigid_inverse(c2w_gl))


# the common mistakes in given cameras: name -> (what the cameras look like then, the fix, the
# change that undoes it)
CAMERA_MISTAKES = {
    'inverted': (
        'world-to-camera matrices given as camera-to-world',
        'invert them',
        cameras.rigid_inverse,
    ),
    'inverted in OpenGL axes': (
        "world-to-camera matrices with OpenGL axes (transforms.json, the GLD release's pose) given as camera-to-world",
        'invert them',
        inverted_in_opengl_axes,
    ),
    'with OpenGL/OpenCV axes swapped': (
        'OpenGL camera axes (y up, z back) where OpenCV ones (y down, z forward) belong, or the reverse',
        'negate their y and z axes (transforms.json holds OpenGL axes; COLMAP and .npz OpenCV)',
        cameras.opengl_to_opencv,
    ),
}


# check_poses's search of the depth scale (metrics.fit_scale's searches), coarser
CHECK_SEARCH = ((-3, 3, 61), (-0.1, 0.1, 11))


def check_poses(images, depth, c2w, K, n_src, side=64, ratio=1.5, searches=CHECK_SEARCH):
    """The sources' photo error (each at its best depth scale, on images shrunk to `side` px, a
    coarser search) under the given cameras and under each CAMERA_MISTAKES undone -> ({'given': e,
    name: e, ...}, a warning line where one of those fits `ratio` times better, else None)."""
    shrink = min(1.0, side / max(images.shape[-2:]))
    small = F.interpolate(images[:n_src], scale_factor=shrink, mode='area')
    H, W = small.shape[-2:]
    small_depth = F.interpolate(depth[:n_src, None], size=(H, W), mode='area')[:, 0]
    errors = {'given': metrics.fit_scale(small, small_depth, c2w, K, n_src, searches)[1]}
    for name, (_, _, undo) in CAMERA_MISTAKES.items():
        errors[name] = metrics.fit_scale(small, small_depth, undo(c2w), K, n_src, searches)[1]
    best = min(CAMERA_MISTAKES, key=errors.get)
    given = errors['given']
    if errors[best] * ratio > given:
        return errors, None
    looks, fix, _ = CAMERA_MISTAKES[best]
    worse = f'{given / errors[best]:.1f}x worse (photo error {given:.3f})'
    than = f'the same cameras {best} ({errors[best]:.3f})'
    warning = f'the source photos fit the given cameras {worse} than {than}: they look like {looks}; {fix}'
    return errors, warning


def fuse_points(images, depth, conf, c2w, K, keep=0.7):
    """The `keep` most confident pixels unprojected -> {'xyz' (N,3), 'rgb', 'view', 'uv' (N,2)}."""
    # (V,H,W,3)
    points = cameras.depth_to_points(depth.double(), c2w.double(), K.double())
    threshold = conf.flatten().quantile(1 - keep)
    mask = conf >= threshold
    # row-major: view, then y, then x
    view, y, x = mask.nonzero(as_tuple=True)
    colours = images.permute(0, 2, 3, 1)[mask].clamp(0, 1)
    # rounded as to_uint8 rounds
    rgb = (colours * 255 + 0.5).to(torch.uint8)
    uv = torch.stack([x, y], -1).double() + 0.5
    return {
        'xyz': points[mask],
        'rgb': rgb,
        'view': view,
        'uv': uv,
    }


# ---------------------------------------------------------------------------- images, video and PLY
def to_uint8(img):
    """(3,H,W) in [0,1] -> (H,W,3) uint8 numpy."""
    clamped = img.detach().clamp(0, 1)
    hwc = clamped.permute(1, 2, 0).cpu().numpy()
    return (hwc * 255 + 0.5).astype(np.uint8)


def save_image(img, path):
    """(3,H,W) in [0,1] -> PNG (or the format Pillow infers from the name)."""
    Image.fromarray(to_uint8(img)).save(path)


def write_video(frames, stem, fps=8):
    """(3,H,W) frames in [0,1] -> stem.mp4 (H.264), or stem.gif without imageio-ffmpeg: its name."""
    pictures = [to_uint8(f) for f in frames]
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        # raises when the bundled binary is missing
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        print(f'note: no MP4 ({e}); wrote {stem}.gif instead (pip install imageio imageio-ffmpeg)')
        gif = [Image.fromarray(p) for p in pictures]
        duration = int(1000 / fps)
        gif[0].save(stem + '.gif', save_all=True, append_images=gif[1:], duration=duration, loop=0)
        return stem + '.gif'
    # yuv420p plays everywhere but needs even sides: macro_block_size 2 keeps our multiples of 14
    imageio.mimsave(stem + '.mp4', pictures, fps=fps, macro_block_size=2, pixelformat='yuv420p')
    return stem + '.mp4'


# a PLY vertex: (name, numpy type, PLY type) of each property
PLY_PROPERTIES = [
    ('x', '<f4', 'float'),
    ('y', '<f4', 'float'),
    ('z', '<f4', 'float'),
    ('red', 'u1', 'uchar'),
    ('green', 'u1', 'uchar'),
    ('blue', 'u1', 'uchar'),
]


def write_ply(path, xyz, rgb, comments=()):
    """Binary little-endian PLY: xyz (N,3), rgb (N,3) in [0,1] or uint8; `comments` in the header."""
    points = torch.as_tensor(xyz).reshape(-1, 3).float().cpu().numpy()
    colours = torch.as_tensor(rgb).reshape(-1, 3)
    if colours.dtype != torch.uint8:
        colours = (colours.float().clamp(0, 1) * 255).round()
    colours = colours.cpu().numpy()
    dtype = [(name, np_type) for name, np_type, _ in PLY_PROPERTIES]
    vertices = np.rec.fromarrays([*points.T, *colours.T], dtype=dtype)
    lines = ['ply', 'format binary_little_endian 1.0']
    lines += [f'comment {c}' for c in comments]
    lines.append(f'element vertex {len(vertices)}')
    lines += [f'property {ply_type} {name}' for name, _, ply_type in PLY_PROPERTIES]
    lines.append('end_header')
    header = ''.join(line + '\n' for line in lines)
    with open(path, 'wb') as f:
        f.write(header.encode('ascii') + vertices.tobytes())


# a frustum's lines: from its apex (vertex 0) to the image corners (1..4), and round the image
FRUSTUM_LINES = ([0, 1], [0, 2], [0, 3], [0, 4], [1, 2, 3, 4, 1])


def write_glb(path, points, c2w, K, H, W, names):
    """scene.glb (trimesh, as DA3 writes it): the points with their colours and a wireframe
    frustum per camera named like its image (sources blue, targets orange; its apex, the camera
    centre, ends 4 of its 8 lines), in the PLY's coordinates."""
    import trimesh  # only this writer needs it

    scene = trimesh.Scene()
    cloud = trimesh.PointCloud(points['xyz'].numpy(), colors=points['rgb'].numpy())
    scene.add_geometry(cloud, geom_name='points', node_name='points')
    centres = c2w[:, :3, 3].double()
    rotations = c2w[:, :3, :3].double()
    # frustums a tenth of the points' median distance from the first camera deep
    length = 0.1 * float((points['xyz'] - centres[0]).norm(dim=-1).median())
    corners = torch.tensor([[0, 0, 1], [W, 0, 1], [W, H, 1], [0, H, 1]], dtype=torch.float64)
    Kpix = cameras.K_to_pixels(K.double(), H, W)
    for v, name in enumerate(names):
        rays = corners @ torch.linalg.inv(Kpix[v]).T * length  # (4,3) at z = length
        ends = rays @ rotations[v].T + centres[v]
        vertices = torch.cat([centres[v][None], ends]).numpy()
        # new lines for each frustum: trimesh renumbers them in place
        lines = [trimesh.path.entities.Line(ends) for ends in FRUSTUM_LINES]
        rgb = SOURCE_RGB if name.startswith('source') else TARGET_RGB
        colours = np.array([[*rgb, 255]] * len(lines), dtype=np.uint8)
        frustum = trimesh.path.Path3D(entities=lines, vertices=vertices, colors=colours)
        stem = name.removesuffix('.png')
        scene.add_geometry(frustum, geom_name=stem, node_name=stem)
    scene.export(path)


# ------------------------------------------------------------------------------------------- COLMAP
# COLMAP camera models, id: (name, number of params)
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
# the models whose params start fx fy cx cy; the other perspective ones start f cx cy
COLMAP_TWO_FOCALS = ('PINHOLE', 'OPENCV', 'FULL_OPENCV')
# a row of points3D.bin
COLMAP_POINT3D = [
    ('id', '<u8'),
    ('xyz', '<f8', 3),
    ('rgb', 'u1', 3),
    ('error', '<f8'),
    ('track_length', '<u8'),
    ('image_id', '<i4'),
    ('point2D_idx', '<i4'),
]
# a 2D point of an image in images.bin
COLMAP_POINT2D = [('xy', '<f8', 2), ('point3D_id', '<i8')]


def write_colmap(folder, c2w, K, H, W, names, points):
    """Binary COLMAP model: a PINHOLE camera per view (id view + 1); each point seen once, at its pixel."""
    os.makedirs(folder, exist_ok=True)
    V = len(names)
    N = len(points['view'])
    w2c = cameras.c2w_to_w2c(c2w.double())
    qvec = cameras.rotmat_to_quat(w2c[:, :3, :3])
    tvec = w2c[:, :3, 3]
    # COLMAP, like us, puts pixel centres at +0.5: no offset
    Kpix = cameras.K_to_pixels(K.double(), H, W)
    # PINHOLE: fx fy cx cy
    params = Kpix[:, [0, 1, 0, 1], [0, 1, 2, 2]]
    view = points['view'].numpy()
    # the points of view v are first[v]:first[v + 1]
    first = np.searchsorted(view, np.arange(V + 1))
    point_ids = np.arange(1, N + 1)
    # the 2D points of all images, by image
    points2D = np.empty(N, dtype=COLMAP_POINT2D)
    points2D['xy'] = points['uv'].numpy()
    points2D['point3D_id'] = point_ids
    points3D = np.empty(N, dtype=COLMAP_POINT3D)
    points3D['id'] = point_ids
    points3D['xyz'] = points['xyz'].numpy()
    points3D['rgb'] = points['rgb'].numpy()
    points3D['error'] = 0.0
    points3D['track_length'] = 1
    points3D['image_id'] = view + 1
    # each point's index among its image's 2D points
    points3D['point2D_idx'] = np.arange(N) - first[view]
    camera_rows = []
    image_rows = []
    for v in range(V):
        # model 1: PINHOLE
        camera = struct.pack('<iiQQ4d', v + 1, 1, W, H, *params[v].tolist())
        camera_rows.append(camera)
        quaternion = qvec[v].tolist()
        translation = tvec[v].tolist()
        # image id, pose, camera id
        pose = struct.pack('<I4d3dI', v + 1, *quaternion, *translation, v + 1)
        image_name = names[v].encode() + b'\0'
        seen = points2D[first[v] : first[v + 1]]
        n_seen = struct.pack('<Q', first[v + 1] - first[v])
        image_rows.append(pose + image_name + n_seen + seen.tobytes())
    tables = [
        ('cameras.bin', V, camera_rows),
        ('images.bin', V, image_rows),
        ('points3D.bin', N, [points3D.tobytes()]),
    ]
    for filename, count, rows in tables:
        # a table: its row count (uint64), then the rows
        with open(os.path.join(folder, filename), 'wb') as f:
            f.write(struct.pack('<Q', count) + b''.join(rows))


def _read_colmap_bin(folder):
    """cameras.bin, images.bin -> {camera id: (model, W, H, params)}, [(qvec, tvec, camera id, name)]."""
    cams = {}
    images = []
    with open(os.path.join(folder, 'cameras.bin'), 'rb') as f:
        n_cams = struct.unpack('<Q', f.read(8))[0]
        for _ in range(n_cams):
            cid, model_id, W, H = struct.unpack('<iiQQ', f.read(24))
            model, n_params = COLMAP_MODELS[model_id]
            params = struct.unpack(f'<{n_params}d', f.read(8 * n_params))
            cams[cid] = (model, W, H, params)
    with open(os.path.join(folder, 'images.bin'), 'rb') as f:
        n_images = struct.unpack('<Q', f.read(8))[0]
        for _ in range(n_images):
            row = struct.unpack('<I4d3dI', f.read(64))
            # the name: bytes up to a NUL
            name = b''.join(iter(lambda: f.read(1), b'\0')).decode()
            # skip the 2D points: x, y (doubles), point3D id (int64)
            n_points = struct.unpack('<Q', f.read(8))[0]
            f.seek(24 * n_points, 1)
            images.append((row[1:5], row[5:8], row[8], name))
    return cams, images


def _read_colmap_txt(folder):
    """cameras.txt and images.txt -> the same as _read_colmap_bin."""
    cams = {}
    images = []
    with open(os.path.join(folder, 'cameras.txt')) as f:
        for line in f:
            if line.strip() and not line.startswith('#'):
                cid, model, W, H, *params = line.split()
                cams[int(cid)] = (model, int(W), int(H), tuple(map(float, params)))
    with open(os.path.join(folder, 'images.txt')) as f:
        lines = (line for line in f if not line.startswith('#'))
        # two lines per image, the second (its 2D points) possibly empty
        for head in lines:
            if head.strip():
                _, *pose, cid, name = head.split()
                qvec = tuple(map(float, pose[:4]))
                tvec = tuple(map(float, pose[4:]))
                images.append((qvec, tvec, int(cid), name))
                next(lines, None)
    return cams, images


def read_colmap(folder):
    """COLMAP model (.bin, .txt) -> {'c2w', 'Kpix' (pixels), 'sizes' [(H, W)], 'names'}, undistorted."""
    if os.path.isfile(os.path.join(folder, 'cameras.bin')):
        cams, images = _read_colmap_bin(folder)
    else:
        cams, images = _read_colmap_txt(folder)
    if not images:
        raise cli.UserError(f'{folder}: the COLMAP model holds no images')
    Kpix = []
    sizes = []
    for _, _, cid, name in images:
        model, W, H, params = cams[cid]
        if model not in COLMAP_PERSPECTIVE:
            raise cli.UserError(
                f'{folder}: camera {cid} of {name} is a {model} camera; undistort the model to '
                'PINHOLE first (colmap image_undistorter)'
            )
        if model not in ('PINHOLE', 'SIMPLE_PINHOLE'):
            print(f'note: {folder}: camera {cid} is {model}; its lens distortion is ignored (undistort for exact rays)')
        if model in COLMAP_TWO_FOCALS:
            fx, fy, cx, cy = params[:4]
        else:
            fx, cx, cy = params[:3]
            fy = fx
        K_view = [
            [fx, 0, cx],
            [0, fy, cy],
            [0, 0, 1],
        ]
        Kpix.append(K_view)
        sizes.append((H, W))
    qvecs, tvecs, _, names = zip(*images)
    qvec = torch.tensor(qvecs, dtype=torch.float64)
    tvec = torch.tensor(tvecs, dtype=torch.float64)
    w2c = cameras.make_pose(cameras.quat_to_rotmat(qvec), tvec)
    return {
        'c2w': cameras.w2c_to_c2w(w2c),
        'Kpix': torch.tensor(Kpix, dtype=torch.float64),
        'sizes': sizes,
        'names': list(names),
    }


# ----------------- nerfstudio, and cameras in: a user's photos' formats -> OpenCV c2w, normalised K
def write_transforms(path, c2w, K, H, W, files, is_source, extra=None):
    """nerfstudio transforms.json, `files` relative to its folder; `extra` adds top-level keys."""
    Kpix = cameras.K_to_pixels(K.double(), H, W)
    # OpenGL c2w: the flip is its own inverse
    c2w_gl = cameras.opengl_to_opencv(c2w.double())
    frames = []
    for v in range(len(files)):
        frame = {
            'file_path': files[v],
            'transform_matrix': c2w_gl[v].tolist(),
            'fl_x': float(Kpix[v, 0, 0]),
            'fl_y': float(Kpix[v, 1, 1]),
            'cx': float(Kpix[v, 0, 2]),
            'cy': float(Kpix[v, 1, 2]),
            'is_source': bool(is_source[v]),
        }
        frames.append(frame)
    transforms = {
        'camera_model': 'OPENCV',
        'w': W,
        'h': H,
        **(extra or {}),
        'frames': frames,
    }
    with open(path, 'w') as f:
        json.dump(transforms, f, indent=1)


CAMERA_FORMATS = (
    'a COLMAP model folder (sparse/0, .bin or .txt), a nerfstudio transforms.json, or a folder of '
    'per-frame NAME.npz (c2w: 4x4 OpenCV camera-to-world, K: 3x3 in pixels, H and W optional; '
    "or the GLD release's demo frames: pose, intrinsic)"
)
# the arrays of a per-frame .npz: ours, then the GLD release's demo frames
# (demo/<scene>/nerfstudio/images_4/)
NPZ_LAYOUTS = (('c2w', 'K'), ('pose', 'intrinsic'))


def _find_colmap(path):
    """The COLMAP model folder at path, path/sparse/0 or path/sparse; None if there is none."""
    for folder in (path, os.path.join(path, 'sparse', '0'), os.path.join(path, 'sparse')):
        for ext in ('bin', 'txt'):
            if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, f'cameras.{ext}')):
                return folder
    return None


def _cameras_from_colmap(sparse):
    """read_cameras of a COLMAP model folder; the photos are in images/ beside its sparse/."""
    model = read_colmap(sparse)
    sizes = sorted(set(model['sizes']))
    if len(sizes) > 1:
        raise cli.UserError(f'{sparse}: cameras of different image sizes {sizes}; give photos of one size')
    H, W = sizes[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(sparse)))
    return {
        'c2w': model['c2w'],
        'K': cameras.K_to_normalized(model['Kpix'], H, W),
        'names': model['names'],
        'files': [os.path.join(root, 'images', name) for name in model['names']],
        'size': (H, W),
        'format': 'COLMAP',
    }


def _cameras_from_npz(folder, image_size):
    """read_cameras of a folder of per-frame NAME.npz in a NPZ_LAYOUTS. The release's pose is
    camera-to-world with OpenGL camera axes: its reader (src/cut3r_data/datasets/dl3dv.py,
    opengl_to_opencv on by default) negates y and z."""
    c2w = []
    K = []
    names = []
    size = None
    for f in sorted(f for f in os.listdir(folder) if f.endswith('.npz')):
        arrays = np.load(os.path.join(folder, f))
        size = image_size
        if 'H' in arrays and 'W' in arrays:
            size = (int(arrays['H']), int(arrays['W']))
        layout = [keys for keys in NPZ_LAYOUTS if set(keys) <= set(arrays.files)]
        if not layout or size is None:
            needs = 'c2w (4x4 OpenCV camera-to-world), K (3x3, pixels)'
            release = "(or the GLD release's pose, intrinsic)"
            size_from = 'H, W (the image size of K) where no photo states it'
            raise cli.UserError(
                f'{os.path.join(folder, f)}: needs arrays {needs} {release} and {size_from}; it has '
                f'{sorted(arrays.files)}: add H and W or the missing arrays'
            )
        pose_key, K_key = layout[0]
        pose = torch.as_tensor(arrays[pose_key], dtype=torch.float64)
        if pose_key == 'pose':  # the release's OpenGL camera axes -> OpenCV
            pose = cameras.opengl_to_opencv(pose)
        Kpix = torch.as_tensor(arrays[K_key], dtype=torch.float64)
        c2w.append(pose)
        K.append(cameras.K_to_normalized(Kpix, *size))
        names.append(f[: -len('.npz')])
    return {
        'c2w': torch.stack(c2w),
        'K': torch.stack(K),
        'names': names,
        'files': [None] * len(names),
        'size': size,
        'format': 'npz',
    }


def read_cameras(path, image_size=None):
    """Cameras in a CAMERA_FORMATS -> {'c2w', 'K', 'names', 'files', 'size' (H, W) or None, 'format'}."""
    sparse = _find_colmap(path)
    json_path = path if path.endswith('.json') else os.path.join(path, 'transforms.json')
    if sparse:
        found = _cameras_from_colmap(sparse)
    elif path.endswith('.json') or os.path.isfile(json_path):
        # the nerfstudio reader that datasets use too
        transforms = data.read_transforms(json_path)
        folder = os.path.dirname(os.path.abspath(json_path))
        found = {
            'c2w': transforms['c2w'],
            'K': transforms['K'],
            'names': transforms['files'],
            'files': [os.path.join(folder, f) for f in transforms['files']],
            'size': None,
            'format': 'nerfstudio',
        }
    elif os.path.isdir(path) and any(f.endswith('.npz') for f in os.listdir(path)):
        found = _cameras_from_npz(path, image_size)
    else:
        raise cli.UserError(f'{path}: no cameras found; pass {CAMERA_FORMATS}')
    found['c2w'] = found['c2w'].float()
    found['K'] = found['K'].float()
    cameras.check_cameras(found['c2w'], found['K'], path)
    return found


# -------------------------------------------------------------- the whole scene, and pictures of it
def draw_topdown(path, c2w_src, c2w_tgt, size=256, title=''):
    """Top-down PNG of the source (blue) and target (orange, joined, first ringed) cameras."""
    up = -c2w_src[0, :3, 1].double()
    right = c2w_src[0, :3, 0].double()
    # the horizontal viewing direction of the first source
    fwd = torch.linalg.cross(up, right)

    both = torch.cat([c2w_src.double(), c2w_tgt.double()])
    positions = both[:, :3, 3]
    axes = both[:, :3, 2]
    # (V,2) page coordinates: right, and forward up the page
    centres = torch.stack([positions @ right, -(positions @ fwd)], -1)
    dirs = torch.stack([axes @ right, -(axes @ fwd)], -1)
    lo = centres.min(0).values
    hi = centres.max(0).values
    tick = 0.12 * float((hi - lo).max().clamp_min(1e-6))
    # (V,2) the ends of the ticks
    tips = centres + tick * dirs
    lo = torch.minimum(lo, tips.min(0).values)
    hi = torch.maximum(hi, tips.max(0).values)
    scale = (size - 40) / float((hi - lo).max().clamp_min(1e-6))
    middle = (lo + hi) / 2
    centres_on_picture = (centres - middle) * scale + size / 2
    tips_on_picture = (tips - middle) * scale + size / 2
    centre_pixels = [tuple(p) for p in centres_on_picture.tolist()]
    tip_pixels = [tuple(p) for p in tips_on_picture.tolist()]
    n_src = len(c2w_src)
    picture = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(picture)
    if len(c2w_tgt) > 1:
        draw.line(centre_pixels[n_src:], fill=(255, 190, 140), width=1)
    for v in range(len(both)):
        x, y = centre_pixels[v]
        # a marker's colour and radius
        colour, r = (SOURCE_RGB, 5) if v < n_src else (TARGET_RGB, 3)
        draw.line([(x, y), tip_pixels[v]], fill=colour, width=2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        if v == n_src:
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=colour)
    draw.text((6, 4), title, fill=(0, 0, 0))
    picture.save(path)


def make_grid(src, pred, gt=None):
    """Rows: sources | + pred[N:] | + gt (if given), white where no image -> (3,rows*H,V*W)."""
    N = src.shape[0]
    blank = torch.ones_like(pred[N:])
    sources_row = torch.cat([src, blank])
    generated_row = torch.cat([src, pred[N:]])
    rows = [sources_row, generated_row]
    if gt is not None:
        rows.append(torch.cat([src, gt, blank[gt.shape[0] :]]))
    strips = [torch.cat(list(row), -1) for row in rows]
    return torch.cat(strips, -2)


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
    """Images (V,3,H,W), sources first, and DA3's depth, conf -> `formats`; a metrics.json summary."""
    # fails on an unknown name
    parse_formats(','.join(formats))
    images = images.detach().cpu()
    depth = depth.detach().cpu()
    conf = conf.detach().cpu()
    c2w = c2w.detach().cpu()
    K = K.detach().cpu()
    c2w_da3 = c2w_da3.detach().cpu()
    V, _, H, W = images.shape
    names = view_names(V, n_src)
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    for v in range(V):
        save_image(images[v], os.path.join(out_dir, 'images', names[v]))
    scale = 1.0
    how = 'none'
    check = None
    if units == 'poses':
        scale, how = metrics.depth_scale(images, depth, c2w, K, c2w_da3, n_src)
    # do the sources agree with their cameras better than with a common mistake?
    if how == 'source photo-consistency':
        errors, warning = check_poses(images, depth, c2w, K, n_src)
        check = {'photo_error': errors, 'warning': warning}
        if warning:
            print(f'warning: {warning}')
    points = fuse_points(images, depth * scale, conf, c2w, K, keep)
    info = {'frame': frame, 'units': UNITS[units], 'depth_scale': scale, 'depth_scale_from': how}
    if 'ply' in formats:
        note = f'units: {UNITS[units]}; DA3 depth x {scale:.6g} ({how})'
        ply_path = os.path.join(out_dir, 'points.ply')
        write_ply(ply_path, points['xyz'], points['rgb'], comments=[note])
    if 'colmap' in formats:
        colmap_folder = os.path.join(out_dir, 'sparse', '0')
        write_colmap(colmap_folder, c2w, K, H, W, names, points)
    if 'glb' in formats:
        write_glb(os.path.join(out_dir, 'scene.glb'), points, c2w, K, H, W, names)
    if 'nerfstudio' in formats:
        extra = {f'gld_{k}': v for k, v in info.items()}
        if 'ply' in formats:
            # splatfacto starts from these points
            extra['ply_file_path'] = 'points.ply'
        image_files = ['images/' + name for name in names]
        is_source = torch.arange(V) < n_src
        transforms_path = os.path.join(out_dir, 'transforms.json')
        write_transforms(transforms_path, c2w, K, H, W, image_files, is_source, extra)
    written = {
        'ply': 'points.ply',
        'colmap': 'sparse/0/',
        'nerfstudio': 'transforms.json',
        'glb': 'scene.glb',
    }
    files = sorted({'images/'} | {written[f] for f in formats})
    return {**info, 'points': len(points['xyz']), 'files': files, 'camera_check': check}
