"""bench.py: throughput, MFU, memory and latency of GLD's hot paths, on CPU or GPU (README "Performance").

A DiT training step (samples/s, tokens/s, TFLOP/s, MFU from model.flops_per_token), an Euler step with CFG, the
frozen encoder/decoder parts, peak memory, and on GPU in bf16 the SDPA backend; `--compile` compares with eager.
"""

import argparse
import contextlib
import resource
import time
from dataclasses import replace

import torch

import cameras
import decoder as decoder_lib
import diffusion
import latents
import model as model_lib
from constants import DEFAULT_ENCODER, PATCH


def build_parser():
    """bench.py's flags (each is run by a test, BENCH_RUNS)."""
    p = argparse.ArgumentParser(description='GLD benchmarks', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', default='gld-tiny', help='DiT preset (model.PRESETS)')
    p.add_argument(
        '--encoder', default=DEFAULT_ENCODER, help='latent encoder (latents.build_encoder) of the frozen parts'
    )
    p.add_argument('--decoder', default='tiny', help='RGB decoder preset')
    p.add_argument('--views', type=int, default=8, help='views V per scene')
    p.add_argument('--size', type=int, default=112, help='square image side (multiple of 14)')
    p.add_argument('--batch', type=int, default=2, help='scenes per step')
    p.add_argument(
        '--dtype',
        default='fp32',
        choices=['fp32', 'bf16', 'fp32,bf16'],
        help='autocast dtype (bf16: fp32 master weights); fp32,bf16: both, side by side',
    )
    p.add_argument('--compile', action='store_true', help='also time torch.compile (reports the compile/eager ratio)')
    p.add_argument('--checkpointing', action='store_true', help='activation checkpointing in the DiT blocks')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--iters', type=int, default=5, help='timed iterations')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations')
    p.add_argument('--skip', default='', help='comma list of parts to skip: train,sample,frozen')
    return p


def timeit(fn, iters, warmup, device):
    """Seconds per call of fn, after `warmup` untimed calls (GPU: synchronised)."""

    def sync():  # GPU work runs asynchronously: wait for it
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for i in range(warmup + iters):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def fake_batch(cfg, B, V, size, device):
    """Random latents and real cameras (V views on an arc, the first two sources) -> (x (B,V,T,C), DiTInputs)."""
    h = w = size // PATCH
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, V, h * w, cfg.latent_dim, generator=g).to(device)
    is_source = torch.arange(V, device=device) < 2  # the first two views
    src = is_source[None].expand(B, V)
    centres = torch.tensor([[0.3 * v, 0.0, 0.1 * v] for v in range(V)])
    target = torch.tensor([0.0, 0.0, 4.0]).expand(V, 3)
    up = torch.tensor([0.0, -1.0, 0.0])
    c2w = cameras.look_at(centres, target, up).expand(B, V, 4, 4)
    K_view = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]])  # normalised: focal 1, centred
    K = K_view.expand(B, V, 3, 3)
    cams = latents.model_cameras(c2w.to(device), K.to(device), src, (h, w))
    # the random latents count as normalised: unit statistics for level 0 and a cascade's upper level 1
    dims = {0: cfg.latent_dim, 1: cfg.upper_dim}
    zeros = {level: torch.zeros(d) for level, d in dims.items()}
    ones = {level: torch.ones(d) for level, d in dims.items()}
    unit = latents.LatentStats(zeros, ones)
    upper_level = None
    upper = None
    if cfg.upper_dim:  # a cascade M1->0 reads level 1 too
        upper_level = 1
        upper = torch.randn(B, V, h * w, cfg.upper_dim, generator=g).to(device)
    return x, latents.dit_inputs(unit, 0, x, cams, upper_level, upper)


def bench_train(net, batch, a, device, autocast, rows, label):
    """One rectified-flow training step of net (forward, backward, AdamW): throughput, TFLOP/s, MFU."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    x, inputs = batch

    velocity = inputs.velocity_fn(net)

    def step():
        with autocast:
            loss, _ = diffusion.flow_loss(velocity, x, inputs.src_mask, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timeit(step, a.iters, a.warmup, device)
    B, V, T, _ = x.shape
    cfg = getattr(net, '_orig_mod', net).cfg  # torch.compile wraps the model
    flops = 3 * model_lib.flops_per_token(cfg, V * T) * B * V * T  # forward + backward (2x)
    peak = model_lib.peak_tflops(device)
    rows.append(
        {
            'part': f'train step ({label})',
            'ms': dt * 1e3,
            'samples/s': B / dt,
            'tokens/s': B * V * T / dt,
            'TFLOP/s': flops / dt / 1e12,
            'MFU': flops / dt / 1e12 / peak if peak else None,
        }
    )
    return dt


def bench_sample(net, batch, a, device, autocast, rows, label):
    """One step of the paper's sampler (diffusion.SAMPLERS['euler']) with CFG: a conditional and an unconditional
    call; a 50-step level is 50 of them."""
    x, inputs = batch
    conditional = inputs.velocity_fn(net)
    unconditional = inputs.velocity_fn(net, unconditional=True)
    sample = diffusion.SAMPLERS['euler']

    def euler_step():
        with autocast:
            return sample(conditional, x, steps=1, cfg_scale=1.5, uncond_fn=unconditional)

    dt = timeit(euler_step, a.iters, a.warmup, device)
    rows.append({'part': f'Euler step, cfg ({label})', 'ms': dt * 1e3})
    rows.append({'part': f'50-step level ({label})', 'ms': 50 * dt * 1e3})
    return dt


def bench_frozen(a, device, autocast, rows):
    """The frozen parts a sample runs around the DiTs: encode, propagate, RGB decode, geometry head."""
    enc = latents.build_encoder(a.encoder).to(device).freeze()
    dec = (
        enc.rgb_decoder()
        if enc.has_rgb_decoder
        else decoder_lib.RGBDecoder(
            replace(decoder_lib.PRESETS[a.decoder], feat_dim=enc.dim, num_levels=enc.num_levels, patch=enc.patch)
        )
        .to(device)
        .eval()
    )
    images = torch.rand(a.batch, a.views, 3, a.size, a.size, device=device)
    hw = (a.size // enc.patch, a.size // enc.patch)

    def ms(fn):
        return 1e3 * timeit(fn, a.iters, a.warmup, device)

    with torch.no_grad(), autocast:
        levels = enc.encode(images)
        norm = enc.normalize_levels(levels)
        encode_ms = ms(lambda: enc.encode(images))
        rows.append({'part': f'encode ({a.encoder})', 'ms': encode_ms})
        if enc.can_propagate:
            cls = None  # VGGT: the level's own special tokens
            if not enc.special:
                cls = enc.first_view_cls(images, 1)
            propagate_ms = ms(lambda: enc.propagate(levels[1], 1, cls, hw))
            rows.append({'part': 'propagate level 1 -> 2, 3', 'ms': propagate_ms})
        name = 'own' if enc.has_rgb_decoder else a.decoder
        decode_ms = ms(lambda: dec(norm, hw))
        rows.append({'part': f'RGB decode ({name})', 'ms': decode_ms})
        if enc.has_geometry:
            geometry_ms = ms(lambda: enc.geometry(norm, a.size, a.size))
            rows.append({'part': 'geometry head', 'ms': geometry_ms})


def sdpa_backend_check(net, batch, device, autocast):
    """On GPU: the forward must run with only the flash kernel allowed, and the profiler must show it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, inputs = batch
    velocity = inputs.velocity_fn(net)
    t = torch.full((x.shape[0],), 0.5, device=device)
    with torch.no_grad(), autocast, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        velocity(x, t)  # raises if flash cannot run these shapes/dtypes
    cuda = torch.profiler.ProfilerActivity.CUDA
    with torch.no_grad(), autocast, torch.profiler.profile(activities=[cuda]) as prof:
        velocity(x, t)
    names = {e.key for e in prof.key_averages()}
    flash = sorted(n for n in names if 'flash' in n.lower())
    assert flash, f'no flash-attention kernel ran: {sorted(names)[:20]}'
    return flash[0]


def main(argv=None):
    """Builds a randomly initialised DiT of --preset, times the parts, prints a row each -> the rows."""
    a = build_parser().parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    skip = set(a.skip.split(',')) if a.skip else set()
    dtypes = a.dtype.split(',')
    casts = {}
    for dtype in dtypes:
        if dtype == 'bf16':
            casts[dtype] = torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            casts[dtype] = contextlib.nullcontext()
    autocast = casts[dtypes[-1]]  # the frozen parts and the SDPA check: the last dtype
    cfg = replace(model_lib.PRESETS[a.preset], checkpointing=a.checkpointing)
    net = model_lib.GLD(cfg).to(device)
    with torch.no_grad():  # a trained-looking model: the zero-initialised output layers would make attention trivial
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    batch = fake_batch(cfg, a.batch, a.views, a.size, device)
    V = a.views
    T = (a.size // PATCH) ** 2  # tokens of a view
    chip = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
    params = model_lib.count_params(net) / 1e6
    print(
        f'{a.preset}: {params:.1f}M params, V={V}, {a.size}x{a.size} -> {V * T} tokens in 3D attention, '
        f'batch {a.batch}, {a.dtype}, {device} ({chip}), torch {torch.__version__}, {torch.get_num_threads()} threads'
    )
    rows = []
    times = {}  # (part, label) -> seconds
    runs = [('eager', net)]
    if a.compile:
        runs.append(('compiled', torch.compile(net, dynamic=False)))
    for dtype, cast in casts.items():
        for run, m in runs:
            label = f'{run}, {dtype}' if len(casts) > 1 else run
            if 'train' not in skip:
                times['train', label] = bench_train(m, batch, a, device, cast, rows, label)
            if 'sample' not in skip:
                times['sample', label] = bench_sample(m.eval(), batch, a, device, cast, rows, label)
                m.train()
    if 'frozen' not in skip:
        bench_frozen(a, device, autocast, rows)
    if device.type == 'cuda' and a.dtype == 'bf16':
        rows.append({'part': f'SDPA backend: {sdpa_backend_check(net, batch, device, autocast)}'})
    if device.type == 'cuda':
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:  # Linux: ru_maxrss in KiB
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows.append({'part': 'peak memory', 'GB': peak_gb})
    for r in rows:
        cells = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items() if v is not None]
        print(' | '.join(cells))
    pairs = [('compiled', 'eager'), ('eager, bf16', 'eager, fp32'), ('compiled, bf16', 'compiled, fp32')]
    for part in ('train', 'sample'):
        for fast, ref in pairs:
            if (part, fast) in times and (part, ref) in times:
                print(f'{part}: {fast} / {ref} speed-up {times[(part, ref)] / times[(part, fast)]:.2f}x')
    return rows


if __name__ == '__main__':
    main()
