"""train.py: one entry point for every stage of GLD (paper Sec. 4): encoder, Stage 1 decoder, Stage 3 DiTs.

`--stage encoder|decoder`, `--level 1` (M1), `--level 0` (M1->0; `--independent`: the ablation's M0); torchrun: DDP.
Also bf16 autocast, torch.compile, EMA, grad accumulation, atomic checkpoints with exact --resume, Ctrl-C checkpoints,
NaN/inf skipping, log line + CSV + curves.png, periodic evaluation; latents on the fly or from --cache.
"""

import argparse
import contextlib
import csv
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import data
import decoder as decoder_lib
import diffusion
import export
import latent_cache
import latents
import model as model_lib
import pipeline
from constants import DEFAULT_ENCODER
from pipeline import list_checkpoints

RECIPES = {  # paper Sec. 5.1, A.1, Tab. 11 (the encoder's is ours): AdamW, lr schedule, grad clip, EMA decay
    'diffusion': dict(lr=5e-5, min_lr=5e-5, schedule='constant', betas=(0.9, 0.95), wd=0.0, clip=1.0, ema=0.9995),
    'decoder': dict(lr=2e-4, min_lr=2e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.0, clip=0.0, ema=0.9978),
    'encoder': dict(lr=3e-4, min_lr=3e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.05, clip=1.0, ema=0.999),
}


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group('what to train')
    g.add_argument('--stage', choices=['encoder', 'decoder', 'diffusion'], default='diffusion', help='training stage')
    g.add_argument(
        '--level', type=int, choices=[0, 1, 2, 3], default=None, help='feature level for --stage diffusion (implies it)'
    )
    g.add_argument(
        '--independent',
        action='store_true',
        help='level 0 without the level-1 condition: the independent M0 of the boundary ablation',
    )
    g.add_argument(
        '--tau', type=float, default=0.0, help='M1->0: noise level of the ground-truth level-1 condition (paper 4.4)'
    )
    g = p.add_argument_group('data')
    g.add_argument('--data', default='data_synth', help="chunk folder, 're10k:PATH', 'dl3dv:PATH'; mixtures 'A*4,B*1'")
    g.add_argument('--views', type=int, default=8, help='views per sample V')
    g.add_argument('--src', default='1-4', help='number of source views per batch, a range lo-hi (paper: 1-4)')
    g.add_argument(
        '--src-mode', default='random', choices=['random', 'ends'], help='random sources (paper) or the ends'
    )
    g.add_argument(
        '--size', default='', help="HxW (multiples of 14), 'buckets' for the paper's mixed sizes; '' = the data's size"
    )
    g.add_argument('--gap', default='1-5', help='frame gap range between consecutive views')
    g.add_argument('--workers', type=int, default=0, help='DataLoader worker processes')
    g.add_argument('--cache', type=int, default=0, help='diffusion: view draws per scene encoded once (0 = off)')
    g = p.add_argument_group('models')
    g.add_argument(
        '--encoder', default=DEFAULT_ENCODER, help='latent encoder: da3-*, vggt-*, dinov2-*, vae* (latents.py)'
    )
    g.add_argument(
        '--encoder-weights', default='auto', help="file; 'auto' = runs/encoder[-NAME], else bundled or random"
    )
    g.add_argument(
        '--decoder',
        default='tiny',
        choices=list(decoder_lib.PRESETS),
        help='RGB decoder preset (stage decoder), see decoder.PRESETS',
    )
    g.add_argument(
        '--decoder-ckpt', default='auto', help="decoder used by periodic evaluation of diffusion runs; 'none' = skip"
    )
    g.add_argument('--model', default='gld-tiny', choices=list(model_lib.PRESETS), help='DiT preset, see model.PRESETS')
    g.add_argument(
        '--pos', default=None, choices=['prope', 'rope3d', 'rope2d'], help='override the positional encoding'
    )
    g.add_argument('--stats', default='', help='latent statistics file (ours or the official .pt); default: compute')
    g.add_argument('--stats-batches', type=int, default=16, help='batches used to compute latent statistics')
    g.add_argument('--level-dropout', type=float, default=0.5, help='decoder: probability of dropping each level')
    g.add_argument(
        '--head-only',
        action='store_true',
        help='encoder: train only the heads of --init (backbone and latents bit-identical)',
    )
    g.add_argument('--noise-tau', type=float, default=0.0, help='decoder: RAE noise augmentation of the input features')
    g.add_argument('--lpips', action='store_true', help='decoder: add LPIPS (needs the lpips package and weights)')
    g.add_argument('--gan', type=int, default=-1, help='decoder: step from which the adversarial loss is on (-1 = off)')
    g.add_argument('--cam-drop', type=float, default=0.1, help='diffusion: camera dropout probability for CFG')
    g.add_argument(
        '--t-dist', default='uniform', choices=['uniform', 'logit_normal'], help='diffusion: time distribution'
    )
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=2000, help='optimizer steps')
    g.add_argument('--batch-size', type=int, default=4, help='scenes per micro-batch per process')
    g.add_argument('--accum', type=int, default=1, help='gradient accumulation micro-steps')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate (default: the recipe of the stage)')
    g.add_argument('--warmup', type=int, default=100, help='linear warmup steps')
    g.add_argument('--ema', type=float, default=None, help='EMA decay (default: the recipe)')
    g.add_argument('--compile', action='store_true', help='torch.compile the trained model')
    g.add_argument(
        '--bf16',
        action='store_true',
        help='bf16 autocast on the CPU too (on by itself on a bf16 GPU); '
        'a CPU with AMX ran the gld-tiny step 1.34x faster',
    )
    g.add_argument('--checkpointing', action='store_true', help='activation checkpointing in the DiT blocks')
    g.add_argument(
        '--init',
        default='',
        help='start the trained network (and its EMA) from these weights: an export or a checkpoint',
    )
    g.add_argument('--seed', type=int, default=0, help='base seed (rank r uses seed + r)')
    g.add_argument('--max-bad', type=int, default=5, help='stop after this many consecutive non-finite losses')
    g = p.add_argument_group('output')
    g.add_argument('--out', default='', help='run folder (default runs/<stage or levelN>[-ENCODER])')
    g.add_argument('--resume', action='store_true', help='continue exactly from the newest checkpoint in --out')
    g.add_argument('--keep', type=int, default=2, help='checkpoints kept')
    g.add_argument('--ckpt-every', type=int, default=500, help='checkpoint interval (steps)')
    g.add_argument('--log-every', type=int, default=20, help='log interval (steps)')
    g.add_argument('--eval-every', type=int, default=500, help='periodic evaluation interval (steps, 0 = off)')
    g.add_argument('--export', default='', help='after training, write the EMA weights as fp16 safetensors here')
    g.add_argument('--force', action='store_true', help='let --export replace the bundled models in weights/tiny')
    return p


def get_args(argv=None):
    """The flags, completed once here (stage from --level, run folder, the recipe's lr and EMA), then never changed."""
    args = build_parser().parse_args(argv)
    if args.level is not None:
        args.stage = 'diffusion'
    elif args.stage == 'diffusion':  # M1, or the only level of a one-level latent (DINOv2, the VAE)
        with torch.device('meta'):
            args.level = min(1, latents.build_encoder(args.encoder).num_levels - 1)
    args.out = args.out or os.path.join('runs', model_name(args))
    args.lr, args.ema = (
        RECIPES[args.stage][k] if getattr(args, k) is None else getattr(args, k) for k in ('lr', 'ema')
    )
    lo, hi = parse_range(args.src, '--src')
    if args.stage == 'diffusion' and not 1 <= lo <= min(hi, args.views - 1):
        raise cli.UserError(f'--src {args.src}: a sample of --views {args.views} has 1..{args.views - 1} source views')
    return args


def parse_range(s, flag):
    lo, _, hi = s.partition('-')
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise cli.UserError(f'{flag} {s}: expected a range lo-hi of integers, e.g. {flag} 1-4') from None


def model_name(args):  # pipeline.model_name of what this run trains: its default run folder and export file name
    return (
        pipeline.run_name(args.level, args.independent, args.encoder)
        if args.stage == 'diffusion'
        else pipeline.model_name(args.stage, args.encoder)
    )


def load_encoder(args, device):
    """The frozen encoder of the latents (--encoder-weights auto: see pipeline.load_encoder)."""
    auto = args.encoder_weights == 'auto' and args.encoder == DEFAULT_ENCODER
    return pipeline.load_encoder(
        args.encoder, pipeline.auto_checkpoint('encoder') if auto else args.encoder_weights, device, ckpt_dir='runs'
    )


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
    return {
        'torch': torch.get_rng_state(),
        'numpy': np.random.get_state(),
        'python': random.getstate(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    np.random.set_state(s['numpy'])
    random.setstate(s['python'])
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


def save_checkpoint(out, step, state, keep):
    """Atomic: write a temporary file, then rename; an interrupted write never replaces a good checkpoint."""
    path = os.path.join(out, f'ckpt_{step:07d}.pt')
    try:
        torch.save(state, path + '.tmp')
    except (OSError, RuntimeError) as e:  # a full disk (PyTorch's writer raises RuntimeError): drop the partial file
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + '.tmp')
        raise cli.UserError(
            f'{path}: cannot write the checkpoint ({cli.first_line(e)}); the older checkpoints in that '
            'folder are intact: free disk space, then continue with --resume'
        ) from None
    os.replace(path + '.tmp', path)
    for old in list_checkpoints(out)[:-keep]:
        os.remove(old)
    return path


def load_newest_checkpoint(out, device):
    """--resume: the newest checkpoint in out that loads -> (path, state); (None, None) when there is none."""
    paths = list_checkpoints(out)
    for path in reversed(paths):
        try:
            ck = torch.load(path, map_location=device, weights_only=False)
            if isinstance(ck, dict) and {'model', 'ema', 'optimizer', 'step', 'rng'} <= set(ck):
                return path, ck
            reason = 'not a training checkpoint'
        except Exception as e:  # truncated or garbage files raise readers' errors of several types
            reason = cli.first_line(e)
        print(f'--resume: skipping {path} ({reason})')
    if paths:
        raise cli.UserError(
            f'--resume: none of the {len(paths)} checkpoints in {out} loads (above); remove them to '
            'start from scratch, or pass another --out'
        )
    return None, None


def lr_at(step, args, r):
    """Linear warm-up to args.lr, then constant or cosine down to the recipe's min_lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if r['schedule'] == 'constant':
        return args.lr
    q = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return r['min_lr'] + 0.5 * (args.lr - r['min_lr']) * (1 + math.cos(math.pi * q))


# ----------------------------------------------------------------------------- logging
class Logger:
    """Rank 0: the dense line, log.csv (all columns; a resume keeps the rows up to its step) and curves.png."""

    def __init__(self, out, rank, start_step=0):
        self.rank, self.out, self.path = rank, out, os.path.join(out, 'log.csv')
        self.rows = [r for r in read_csv(self.path) if r['step'] <= start_step]

    def log(self, row):
        if self.rank != 0:
            return
        self.rows.append(row)
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path + '.tmp', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(self.path + '.tmp', self.path)

    def plot(self, keys=('loss', 'val_psnr', 'val_mean_psnr', 'val_mse', 'val_recon_psnr', 'val_absrel')):
        """curves.png drawn with Pillow: a panel per logged key, the training loss on a log10 axis."""
        from PIL import Image, ImageDraw

        series = {
            k: [(r['step'], r[k]) for r in self.rows if r.get(k) is not None and (k != 'loss' or r[k] > 0)]
            for k in keys
        }
        series = {k: pts for k, pts in series.items() if len(pts) >= 2}
        if self.rank != 0 or not series:
            return
        W, H, m = 640, 240, 40
        img = Image.new('RGB', (W, H * len(series)), 'white')
        d = ImageDraw.Draw(img)
        for top, (key, pts) in zip(range(0, H * len(series), H), series.items()):
            (s0, s1), vals = (pts[0][0], pts[-1][0]), [v for _, v in pts]
            y = [math.log10(v) for v in vals] if key == 'loss' else vals
            y0, y1 = min(y), max(y) + 1e-9
            d.line(
                [
                    (m + (s - s0) / max(1, s1 - s0) * (W - 2 * m), top + H - m - (v - y0) / (y1 - y0) * (H - 2 * m))
                    for (s, _), v in zip(pts, y)
                ],
                fill=(30, 90, 200),
                width=2,
            )
            d.rectangle([m, top + m, W - m, top + H - m], outline='black')
            d.text(
                (m, top + 8),
                f'{key}{" (log10)" if key == "loss" else ""}: {min(vals):.4g} .. {max(vals):.4g}, '
                f'steps {s0}..{s1}, last {vals[-1]:.4g}',
                fill='black',
            )
        img.save(os.path.join(self.out, 'curves.png'))


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [
            {k: (float(v) if k != 'step' else int(v)) for k, v in r.items() if v not in ('', None)}
            for r in csv.DictReader(f)
        ]


# ----------------------------------------------------------------------------- the stages
class EncoderStage:
    """An encoder trained from scratch with its own training_loss (da3-tiny: DA3's depth and ray-map losses)."""

    kind, extra = 'encoder', {}  # extra: what checkpoints and exports record besides the weights

    def __init__(self, args, device, loader, init):  # init: --init's metadata ({} without it)
        self.net = latents.build_encoder(args.encoder).to(device)
        if not hasattr(self.net, 'training_loss'):
            raise cli.UserError(f'--stage encoder: {args.encoder} has no training objective; use --encoder-weights')
        self.config = asdict(self.net.cfg)
        if args.head_only:  # the backbone makes the latents: frozen, so every model trained on them stays valid
            if not (args.init and self.net.has_geometry):
                raise cli.UserError(
                    '--head-only: pass the DA3 encoder to fine-tune (e.g. --init weights/tiny/encoder.safetensors)'
                )
            self.net.backbone.requires_grad_(False)  # AdamW skips parameters without gradients; EMA lerp keeps them
            self.extra = {'latents_sha256': pipeline.latents_sha256(init)}

    def loss(self, batch, step, gen):
        return self.net.training_loss(batch)

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """Median-aligned depth AbsRel, RMSE, delta1; without geometry, the PSNR of its own reconstructions."""
        net = unwrap(self.net)
        if not net.has_geometry:
            ps = [data.psnr(net.reconstruct(s['images']).clamp(0, 1), s['images']).mean() for s in scenes]
            return {'recon_psnr': float(torch.stack(ps).mean())}
        m = [data.depth_metrics(net(s['images'])['depth'], s['depths'], align='median') for s in scenes]
        return {k: float(np.mean([x[k] for x in m])) for k in m[0]}


class DecoderStage:
    """Stage 1: frozen encoder features of all views -> RGB, with level-wise dropout (paper Sec. 4.2)."""

    kind = 'decoder'

    def __init__(self, args, device, loader, init):
        self.enc = load_encoder(args, device)
        if self.enc.has_rgb_decoder:
            raise cli.UserError(f'--stage decoder: {args.encoder} decodes RGB with its own decoder; nothing to train')
        cfg = decoder_lib.DecoderConfig(
            **{
                **asdict(decoder_lib.PRESETS[args.decoder]),
                'feat_dim': self.enc.dim,
                'noise_tau': args.noise_tau,
                'num_levels': self.enc.num_levels,
                'patch': self.enc.patch,
            }
        )
        self.net, self.config = decoder_lib.RGBDecoder(cfg).to(device), asdict(cfg)
        self.level_dropout, self.gan_start = args.level_dropout, args.gan
        self.lpips = data.lpips_fn(device) if args.lpips else None
        self.disc = decoder_lib.PatchDiscriminator().to(device) if args.gan >= 0 else None
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if self.disc else None
        self.extra = {'encoder': {'preset': args.encoder, **self.enc.source}}  # the file and hash that made the latents

    def levels(self, images):
        H, W = images.shape[-2:]
        with torch.no_grad():
            return self.enc.normalize_levels(self.enc.encode(images)), (H // self.enc.patch, W // self.enc.patch)

    def loss(self, batch, step, gen):
        images = batch['images']
        levels, hw = self.levels(images)
        keep = decoder_lib.sample_level_keep(images.shape[0], self.level_dropout, gen, len(levels)).to(images.device)
        pred = self.net(levels, hw, keep=keep)
        loss, parts = decoder_lib.decoder_loss(pred, images, lpips=self.lpips)
        if self.disc is not None and step >= self.gan_start:
            gan_loss, gparts = decoder_lib.adversarial_step(self.net, self.disc, self.disc_opt, pred, images, loss)
            loss, parts = loss + gan_loss, {**parts, **gparts}
        return loss, parts

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """PSNR of the validation scenes reconstructed from all four levels."""
        ps = [data.psnr(unwrap(self.net)(*self.levels(s['images'])).clamp(0, 1), s['images']).mean() for s in scenes]
        return {'recon_psnr': float(torch.stack(ps).mean())}


class DiffusionStage:
    """Stage 3: M_l (or M1->0, conditioned on level l+1) by rectified flow over all V views (paper Sec. 4.3-4.4)."""

    kind = 'gld'

    def __init__(self, args, device, loader, init):
        self.enc = load_encoder(args, device)
        if args.level >= self.enc.num_levels:
            raise cli.UserError(f'--level {args.level}: {args.encoder} has levels 0..{self.enc.num_levels - 1}')
        self.level = args.level
        self.upper_level = pipeline.cascade_upper(args.level, args.independent, self.enc.num_levels)
        self.levels_needed = [self.level] + ([self.upper_level] if self.upper_level is not None else [])
        self.tau, self.cam_drop, self.t_dist = args.tau, args.cam_drop, args.t_dist
        # --init's normalisation, unless it is of another level (M2 from M1's weights: a warm start, its own statistics)
        init_stats = init['stats'] if all(f'mean{l}' in init.get('stats', {}) for l in self.levels_needed) else None
        self.stats = (
            latents.LatentStats.load(args.stats)
            if args.stats
            else latents.LatentStats.from_state_dict(init_stats)
            if init_stats
            else latents.compute_stats(self.enc, loader, self.levels_needed, args.stats_batches, device)
        )
        overrides = {
            'latent_dim': self.enc.dim,
            'upper_dim': self.enc.dim if self.upper_level is not None else 0,
            'cam_patch': self.enc.patch,
            'checkpointing': args.checkpointing,
            **({'pos': args.pos} if args.pos else {}),
        }
        cfg = model_lib.GLDConfig(**{**asdict(model_lib.PRESETS[args.model]), **overrides})
        self.net, self.config = model_lib.GLD(cfg).to(device), asdict(cfg)
        self.extra = {
            'stats': self.stats.state_dict(),
            'level': self.level,
            'upper_level': self.upper_level,
            'encoder': {'preset': args.encoder, **self.enc.source},
        }  # the file and hash that made the latents
        self.dec = self.eval_decoder(args, device)

    def eval_decoder(self, args, device):
        """The RGB decoder of periodic evaluation: the encoder's own, --decoder-ckpt, 'auto', or None (skipped)."""
        if args.decoder_ckpt == 'none':
            return None
        if self.enc.has_rgb_decoder:
            return self.enc.rgb_decoder()
        if args.decoder_ckpt != 'auto':
            return pipeline.load_decoder(args.decoder_ckpt, device)
        name = pipeline.model_name('decoder', args.encoder)
        if args.encoder != DEFAULT_ENCODER and not os.path.isdir(os.path.join('runs', name)):
            print(
                f'note: no runs/{name}: periodic evaluation is skipped (train it with: {pipeline.train_command(name)})'
            )
            return None
        return pipeline.load_decoder(pipeline.auto_checkpoint(name), device)

    def loss(self, batch, step, gen):
        x, inputs = latents.training_latents(
            self.enc, self.stats, batch, self.level, self.upper_level, self.tau, self.cam_drop, generator=gen
        )
        shift = diffusion.shift_alpha(x[0].numel())  # from V*T*C of the latents (B,V,T,C)
        velocity = inputs.velocity_fn(self.net)
        return diffusion.flow_loss(velocity, x, inputs.src_mask, generator=gen, a=shift, dist=self.t_dist)

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """N=2 -> 6 with 10 Euler steps (psnr, mse) and with 1 (mean_psnr, mean_mse: the posterior mean, the bundled
        default): the generated level's normalised MSE on the targets, their PSNR decoded with the true upper level
        (cascade) or the ones propagated from it (independent), a grid of 4 scenes (10 steps)."""
        if self.dec is None:
            return {}
        meta = {'stats': self.stats, 'upper_level': self.upper_level}
        pipe = pipeline.Pipeline(
            self.enc,
            self.dec,
            {self.level: (unwrap(self.net), meta)},
            boundary=self.level if self.upper_level is None else self.upper_level,
            log=lambda *_: None,
            progress=False,
        )
        m, grids = {k: [] for k in ('psnr', 'mse', 'mean_psnr', 'mean_mse')}, []
        for i, s in enumerate(scenes):
            full = self.enc.encode(s['images'])
            given = {l: full[l] for l in range(self.level + 1, pipe.boundary + 1)}  # ground-truth deeper levels
            for prefix, steps, cfg_scale in (('', 10, 1.5), ('mean_', 1, 1.0)):
                out = pipe.generate(
                    s['images'], s['c2w'], s['K'], 2, steps=steps, cfg_scale=cfg_scale, seed=i, given=given
                )
                m[prefix + 'psnr'].append(data.psnr(out['images'][:, 2:], s['images'][:, 2:]).mean())
                gen, true = (
                    self.stats.normalize(f, self.level)[:, 2:] for f in (out['levels'][self.level], full[self.level])
                )
                m[prefix + 'mse'].append((gen - true).pow(2).mean())
                if not prefix:  # the grid shows the 10-step samples
                    grids.append(export.make_grid(s['images'][0, :2], out['images'][0], s['images'][0, 2:]))
        export.save_image(torch.cat(grids[:4], 1), png)
        return {k: float(torch.stack(v).mean()) for k, v in m.items()}


def unwrap(net):  # the plain module inside DDP and torch.compile wrappers
    net = getattr(net, '_orig_mod', net)
    return getattr(net, 'module', net)


STAGES = {'encoder': EncoderStage, 'decoder': DecoderStage, 'diffusion': DiffusionStage}


def validation_scenes(val, device, n=8):
    scenes = [data.collate_one(val[i]) for i in range(min(n, len(val)))]
    return [
        data.split_views({k: v.to(device) if torch.is_tensor(v) else v for k, v in s.items()}, 2, mode='ends')
        for s in scenes
    ]


def build_cache(args, stage, size, gap, rank, world, device):
    """--cache: the latents of fixed view draws, encoded once by rank 0 (latent_cache.LatentCache)."""
    if args.size == 'buckets':
        raise cli.UserError('--cache works at one image size: pass --size HxW or drop --cache')
    src = parse_range(args.src, '--src')
    path = latent_cache.LatentCache.path_for(
        os.path.join('runs', 'cache'),
        stage.enc,
        args.data,
        args.views,
        args.cache,
        stage.levels_needed,
        stage.level,
        src,
        args.src_mode,
        args.seed,
    )
    cache = None
    if rank == 0:
        scenes = data.SceneDataset(args.data, 'train', args.views, size, gap, args.seed)
        cache = latent_cache.LatentCache.build(
            path, stage.enc, scenes, stage.levels_needed, stage.level, args.cache, src, args.src_mode, args.seed, device
        )
    if world > 1:
        dist.barrier()
    return cache or latent_cache.LatentCache(path)


# ----------------------------------------------------------------------------- main loop
STOP = []  # set by the first Ctrl-C of a one-process run (main clears it and installs interrupt)


def interrupt(signum, frame):
    """The first Ctrl-C ends training with a checkpoint after the step in flight; a second one at once."""
    STOP.append(signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if args.export and os.path.realpath(args.export) == os.path.realpath(pipeline.WEIGHTS) and not args.force:
        raise cli.UserError(
            f'--export {args.export}: that folder holds the bundled models; export to a new folder '
            '(e.g. --export weights/mine) or add --force to replace them'
        )
    data.make_output_dir(args.out)
    recipe = RECIPES[args.stage]
    bf16 = device.type == 'cuda' and torch.cuda.is_bf16_supported() or args.bf16 and device.type == 'cpu'
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    # data: one sample = V views of one scene, temporal order; sources are chosen per batch below
    size, gap, (src_lo, src_hi) = (
        data.parse_size(args.size, buckets=True),
        parse_range(args.gap, '--gap'),
        parse_range(args.src, '--src'),
    )
    dataset = data.make_dataset(args.data, split='train', num_views=args.views, size=size, gap=gap, seed=args.seed)
    loader = data.make_loader(
        dataset, args.batch_size, shuffle=True, num_workers=args.workers, distributed=world > 1, seed=args.seed
    )
    val = data.SceneDataset(
        args.data,
        split='test',
        num_views=args.views,
        size=None if size == 'buckets' else size,
        gap=gap,
        seed=args.seed,
        eval=True,
    )
    # the stage (its network, loss and evaluation), EMA, optimizer, the latent cache, resume
    init, init_sd = pipeline.load_checkpoint(args.init, device) if args.init else ({}, None)  # read once, hash printed
    stage = STAGES[args.stage](args, device, loader, init)
    net = stage.net
    if rank == 0 and hasattr(stage, 'enc'):  # the latents' encoder, as the checkpoints record it
        print(
            f'{args.stage}: encoder {stage.enc.source["weights"]} (sha256 {(stage.enc.source["sha256"] or "-")[:12]})'
        )
    if args.init:  # continue from earlier weights (e.g. the bundled ones); the optimizer starts fresh
        net.load_state_dict(init_sd)
    ema = diffusion.EMA(net, args.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=recipe['betas'], weight_decay=recipe['wd'])
    cache = (
        build_cache(args, stage, size, gap, rank, world, device) if args.cache and args.stage == 'diffusion' else None
    )
    step, bad, epoch, pos = 0, 0, 0, 0  # pos: batches consumed in the current epoch
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # per-rank stream of source counts, t, dropout
    path, ck = load_newest_checkpoint(args.out, device) if args.resume else (None, None)
    if ck:  # exact resume: weights, EMA, optimizer, step, every RNG
        net.load_state_dict(ck['model'])
        ema.load_state_dict(ck['ema'], ck.get('ema_updates', 0))
        opt.load_state_dict(ck['optimizer'])
        step, epoch, pos = ck['step'], ck['epoch'], ck['pos']
        rng = ck['rng'][rank] if rank < len(ck['rng']) else ck['rng'][0]
        set_rng_state(rng)
        gen.set_state(rng['gen'])
        if rank == 0:
            print(f'resumed from {path} at step {step}')
    elif args.resume and rank == 0:
        print(f'--resume: no checkpoint in {args.out}, starting from scratch')
    train_net = DDP(net, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else net
    stage.net = torch.compile(train_net, dynamic=False) if args.compile else train_net  # the loss calls stage.net
    logger = Logger(args.out, rank, start_step=step)
    if rank == 0:
        print(
            f'{args.stage} {"level " + str(args.level) if args.stage == "diffusion" else ""}: '
            f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, {len(dataset)} scenes, world {world}, device {device}'
        )

    def checkpoint_state():
        mine = {**rng_state(), 'gen': gen.get_state()}
        rngs = [mine] * world
        if world > 1:  # collective: every rank calls checkpoint_state
            dist.all_gather_object(rngs, mine)
        return {
            'kind': stage.kind,
            'model': net.state_dict(),
            'ema': ema.state_dict(),
            'ema_updates': ema.num_updates,
            'optimizer': opt.state_dict(),
            'step': step,
            'epoch': epoch,
            'pos': pos,
            'config': stage.config,
            'args': vars(args),
            'rng': rngs,
            **stage.extra,
        }

    def batches():  # the order is a function of (seed, epoch) alone, so a resume can skip what was consumed
        nonlocal epoch, pos
        while True:
            if cache:
                source = (
                    cache.batch(idx, device) for idx in cache.batches(args.batch_size, epoch, args.seed, rank, world)
                )
            else:
                loader.sampler.set_epoch(epoch)
                dataset.set_epoch(epoch)
                source = loader
            for i, b in enumerate(source):
                if i >= pos:
                    pos = i + 1
                    yield b
            epoch, pos = epoch + 1, 0

    STOP.clear()
    if world == 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt)
    it, t_last, seen, skipped = batches(), time.time(), 0, 0
    sum_loss = torch.zeros((), device=device)
    parts_sum = {}
    while step < args.steps:
        lr = lr_at(step, args, recipe)
        for g in opt.param_groups:
            g['lr'] = lr
        for micro in range(args.accum):
            batch = next(it)
            skipped += int(batch.pop('skipped').sum()) if 'skipped' in batch else 0  # unreadable frames (warned)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if args.stage == 'diffusion' and not cache:  # 1-4 sources (one count per batch), moved to the front
                n_src = int(torch.randint(src_lo, min(src_hi, args.views - 1) + 1, (1,), generator=gen))
                batch = data.split_views(batch, n_src, generator=gen, mode=args.src_mode)
            if world > 1:  # sync gradients only on the last micro-step
                train_net.require_backward_grad_sync = micro == args.accum - 1
            with autocast:
                loss, parts = stage.loss(batch, step, gen)
            (loss / args.accum).backward()
            seen += batch['c2w'].shape[0] * world
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), recipe['clip'] or float('inf'))
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):  # one host sync per step, by design
            opt.zero_grad(set_to_none=True)
            bad += 1
            print(f'[rank {rank}] step {step}: non-finite loss or gradient, step skipped ({bad} in a row)')
            if bad >= args.max_bad:
                raise SystemExit(
                    f'stopping: {bad} non-finite steps in a row; the last good checkpoint in {args.out} is kept. '
                    'Lower --lr, check the data, or resume with --resume.'
                )
            continue
        bad = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)
        step += 1
        sum_loss += loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float()
        if step % args.log_every == 0 or step == args.steps:
            dt, n = time.time() - t_last, args.log_every if step % args.log_every == 0 else step % args.log_every
            logger.log(
                log_row(step, sum_loss, parts_sum, n, grad_norm, lr, seen, dt, batch, stage, net, args, world, device)
            )
            sum_loss.zero_()
            parts_sum = {}
            seen = 0
            t_last = time.time()
        saved = step % args.ckpt_every == 0 or step == args.steps
        if saved:
            state = checkpoint_state()
            if rank == 0:
                save_checkpoint(args.out, step, state, args.keep)
                logger.plot()
        if rank == 0 and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            with ema.swapped(net):
                net.eval()
                metrics = stage.evaluate(validation_scenes(val, device), os.path.join(args.out, f'val_{step:07d}.png'))
                net.train()
            logger.log({'step': step, **{f'val_{k}': float(v) for k, v in metrics.items()}})
            logger.plot()
        if STOP:
            path = (
                os.path.join(args.out, f'ckpt_{step:07d}.pt')
                if saved
                else save_checkpoint(args.out, step, checkpoint_state(), args.keep)
            )
            print(
                f'interrupted: wrote {path} at step {step}; continue with the same command and --resume',
                file=sys.stderr,
            )
            raise SystemExit(130)
    if world == 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if skipped:
        print(f'[rank {rank}] skipped {skipped} training samples with unreadable frames (the warnings above name them)')
    if rank == 0 and args.export:
        with ema.swapped(net):
            pipeline.export_weights(stage.kind, net, stage.config, stage.extra, args.export, name=model_name(args))
    if world > 1:  # every rank finishes (rank 0 writes the last checkpoint) before the process group goes away
        dist.barrier()
        dist.destroy_process_group()
    return args.out


def log_row(step, sum_loss, parts_sum, n, grad_norm, lr, seen, dt, batch, stage, net, args, world, device):
    """The dense log line of the last n steps: loss and its parts, the loss binned by t, throughput, MFU on GPU."""
    B, V = batch['c2w'].shape[:2]
    H, W = batch['images'].shape[-2:] if 'images' in batch else batch['size']
    patch = stage.enc.patch if hasattr(stage, 'enc') else unwrap(stage.net).patch  # image pixels per token side
    T = (H // patch) * (W // patch)
    if world > 1:  # the logged loss is the mean over ranks (one collective, at log steps only)
        dist.all_reduce(sum_loss)
        sum_loss /= world
    parts, bins = dict(parts_sum), {}  # the loss binned by t: bin sums over counts of the whole interval
    if 't_bin_sum' in parts:
        total, count = parts.pop('t_bin_sum'), parts.pop('t_bin_count')
        bins = {f'loss_t{i}': float(total[i] / count[i]) for i in range(len(total)) if count[i] > 0}
    row = {
        'step': step,
        'loss': float(sum_loss) / n,
        **{k: float(v) / n for k, v in parts.items()},
        **bins,
        'grad_norm': float(grad_norm),
        'lr': lr,
        'samples_s': seen / dt,
        'tokens_s': seen * V * T / dt,
        'eta_min': (args.steps - step) * dt / n / 60,
    }
    peak = model_lib.peak_tflops(device)
    if peak and stage.kind == 'gld':  # 3x forward FLOPs (forward + backward) over the GPU's dense bf16 peak
        row['mfu'] = row['tokens_s'] / world * 3 * model_lib.flops_per_token(net.cfg, V * T) / (peak * 1e12)
    return row


if __name__ == '__main__':
    cli.run_cli(main)
