"""Data: Re10K / DL3DV readers, the scene dataset, view splits, resolution buckets, synthetic set.

Re10K in the pixelSplat chunk layout ('cameras' (V,18) = fx fy cx cy (normalised) 0 0 + 3x4 OpenCV
w2c, JPEG 'images', our optional 'depths'), memory-mapped and decoded lazily; DL3DV / nerfstudio
transforms.json (its applied_transform, a rigid motion, ignored). Shape legend: B batch, V views,
H W image, F frames. References: pixelSplat, real_estate_10k_tools (chunk layout); DepthSplat
(DL3DV); GLD.
"""

import argparse
import functools
import io
import json
import os
import time
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cameras
import cli
import synth
from cli import UserError
from constants import PATCH

# PSNR and SSIM live in metrics.py; data.psnr and data.ssim stay importable for code written against earlier versions
from metrics import psnr, ssim  # noqa: F401

# the paper's resolution buckets (H, W) at width 504, mixed 2:2:1:1; the same at 112 px (synth)
BUCKETS_504 = ((504, 504), (378, 504), (336, 504), (280, 504))
BUCKETS_112 = ((112, 112), (84, 112), (70, 112), (56, 112))
BUCKET_WEIGHTS = (2, 2, 1, 1)


class FrameError(UserError):
    """An unreadable frame, or one of another size: training skips the scene, evaluation stops."""


# ---------------------------------------------------------------------------- images and cameras
def decode_image(source):  # JPEG/PNG bytes (uint8 tensor) or a file path -> (3,H,W) float in [0,1]
    file = io.BytesIO(source.numpy().tobytes()) if torch.is_tensor(source) else source
    try:
        with Image.open(file) as im:
            pixels = np.asarray(im.convert('RGB'))
    except (FileNotFoundError, IsADirectoryError) as e:
        problem = 'a folder, not an image' if os.path.isdir(source) else 'no such image file'
        raise FrameError(f'{source}: {problem}') from e
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        reason = str(e).replace(f' {file!r}', '')  # no '<BytesIO at 0x..>'
        raise FrameError(f'not a readable image ({reason})') from e
    image = torch.from_numpy(pixels.copy())  # (H,W,3) uint8
    return image.permute(2, 0, 1).float() / 255


def cameras_to_c2w_K(cams, where='cameras'):
    """Re10K camera rows (V,18) -> c2w (V,4,4) OpenCV and normalised K (V,3,3)."""
    if cams.ndim != 2 or cams.shape[1] != 18:
        raise UserError(
            f'{where}: camera rows have shape {tuple(cams.shape)}, expected (V, 18) = fx fy cx cy '
            '(normalised) 0 0 + 3x4 w2c row-major; re-export with synth.write_re10k_chunk'
        )
    cams = cams.double()
    K = torch.eye(3, dtype=torch.float64).repeat(len(cams), 1, 1)
    K[:, [0, 1, 0, 1], [0, 1, 2, 2]] = cams[:, :4]  # fx fy cx cy
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(cams), 1, 1)
    w2c[:, :3] = cams[:, 6:].reshape(-1, 3, 4)
    cameras.check_cameras(w2c, K, where)  # w2c's rotation is c2w's transposed: the same checks
    return cameras.w2c_to_c2w(w2c).float(), K.float()


def parse_size(text, buckets=False):
    """--size: '' -> None (the data's size), 'HxW' -> (H, W) (multiples of 14), or 'buckets'."""
    if not text:
        return None
    if buckets and text == 'buckets':
        return text
    try:
        H, W = (int(v) for v in text.lower().split('x'))
    except ValueError:
        alternative = ' or --size buckets' if buckets else ''
        raise UserError(f'--size {text}: expected HxW in pixels, e.g. --size 112x112{alternative}') from None
    if H <= 0 or W <= 0 or H % PATCH or W % PATCH:
        fix = f'{max(1, H // PATCH) * PATCH}x{max(1, W // PATCH) * PATCH}'
        problem = f'both sides must be positive multiples of {PATCH}'
        raise UserError(f'--size {text}: {problem}, e.g. --size {fix}')
    return H, W


def make_output_dir(folder, flag='--out'):  # created and checked writable before any work is done
    fix = f'pass a writable {flag}'
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'{flag} {folder}: cannot create the folder ({e.strerror}); {fix}') from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {folder}: the folder is not writable; {fix}')
    return folder


def resize_and_crop(images, K, size, depths=None):
    """Images (...,3,H,W) resized to cover size and centre-cropped; K, depths (...,H,W) follow."""
    Ho, Wo = size
    if Ho % PATCH or Wo % PATCH:
        raise ValueError(f'size {Ho}x{Wo}: both sides must be multiples of {PATCH}')
    H, W = images.shape[-2:]
    scale = max(Ho / H, Wo / W)
    Hr, Wr = max(Ho, round(H * scale)), max(Wo, round(W * scale))  # resized, then cropped
    top, left = (Hr - Ho) // 2, (Wr - Wo) // 2
    if (Hr, Wr) != (H, W):
        x = images.reshape(-1, 3, H, W)
        x = F.interpolate(x, size=(Hr, Wr), mode='bilinear', antialias=True, align_corners=False)
        images = x.clamp(0, 1).reshape(*images.shape[:-2], Hr, Wr)
    images = images[..., top : top + Ho, left : left + Wo]
    # the focal lengths scale with the resize, the principal point moves with the crop
    stretch = K.new_tensor([[Wr / W], [Hr / H], [1.0]])
    K_pixels = cameras.K_to_pixels(K, H, W) * stretch
    K_pixels[..., 0, 2] -= left
    K_pixels[..., 1, 2] -= top
    K = cameras.K_to_normalized(K_pixels, Ho, Wo)
    if depths is None:
        return images, K
    d = depths.reshape(-1, 1, H, W).float()
    d = F.interpolate(d, size=(Hr, Wr), mode='nearest')
    d = d.reshape(*depths.shape[:-2], Hr, Wr)
    return images, K, d[..., top : top + Ho, left : left + Wo]


# ---------------------------------------------------------------------- RealEstate10K chunk layout
# memory-mapped and cached: unpickling costs ~50 ms, an epoch visits each chunk many times
@functools.lru_cache(maxsize=256)
def _load_chunk(path):
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as e:  # truncated or foreign files: PyTorch's errors name no file
        raise UserError(
            f'{path}: not a readable chunk file ({cli.first_line(e)}); re-create it '
            '(the synthetic set: python data.py synth) or remove it from the index.json next to it'
        ) from None


def read_re10k_chunk(path, decode=True):
    """A chunk -> scenes {'key', 'c2w', 'K', 'timestamps', 'depths'?, 'source', 'images'|'jpegs'}"""
    if not os.path.isfile(path):
        problem = 'a folder, not a chunk file' if os.path.isdir(path) else 'no such chunk'
        raise UserError(f'{path}: {problem}; check the index.json next to it')
    scenes = []
    for row in _load_chunk(path):
        c2w, K = cameras_to_c2w_K(row['cameras'], f'{path} scene {row["key"]}')
        scene = {
            'key': row['key'],
            'c2w': c2w,
            'K': K,
            'timestamps': row['timestamps'],
            'jpegs': row['images'],
            'source': path,
        }
        if 'depths' in row:
            scene['depths'] = row['depths']
        if decode:
            scene['images'] = decode_frames(scene, range(len(c2w)))
            del scene['jpegs']
        scenes.append(scene)
    return scenes


def decode_frames(scene, frames):
    """Frames of a lazily read scene -> (len(frames),3,H,W); a FrameError names a bad one."""
    images = []
    for f in frames:
        where = f'{scene["source"]}: scene {scene["key"]} frame {int(f)}'
        try:
            image = decode_image(scene['jpegs'][int(f)])
        except FrameError as e:
            raise FrameError(f'{where}: {e}; replace the frame or drop the scene from the index') from None
        images.append(image)
        if image.shape != images[0].shape:
            H, W = image.shape[-2:]
            H0, W0 = images[0].shape[-2:]
            raise FrameError(
                f'{where}: {H}x{W} pixels, but frame {int(frames[0])} is {H0}x{W0}; '
                'the frames of a scene must share one size'
            )
    return torch.stack(images)


def read_json(path, what):  # what: what the file should hold, for the error
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        reason = getattr(e, 'strerror', None) or e
        raise UserError(f'{path}: not a readable {what} ({reason})') from None


def read_index(root):
    path = os.path.join(root, 'index.json')
    if not os.path.isfile(path):
        raise UserError(
            f'{path}: missing; a chunk folder needs index.json ({{key: "000000.torch"}}); '
            'create the synthetic set with: python data.py synth '
            '(or run real_estate_10k_tools generate_index)'
        )
    index = read_json(path, 'index.json ({key: "000000.torch"})')
    return {k: os.path.join(root, v) for k, v in index.items()}


def read_eval_index(path):
    """{key: {'context': [i, j], 'target': [..]} | null} -> {key: (context, target)}, no nulls."""
    index = read_json(path, 'evaluation index')
    return {k: (list(v['context']), list(v['target'])) for k, v in index.items() if v is not None}


# -------------------------------------------------------------- DL3DV / nerfstudio transforms.json
def read_transforms(path):
    """nerfstudio transforms.json -> {'c2w' (V,4,4) OpenCV, 'K', 'files', 'timestamps'}, by name."""
    meta = read_json(path, 'nerfstudio transforms.json')
    frames = sorted(meta.get('frames', []), key=lambda fr: fr['file_path'])
    if not frames:
        raise UserError(
            f'{path}: no frames; expected {{"fl_x", "fl_y", "cx", "cy", "w", "h", "frames": '
            '[{"file_path", "transform_matrix" (OpenGL c2w)}]}'
        )
    poses = []
    intrinsics = []
    stamps = []
    for i, fr in enumerate(frames):
        intrinsics.append(frame_intrinsics(meta, fr, path))
        poses.append(fr['transform_matrix'])
        stamps.append(frame_timestamp(fr['file_path'], i))
    c2w = cameras.opengl_to_opencv(torch.tensor(poses, dtype=torch.float64))
    K = torch.tensor(intrinsics, dtype=torch.float64)
    cameras.check_cameras(c2w, K, path)
    return {
        'c2w': c2w.float(),
        'K': K.float(),
        'files': [fr['file_path'] for fr in frames],
        'timestamps': torch.tensor(stamps),
    }


def frame_intrinsics(meta, frame, path):  # a frame's normalised K; its values before the file's
    keys = ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h')
    try:
        fx, fy, cx, cy, w, h = (float(frame.get(k, meta.get(k))) for k in keys)
    except TypeError:
        problem = f'frame {frame["file_path"]} lacks intrinsics fl_x fl_y cx cy w h'
        raise UserError(f'{path}: {problem}') from None
    return [[fx / w, 0, cx / w], [0, fy / h, cy / h], [0, 0, 1]]


def frame_timestamp(file_path, i):  # the digits of the file name ('frame_00012.png' -> 12), else i
    stem = os.path.splitext(os.path.basename(file_path))[0]
    digits = ''.join(ch for ch in stem if ch.isdigit())
    return int(digits) if digits else i


def _find_transforms(folder):  # the transforms.json of a DL3DV scene folder, or None
    for name in ('transforms.json', 'nerfstudio/transforms.json'):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_dl3dv_scene(folder, images='images_4', decode=True):
    """A folder with (nerfstudio/)transforms.json -> a scene like read_re10k_chunk's."""
    path = _find_transforms(folder)
    if path is None:
        raise UserError(
            f'{folder}: no transforms.json (nor nerfstudio/transforms.json); write a nerfstudio '
            'transforms.json with fl_x fl_y cx cy w h and frames[].file_path / transform_matrix'
        )
    root = os.path.dirname(path)
    image_dir = os.path.join(root, images or '')
    if images and not os.path.isdir(image_dir):
        raise UserError(f'{image_dir}: missing; pass images= one of the image folders next to {path}')
    transforms = read_transforms(path)
    if images:
        paths = [os.path.join(image_dir, os.path.basename(f)) for f in transforms['files']]
    else:
        paths = [os.path.join(root, f) for f in transforms['files']]
    scene_dir = os.path.dirname(root) if root.endswith('nerfstudio') else root
    scene = {
        'key': os.path.basename(scene_dir),
        'c2w': transforms['c2w'],
        'K': transforms['K'],
        'timestamps': transforms['timestamps'],
        'jpegs': paths,
        'source': path,
    }
    if decode:
        scene['images'] = decode_frames(scene, range(len(paths)))
    return scene


# ------------------------------------------------------- dataset, view sampling, buckets, loader
def sample_frames(n, num_views, gap, generator):
    """V frame indices of n in order, gaps uniform in gap=(lo, hi) (shrunk for short clips)."""
    if n < num_views:
        return torch.linspace(0, n - 1, num_views).round().long()
    hi = min(gap[1], (n - 1) // max(num_views - 1, 1))
    lo = min(gap[0], hi)
    gaps = torch.randint(lo, hi + 1, (num_views - 1,), generator=generator)
    start = torch.randint(0, n - int(gaps.sum()), (1,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), gaps.cumsum(0)])
    return start + offsets


def find_scenes(spec, split):
    """--data spec -> the split's folder, {scene key: its chunk file or DL3DV scene folder}."""
    spec = spec.removeprefix('re10k:')
    if not spec.startswith('dl3dv:'):
        folder = os.path.join(spec, split)
        return folder, read_index(folder)
    root = spec.removeprefix('dl3dv:')
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):  # scene folders right under PATH
        folder = root
    if not os.path.isdir(folder):
        raise UserError(f'{folder}: no such DL3DV folder; pass --data dl3dv:PATH with scene folders under PATH')
    names = [d for d in sorted(os.listdir(folder)) if _find_transforms(os.path.join(folder, d))]
    return folder, {d: os.path.join(folder, d) for d in names}


class SceneDataset(torch.utils.data.Dataset):
    """V views of a scene per item, drawn per seed, epoch and index (eval: the index's, or fixed)."""

    def __init__(self, spec, split='train', num_views=8, size=None, gap=(1, 5), seed=0, eval=False, images='images_4'):
        self.num_views = num_views
        self.size = size
        self.gap = gap
        self.seed = seed
        self.eval = eval
        self.epoch = 0
        self.images = images  # DL3DV image folder
        folder, self.items = find_scenes(spec, split)
        self.eval_frames = {}  # {key: frames} of the evaluation index
        eval_path = os.path.join(folder, 'eval_index.json')
        if eval and os.path.isfile(eval_path):
            self._keep_eval_scenes(eval_path)
        self.keys = list(self.items)
        if not self.keys:
            raise UserError(
                f'{folder}: no scenes found (empty index.json or no scene folders with transforms.json); '
                'for the synthetic set run: python data.py synth'
            )
        first = self._scene(0)
        # without a size, every scene must have the first one's
        self.native = tuple(decode_frames(first, [0]).shape[-2:])
        H, W = self.native
        self.buckets = None
        if size == 'buckets':
            self.buckets = BUCKETS_504 if W >= 504 else BUCKETS_112
        if size is None and (H % PATCH or W % PATCH):
            fix = f'{max(1, H // PATCH) * PATCH}x{max(1, W // PATCH) * PATCH}'
            raise UserError(
                f'{first["source"]}: images are {H}x{W}, not multiples of {PATCH}; pass --size '
                f'{fix} or --size buckets (size=(H, W) in Python)'
            )

    def _keep_eval_scenes(self, path):  # keep the scenes of the evaluation index, with their frames
        index = {k: v for k, v in read_eval_index(path).items() if k in self.items}
        self.eval_frames = {k: eval_views(c, t, self.num_views, path) for k, (c, t) in index.items()}
        self.items = {k: self.items[k] for k in self.eval_frames}
        counts = sorted({(len(c), len(t)) for c, t in index.values()})
        if any(c + t != self.num_views for c, t in counts):
            given = ' or '.join(f'{c} context + {t} target' for c, t in counts)
            print(
                f'note: {path} gives {given} frames per scene; --views {self.num_views} keeps '
                'every context frame and spreads the rest over the targets'
            )

    def __len__(self):
        return len(self.keys)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def index_of(self, key):
        if key not in self.items:
            raise UserError(
                f'--scene {key}: not in this split ({len(self)} scenes, e.g. --scene {self.keys[0]} '
                f'or an index 0..{len(self) - 1})'
            )
        return self.keys.index(key)

    def _scene(self, i):
        key = self.keys[i]
        path = self.items[key]
        if path.endswith('.torch'):
            return next(s for s in read_re10k_chunk(path, decode=False) if s['key'] == key)
        return read_dl3dv_scene(path, self.images, decode=False)

    # training skips unreadable scenes (item['skipped'] counts them), evaluation raises
    def __getitem__(self, i):
        if self.eval:
            return self._item(i)
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return {**self._item(j), 'skipped': attempt}
            except FrameError as e:
                warnings.warn(f'skipping training scene {self.keys[j]}: {e}', stacklevel=1)
        raise UserError(
            f'{self.items[self.keys[i]]}: no scene of this split can be read (warnings above); check --data'
        )

    def _item(self, i):
        scene = self._scene(i)
        key = self.keys[i]
        if key in self.eval_frames:
            frames = torch.tensor(self.eval_frames[key])
        else:
            epoch = 0 if self.eval else self.epoch
            g = torch.Generator().manual_seed(zlib.crc32(f'{self.seed}/{epoch}/{i}'.encode()))
            frames = sample_frames(len(scene['c2w']), self.num_views, self.gap, g)
        images = decode_frames(scene, frames)
        c2w, K = scene['c2w'][frames], scene['K'][frames]
        item = {'images': images, 'c2w': c2w, 'K': K, 'key': key, 'frames': frames}
        if self.size is None and images.shape[-2:] != self.native:
            H, W = images.shape[-2:]
            raise UserError(
                f'{scene["source"]}: scene {key} is {H}x{W} pixels, but frame 0 of scene {self.keys[0]} is '
                f'{self.native[0]}x{self.native[1]}; pass --size HxW or --size buckets for data of several sizes'
            )
        if 'depths' in scene:
            item['depths'] = scene['depths'][frames].float()
        if isinstance(self.size, tuple):
            return resize_item(item, self.size)
        return item


class MixtureDataset(torch.utils.data.Dataset):
    """Datasets mixed with ratios (paper: Re10K:DL3DV:HyperSim:TartanAir 4:4:1:1) in each epoch."""

    def __init__(self, parts, ratios):
        self.parts = parts
        total = sum(len(p) for p in parts)
        lengths = [max(1, round(total * r / sum(ratios))) for r in ratios]
        self.offsets = torch.tensor(lengths).cumsum(0).tolist()  # where each part ends
        self.buckets = parts[0].buckets

    def __len__(self):
        return self.offsets[-1]

    def set_epoch(self, epoch):
        for p in self.parts:
            p.set_epoch(epoch)

    def __getitem__(self, i):
        part = next(j for j, end in enumerate(self.offsets) if i < end)
        start = self.offsets[part - 1] if part else 0
        return self.parts[part][(i - start) % len(self.parts[part])]


def eval_views(context, target, num_views, path):
    """An evaluation-index entry as num_views sorted frames: the context, targets spread over the rest"""
    n = num_views - len(context)
    if n < 1:
        raise UserError(
            f'--views {num_views}: {path} has {len(context)} context frames per scene; pass --views '
            f'{len(context) + 1} or more'
        )
    if n >= len(target):
        return sorted(context + target)
    # the middle target of each of n equal parts
    picked = [target[(2 * i + 1) * len(target) // (2 * n)] for i in range(n)]
    return sorted(context + picked)


def make_dataset(spec, **kw):
    """'PATH' or 're10k:PATH' (chunks), 'dl3dv:PATH', or a mixture 'SPEC*4,SPEC*1' of ratios 4:1."""
    if ',' not in spec and '*' not in spec:
        return SceneDataset(spec, **kw)
    parts = [p.rsplit('*', 1) if '*' in p else (p, '1') for p in spec.split(',')]
    try:
        ratios = [float(r) for _, r in parts]
    except ValueError:
        raise UserError(f'--data {spec}: the ratio after each * must be a number, e.g. --data A*4,B*1') from None
    return MixtureDataset([SceneDataset(p, **kw) for p, _ in parts], ratios)


def resize_item(item, size):  # resize_and_crop of a dataset item's images, K and depths
    resized = resize_and_crop(item['images'], item['K'], size, item.get('depths'))
    keys = ['images', 'K', 'depths'] if 'depths' in item else ['images', 'K']
    return {**item, **dict(zip(keys, resized))}


def bucket_collate(buckets, items):
    """A batch resized to one bucket, drawn 2:2:1:1 by a hash of its keys and frames (worker-safe)"""
    tag = ','.join(f'{it["key"]}:{it["frames"].tolist()}' for it in items)
    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    weights = torch.tensor(BUCKET_WEIGHTS, dtype=torch.float)
    size = buckets[int(torch.multinomial(weights, 1, generator=g))]
    return torch.utils.data.default_collate([resize_item(it, size) for it in items])


def make_loader(dataset, batch_size, shuffle=True, num_workers=0, distributed=False, seed=0, drop_last=None):
    """DataLoader with a DistributedSampler (1 replica if not distributed); set_epoch reshuffles."""
    drop_last = shuffle if drop_last is None else drop_last
    replicas = {} if distributed else {'num_replicas': 1, 'rank': 0}
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, **replicas)
    if drop_last and len(sampler) < batch_size:
        raise UserError(
            f'{len(sampler)} scenes per process < batch size {batch_size}: no full batch; '
            'lower --batch-size or make more scenes'
        )
    collate = None
    if getattr(dataset, 'buckets', None):
        collate = functools.partial(bucket_collate, dataset.buckets)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )


def collate_one(item):  # tensors get a batch axis, other values become 1-lists
    return {k: v[None] if torch.is_tensor(v) else [v] for k, v in item.items()}


def split_views(batch, n_src, generator=None, mode='random'):
    """n_src source views (random or 'ends') of (B,V,...) moved to the front; adds 'src_mask'."""
    B, V = batch['images'].shape[:2]
    if not 0 < n_src < V or mode not in ('random', 'ends'):
        message = f"n_src={n_src} must be in 1..{V - 1} for {V} views, mode 'random' or 'ends' (got {mode!r})"
        raise ValueError(message)
    if mode == 'ends':
        src = torch.linspace(0, V - 1, n_src).round().long().expand(B, n_src)
    else:
        src = torch.rand(B, V, generator=generator).argsort(1)[:, :n_src]  # (B,n_src)
    is_src = torch.zeros(B, V, dtype=torch.bool).scatter_(1, src, True)
    # (B,V): sources first, each group in order
    perm = ((~is_src).long() * V + torch.arange(V)).argsort(1)
    out = dict(batch)
    for k, v in batch.items():
        if torch.is_tensor(v) and v.shape[:2] == (B, V):
            out[k] = v[torch.arange(B, device=v.device)[:, None], perm.to(v.device)]
    out['src_mask'] = (torch.arange(V) < n_src).expand(B, V).to(batch['images'].device)
    return out


def main(argv=None):  # python data.py synth
    parser = argparse.ArgumentParser(description='gld data tools')
    commands = parser.add_subparsers(dest='cmd', required=True)
    p = commands.add_parser(
        'synth',
        help='render the synthetic indoor scenes (the embedded default data)',
        description='Render synth.py rooms into the pixelSplat chunk layout (+ depth): 240 + 16 scenes',
    )
    p.add_argument('--out', default='data_synth', help='output folder (gets train/ and test/)')
    p.add_argument('--train', type=int, default=240, help='number of training scenes')
    p.add_argument('--test', type=int, default=16, help='number of test scenes (with eval_index.json)')
    p.add_argument('--frames', type=int, default=24, help='frames per scene (camera path samples)')
    p.add_argument('--size', type=int, default=112, help='square image side in pixels (multiple of 14)')
    p.add_argument('--seed', type=int, default=0, help='random seed; the output is a function of it')
    p.add_argument('--per-chunk', type=int, default=8, help='scenes per .torch chunk file')
    p.add_argument('--quality', type=int, default=90, help='JPEG quality')
    args = parser.parse_args(argv)
    if args.size % PATCH:
        parser.error(f'--size {args.size} must be a multiple of {PATCH}')
    t_start = time.time()
    make_output_dir(args.out)
    synth.write_synth(args.out, args.train, args.test, args.frames, args.size, args.seed, args.per_chunk, args.quality)
    print(f'wrote {args.train} train + {args.test} test scenes to {args.out} in {time.time() - t_start:.1f}s')


if __name__ == '__main__':
    cli.run_cli(main)
