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

# the metrics moved to metrics.py; train.py still reads them here
from metrics import depth_metrics, lpips_fn, psnr, ssim  # noqa: F401

# the paper's resolution buckets (H, W) at width 504, mixed 2:2:1:1, and the same mix at 112 px (synthetic set)
BUCKETS_504 = ((504, 504), (378, 504), (336, 504), (280, 504))
BUCKETS_112 = ((112, 112), (84, 112), (70, 112), (56, 112))
BUCKET_WEIGHTS = (2, 2, 1, 1)


class FrameError(UserError):
    """An unreadable frame (or one of another size than its scene's): training skips the sample, evaluation stops."""


# -------------------------------------------------------------------------------------------------- images and cameras
def decode_image(data):  # JPEG/PNG bytes (uint8 tensor) or a file path -> (3,H,W) float in [0,1]
    try:
        src = io.BytesIO(data.numpy().tobytes()) if torch.is_tensor(data) else data
        with Image.open(src) as im:
            arr = np.asarray(im.convert('RGB'))
    except (FileNotFoundError, IsADirectoryError) as e:
        raise FrameError(f'{data}: {"a folder, not an image" if os.path.isdir(data) else "no such image file"}') from e
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise FrameError(f'not a readable image ({str(e).replace(f" {src!r}", "")})') from e  # no '<BytesIO at 0x..>'
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def cameras_to_c2w_K(cams, where='cameras'):
    """Re10K camera rows (V,18) -> c2w (V,4,4) OpenCV and normalised K (V,3,3)."""
    if cams.ndim != 2 or cams.shape[1] != 18:
        raise UserError(
            f'{where}: camera rows have shape {tuple(cams.shape)}, expected (V, 18) = '
            'fx fy cx cy (normalised) 0 0 + 3x4 w2c row-major; re-export with synth.write_re10k_chunk'
        )
    cams = cams.double()
    K = torch.eye(3, dtype=torch.float64).repeat(len(cams), 1, 1)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2] = cams[:, 0], cams[:, 1], cams[:, 2], cams[:, 3]
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(cams), 1, 1)
    w2c[:, :3] = cams[:, 6:].reshape(-1, 3, 4)
    cameras.check_cameras(w2c, K, where)  # w2c's rotation is c2w's transposed: the same checks hold
    return cameras.w2c_to_c2w(w2c).float(), K.float()


def parse_size(text, buckets=False):
    """The --size flag: '' -> None (the data's size), 'HxW' -> (H, W) (multiples of 14), 'buckets' if allowed."""
    if not text or (buckets and text == 'buckets'):
        return text or None
    try:
        H, W = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise UserError(
            f'--size {text}: expected HxW in pixels, e.g. --size 112x112' + (' or --size buckets' if buckets else '')
        ) from None
    if H <= 0 or W <= 0 or H % PATCH or W % PATCH:
        fix = f'{max(1, H // PATCH) * PATCH}x{max(1, W // PATCH) * PATCH}'
        raise UserError(f'--size {text}: both sides must be positive multiples of {PATCH}, e.g. --size {fix}')
    return H, W


def make_output_dir(folder, flag='--out'):  # created and checked writable before any work is done
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'{flag} {folder}: cannot create the folder ({e.strerror}); pass a writable {flag}') from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {folder}: the folder is not writable; pass a writable {flag}')
    return folder


def resize_and_crop(images, K, size, depths=None):
    """Resize images (...,3,H,W) to cover size (H', W'), centre-crop; K (...,3,3) follows, depths (...,H,W) nearest."""
    Ho, Wo = size
    if Ho % PATCH or Wo % PATCH:
        raise ValueError(f'size {Ho}x{Wo}: both sides must be multiples of {PATCH}')
    H, W = images.shape[-2:]
    s = max(Ho / H, Wo / W)
    Hr, Wr = max(Ho, round(H * s)), max(Wo, round(W * s))
    top, left = (Hr - Ho) // 2, (Wr - Wo) // 2
    if (Hr, Wr) != (H, W):
        x = F.interpolate(
            images.reshape(-1, 3, H, W), size=(Hr, Wr), mode='bilinear', antialias=True, align_corners=False
        )
        images = x.clamp(0, 1).reshape(*images.shape[:-2], Hr, Wr)
    images = images[..., top : top + Ho, left : left + Wo]
    Kp = cameras.K_to_pixels(K, H, W) * K.new_tensor([[Wr / W], [Hr / H], [1.0]])
    Kp[..., 0, 2], Kp[..., 1, 2] = Kp[..., 0, 2] - left, Kp[..., 1, 2] - top
    out = (images, cameras.K_to_normalized(Kp, Ho, Wo))
    if depths is not None:
        d = F.interpolate(depths.reshape(-1, 1, H, W).float(), size=(Hr, Wr), mode='nearest')
        out += (d.reshape(*depths.shape[:-2], Hr, Wr)[..., top : top + Ho, left : left + Wo],)
    return out


# ------------------------------------------------------------------------------------------ RealEstate10K chunk layout
@functools.lru_cache(maxsize=256)
def _load_chunk(path):  # memory-mapped and cached: unpickling costs ~50 ms, an epoch visits each chunk many times
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as e:  # truncated or foreign files: PyTorch's reader errors (of several types) name no file
        raise UserError(
            f'{path}: not a readable chunk file ({cli.first_line(e)}); re-create it '
            '(the synthetic set: python data.py synth) or remove it from the index.json next to it'
        ) from None


def read_re10k_chunk(path, decode=True):
    """A chunk -> scenes {'key', 'c2w', 'K', 'timestamps', 'depths'?, 'source', 'images' (decode) or lazy 'jpegs'}."""
    if not os.path.isfile(path):
        raise UserError(
            f'{path}: {"a folder, not a chunk file" if os.path.isdir(path) else "no such chunk"}; '
            'check the index.json next to it'
        )
    scenes = []
    for ex in _load_chunk(path):
        c2w, K = cameras_to_c2w_K(ex['cameras'], f'{path} scene {ex["key"]}')
        s = {
            'key': ex['key'],
            'c2w': c2w,
            'K': K,
            'timestamps': ex['timestamps'],
            'jpegs': ex['images'],
            'source': path,
            **({'depths': ex['depths']} if 'depths' in ex else {}),
        }
        if decode:
            s['images'] = decode_frames(s, range(len(c2w)))
            del s['jpegs']
        scenes.append(s)
    return scenes


def decode_frames(scene, frames):
    """Frames of a lazily read scene -> (len(frames),3,H,W); a FrameError names an unreadable or odd-sized one."""
    out = []
    for f in frames:
        where = f'{scene["source"]}: scene {scene["key"]} frame {int(f)}'
        try:
            out.append(decode_image(scene['jpegs'][int(f)]))
        except FrameError as e:
            raise FrameError(f'{where}: {e}; replace the frame or drop the scene from the index') from None
        if out[-1].shape != out[0].shape:
            raise FrameError(
                f'{where}: {out[-1].shape[-2]}x{out[-1].shape[-1]} pixels, but frame {int(frames[0])} '
                f'is {out[0].shape[-2]}x{out[0].shape[-1]}; the frames of a scene must share one size'
            )
    return torch.stack(out)


def read_json(path, what):  # what: what the file should hold, for the error
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f'{path}: not a readable {what} ({getattr(e, "strerror", None) or e})') from None


def read_index(root):
    path = os.path.join(root, 'index.json')
    if not os.path.isfile(path):
        raise UserError(
            f'{path}: missing; a chunk folder needs index.json ({{key: "000000.torch"}}); create the '
            'synthetic set with: python data.py synth (or run real_estate_10k_tools generate_index)'
        )
    return {k: os.path.join(root, v) for k, v in read_json(path, 'index.json ({key: "000000.torch"})').items()}


def read_eval_index(path):
    """Evaluation index {key: {'context': [i, j], 'target': [..]} | null} -> {key: (context, target)}, nulls dropped."""
    return {
        k: (list(v['context']), list(v['target']))
        for k, v in read_json(path, 'evaluation index').items()
        if v is not None
    }


# ---------------------------------------------------------------------------------- DL3DV / nerfstudio transforms.json
def read_transforms(path):
    """nerfstudio transforms.json -> {'c2w' (V,4,4) OpenCV, 'K' (V,3,3), 'files', 'timestamps'}, by file name."""
    meta = read_json(path, 'nerfstudio transforms.json')
    if not (frames := sorted(meta.get('frames', []), key=lambda fr: fr['file_path'])):
        raise UserError(
            f'{path}: no frames; expected {{"fl_x", "fl_y", "cx", "cy", "w", "h", "frames": '
            '[{"file_path", "transform_matrix" (OpenGL c2w)}]}'
        )
    c2w, K, stamps = [], [], []
    for i, fr in enumerate(frames):
        try:
            fx, fy, cx, cy, w, h = (float(fr.get(k, meta.get(k))) for k in ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h'))
        except TypeError:
            raise UserError(f'{path}: frame {fr["file_path"]} lacks intrinsics fl_x fl_y cx cy w h') from None
        K.append([[fx / w, 0, cx / w], [0, fy / h, cy / h], [0, 0, 1]])
        c2w.append(fr['transform_matrix'])
        digits = ''.join(ch for ch in os.path.splitext(os.path.basename(fr['file_path']))[0] if ch.isdigit())
        stamps.append(int(digits) if digits else i)
    c2w, K = cameras.opengl_to_opencv(torch.tensor(c2w, dtype=torch.float64)), torch.tensor(K, dtype=torch.float64)
    cameras.check_cameras(c2w, K, path)
    return {
        'c2w': c2w.float(),
        'K': K.float(),
        'files': [fr['file_path'] for fr in frames],
        'timestamps': torch.tensor(stamps),
    }


def _find_transforms(folder):  # the transforms.json of a DL3DV scene folder, or None
    paths = (os.path.join(folder, 'transforms.json'), os.path.join(folder, 'nerfstudio', 'transforms.json'))
    return next((p for p in paths if os.path.isfile(p)), None)


def read_dl3dv_scene(folder, images='images_4', decode=True):
    """A folder with (nerfstudio/)transforms.json -> a scene like read_re10k_chunk's; images: a folder beside it."""
    if (path := _find_transforms(folder)) is None:
        raise UserError(
            f'{folder}: no transforms.json (nor nerfstudio/transforms.json); write a nerfstudio '
            'transforms.json with fl_x fl_y cx cy w h and frames[].file_path / transform_matrix'
        )
    root = os.path.dirname(path)
    if images and not os.path.isdir(os.path.join(root, images)):
        raise UserError(f'{os.path.join(root, images)}: missing; pass images= one of the image folders next to {path}')
    t = read_transforms(path)
    paths = [os.path.join(root, images, os.path.basename(f)) if images else os.path.join(root, f) for f in t['files']]
    s = {
        'key': os.path.basename(os.path.dirname(root) if root.endswith('nerfstudio') else root),
        'c2w': t['c2w'],
        'K': t['K'],
        'timestamps': t['timestamps'],
        'jpegs': paths,
        'source': path,
    }
    if decode:
        s['images'] = decode_frames(s, range(len(paths)))
    return s


# ----------------------------------------------------------------------------- dataset, view sampling, buckets, loader
def sample_frames(n, num_views, gap, generator):
    """V frame indices of n in temporal order, gaps uniform in gap=(lo, hi) (shrunk for short clips)."""
    if n < num_views:
        return torch.linspace(0, n - 1, num_views).round().long()
    hi = min(gap[1], (n - 1) // max(num_views - 1, 1))
    lo = min(gap[0], hi)
    gaps = torch.randint(lo, hi + 1, (num_views - 1,), generator=generator)
    start = torch.randint(0, n - int(gaps.sum()), (1,), generator=generator)
    return start + torch.cat([torch.zeros(1, dtype=torch.long), gaps.cumsum(0)])


class SceneDataset(torch.utils.data.Dataset):
    """V views of a scene per item, drawn per seed/epoch/index (eval: split/eval_index.json's, or fixed per seed)."""

    def __init__(self, spec, split='train', num_views=8, size=None, gap=(1, 5), seed=0, eval=False, images='images_4'):
        self.num_views, self.size, self.gap, self.seed, self.eval, self.epoch = num_views, size, gap, seed, eval, 0
        self.images = images  # DL3DV image folder
        spec = spec.removeprefix('re10k:')
        if spec.startswith('dl3dv:'):
            root = spec.removeprefix('dl3dv:')
            folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
            if not os.path.isdir(folder):
                raise UserError(f'{folder}: no such DL3DV folder; pass --data dl3dv:PATH with scene folders under PATH')
            self.items = {
                d: os.path.join(folder, d)
                for d in sorted(os.listdir(folder))
                if _find_transforms(os.path.join(folder, d))
            }
        else:
            self.items = read_index(folder := os.path.join(spec, split))
        eval_path, self.eval_frames = os.path.join(folder, 'eval_index.json'), {}
        if eval and os.path.isfile(eval_path):
            index = {k: v for k, v in read_eval_index(eval_path).items() if k in self.items}
            self.eval_frames = {k: eval_views(c, t, num_views, eval_path) for k, (c, t) in index.items()}
            self.items = {k: self.items[k] for k in self.eval_frames}
            if any(len(c) + len(t) != num_views for c, t in index.values()):
                counts = sorted({(len(c), len(t)) for c, t in index.values()})
                print(
                    f'note: {eval_path} gives {" or ".join(f"{c} context + {t} target" for c, t in counts)} '
                    f'frames per scene; --views {num_views} keeps every context frame and spreads the rest over '
                    'the targets'
                )
        self.keys = list(self.items)
        if not self.keys:
            raise UserError(
                f'{folder}: no scenes found (empty index.json or no scene folders with transforms.json); '
                'for the synthetic set run: python data.py synth'
            )
        first = self._scene(0)
        H, W = self.native = tuple(decode_frames(first, [0]).shape[-2:])  # without a size, every scene must have it
        self.buckets = (BUCKETS_504 if W >= 504 else BUCKETS_112) if size == 'buckets' else None
        if size is None and (H % PATCH or W % PATCH):
            raise UserError(
                f'{first["source"]}: images are {H}x{W}, not multiples of {PATCH}; pass --size '
                f'{max(1, H // PATCH) * PATCH}x{max(1, W // PATCH) * PATCH} or --size buckets '
                '(size=(H, W) in Python)'
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
        path = self.items[self.keys[i]]
        if path.endswith('.torch'):
            return next(s for s in read_re10k_chunk(path, decode=False) if s['key'] == self.keys[i])
        return read_dl3dv_scene(path, self.images, decode=False)

    def __getitem__(self, i):  # training skips unreadable scenes (item['skipped'] counts them), evaluation raises
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
        scene, key = self._scene(i), self.keys[i]
        if key in self.eval_frames:
            frames = torch.tensor(self.eval_frames[key])
        else:
            g = torch.Generator().manual_seed(zlib.crc32(f'{self.seed}/{0 if self.eval else self.epoch}/{i}'.encode()))
            frames = sample_frames(len(scene['c2w']), self.num_views, self.gap, g)
        item = {
            'images': decode_frames(scene, frames),
            'c2w': scene['c2w'][frames],
            'K': scene['K'][frames],
            'key': key,
            'frames': frames,
        }
        if self.size is None and item['images'].shape[-2:] != self.native:
            raise UserError(
                f'{scene["source"]}: scene {key} is {item["images"].shape[-2]}x{item["images"].shape[-1]} '
                f'pixels, but frame 0 of scene {self.keys[0]} is {self.native[0]}x{self.native[1]}; pass '
                '--size HxW or --size buckets for data of several sizes'
            )
        if 'depths' in scene:
            item['depths'] = scene['depths'][frames].float()
        return resize_item(item, self.size) if isinstance(self.size, tuple) else item


class MixtureDataset(torch.utils.data.Dataset):
    """Datasets mixed with ratios r (paper: Re10K:DL3DV:HyperSim:TartanAir 4:4:1:1), part i r_i / sum(r) of an epoch."""

    def __init__(self, parts, ratios):
        self.parts, total = parts, sum(len(p) for p in parts)
        self.offsets = torch.tensor([max(1, round(total * r / sum(ratios))) for r in ratios]).cumsum(0).tolist()
        self.buckets = parts[0].buckets

    def __len__(self):
        return self.offsets[-1]

    def set_epoch(self, epoch):
        for p in self.parts:
            p.set_epoch(epoch)

    def __getitem__(self, i):
        part = next(j for j, o in enumerate(self.offsets) if i < o)
        local = i - (self.offsets[part - 1] if part else 0)
        return self.parts[part][local % len(self.parts[part])]


def eval_views(context, target, num_views, path):
    """One evaluation-index entry as num_views sorted frames: all context frames, targets spread over the rest."""
    n = num_views - len(context)
    if n < 1:
        raise UserError(
            f'--views {num_views}: {path} has {len(context)} context frames per scene; pass --views '
            f'{len(context) + 1} or more'
        )
    pick = target if n >= len(target) else [target[(2 * i + 1) * len(target) // (2 * n)] for i in range(n)]
    return sorted(context + pick)


def make_dataset(spec, **kw):
    """'PATH' or 're10k:PATH' (chunk layout), 'dl3dv:PATH', or a mixture 'SPEC*4,SPEC*1' (ratios after '*')."""
    if ',' not in spec and '*' not in spec:
        return SceneDataset(spec, **kw)
    parts = [p.rsplit('*', 1) if '*' in p else (p, '1') for p in spec.split(',')]
    try:
        ratios = [float(r) for _, r in parts]
    except ValueError:
        raise UserError(f'--data {spec}: the ratio after each * must be a number, e.g. --data A*4,B*1') from None
    return MixtureDataset([SceneDataset(p, **kw) for p, _ in parts], ratios)


def resize_item(item, size):  # resize_and_crop of a dataset item's images, K and depths
    keys = ['images', 'K', 'depths'] if 'depths' in item else ['images', 'K']
    return {**item, **dict(zip(keys, resize_and_crop(item['images'], item['K'], size, item.get('depths'))))}


def bucket_collate(buckets, items):
    """Collate a batch resized to one bucket, drawn 2:2:1:1 from a hash of its keys and frames (worker-safe)."""
    tag = ','.join(f'{it["key"]}:{it["frames"].tolist()}' for it in items)
    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    size = buckets[int(torch.multinomial(torch.tensor(BUCKET_WEIGHTS, dtype=torch.float), 1, generator=g))]
    return torch.utils.data.default_collate([resize_item(it, size) for it in items])


def make_loader(dataset, batch_size, shuffle=True, num_workers=0, distributed=False, seed=0, drop_last=None):
    """DataLoader with a DistributedSampler (one replica when not distributed): sampler.set_epoch(e) reshuffles."""
    drop_last = shuffle if drop_last is None else drop_last
    kw = {} if distributed else {'num_replicas': 1, 'rank': 0}
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, **kw)
    if drop_last and len(sampler) < batch_size:
        raise UserError(
            f'{len(sampler)} scenes per process < batch size {batch_size}: no full batch; '
            'lower --batch-size or make more scenes'
        )
    collate = functools.partial(bucket_collate, dataset.buckets) if getattr(dataset, 'buckets', None) else None
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
    """Move n_src source views (random or 'ends') of (B,V,...) tensors to the front, in order; adds 'src_mask' (B,V)."""
    B, V = batch['images'].shape[:2]
    if not 0 < n_src < V or mode not in ('random', 'ends'):
        raise ValueError(f"n_src={n_src} must be in 1..{V - 1} for {V} views, mode 'random' or 'ends' (got {mode!r})")
    src = (
        torch.linspace(0, V - 1, n_src).round().long().expand(B, n_src)
        if mode == 'ends'
        else torch.rand(B, V, generator=generator).argsort(1)[:, :n_src]
    )  # (B,n_src)
    is_src = torch.zeros(B, V, dtype=torch.bool).scatter_(1, src, True)
    perm = ((~is_src).long() * V + torch.arange(V)).argsort(1)  # (B,V): sources first, each group in order
    out = {
        k: v[torch.arange(B, device=v.device)[:, None], perm.to(v.device)]
        if torch.is_tensor(v) and v.shape[:2] == (B, V)
        else v
        for k, v in batch.items()
    }
    out['src_mask'] = (torch.arange(V) < n_src).expand(B, V).to(batch['images'].device)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description='gld data tools')
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser(
        'synth',
        help='render the synthetic indoor scenes (the embedded default data)',
        description='Render synth.py rooms into the pixelSplat chunk layout (+ depth): 240 + 16 scenes',
    )
    s.add_argument('--out', default='data_synth', help='output folder (gets train/ and test/)')
    s.add_argument('--train', type=int, default=240, help='number of training scenes')
    s.add_argument('--test', type=int, default=16, help='number of test scenes (with eval_index.json)')
    s.add_argument('--frames', type=int, default=24, help='frames per scene (camera path samples)')
    s.add_argument('--size', type=int, default=112, help='square image side in pixels (multiple of 14)')
    s.add_argument('--seed', type=int, default=0, help='random seed; the output is a function of it')
    s.add_argument('--per-chunk', type=int, default=8, help='scenes per .torch chunk file')
    s.add_argument('--quality', type=int, default=90, help='JPEG quality')
    a = p.parse_args(argv)
    if a.size % PATCH:
        p.error(f'--size {a.size} must be a multiple of {PATCH}')
    t0 = time.time()
    make_output_dir(a.out)
    synth.write_synth(a.out, a.train, a.test, a.frames, a.size, a.seed, a.per_chunk, a.quality)
    print(f'wrote {a.train} train + {a.test} test scenes to {a.out} in {time.time() - t0:.1f}s')


if __name__ == '__main__':
    cli.run_cli(main)
