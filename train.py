"""train.py: one entry point for every stage of GLD.

    python train.py --stage encoder            # da3-tiny on synthetic scenes (depth + ray maps), the embedded default
    python train.py --stage decoder            # Stage 1: RGB decoder on frozen DA3 features, level-wise dropout
    python train.py --level 1                  # Stage 3: M1, level-1 features of all views
    python train.py --level 0                  # Stage 3: M1->0, level 0 conditioned on ground-truth level 1
    python train.py --level 2 --independent    # an independent M_l for the boundary ablation (paper Table 2)
    torchrun --nproc_per_node 8 train.py --level 1 --model gld-paper --encoder da3-base ...   # the paper's scale
    python train.py --encoder vggt-tiny        # the same on another latent: vggt-*, dinov2-*, vae* (encoder.build_encoder)
    python train.py --stage encoder --encoder vae-tiny   # the tiny SD-architecture VAE on the synthetic scenes

Everything a run needs stays visible here, a few lines each: DDP (torchrun env vars; NCCL on GPU, gloo on CPU),
bf16 autocast on GPU, torch.compile, EMA, gradient accumulation that syncs only on the last micro-step, atomic
checkpoints with exact resume, NaN/inf skipping, a dense log line, a CSV log and a loss-curve PNG, periodic
evaluation. Recipes (paper Sec. 5.1, A.1, Tab. 11): diffusion AdamW lr 5e-5 constant, betas (0.9, 0.95), wd 0,
clip 1.0, EMA 0.9995; decoder AdamW 2e-4 cosine to 2e-5 with warmup, EMA 0.9978.

Latents are computed on the fly by the frozen encoder (latents.py): the target is DA3 over all V views jointly, the
condition is DA3 over the source views alone ("leakage-free", zero at targets); `--cache N` encodes N fixed view
draws per scene once instead (latents.LatentCache), which is what makes the tiny default trainable on 2 CPU cores. Per-channel latent statistics are computed
once per encoder and level (or loaded, e.g. the official normalization_stats_level{0,1}.pt) and saved in every
checkpoint, so sample.py rebuilds the whole pipeline from the files alone.
"""
import argparse
import contextlib
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cameras
import data
import decoder as decoder_lib
import diffusion
import encoder as encoder_lib
import latents
import model as model_lib
import sample

RECIPES = {  # (lr, final lr, schedule, betas, weight decay, clip, EMA decay)
    'diffusion': dict(lr=5e-5, min_lr=5e-5, schedule='constant', betas=(0.9, 0.95), wd=0.0, clip=1.0, ema=0.9995),
    'decoder': dict(lr=2e-4, min_lr=2e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.0, clip=0.0, ema=0.9978),
    'encoder': dict(lr=3e-4, min_lr=3e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.05, clip=1.0, ema=0.999),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('what to train')
    g.add_argument('--stage', choices=['encoder', 'decoder', 'diffusion'], default='diffusion', help='training stage')
    g.add_argument('--level', type=int, choices=[0, 1, 2, 3], default=None, help='feature level for --stage diffusion (implies it)')
    g.add_argument('--independent', action='store_true', help='level 0 without the level-1 condition: the independent M0 of the boundary ablation')
    g.add_argument('--tau', type=float, default=0.0, help='M1->0: noise level of the ground-truth level-1 condition (paper 4.4)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='data_synth', help="chunk folder, 're10k:PATH', 'dl3dv:PATH'; mixtures 'A*4,B*1'")
    g.add_argument('--views', type=int, default=8, help='views per sample V')
    g.add_argument('--src', default='1-4', help='number of source views per batch, a range lo-hi (paper: 1-4)')
    g.add_argument('--src-mode', default='random', choices=['random', 'ends'], help="which views are sources: a random "
                   "subset (paper) or first and last, evenly spaced for more (the N=2 evaluation's interpolation)")
    g.add_argument('--size', default='', help="HxW (multiples of 14), 'buckets' for the paper's mixed sizes; '' = the data's size")
    g.add_argument('--gap', default='1-5', help='frame gap range between consecutive views')
    g.add_argument('--workers', type=int, default=0, help='DataLoader worker processes')
    g.add_argument('--cache', type=int, default=0, help='diffusion: encode this many fixed view draws per scene once '
                   '(runs/cache/, keyed by the encoder hash) and train on them (0 = encode every batch)')
    g = p.add_argument_group('models')
    g.add_argument('--encoder', default='da3-tiny', help='latent encoder: da3-{tiny,small,base,large,giant} (GLD), vggt-{tiny,1b}, '
                   'dinov2-{s,b,l}[-reg], vae[-tiny] (encoder.build_encoder)')
    g.add_argument('--encoder-weights', default='auto', help="encoder weights file (its official layout); 'auto' = runs/encoder "
                   "then weights/tiny (other encoders: runs/encoder-NAME, else random); 'none' = random. Runs on encoders "
                   "other than da3-tiny go to runs/<stage>-NAME")
    g.add_argument('--decoder', default='tiny', help='RGB decoder preset (stage decoder), see decoder.PRESETS')
    g.add_argument('--decoder-ckpt', default='auto', help="decoder used by periodic evaluation of diffusion runs; 'none' = skip")
    g.add_argument('--model', default='gld-tiny', help='DiT preset, see model.PRESETS')
    g.add_argument('--pos', default=None, choices=['prope', 'rope3d', 'rope2d'], help='override the positional encoding')
    g.add_argument('--stats', default='', help='latent statistics file (ours or the official .pt); default: compute')
    g.add_argument('--stats-batches', type=int, default=16, help='batches used to compute latent statistics')
    g.add_argument('--level-dropout', type=float, default=0.5, help='decoder: probability of dropping each level')
    g.add_argument('--noise-tau', type=float, default=0.0, help='decoder: RAE noise augmentation of the input features')
    g.add_argument('--lpips', action='store_true', help='decoder: add LPIPS (needs the lpips package and weights)')
    g.add_argument('--gan', type=int, default=-1, help='decoder: step from which the adversarial loss is on (-1 = off)')
    g.add_argument('--cam-drop', type=float, default=0.1, help='diffusion: camera dropout probability for CFG')
    g.add_argument('--t-dist', default='uniform', choices=['uniform', 'logit_normal'], help='diffusion: time distribution')
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=2000, help='optimizer steps')
    g.add_argument('--batch-size', type=int, default=4, help='scenes per micro-batch per process')
    g.add_argument('--accum', type=int, default=1, help='gradient accumulation micro-steps')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate (default: the recipe of the stage)')
    g.add_argument('--warmup', type=int, default=100, help='linear warmup steps')
    g.add_argument('--ema', type=float, default=None, help='EMA decay (default: the recipe)')
    g.add_argument('--compile', action='store_true', help='torch.compile the trained model')
    g.add_argument('--checkpointing', action='store_true', help='activation checkpointing in the DiT blocks')
    g.add_argument('--init', default='', help='start the trained network (and its EMA) from these weights: an export or a checkpoint')
    g.add_argument('--seed', type=int, default=0, help='base seed (rank r uses seed + r)')
    g.add_argument('--max-bad', type=int, default=5, help='stop after this many consecutive non-finite losses')
    g = p.add_argument_group('output')
    g.add_argument('--out', default='', help='run folder (default runs/<stage or levelN>)')
    g.add_argument('--resume', action='store_true', help='continue exactly from the newest checkpoint in --out')
    g.add_argument('--keep', type=int, default=2, help='checkpoints kept')
    g.add_argument('--ckpt-every', type=int, default=500, help='checkpoint interval (steps)')
    g.add_argument('--log-every', type=int, default=20, help='log interval (steps)')
    g.add_argument('--eval-every', type=int, default=500, help='periodic evaluation interval (steps, 0 = off)')
    g.add_argument('--export', default='', help='after training, write the EMA weights as fp16 safetensors into this folder')
    g.add_argument('--wandb', default='', help='wandb project name (only when wandb is installed)')
    return p


def get_args(argv=None):
    a = build_parser().parse_args(argv)
    if a.level is not None:
        a.stage = 'diffusion'
    elif a.stage == 'diffusion':  # M1, or the only level of a one-level latent (DINOv2, VAE)
        with torch.device('meta'):
            a.level = min(1, encoder_lib.build_encoder(a.encoder).num_levels - 1)
    name = a.stage if a.stage != 'diffusion' else f'level{a.level}' + ('_ind' if a.independent and a.level == 0 else '')
    a.out = a.out or os.path.join('runs', sample.run_name(name, a.encoder))
    return a


def parse_range(s):
    lo, _, hi = s.partition('-')
    return int(lo), int(hi or lo)


# ----------------------------------------------------------------------------- distributed, RNG, checkpoints

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` runs as one process."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return rank, world, torch.device(f'cuda:{local}' if torch.cuda.is_available() else 'cpu')


def rng_state():
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s['torch']); np.random.set_state(s['numpy']); random.setstate(s['python'])
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


def save_checkpoint(out, step, state, keep):
    """Atomic: write a temporary file, then rename; an interrupted write never replaces a good checkpoint."""
    path = os.path.join(out, f'ckpt_{step:07d}.pt')
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(out)[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(out):
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith('ckpt_') and f.endswith('.pt'))


def lr_at(step, a, r):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    if r['schedule'] == 'constant':
        return a.lr
    q = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return r['min_lr'] + 0.5 * (a.lr - r['min_lr']) * (1 + math.cos(math.pi * q))


# ----------------------------------------------------------------------------- logging

class Logger:
    """Rank-0 dense line + CSV (rewritten with the union of columns; on resume, rows up to the resumed step are kept)
    + loss-curve PNG + wandb when installed and asked for."""

    def __init__(self, out, rank, wandb_project, config, start_step=0):
        self.rank, self.path, self.wandb = rank, os.path.join(out, 'log.csv'), None
        self.out = out
        self.rows = [r for r in read_csv(self.path) if r['step'] <= start_step]
        if rank == 0 and wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=config)
            except ImportError:
                print('wandb is not installed: logging to CSV only')

    def log(self, row):
        if self.rank != 0:
            return
        self.rows.append(row)
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path + '.tmp', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader(); w.writerows(self.rows)
        os.replace(self.path + '.tmp', self.path)
        if self.wandb:
            self.wandb.log(row, step=row['step'])

    def plot(self, keys=('loss', 'val_psnr', 'val_mse', 'val_recon_psnr', 'val_absrel')):
        """Curves drawn with Pillow, so no plotting library is needed: one panel per logged key (the training loss on
        a log scale, held-out metrics linear) -> curves.png."""
        if self.rank != 0:
            return
        from PIL import Image, ImageDraw
        series = {k: [(r['step'], r[k]) for r in self.rows if r.get(k) is not None] for k in keys}
        series = {k: p for k, p in series.items() if len(p) >= 2}
        if not series:
            return
        W, H, m = 640, 240, 40
        img = Image.new('RGB', (W, H * len(series)), 'white'); d = ImageDraw.Draw(img)
        for n, (key, pts) in enumerate(series.items()):
            log = key == 'loss'
            pts = [(s, math.log10(v)) for s, v in pts if v > 0] if log else pts
            (s0, s1), (y0, y1) = (pts[0][0], pts[-1][0]), (min(p[1] for p in pts), max(p[1] for p in pts) + 1e-9)
            top = n * H
            xy = [(m + (s - s0) / max(1, s1 - s0) * (W - 2 * m), top + H - m - (v - y0) / (y1 - y0) * (H - 2 * m)) for s, v in pts]
            d.line(xy, fill=(30, 90, 200), width=2); d.rectangle([m, top + m, W - m, top + H - m], outline='black')
            lo, hi = (10 ** y0, 10 ** y1) if log else (y0, y1)
            d.text((m, top + 8), f'{key}{" (log10)" if log else ""}: {lo:.4g} .. {hi:.4g}, steps {s0}..{s1}, last {pts[-1][1] if not log else 10 ** pts[-1][1]:.4g}', fill='black')
        img.save(os.path.join(self.out, 'curves.png'))


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: (float(v) if k != 'step' else int(v)) for k, v in r.items() if v not in ('', None)} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- the stages

class EncoderStage:
    """An encoder trained from scratch with its own objective (its training_loss): da3-tiny with DA3's depth and
    ray-map losses (our own small geometric foundation model), vae-tiny with the VAE's."""
    kind = 'encoder'

    def __init__(self, a, device):
        self.net = encoder_lib.build_encoder(a.encoder).to(device)
        if not hasattr(self.net, 'training_loss'):
            raise SystemExit(f'--stage encoder: {a.encoder} has no training objective here; '
                             'use its official weights (--encoder-weights FILE)')
        self.config = asdict(self.net.cfg)

    def loss(self, batch, a, gen):
        return self.net.training_loss(batch)

    def extra_state(self):
        return {}


class DecoderStage:
    """Stage 1: frozen encoder features of all views -> RGB, with level-wise dropout (paper Sec. 4.2)."""
    kind = 'decoder'

    def __init__(self, a, device):
        self.enc = sample.load_encoder(a.encoder, a.encoder_weights, device)
        if self.enc.has_rgb_decoder:
            raise SystemExit(f'--stage decoder: {a.encoder} decodes RGB with its own decoder; nothing to train')
        cfg = decoder_lib.PRESETS[a.decoder]
        cfg = decoder_lib.DecoderConfig(**{**asdict(cfg), 'feat_dim': self.enc.dim, 'noise_tau': a.noise_tau,
                                           'num_levels': self.enc.num_levels, 'patch': self.enc.patch})
        self.net = decoder_lib.RGBDecoder(cfg).to(device)
        self.config = asdict(cfg)
        self.lpips = data.lpips_fn(device) if a.lpips else None
        self.disc = decoder_lib.PatchDiscriminator().to(device) if a.gan >= 0 else None
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=a.lr, betas=(0.5, 0.9)) if self.disc else None
        self.encoder_ref = {'preset': a.encoder, 'weights': a.encoder_weights}

    def loss(self, batch, a, gen):
        images = batch['images']
        B, V, _, H, W = images.shape
        with torch.no_grad():
            levels = self.enc.normalize_levels(self.enc.encode(images))
        keep = decoder_lib.sample_level_keep(B, a.level_dropout, gen, len(levels)).to(images.device)
        pred = self.net(levels, (H // self.enc.patch, W // self.enc.patch), keep=keep)
        loss, parts = decoder_lib.decoder_loss(pred, images, lpips=self.lpips)
        if self.disc is not None and a.step >= a.gan:
            gan_loss, gparts = decoder_lib.adversarial_step(self.net, self.disc, self.disc_opt, pred, images, loss)
            loss = loss + gan_loss
            parts.update(gparts)
        return loss, parts

    def extra_state(self):
        return {'encoder': self.encoder_ref}


class DiffusionStage:
    """Stage 3: M_l (or M1->0, conditioned on level l+1) by rectified flow over all V views (paper Sec. 4.3-4.4)."""
    kind = 'gld'

    def __init__(self, a, device, loader):
        self.enc = sample.load_encoder(a.encoder, a.encoder_weights, device)
        # only M1->0 is conditioned on a deeper level (the cascade); M1..M3 and --independent M0 are not
        if a.level >= self.enc.num_levels:
            raise SystemExit(f'--level {a.level}: {a.encoder} has levels 0..{self.enc.num_levels - 1}')
        cascade = a.level == 0 and not a.independent and self.enc.num_levels > 1
        self.level, self.upper_level = a.level, (1 if cascade else None)
        levels_needed = [self.level] + ([self.upper_level] if self.upper_level is not None else [])
        init_stats = sample.load_checkpoint(a.init)[0].get('stats') if a.init else None  # keep --init's normalisation
        self.stats = (encoder_lib.LatentStats.load(a.stats) if a.stats else
                      encoder_lib.LatentStats.from_state_dict(init_stats) if init_stats else
                      latents.compute_stats(self.enc, loader, levels_needed, a.stats_batches, device))
        overrides = {'latent_dim': self.enc.dim, 'upper_dim': self.enc.dim if self.upper_level is not None else 0,
                     'cam_patch': self.enc.patch, 'checkpointing': a.checkpointing, **({'pos': a.pos} if a.pos else {})}
        cfg = model_lib.GLDConfig(**{**asdict(model_lib.PRESETS[a.model]), **overrides})
        self.net = model_lib.GLD(cfg).to(device)
        self.config = asdict(cfg)
        self.encoder_ref = {'preset': a.encoder, 'weights': a.encoder_weights}

    def loss(self, batch, a, gen):
        lat = latents.training_latents(self.enc, self.stats, batch, self.level, self.upper_level, tau=a.tau, generator=gen)
        drop = torch.rand(lat['x'].shape[0], generator=gen, device='cpu').to(lat['x'].device) < a.cam_drop
        cams = model_lib.drop_cameras(lat['cams'], drop)
        B, V, T, C = lat['x'].shape
        shift = diffusion.shift_alpha(V * T * C)

        def velocity(x_t, t):
            return self.net(x_t, t, lat['cond'], cams, upper=lat['upper'])
        return diffusion.flow_loss(velocity, lat['x'], lat['src_mask'], generator=gen, a=shift, dist=a.t_dist)

    def extra_state(self):
        return {'stats': self.stats.state_dict(), 'level': self.level, 'upper_level': self.upper_level,
                'encoder': self.encoder_ref}


# ----------------------------------------------------------------------------- main loop

def main(argv=None):
    a = get_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(a.seed + rank); np.random.seed(a.seed + rank); random.seed(a.seed + rank)
    os.makedirs(a.out, exist_ok=True)
    recipe = RECIPES['diffusion' if a.stage == 'diffusion' else a.stage]
    a.lr = a.lr if a.lr is not None else recipe['lr']
    ema_decay = a.ema if a.ema is not None else recipe['ema']
    bf16 = device.type == 'cuda' and torch.cuda.is_bf16_supported()
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # data: one sample = V views of one scene, temporal order; sources are chosen per batch below
    size = None if not a.size or a.size == 'buckets' else tuple(int(s) for s in a.size.lower().split('x'))
    dataset = data.make_dataset(a.data, split='train', num_views=a.views, size=size or ('buckets' if a.size == 'buckets' else None),
                                gap=parse_range(a.gap), seed=a.seed)
    loader = data.make_loader(dataset, a.batch_size, shuffle=True, num_workers=a.workers, distributed=world > 1, seed=a.seed)
    val = data.SceneDataset(a.data, split='test', num_views=a.views, size=size, gap=parse_range(a.gap), seed=a.seed, eval=True)

    stage = {'encoder': lambda: EncoderStage(a, device), 'decoder': lambda: DecoderStage(a, device),
             'diffusion': lambda: DiffusionStage(a, device, loader)}[a.stage]()
    net = stage.net
    if a.init:  # continue from earlier weights (e.g. the bundled ones); the optimizer starts fresh
        net.load_state_dict(sample.load_checkpoint(a.init, device)[1])
    ema = diffusion.EMA(net, ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, betas=recipe['betas'], weight_decay=recipe['wd'])
    cache = None
    if a.cache and a.stage == 'diffusion':  # DA3 outputs of fixed view draws, encoded once (see latents.LatentCache)
        if a.size == 'buckets':
            raise SystemExit('--cache works at one image size: pass --size HxW or drop --cache')
        levels = [stage.level] + ([stage.upper_level] if stage.upper_level is not None else [])
        path = latents.LatentCache.path_for(os.path.join('runs', 'cache'), stage.enc, a.data, a.views, a.cache, levels,
                                            stage.level, parse_range(a.src), a.src_mode, a.seed)
        if rank == 0:
            cache = latents.LatentCache.build(path, stage.enc, data.SceneDataset(a.data, 'train', a.views, size, parse_range(a.gap), a.seed),
                                              levels, stage.level, a.cache, parse_range(a.src), a.src_mode, a.seed, device)
        if world > 1:
            dist.barrier()
        cache = cache or latents.LatentCache(path)
    step, bad, epoch, pos = 0, 0, 0, 0  # pos: batches consumed in the current epoch
    gen = torch.Generator().manual_seed(a.seed * 1000 + rank)  # per-rank stream of source counts, t, dropout
    ckpts = list_checkpoints(a.out)
    if a.resume and ckpts:  # exact resume: weights, EMA, optimizer, step, every RNG
        ck = torch.load(ckpts[-1], map_location=device, weights_only=False)
        net.load_state_dict(ck['model']); ema.load_state_dict(ck['ema'], ck.get('ema_updates', 0)); opt.load_state_dict(ck['optimizer'])
        step, epoch, pos = ck['step'], ck['epoch'], ck['pos']
        rng = ck['rng'][rank] if rank < len(ck['rng']) else ck['rng'][0]
        set_rng_state(rng); gen.set_state(rng['gen'])
        if rank == 0:
            print(f'resumed from {ckpts[-1]} at step {step}')
    elif a.resume and rank == 0:
        print(f'--resume: no checkpoint in {a.out}, starting from scratch')
    train_net = DDP(net, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else net
    stage.net = torch.compile(train_net, dynamic=False) if a.compile else train_net  # the loss calls stage.net
    logger = Logger(a.out, rank, a.wandb, vars(a), start_step=step)
    if rank == 0:
        print(f'{a.stage} {"level " + str(a.level) if a.stage == "diffusion" else ""}: '
              f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, {len(dataset)} scenes, world {world}, device {device}')

    def checkpoint_state():
        mine = {**rng_state(), 'gen': gen.get_state()}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, mine)
        else:
            rngs = [mine]
        return {'kind': stage.kind, 'model': net.state_dict(), 'ema': ema.state_dict(), 'ema_updates': ema.num_updates,
                'optimizer': opt.state_dict(),
                'step': step, 'epoch': epoch, 'pos': pos, 'config': stage.config, 'args': vars(a), 'rng': rngs, **stage.extra_state()}

    def batches():  # the order is a function of (seed, epoch) alone, so a resume can skip what was consumed
        nonlocal epoch, pos
        while True:
            if cache:
                source = (cache.batch(idx, device) for idx in cache.batches(a.batch_size, epoch, a.seed, rank, world))
            else:
                loader.sampler.set_epoch(epoch); dataset.set_epoch(epoch)
                source = loader
            for i, b in enumerate(source):
                if i >= pos:
                    pos = i + 1
                    yield b
            epoch, pos = epoch + 1, 0

    it, t_last, seen = batches(), time.time(), 0
    src_lo, src_hi = parse_range(a.src)
    sum_loss = torch.zeros((), device=device); parts_sum = {}
    while step < a.steps:
        a.step = step
        lr = lr_at(step, a, recipe)
        for g in opt.param_groups:
            g['lr'] = lr
        for micro in range(a.accum):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(it).items()}
            if a.stage == 'diffusion' and not cache:  # 1-4 random sources (one count per batch), moved to the front
                n_src = int(torch.randint(src_lo, min(src_hi, a.views - 1) + 1, (1,), generator=gen))
                batch = data.split_views(batch, n_src, generator=gen, mode=a.src_mode)
            if world > 1:  # sync gradients only on the last micro-step
                train_net.require_backward_grad_sync = micro == a.accum - 1
            with autocast:
                loss, parts = stage.loss(batch, a, gen)
            (loss / a.accum).backward()
            seen += batch['c2w'].shape[0] * world
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), recipe['clip'] or float('inf'))
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):  # one host sync per step, by design
            opt.zero_grad(set_to_none=True)
            bad += 1
            print(f'[rank {rank}] step {step}: non-finite loss or gradient, step skipped ({bad} in a row)')
            if bad >= a.max_bad:
                raise SystemExit(f'stopping: {bad} non-finite steps in a row; the last good checkpoint in {a.out} is kept. '
                                 'Lower --lr, check the data, or resume with --resume.')
            continue
        bad = 0
        opt.step(); opt.zero_grad(set_to_none=True); ema.update(net)
        step += 1
        sum_loss += loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float()
        if step % a.log_every == 0 or step == a.steps:
            dt = time.time() - t_last; n = a.log_every if step % a.log_every == 0 else step % a.log_every
            B, V = batch['c2w'].shape[:2]
            H, W = batch['images'].shape[-2:] if 'images' in batch else batch['size']
            patch = stage.enc.patch if hasattr(stage, 'enc') else net.patch  # image pixels per token of the latent
            T = (H // patch) * (W // patch)
            bins = {}  # the loss binned by t: bin sums over counts of the whole interval
            if 't_bin_sum' in parts_sum:
                total, count = parts_sum.pop('t_bin_sum'), parts_sum.pop('t_bin_count')
                bins = {f'loss_t{i}': float(total[i] / count[i]) for i in range(len(total)) if count[i] > 0}
            row = {'step': step, 'loss': float(sum_loss) / n, **{k: float(v) / n for k, v in parts_sum.items()}, **bins,
                   'grad_norm': float(grad_norm), 'lr': lr, 'samples_s': seen / dt, 'tokens_s': seen * V * T / dt,
                   'eta_min': (a.steps - step) * dt / n / 60}
            if device.type == 'cuda' and stage.kind == 'gld':  # 3x forward FLOPs; H100/H200 dense bf16 peak 989 TFLOP/s
                row['mfu'] = row['tokens_s'] / world * 3 * model_lib.flops_per_token(net.cfg, V * T) / 989e12
            logger.log(row)
            sum_loss.zero_(); parts_sum = {}; seen = 0; t_last = time.time()
        if rank == 0 and (step % a.ckpt_every == 0 or step == a.steps):
            save_checkpoint(a.out, step, checkpoint_state(), a.keep)
            logger.plot()
        elif world > 1 and (step % a.ckpt_every == 0 or step == a.steps):
            checkpoint_state()  # the all_gather of RNG states is collective
        if rank == 0 and a.eval_every and (step % a.eval_every == 0 or step == a.steps):
            with ema.swapped(net), torch.no_grad():
                net.eval()
                metrics = sample.evaluate_during_training(stage, val, a, device)
                net.train()
            logger.log({'step': step, **{f'val_{k}': float(v) for k, v in metrics.items()}})
            logger.plot()
    if rank == 0 and a.export:
        with ema.swapped(net):
            sample.export_weights(stage.kind, net, stage.config, stage.extra_state(), a.export, name=os.path.basename(a.out))
    if world > 1:  # every rank finishes (rank 0 writes the last checkpoint) before the process group goes away
        dist.barrier()
        dist.destroy_process_group()
    return a.out


if __name__ == '__main__':
    main()
