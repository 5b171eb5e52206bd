"""train.py: one entry point for every GLD stage (Sec. 4): encoder, Stage 1 decoder, Stage 3 DiTs.

`--stage encoder|decoder`, `--level 1` (M1), `--level 0` (M1->0; `--independent`: the ablation's
M0); torchrun: DDP. Also bf16 autocast, torch.compile, EMA, grad accumulation, atomic checkpoints
with an exact --resume, one run per --out (a lock), a checkpoint on SIGINT, SIGTERM or SIGUSR1 on
every rank (safety.py), NaN/inf skipping, periodic evaluation, a log line with log.csv and
curves.png (runlog.py); latents on the fly or from --cache.
"""

import argparse
import contextlib
import math
import os
import random
import sys
import threading
from dataclasses import asdict, replace

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
import metrics
import model as model_lib
import pipeline
import runlog
import safety
from constants import DEFAULT_ENCODER
from pipeline import list_checkpoints

# paper Sec. 5.1, A.1, Tab. 11 (the encoder's is ours): AdamW, lr schedule, grad clip, EMA decay
RECIPES = {
    'diffusion': dict(lr=5e-5, min_lr=5e-5, schedule='constant', betas=(0.9, 0.95), wd=0.0, clip=1.0, ema=0.9995),
    'decoder': dict(lr=2e-4, min_lr=2e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.0, clip=0.0, ema=0.9978),
    'encoder': dict(lr=3e-4, min_lr=3e-5, schedule='cosine', betas=(0.9, 0.95), wd=0.05, clip=1.0, ema=0.999),
}


EXIT_STATUS = (
    'exit status: 0 done; 2 a user error (one line); 128+N after signal N, its checkpoint '
    'written (130 SIGINT, 143 SIGTERM, 138 SIGUSR1): continue with --resume'
)


def build_parser():
    formatter = argparse.ArgumentDefaultsHelpFormatter
    description = __doc__.split('\n')[0]
    p = argparse.ArgumentParser(description=description, formatter_class=formatter, epilog=EXIT_STATUS)
    arg = p.add_argument_group('what to train').add_argument
    arg('--stage', choices=list(STAGES), default='diffusion', help='training stage')
    arg('--level', type=int, choices=range(4), help='feature level (implies --stage diffusion)')
    arg(
        '--independent',
        action='store_true',
        help='level 0 without the level-1 condition: the independent M0 of the boundary ablation',
    )
    arg('--tau', type=float, default=0.0, help='M1->0: noise level of the true level-1 condition')
    arg = p.add_argument_group('data').add_argument
    arg('--data', default='data_synth', help="chunks, 're10k:PATH', 'dl3dv:PATH'; a mix 'A*4,B*1'")
    arg('--views', type=int, default=8, help='views per sample V')
    arg('--src', default='1-4', help='number of source views per batch, a range lo-hi (paper: 1-4)')
    arg('--src-mode', default='random', choices=['random', 'ends'], help='random (paper) or ends')
    arg('--size', default='', help="HxW (multiples of 14); 'buckets': the paper's; '': the data's")
    arg('--gap', default='1-5', help='frame gap range between consecutive views')
    arg('--workers', type=int, default=0, help='DataLoader worker processes')
    arg('--cache', type=int, default=0, help='diffusion: draws per scene, encoded once (0 = off)')
    arg = p.add_argument_group('models').add_argument
    arg('--encoder', default=DEFAULT_ENCODER, help='latent encoder: da3-*, vggt-*, dinov2-*, vae*')
    arg('--encoder-weights', default='auto', help="file, hub name (DA3-BASE...), 'auto' (runs/encoder*)")
    arg('--decoder', default='tiny', choices=list(decoder_lib.PRESETS), help='RGB decoder preset')
    arg('--decoder-ckpt', default='auto', help="the evaluation's decoder (diffusion); 'none': skip")
    arg('--model', default='gld-tiny', choices=list(model_lib.PRESETS), help='DiT preset')
    arg('--pos', choices=['prope', 'rope3d', 'rope2d'], help='override the positional encoding')
    arg('--stats', default='', help='latent statistics (ours or official .pt); default: compute')
    arg('--stats-batches', type=int, default=16, help='batches used to compute latent statistics')
    arg('--level-dropout', type=float, default=0.5, help='decoder: probability to drop each level')
    arg('--head-only', action='store_true', help='encoder: heads of --init only (backbone frozen)')
    arg('--noise-tau', type=float, default=0.0, help='decoder: RAE noise augmentation of its input')
    arg('--lpips', action='store_true', help='decoder: add LPIPS (needs lpips and its weights)')
    arg('--gan', type=int, default=-1, help='decoder: adversarial loss from this step (-1 = off)')
    arg('--cam-drop', type=float, default=0.1, help='diffusion: camera dropout probability for CFG')
    arg('--t-dist', default='uniform', choices=['uniform', 'logit_normal'], help='t distribution')
    arg = p.add_argument_group('optimisation').add_argument
    arg('--steps', type=int, default=2000, help='optimizer steps')
    arg('--batch-size', type=int, default=4, help='scenes per micro-batch per process')
    arg('--accum', type=int, default=1, help='gradient accumulation micro-steps')
    arg('--lr', type=float, help='peak learning rate (default: the recipe of the stage)')
    arg('--warmup', type=int, default=100, help='linear warmup steps')
    arg('--schedule', choices=['constant', 'cosine'], help='lr after warm-up (default: the recipe)')
    arg('--min-lr', type=float, help='cosine: the lr at --steps (default: the recipe)')
    arg('--budget-minutes', type=float, default=0.0, help='stop as at --steps after N minutes (runlog.TrainClock)')
    arg('--ema', type=float, help='EMA decay (default: the recipe)')
    arg('--compile', action='store_true', help='torch.compile the trained model')
    arg(
        '--bf16',
        action='store_true',
        help='bf16 autocast on the CPU too (on by itself on a bf16 GPU); '
        'a CPU with AMX ran the gld-tiny step 1.34x faster',
    )
    arg('--checkpointing', action='store_true', help='activation checkpointing in the DiT blocks')
    arg('--init', default='', help='start the network and its EMA from an export or a checkpoint')
    arg('--seed', type=int, default=0, help='base seed (rank r uses seed + r)')
    arg('--max-bad', type=int, default=5, help='stop after N non-finite losses in a row')
    arg = p.add_argument_group('output').add_argument
    arg('--out', default='', help='run folder (default runs/<stage or levelN>[-ENCODER])')
    arg('--resume', action='store_true', help='continue exactly from the last checkpoint in --out')
    arg('--keep', type=int, default=2, help='checkpoints kept')
    arg('--ckpt-every', type=int, default=500, help='checkpoint interval (steps)')
    arg('--log-every', type=int, default=20, help='log interval (steps)')
    arg('--eval-every', type=int, default=500, help='evaluation interval (steps, 0 = off)')
    arg('--export', default='', help='write the EMA weights here after training (fp16 safetensors)')
    arg('--force', action='store_true', help='let --export replace the bundled weights/tiny')
    return p


def get_args(argv=None):
    """The flags, completed once here (stage from --level, run folder, the recipe's lr and EMA)."""
    args = build_parser().parse_args(argv)
    if args.level is not None:
        args.stage = 'diffusion'
    elif args.stage == 'diffusion':  # M1, or the only level of a one-level latent (DINOv2, the VAE)
        with torch.device('meta'):
            args.level = min(1, latents.build_encoder(args.encoder).num_levels - 1)
    args.out = args.out or os.path.join('runs', model_name(args))
    recipe = RECIPES[args.stage]
    args.lr = recipe['lr'] if args.lr is None else args.lr
    args.ema = recipe['ema'] if args.ema is None else args.ema
    args.schedule = args.schedule or recipe['schedule']
    args.min_lr = recipe['min_lr'] if args.min_lr is None else args.min_lr
    lo, hi = parse_range(args.src, '--src')
    if args.stage == 'diffusion' and not 1 <= lo <= min(hi, args.views - 1):
        V = args.views
        message = f'--src {args.src}: a sample of --views {V} has 1..{V - 1} source views'
        raise cli.UserError(message)
    bundled = os.path.realpath(pipeline.WEIGHTS)
    if args.export and os.path.realpath(args.export) == bundled and not args.force:
        raise cli.UserError(
            f'--export {args.export}: that folder holds the bundled models; export to a new folder '
            '(e.g. --export weights/mine) or add --force to replace them'
        )
    return args


def parse_range(s, flag):
    lo, _, hi = s.partition('-')
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        message = f'{flag} {s}: expected a range lo-hi of integers, e.g. {flag} 1-4'
        raise cli.UserError(message) from None


def model_name(args):
    """pipeline.model_name of what this run trains: its default run folder and export file name."""
    if args.stage == 'diffusion':
        return pipeline.run_name(args.level, args.independent, args.encoder)
    return pipeline.model_name(args.stage, args.encoder)


def load_encoder(args, device):
    """The frozen encoder of the latents (--encoder-weights auto: see pipeline.load_encoder)."""
    weights = args.encoder_weights
    if weights == 'auto' and args.encoder == DEFAULT_ENCODER:
        weights = pipeline.auto_checkpoint('encoder')
    return pipeline.load_encoder(args.encoder, weights, device, ckpt_dir='runs')


# ------------------------------------------------------------------ distributed, data, RNG
def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` runs as one process."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank = int(os.environ['RANK'])
    world = int(os.environ['WORLD_SIZE'])
    local = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return rank, world, torch.device(f'cuda:{local}' if torch.cuda.is_available() else 'cpu')


def build_data(args, world):
    """The training loader (a sample: V views of a scene in temporal order), the held-out scenes."""
    size = data.parse_size(args.size, buckets=True)
    gap = parse_range(args.gap, '--gap')
    dataset = data.make_dataset(args.data, split='train', num_views=args.views, size=size, gap=gap, seed=args.seed)
    loader = data.make_loader(
        dataset, args.batch_size, shuffle=True, num_workers=args.workers, distributed=world > 1, seed=args.seed
    )
    val_size = None if size == 'buckets' else size
    val = data.SceneDataset(args.data, 'test', args.views, val_size, gap, args.seed, eval=True)
    return loader, val


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Batches:
    """The training batches on the device, epoch after epoch. Their order is a function of
    (seed, epoch) alone, so a resume at (epoch, pos) skips the batches that were consumed."""

    def __init__(self, loader, cache, args, rank, world, device):
        self.loader = loader
        self.cache = cache
        self.batch_size = args.batch_size
        self.seed = args.seed
        self.rank = rank
        self.world = world
        self.device = device
        self.epoch = 0
        self.pos = 0  # batches consumed in the current epoch
        self.skipped = 0  # training samples with unreadable frames (warned when read)

    def __iter__(self):
        while True:
            for i, batch in enumerate(self.epoch_batches()):
                if i >= self.pos:
                    self.pos = i + 1
                    if 'skipped' in batch:
                        self.skipped += int(batch.pop('skipped').sum())
                    yield to_device(batch, self.device)
            self.epoch += 1
            self.pos = 0

    def epoch_batches(self):
        if self.cache:
            draws = self.cache.batches(self.batch_size, self.epoch, self.seed, self.rank, self.world)
            return (self.cache.batch(idx, self.device) for idx in draws)
        self.loader.sampler.set_epoch(self.epoch)
        self.loader.dataset.set_epoch(self.epoch)
        # the workers' base seed from (seed, rank, epoch), not from torch's global RNG: a
        # resume that opens the epoch again draws no number the uninterrupted run did not
        epoch_seed = (self.seed * 1000 + self.rank) * 100003 + self.epoch
        self.loader.generator = torch.Generator().manual_seed(epoch_seed)
        return self.loader


def split_sources(batch, args, rng):
    """Diffusion: --src source views (one count per batch), moved to the front of the views."""
    lo, hi = parse_range(args.src, '--src')
    n_src = int(torch.randint(lo, min(hi, args.views - 1) + 1, (1,), generator=rng))
    return data.split_views(batch, n_src, generator=rng, mode=args.src_mode)


def validation_scenes(val, device, n=8):
    """The first n held-out scenes on the device: the two end views are the sources."""
    scenes = [to_device(data.collate_one(val[i]), device) for i in range(min(n, len(val)))]
    return [data.split_views(s, 2, mode='ends') for s in scenes]


def build_cache(args, stage, rank, world, device):
    """--cache: the latents of fixed view draws, encoded once by rank 0 (latent_cache.LatentCache)."""
    if args.size == 'buckets':
        raise cli.UserError('--cache works at one image size: pass --size HxW or drop --cache')
    size = data.parse_size(args.size, buckets=True)
    gap = parse_range(args.gap, '--gap')
    src = parse_range(args.src, '--src')
    enc = stage.enc
    levels = stage.levels_needed
    level = stage.level
    draws = args.cache
    folder = os.path.join('runs', 'cache')
    path = latent_cache.LatentCache.path_for(
        folder, enc, args.data, args.views, draws, levels, level, src, args.src_mode, args.seed
    )
    cache = None
    if rank == 0:
        scenes = data.SceneDataset(args.data, 'train', args.views, size, gap, args.seed)
        cache = latent_cache.LatentCache.build(
            path, enc, scenes, levels, level, draws, src, args.src_mode, args.seed, device
        )
    if world > 1:
        dist.barrier()
    return cache or latent_cache.LatentCache(path)


def lr_at(step, args):
    """Linear warm-up to args.lr, then constant or cosine down to args.min_lr at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == 'constant':
        return args.lr
    q = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * q))


def mfu(tokens_s, tokens, cfg, peak_tflops):
    """Model FLOPs utilisation: 3x the forward FLOPs (forward + backward) over the bf16 peak."""
    return tokens_s * 3 * model_lib.flops_per_token(cfg, tokens) / (peak_tflops * 1e12)


# ------------------------------------------------------------------ checkpoints
def checkpoint_state(step, stage, net, ema, opt, batches, rng, clock, args, world):
    """What an exact --resume needs: weights, EMA, optimizer, step, data position, RNGs."""
    mine = safety.rng_state(rng)
    rngs = [mine] * world
    if world > 1:  # a collective: every rank calls checkpoint_state
        dist.all_gather_object(rngs, mine)
    state = {
        'kind': stage.kind,
        'model': net.state_dict(),
        'ema': ema.state_dict(),
        'ema_updates': ema.num_updates,
        'optimizer': opt.state_dict(),
        'step': step,
        'epoch': batches.epoch,
        'pos': batches.pos,
        'config': stage.config,
        'args': dict(vars(args)),
        'rng': rngs,
        'train_min': clock.minutes,
        **stage.extra,
    }
    # the adversarial decoder (--gan): its discriminator and that one's optimizer resume with it
    if getattr(stage, 'disc', None) is not None:
        state['disc'] = stage.disc.state_dict()
        state['disc_optimizer'] = stage.disc_opt.state_dict()
    return state


def save_checkpoint(out, step, state, keep):
    """Atomic (safety.write_file): an interrupted or failed write never replaces a good one."""
    path = os.path.join(out, f'ckpt_{step:07d}.pt')
    try:
        safety.write_file(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # a full disk (PyTorch's writer raises RuntimeError)
        raise cli.UserError(
            f'{path}: cannot write the checkpoint ({cli.first_line(e)}); the older checkpoints in '
            'that folder are intact: free disk space, then continue with --resume'
        ) from None
    for old in list_checkpoints(out)[:-keep]:
        os.remove(old)
    return path


def load_newest_checkpoint(out, device):
    """--resume: the newest checkpoint in out that loads -> (path, state); (None, None): none."""
    paths = list_checkpoints(out)
    for path in reversed(paths):
        try:
            ck = safety.load_plain(path, device=device)
            if isinstance(ck, dict) and {'model', 'ema', 'optimizer', 'step', 'rng'} <= set(ck):
                return path, ck
            reason = 'not a training checkpoint'
        except cli.UserError as e:  # a pickle that could run code
            reason = str(e)
        except Exception as e:  # truncated or garbage files raise readers' errors of several types
            reason = cli.first_line(e)
        print(f'--resume: skipping {path} ({reason})')
    if paths:
        raise cli.UserError(
            f'--resume: none of the {len(paths)} checkpoints in {out} loads (above); remove them '
            'to start from scratch, or pass another --out'
        )
    return None, None


def resume(args, rank, device, stage, net, ema, opt, batches, rng, clock):
    """--resume: all that checkpoint_state saved, from the newest checkpoint -> its step."""
    path, ck = load_newest_checkpoint(args.out, device)
    if ck is None:
        if rank == 0:
            print(f'--resume: no checkpoint in {args.out}, starting from scratch')
        return 0
    net.load_state_dict(ck['model'])
    ema.load_state_dict(ck['ema'], ck.get('ema_updates', 0))
    opt.load_state_dict(ck['optimizer'])
    if 'disc' in ck:
        stage.disc.load_state_dict(ck['disc'])
        stage.disc_opt.load_state_dict(ck['disc_optimizer'])
    batches.epoch = ck['epoch']
    batches.pos = ck['pos']
    clock.minutes = ck.get('train_min', 0.0)
    # this rank's random streams (on more ranks than the run had, the new ranks take rank 0's)
    safety.set_rng_state(ck['rng'][rank] if rank < len(ck['rng']) else ck['rng'][0], rng)
    if rank == 0:
        print(f'resumed from {path} at step {ck["step"]}')
    return ck['step']


# ------------------------------------------------------------------ the stages
class EncoderStage:
    """An encoder trained from scratch with its own training_loss (da3-tiny: DA3's depth and
    ray-map losses)."""

    kind = 'encoder'
    extra = {}  # what checkpoints and exports record besides the weights

    def __init__(self, args, device, loader, init):  # init: --init's metadata ({} without it)
        self.net = latents.build_encoder(args.encoder).to(device)
        if not hasattr(self.net, 'training_loss'):
            raise cli.UserError(f'--stage encoder: {args.encoder} has no training objective; use --encoder-weights')
        self.config = asdict(self.net.cfg)
        # --head-only: the backbone makes the latents; frozen, it keeps the models of them valid
        if args.head_only:
            if not (args.init and self.net.has_geometry):
                raise cli.UserError(
                    '--head-only: pass the DA3 encoder to fine-tune (e.g. --init weights/tiny/encoder.safetensors)'
                )
            # AdamW skips parameters without gradients; the EMA's lerp keeps them
            self.net.backbone.requires_grad_(False)
            self.extra = {'latents_sha256': pipeline.latents_sha256(init)}

    def loss(self, batch, step, rng):
        return self.net.training_loss(batch, generator=rng)

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """Median-aligned depth AbsRel, RMSE, delta1; without geometry, the PSNR of its own
        reconstructions."""
        net = unwrap(self.net)
        if not net.has_geometry:
            return recon_psnr(net.reconstruct, scenes)
        depths = [net(s['images'])['depth'] for s in scenes]
        rows = [metrics.depth_metrics(d, s['depths'], align='median') for d, s in zip(depths, scenes)]
        return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


class DecoderStage:
    """Stage 1: frozen encoder features of all views -> RGB, level-wise dropout (paper Sec. 4.2)."""

    kind = 'decoder'

    def __init__(self, args, device, loader, init):
        self.enc = load_encoder(args, device)
        if self.enc.has_rgb_decoder:
            raise cli.UserError(f'--stage decoder: {args.encoder} decodes RGB with its own decoder; nothing to train')
        cfg = replace(
            decoder_lib.PRESETS[args.decoder],
            feat_dim=self.enc.dim,
            noise_tau=args.noise_tau,
            num_levels=self.enc.num_levels,
            patch=self.enc.patch,
        )
        self.net = decoder_lib.RGBDecoder(cfg).to(device)
        self.config = asdict(cfg)
        self.level_dropout = args.level_dropout
        self.gan_start = args.gan
        self.lpips = metrics.lpips_fn(device) if args.lpips else None
        self.disc = None
        if args.gan >= 0:
            self.disc = decoder_lib.PatchDiscriminator().to(device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
        # the file and hash that made the latents
        self.extra = {'encoder': {'preset': args.encoder, **self.enc.source}}

    def levels(self, images):
        H, W = images.shape[-2:]
        hw = (H // self.enc.patch, W // self.enc.patch)
        with torch.no_grad():
            return self.enc.normalize_levels(self.enc.encode(images)), hw

    def loss(self, batch, step, rng):
        images = batch['images']
        levels, hw = self.levels(images)
        keep = decoder_lib.sample_level_keep(images.shape[0], self.level_dropout, rng, len(levels))
        pred = self.net(levels, hw, keep=keep.to(images.device), generator=rng)
        loss, parts = decoder_lib.decoder_loss(pred, images, lpips=self.lpips)
        if self.disc is not None and step >= self.gan_start:
            gan_loss, gan_parts = decoder_lib.adversarial_step(self.net, self.disc, self.disc_opt, pred, images, loss)
            loss = loss + gan_loss
            parts = {**parts, **gan_parts}
        return loss, parts

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """PSNR of the validation scenes reconstructed from all four levels."""
        net = unwrap(self.net)
        return recon_psnr(lambda images: net(*self.levels(images)), scenes)


# periodic evaluation of a DiT: 10 Euler steps with CFG (psnr, mse) and 1 step, the posterior
# mean and the bundled default (mean_psnr, mean_mse)
EVAL_SAMPLERS = {
    '': dict(sampler='euler', steps=10, cfg_scale=1.5),
    'mean_': dict(sampler='mean', steps=1, cfg_scale=1.0),
}


class DiffusionStage:
    """Stage 3: M_l (or M1->0, conditioned on level l+1) by rectified flow over all V views
    (paper Sec. 4.3-4.4)."""

    kind = 'gld'

    def __init__(self, args, device, loader, init):
        self.enc = load_encoder(args, device)
        num_levels = self.enc.num_levels
        if args.level >= num_levels:
            raise cli.UserError(f'--level {args.level}: {args.encoder} has levels 0..{num_levels - 1}')
        self.level = args.level
        self.upper_level = pipeline.cascade_upper(args.level, args.independent, num_levels)
        levels = [self.level]
        if self.upper_level is not None:
            levels.append(self.upper_level)
        self.levels_needed = levels
        self.tau = args.tau
        self.cam_drop = args.cam_drop
        self.t_dist = args.t_dist
        # --init's normalisation, unless it is of another level (M2 from M1's weights: a warm
        # start with its own statistics)
        init_stats = init.get('stats', {})
        wanted = [f'mean{level}' for level in levels]
        if self.enc.special:  # VGGT: its special tokens' statistics too
            wanted += [f'special_mean{level}' for level in levels]
        if args.stats:
            self.stats = latents.LatentStats.load(args.stats)
            missing = sorted(set(wanted) - set(self.stats.state_dict()))
            if missing:
                fix = 'leave --stats out to compute them'
                raise cli.UserError(f'--stats {args.stats}: no {missing} for {args.encoder}; {fix}')
        elif all(k in init_stats for k in wanted):
            self.stats = latents.LatentStats.from_state_dict(init_stats)
        else:
            self.stats = latents.compute_stats(self.enc, loader, levels, args.stats_batches, device)
        overrides = {
            'latent_dim': self.enc.dim,
            'upper_dim': self.enc.dim if self.upper_level is not None else 0,
            'cam_patch': self.enc.patch,
            'checkpointing': args.checkpointing,
            'special_tokens': self.enc.special,
        }
        if args.pos:
            overrides['pos'] = args.pos
        cfg = replace(model_lib.PRESETS[args.model], **overrides)
        self.net = model_lib.GLD(cfg).to(device)
        self.config = asdict(cfg)
        self.extra = {
            'stats': self.stats.state_dict(),
            'level': self.level,
            'upper_level': self.upper_level,
            # the file and hash that made the latents
            'encoder': {'preset': args.encoder, **self.enc.source},
        }
        self.dec = self.eval_decoder(args, device)

    def eval_decoder(self, args, device):
        """The RGB decoder of periodic evaluation: the encoder's own, --decoder-ckpt, 'auto', or
        None (skipped)."""
        if args.decoder_ckpt == 'none':
            return None
        if self.enc.has_rgb_decoder:
            return self.enc.rgb_decoder()
        if args.decoder_ckpt != 'auto':
            return pipeline.load_decoder(args.decoder_ckpt, device)
        name = pipeline.model_name('decoder', args.encoder)
        if args.encoder != DEFAULT_ENCODER and not os.path.isdir(os.path.join('runs', name)):
            cmd = pipeline.train_command(name)
            print(f'note: no runs/{name}: periodic evaluation is skipped (train it with: {cmd})')
            return None
        return pipeline.load_decoder(pipeline.auto_checkpoint(name), device)

    def loss(self, batch, step, rng):
        x, inputs = latents.training_latents(
            self.enc, self.stats, batch, self.level, self.upper_level, self.tau, self.cam_drop, generator=rng
        )
        shift = diffusion.shift_alpha(x[0].numel())  # from V*T*C of the latents (B,V,T,C)
        velocity = inputs.velocity_fn(self.net)
        return diffusion.flow_loss(velocity, x, inputs.src_mask, generator=rng, a=shift, dist=self.t_dist)

    @torch.no_grad()
    def evaluate(self, scenes, png):
        """N=2 -> 6 with each of EVAL_SAMPLERS: the generated level's normalised MSE on the
        targets, their PSNR decoded with the true upper level (cascade) or the ones propagated from
        it (independent); a grid of 4 scenes (10 steps)."""
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
        scores = {k: [] for k in ('psnr', 'mse', 'mean_psnr', 'mean_mse')}
        grids = []
        for i, s in enumerate(scenes):
            images = s['images']
            full = self.enc.encode(images)
            # the deeper levels are given: the true ones
            given = {level: full[level] for level in range(self.level + 1, pipe.boundary + 1)}
            for prefix, sampler in EVAL_SAMPLERS.items():
                out = pipe.generate(images, s['c2w'], s['K'], 2, seed=i, given=given, **sampler)
                psnr = metrics.psnr(out['images'][:, 2:], images[:, 2:]).mean()
                scores[prefix + 'psnr'].append(psnr)
                pred = self.stats.normalize(out['levels'][self.level], self.level)[:, 2:]
                true = self.stats.normalize(full[self.level], self.level)[:, 2:]
                scores[prefix + 'mse'].append((pred - true).pow(2).mean())
                if not prefix:  # the grid shows the 10-step samples
                    grids.append(export.make_grid(images[0, :2], out['images'][0], images[0, 2:]))
        export.save_image(torch.cat(grids[:4], 1), png)
        return {k: float(torch.stack(v).mean()) for k, v in scores.items()}


def evaluate(stage, net, ema, scenes, png):
    """The stage's metrics on the held-out scenes, with the EMA weights in eval mode."""
    with ema.swapped(net):
        net.eval()
        scores = stage.evaluate(scenes, png)
        net.train()
    return {f'val_{k}': float(v) for k, v in scores.items()}


def recon_psnr(reconstruct, scenes):
    """The mean PSNR of the scenes' images as reconstruct(images) returns them."""
    psnrs = [metrics.psnr(reconstruct(s['images']).clamp(0, 1), s['images']).mean() for s in scenes]
    return {'recon_psnr': float(torch.stack(psnrs).mean())}


def unwrap(net):  # the plain module inside DDP and torch.compile wrappers
    net = getattr(net, '_orig_mod', net)
    return getattr(net, 'module', net)


STAGES = {'encoder': EncoderStage, 'decoder': DecoderStage, 'diffusion': DiffusionStage}


# ------------------------------------------------------------------ main loop
def main(argv=None):
    """One run in --out (held by rank 0's lock); under torchrun a failed rank stops the others."""
    args = get_args(argv)
    rank, world, device = setup_distributed()
    data.make_output_dir(args.out)
    lock = safety.lock_folder(args.out) if rank == 0 else contextlib.nullcontext()
    ended = threading.Event()  # this rank's end: its watcher of the other ranks stops
    if world > 1:
        safety.watch_ranks(rank, ended)
    preemption = safety.Preemption(world, device)
    try:
        with lock:
            stop_signal = train(args, rank, world, device, preemption)
    except Exception as e:
        ended.set()  # its watcher must not take this rank's failure for another's
        if world > 1:
            safety.stop_other_ranks(rank, e)
        raise
    finally:
        preemption.restore()
    ended.set()
    # every rank finishes (rank 0 writes the last checkpoint) before the process group goes away
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop_signal:
        raise SystemExit(128 + stop_signal)
    return args.out


def train(args, rank, world, device, preemption):
    """Setup, the training loop, the export -> the signal it stopped for (0: it ran to --steps)."""
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    recipe = RECIPES[args.stage]
    # bf16 autocast: on by itself on a GPU that has it, on the CPU with --bf16
    gpu_bf16 = device.type == 'cuda' and torch.cuda.is_bf16_supported()
    autocast = contextlib.nullcontext()
    if gpu_bf16 or (args.bf16 and device.type == 'cpu'):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    loader, val = build_data(args, world)

    # the stage (its network, loss and evaluation), EMA, optimizer, the latent cache, resume
    init_meta = {}  # --init's metadata: --head-only's parent hash, M_l's statistics
    if args.init:  # read once (its hash is printed)
        init_meta, init_weights = pipeline.load_checkpoint(args.init, device)
    stage = STAGES[args.stage](args, device, loader, init_meta)
    net = stage.net
    if rank == 0 and hasattr(stage, 'enc'):  # the latents' encoder, as the checkpoints record it
        sha256 = stage.enc.source['sha256'] or '-'
        print(f'{args.stage}: encoder {stage.enc.source["weights"]} (sha256 {sha256[:12]})')
    # --init: continue from earlier weights (e.g. the bundled ones); the optimizer starts fresh
    if args.init:
        net.load_state_dict(init_weights)
    ema = diffusion.EMA(net, args.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=recipe['betas'], weight_decay=recipe['wd'])
    cache = None
    if args.cache and args.stage == 'diffusion':
        cache = build_cache(args, stage, rank, world, device)
    batches = Batches(loader, cache, args, rank, world, device)
    rng = torch.Generator().manual_seed(args.seed * 1000 + rank)  # source counts, t, dropouts
    clock = runlog.TrainClock(device)
    step = resume(args, rank, device, stage, net, ema, opt, batches, rng, clock) if args.resume else 0

    # stage.net is what the loss calls: DDP averages its gradients over ranks, compile fuses it
    train_net = net
    if world > 1:
        train_net = DDP(net, device_ids=[device.index] if device.type == 'cuda' else None)
    stage.net = torch.compile(train_net, dynamic=False) if args.compile else train_net
    logger = runlog.Logger(args.out, rank, start_step=step)
    patch = stage.enc.patch if hasattr(stage, 'enc') else net.patch  # image pixels per token side
    # the log line's MFU: of a DiT, on a GPU model.PEAK_TFLOPS lists
    peak_tflops = model_lib.peak_tflops(device) if stage.kind == 'gld' else None
    if rank == 0:
        params = sum(p.numel() for p in net.parameters()) / 1e6
        counts = f'{params:.2f}M params, {len(loader.dataset)} scenes'
        print(f'{model_name(args)}: {counts}, world {world}, device {device}')

    batch_iter = iter(batches)
    window = runlog.LogWindow(torch.zeros((), device=device))
    bad = 0  # non-finite steps in a row
    steps = {'total': args.steps, 'initial': step, 'unit': 'step'}
    bar = cli.progress(desc=model_name(args), **steps, every=60, disable=rank != 0)
    while step < args.steps:
        clock.start()
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group['lr'] = lr
        for micro in range(args.accum):
            batch = next(batch_iter)
            if args.stage == 'diffusion' and not cache:  # a cached draw comes with its sources
                batch = split_sources(batch, args, rng)
            if world > 1:  # sync gradients only on the last micro-step
                train_net.require_backward_grad_sync = micro == args.accum - 1
            with autocast:
                loss, parts = stage.loss(batch, step, rng)
            (loss / args.accum).backward()
            window.add_batch(batch, patch, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), recipe['clip'] or float('inf'))
        # the non-finite guard: one host sync per step, by design
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            bad += 1
            print(f'[rank {rank}] step {step} skipped: non-finite loss or grad ({bad} in a row)')
            if bad >= args.max_bad:
                raise SystemExit(
                    f'stopping: {bad} non-finite steps in a row; the last good checkpoint in '
                    f'{args.out} is kept. Lower --lr, check the data, or resume with --resume.'
                )
            continue
        bad = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)
        step += 1
        clock.stop()
        bar.update()
        window.add_step(loss, parts)
        # --budget-minutes: this step is the last on every rank (the slowest rank's clock decides)
        out_of_time = 0 < args.budget_minutes <= clock.minutes
        if world > 1 and args.budget_minutes:
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag)
        last = step == args.steps or out_of_time
        if step % args.log_every == 0 or last:
            row = window.row(step, grad_norm, lr, args.steps - step, world)
            row['train_min'] = clock.minutes
            if peak_tflops:
                row['mfu'] = mfu(row['tokens_s'] / world, window.tokens, net.cfg, peak_tflops)
            logger.log(row)
            speed = f'{row["samples_s"]:.3g}'
            bar.set_postfix(loss=f'{row["loss"]:.4g}', samples_s=speed, refresh=False)
            window = runlog.LogWindow(torch.zeros((), device=device))
        # a signal on any rank: every rank stops after this step, with a checkpoint of it
        stop_signal = preemption.stop_signal()
        if step % args.ckpt_every == 0 or last or stop_signal:
            state = checkpoint_state(step, stage, net, ema, opt, batches, rng, clock, args, world)
            if rank == 0:
                path = save_checkpoint(args.out, step, state, args.keep)
                logger.plot()
        if rank == 0 and args.eval_every and (step % args.eval_every == 0 or last):
            png = os.path.join(args.out, f'val_{step:07d}.png')
            scenes = validation_scenes(val, device)
            logger.log({'step': step, 'train_min': clock.minutes, **evaluate(stage, net, ema, scenes, png)})
            logger.plot()
        if stop_signal:
            bar.close()
            if rank == 0:
                hint = 'continue with the same command and --resume'
                print(f'interrupted: wrote {path} at step {step}; {hint}', file=sys.stderr)
            return stop_signal
        if last:
            break
    bar.close()
    if batches.skipped:
        unreadable = f'{batches.skipped} training samples with unreadable frames'
        print(f'[rank {rank}] skipped {unreadable} (the warnings above name them)')
    if rank == 0 and args.export:
        name = model_name(args)
        with ema.swapped(net):
            pipeline.export_weights(stage.kind, net, stage.config, stage.extra, args.export, name)
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
