"""latent_cache.py: `train.py --cache`, the frozen encoder's latents of fixed view draws, encoded once, read back.

Off the reading path (a training speed-up): a cache file holds what latents.encode_batch gives on the fly, the raw
levels (float16) of `draws` whole view draws of every training scene, and its name ties it to the exact encoder
weights. Legend: N draws, V views, T tokens, C channels (a level has 2C).
"""

import hashlib
import os
import time

import torch

import data
import latents


def state_hash(module):
    """SHA-256 of a module's state dict (names, shapes, bytes): ties a cache to the exact encoder weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """The frozen encoder's raw levels (float16) of `draws` whole view draws of every training scene (see build)."""

    def __init__(self, path):
        self.path, self.data = path, torch.load(path, weights_only=True)
        self.n_src = self.data['n_src']

    def __len__(self):
        return len(self.n_src)

    def batch(self, idx, device='cpu'):
        """Draws idx (one source count) -> a training batch in the on-the-fly layout plus 'full' and 'cond'."""
        d, idx = self.data, torch.as_tensor(idx)
        n, V = int(self.n_src[idx[0]]), d['c2w'].shape[1]
        return {
            'c2w': d['c2w'][idx].to(device),
            'K': d['K'][idx].to(device),
            'size': tuple(d['size'].tolist()),
            'src_mask': (torch.arange(V) < n).expand(len(idx), V).to(device),
            'full': {int(k[4:]): v[idx].to(device).float() for k, v in d.items() if k.startswith('full')},
            'cond': d['cond'][idx].to(device).float(),
        }

    def batches(self, batch_size, epoch, seed=0, rank=0, world=1):
        """The epoch's batches of draws of one source count, shuffled by (seed, epoch), dealt to ranks round-robin."""
        g, out = torch.Generator().manual_seed(seed * 100003 + epoch), []
        for n in self.n_src.unique().tolist():
            idx = (self.n_src == n).nonzero()[:, 0]
            idx = idx[torch.randperm(len(idx), generator=g)]
            out += [idx[i : i + batch_size].tolist() for i in range(0, len(idx) - batch_size + 1, batch_size)]
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()][rank::world]

    @staticmethod
    def path_for(folder, enc, spec, views, draws, levels, cond_level, src, src_mode, seed):
        name = (
            f'{os.path.basename(os.path.normpath(spec.split(":")[-1]))}_{state_hash(enc)[:12]}_v{views}_d{draws}'
            f'_l{"".join(map(str, levels))}c{cond_level}_s{src[0]}-{src[1]}{src_mode}_seed{seed}.pt'
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
        """Draw d of each scene: epoch d's frames, lo + d mod (hi-lo+1) sources, encoded once (or loaded from path)."""
        if os.path.exists(path):
            log(f'latent cache: {path}')
            return cls(path)
        lo, hi = src[0], min(src[1], dataset.num_views - 1)
        rows, t0 = [], time.time()
        for d in range(draws):
            dataset.set_epoch(d)
            for i in range(len(dataset)):
                item, n = data.collate_one(dataset[i]), lo + d % (hi - lo + 1)
                g = torch.Generator().manual_seed(seed * 1000003 + d * 10007 + i)
                b = data.split_views(item, n, generator=g, mode=src_mode)
                b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                raw = latents.encode_batch(enc, b, levels, cond_level)
                rows.append(
                    {
                        'c2w': b['c2w'][0],
                        'K': b['K'][0],
                        'n_src': n,
                        'scene': i,
                        'frames': b['frames'][0],
                        'cond': raw['cond'][0].half().cpu(),
                        **{f'full{level}': raw['full'][level][0].half().cpu() for level in levels},
                    }
                )
            log(f'latent cache: draw {d + 1}/{draws}, {len(rows)} samples, {time.time() - t0:.0f}s')
        # (N,...) each; 'scene' (N,) and 'frames' (N,V), sources first, say where a draw came from
        out = {
            k: torch.stack([r[k] for r in rows]).cpu()
            if torch.is_tensor(rows[0][k])
            else torch.tensor([r[k] for r in rows])
            for k in rows[0]
        }
        out['size'] = torch.tensor(item['images'].shape[-2:])
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        torch.save(out, path + '.tmp')
        os.replace(path + '.tmp', path)
        log(f'latent cache: wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB)')
        return cls(path)
