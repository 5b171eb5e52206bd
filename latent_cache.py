"""latent_cache.py: `train.py --cache`, the frozen encoder's latents of fixed view draws, encoded once, read back.

Off the reading path (a training speed-up): a cache file holds what latents.encode_batch gives on the fly, the raw
levels (float16) of `draws` whole view draws of every training scene, and its name ties it to the exact encoder
weights. It is written whole or not at all, and checked (key, rows, header checksum) before it is
trusted. Legend: N draws, V views, T tokens, C channels (a level has 2C).
"""

import hashlib
import os

import torch

import cli
import data
import latents
import safety

HEADER = ('n_src', 'scene', 'frames', 'c2w', 'K', 'size')  # the draws it holds: its checksum's


def state_hash(module):
    """SHA-256 of a module's state dict (names, shapes, bytes): ties a cache to the exact encoder weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        shape = str(tuple(v.shape)).encode()
        h.update(k.encode() + shape + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def header_checksum(key, d):  # SHA-256 of the key and the HEADER tensors
    h = hashlib.sha256(key.encode())
    for k in HEADER:
        h.update(d[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_problem(d, key, rows):
    """Why a cache cannot be trusted ('' when it can): another key, rows missing, another header."""
    if d.get('key') != key:
        return f'its key is {d.get("key")!r}, not {key!r}'
    if any(len(v) != rows for k, v in d.items() if torch.is_tensor(v) and k != 'size'):
        return f'not {rows} rows'
    if d.get('checksum') != header_checksum(key, d):
        return 'its header checksum differs'
    return ''


class LatentCache:
    """The frozen encoder's raw levels (float16) of `draws` whole view draws of every training scene (see build)."""

    def __init__(self, path):
        self.path = path
        self.data = torch.load(path, weights_only=True)
        self.n_src = self.data['n_src']  # (N,) the source count of each draw

    def __len__(self):
        return len(self.n_src)

    def batch(self, idx, device='cpu'):
        """Draws idx (one source count) -> a training batch in the on-the-fly layout plus 'full' and 'cond'."""
        d = self.data
        idx = torch.as_tensor(idx)
        n_src = int(self.n_src[idx[0]])
        V = d['c2w'].shape[1]
        full = {int(k[4:]): v[idx].to(device).float() for k, v in d.items() if k.startswith('full')}
        return {
            'c2w': d['c2w'][idx].to(device),
            'K': d['K'][idx].to(device),
            'size': tuple(d['size'].tolist()),
            'src_mask': (torch.arange(V) < n_src).expand(len(idx), V).to(device),
            'full': full,
            'cond': d['cond'][idx].to(device).float(),
        }

    def batches(self, batch_size, epoch, seed=0, rank=0, world=1):
        """The epoch's batches of draws of one source count, shuffled by (seed, epoch), dealt to ranks round-robin."""
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        out = []
        for n in self.n_src.unique().tolist():
            idx = (self.n_src == n).nonzero()[:, 0]
            idx = idx[torch.randperm(len(idx), generator=g)]
            starts = range(0, len(idx) - batch_size + 1, batch_size)  # whole batches only
            out += [idx[i : i + batch_size].tolist() for i in starts]
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[i] for i in order][rank::world]

    @staticmethod
    def path_for(folder, enc, spec, views, draws, levels, cond_level, src, src_mode, seed):
        """The file under folder for these settings: the data set's name, the encoder's weights, the draws."""
        dataset = os.path.basename(os.path.normpath(spec.split(':')[-1]))
        level_names = ''.join(map(str, levels))
        name = (
            f'{dataset}_{state_hash(enc)[:12]}_v{views}_d{draws}'
            f'_l{level_names}c{cond_level}_s{src[0]}-{src[1]}{src_mode}_seed{seed}.pt'
        )
        return os.path.join(folder, name)

    @classmethod
    def build(
        cls,
        path,
        enc,
        dataset,
        levels,
        cond_level,
        draws,
        src=(1, 4),
        src_mode='random',
        seed=0,
        device='cpu',
        log=print,
    ):
        """Draw d of each scene: epoch d's frames, lo + d mod (hi-lo+1) sources, encoded once (or
        loaded from path, once checked)."""
        key = os.path.basename(path)  # the settings and the encoder's hash
        if os.path.exists(path):
            try:
                cache = cls(path)
                reason = cache_problem(cache.data, key, draws * len(dataset))
            except Exception as e:  # a truncated or foreign file: the reader's errors vary
                reason = f'{type(e).__name__}: unreadable'
            if not reason:
                log(f'latent cache: {path}')
                return cache
            log(f'latent cache: {path} cannot be trusted ({reason}): building it again')
        lo, hi = src[0], min(src[1], dataset.num_views - 1)
        rows = []
        bar = cli.progress(desc='latent cache', total=draws * len(dataset), unit='sample')
        for d in range(draws):
            dataset.set_epoch(d)
            n_src = lo + d % (hi - lo + 1)  # each source count in turn
            for i in range(len(dataset)):
                item = data.collate_one(dataset[i])
                g = torch.Generator().manual_seed(seed * 1000003 + d * 10007 + i)
                b = data.split_views(item, n_src, generator=g, mode=src_mode)
                b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                raw = latents.encode_batch(enc, b, levels, cond_level)
                row = {
                    'c2w': b['c2w'][0],
                    'K': b['K'][0],
                    'n_src': n_src,
                    'scene': i,
                    'frames': b['frames'][0],  # (V,) sources first
                    'cond': raw['cond'][0].half().cpu(),
                }
                for level in levels:
                    row[f'full{level}'] = raw['full'][level][0].half().cpu()
                rows.append(row)
                bar.update()
        bar.close()
        # (N,...) each; 'scene' (N,) and 'frames' (N,V), sources first, say where a draw came from
        out = {}
        for k in rows[0]:
            column = [r[k] for r in rows]
            out[k] = torch.stack(column).cpu() if torch.is_tensor(column[0]) else torch.tensor(column)
        out['size'] = torch.tensor(item['images'].shape[-2:])
        out['key'] = key
        out['checksum'] = header_checksum(key, out)
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        safety.write_file(path, lambda tmp: torch.save(out, tmp))
        log(f'latent cache: wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB)')
        return cls(path)
