"""bench.py: throughput, MFU, memory and latency of GLD's hot paths, CPU or GPU (README "Performance").

A DiT training step (samples/s, tokens/s, TFLOP/s from model.flops_per_token, fraction of peak), an
Euler step with CFG, the frozen encoder/decoder parts, peak memory, and on GPU in bf16 the SDPA
backend; `--compile` compares with eager. `--report FILE.json` runs one suite (SUITES) and writes
FILE.json and FILE.md: the machine's own matmul peak measured in the same run (the denominator; on a
listed GPU the spec's dense bf16 peak, the measured one beside it), the steps eager and compiled,
the whole scene through the cascade, and the fast path (bf16, compiled, flash on GPU) checked
against the plain one (fp32, eager) on the same batch. `--suite gpu`: the paper's sizes.
"""

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import cameras
import cli
import decoder as decoder_lib
import diffusion
import latents
import model as model_lib
import pipeline
from constants import DEFAULT_ENCODER, PATCH

# what --report runs, as defaults of the flags (a flag given on the command line wins). cpu: the
# flags' DiT and sizes (gld-tiny, V=8, 112x112), fp32 and bf16, eager and compiled. gpu: the paper's
# M1 (gld-paper, V=8, 504x504 = 10,368 tokens) in bf16, eager and compiled, activation checkpointing
# off and on, and the cascade (gld-paper-cascade) on one scene at 50 steps: 3-5 minutes on one H100
# (recipes/gpu_bench.sh: the estimate from the FLOPs). The scene replaces the frozen parts.
SUITES = {
    'cpu': {'dtype': 'fp32,bf16', 'compile': True, 'skip': 'frozen'},
    'gpu': {
        'preset': 'gld-paper',
        'views': 8,
        'size': 504,
        'batch': 1,
        'dtype': 'bf16',
        'compile': True,
        'checkpointing_runs': [False, True],
        'encoder': 'da3-base',
        'decoder': 'xl',
        'steps': 50,
        'skip': 'frozen',
    },
}

# the fast path against the plain one (same batch, weights, t, eps, noise): bound, 'max' or 'min'
CHECKS = {
    'loss relative difference': (1e-2, 'max'),
    'gradient cosine': (0.99, 'min'),
    '4-step sample relative error': (5e-2, 'max'),
}


def build_parser():
    """bench.py's flags (each is run by a test, BENCH_RUNS and BENCH_REPORT)."""
    p = argparse.ArgumentParser(description='GLD benchmarks', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', default='gld-tiny', help='DiT preset (model.PRESETS)')
    p.add_argument('--encoder', default=DEFAULT_ENCODER, help='latent encoder (latents.build_encoder)')
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
    p.add_argument('--compile', action='store_true', help='also time each DiT block torch.compiled')
    p.add_argument('--checkpointing', action='store_true', help='activation checkpointing in the DiT blocks')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--iters', type=int, default=5, help='timed iterations (the fastest counts)')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations')
    parts = 'train,sample,frozen (--report: compile,scene,checks too)'
    p.add_argument('--skip', default='', help=f'comma list of parts to skip: {parts}')
    p.add_argument('--report', default='', help='FILE.json: run --suite; FILE.json, FILE.md')
    p.add_argument('--suite', default='cpu', choices=sorted(SUITES), help="--report's flags (SUITES)")
    p.add_argument('--steps', type=int, default=50, help='--report: Euler steps of the scene')
    return p


def parse_args(argv=None):
    """The flags, with --report's suite as the defaults of those not given."""
    p = build_parser()
    p.set_defaults(checkpointing_runs=None)  # the GPU suite times both
    first, _ = p.parse_known_args(argv)
    if first.report:
        p.set_defaults(**SUITES[first.suite])
    a = p.parse_args(argv)
    if a.checkpointing_runs is None:
        a.checkpointing_runs = [a.checkpointing]
    if a.report and a.suite == 'gpu' and a.device != 'cuda':
        raise cli.UserError(f'--suite gpu: the paper-sized suite needs a CUDA GPU; --device is {a.device}')
    return a


def timeit(fn, iters, warmup, device):
    """Seconds of the fastest of `iters` calls of fn, after `warmup` untimed calls (GPU: synchronised):
    on a machine shared with other work the least disturbed call."""
    for _ in range(warmup):
        fn()
    now = clock(device)
    seconds = []
    for _ in range(iters):
        sync(device)
        t0 = now()
        fn()
        sync(device)
        seconds.append(now() - t0)
    return min(seconds)


def clock(device):
    """The timer: on a CPU with one torch thread the thread's CPU time (processes sharing the CPU
    take turns, which the wall clock would count), else the wall clock."""
    if device.type == 'cpu' and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


CLOCK_NAMES = {time.thread_time: "the thread's CPU time", time.perf_counter: 'the wall clock'}


def sync(device):  # GPU work runs asynchronously: wait for it
    if device.type == 'cuda':
        torch.cuda.synchronize()


def arc_cameras(B, V):
    """V views on an arc looking at one point -> c2w (B,V,4,4), normalised K (B,V,3,3)."""
    centres = torch.tensor([[0.3 * v, 0.0, 0.1 * v] for v in range(V)])
    target = torch.tensor([0.0, 0.0, 4.0]).expand(V, 3)
    up = torch.tensor([0.0, -1.0, 0.0])
    c2w = cameras.look_at(centres, target, up).expand(B, V, 4, 4)
    K_view = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]])  # focal 1, centred
    return c2w, K_view.expand(B, V, 3, 3)


def unit_stats(cfg):
    """Random latents count as normalised: unit statistics for level 0 and a cascade's level 1."""
    dims = {0: cfg.latent_dim, 1: cfg.upper_dim or cfg.latent_dim}
    zeros = {level: torch.zeros(d) for level, d in dims.items()}
    ones = {level: torch.ones(d) for level, d in dims.items()}
    return latents.LatentStats(zeros, ones)


def fake_batch(cfg, B, V, size, device):
    """Random latents and real cameras (V views on an arc, the first two sources) -> (x (B,V,T,C),
    DiTInputs)."""
    h = w = size // PATCH
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, V, h * w, cfg.latent_dim, generator=g).to(device)
    is_source = torch.arange(V, device=device) < 2  # the first two views
    src = is_source[None].expand(B, V)
    c2w, K = arc_cameras(B, V)
    cams = latents.model_cameras(c2w.to(device), K.to(device), src, (h, w))
    upper_level = None
    upper = None
    if cfg.upper_dim:  # a cascade M1->0 reads level 1 too
        upper_level = 1
        upper = torch.randn(B, V, h * w, cfg.upper_dim, generator=g).to(device)
    return x, latents.dit_inputs(unit_stats(cfg), 0, x, cams, upper_level, upper)


def random_dit(cfg, device):
    """A random DiT that looks trained (zero-initialised output layers make attention trivial)."""
    with torch.device(device):
        net = model_lib.GLD(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


def compile_blocks(net):
    """torch.compile each DiT block in place: the blocks of one width share a compiled graph, so
    the paper's 34 blocks compile twice (encoder, head), not as one long graph (the GPU budget)."""
    # a graph per width, mode (training, sampling), dtype and checkpointing: more than dynamo's 8
    torch._dynamo.config.recompile_limit = 32
    for blk in net.blocks:
        blk.compile(dynamic=False)


def step_row(part, net, x, seconds, passes, peak, dtype, compiled):
    """A timed row of `passes` forward passes of net over x (a training step is 3: forward and
    backward): throughput, TFLOP/s from model.flops_per_token, the fraction of `peak`."""
    B, V, T, _ = x.shape
    flops = passes * model_lib.flops_per_token(net.cfg, V * T) * B * V * T
    tflops = flops / seconds / 1e12
    fraction = None
    if peak:
        fraction = tflops / peak
    return {
        'part': part,
        'dtype': dtype,
        'compiled': compiled,
        'checkpointing': net.cfg.checkpointing,
        'ms': seconds * 1e3,
        'samples_per_s': B / seconds,
        'tokens_per_s': B * V * T / seconds,
        'tflops': tflops,
        'fraction_of_peak': fraction,
    }


def bench_train(net, batch, a, device, autocast, peak, dtype, compiled):
    """One rectified-flow training step of net (forward, backward, AdamW) -> its row."""
    # lr 0: the optimiser runs the same kernels and the weights stay (every row sees one model)
    opt = torch.optim.AdamW(net.parameters(), lr=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    x, inputs = batch
    velocity = inputs.velocity_fn(net)

    def step():
        with autocast:
            loss, _ = diffusion.flow_loss(velocity, x, inputs.src_mask, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    seconds = timeit(step, a.iters, a.warmup, device)
    row = step_row('train step', net, x, seconds, 3, peak, dtype, compiled)
    if device.type == 'cuda':
        row['memory_gb'] = torch.cuda.max_memory_allocated() / 2**30
    return row


def train_row(net, batch, a, device, autocast, peak, dtype, compiled):
    """bench_train's row, or one that says it ran out of GPU memory (a lent GPU's run goes on)."""
    try:
        return bench_train(net, batch, a, device, autocast, peak, dtype, compiled)
    except torch.cuda.OutOfMemoryError:
        net.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        row = {'part': 'train step', 'dtype': dtype, 'compiled': compiled}
        row['checkpointing'] = net.cfg.checkpointing
        row['error'] = 'out of GPU memory'
        return row


def bench_sample(net, batch, a, device, autocast, peak, dtype, compiled):
    """One step of the paper's sampler (diffusion.SAMPLERS['euler']) with CFG: a conditional and an
    unconditional call; a 50-step level is 50 of them -> its row."""
    x, inputs = batch
    conditional = inputs.velocity_fn(net)
    unconditional = inputs.velocity_fn(net, unconditional=True)
    sample = diffusion.SAMPLERS['euler']

    def euler_step():
        with autocast:
            return sample(conditional, x, steps=1, cfg_scale=1.5, uncond_fn=unconditional)

    seconds = timeit(euler_step, a.iters, a.warmup, device)
    row = step_row('Euler step, cfg', net, x, seconds, 2, peak, dtype, compiled)
    row['checkpointing'] = False  # sampling keeps no activations
    return row


def build_decoder(a, enc, device):
    """The encoder's own RGB decoder, else --decoder's preset sized to its levels (random)."""
    if enc.has_rgb_decoder:
        return enc.rgb_decoder()
    preset = decoder_lib.PRESETS[a.decoder]
    cfg = replace(preset, feat_dim=enc.dim, num_levels=enc.num_levels, patch=enc.patch)
    return decoder_lib.RGBDecoder(cfg).to(device).eval()


def bench_frozen(a, device, autocast, rows):
    """The frozen parts around the DiTs: encode, propagate, RGB decode, geometry head."""
    enc = latents.build_encoder(a.encoder).to(device).freeze()
    dec = build_decoder(a, enc, device)
    images = torch.rand(a.batch, a.views, 3, a.size, a.size, device=device)
    hw = (a.size // enc.patch, a.size // enc.patch)

    def ms(fn):
        return 1e3 * timeit(fn, a.iters, a.warmup, device)

    with torch.no_grad(), autocast:
        levels = enc.encode(images)
        norm = enc.normalize_levels(levels)
        encode_ms = ms(lambda: enc.encode(images))
        add(rows, {'part': f'encode ({a.encoder})', 'ms': encode_ms})
        if enc.can_propagate:
            cls = None  # VGGT: the level's own special tokens
            if not enc.special:
                cls = enc.first_view_cls(images, 1)
            propagate_ms = ms(lambda: enc.propagate(levels[1], 1, cls, hw))
            add(rows, {'part': 'propagate level 1 -> 2, 3', 'ms': propagate_ms})
        name = 'own' if enc.has_rgb_decoder else a.decoder
        decode_ms = ms(lambda: dec(norm, hw))
        add(rows, {'part': f'RGB decode ({name})', 'ms': decode_ms})
        if enc.has_geometry:
            geometry_ms = ms(lambda: enc.geometry(norm, a.size, a.size))
            add(rows, {'part': 'geometry head', 'ms': geometry_ms})


def bench_scene(a, net, device, autocast, dtype, compiled):
    """One scene (V views, 2 sources) through the cascade, stage by stage as Pipeline.generate runs
    it: encode the sources, M1 and M1->0 (--steps Euler steps, CFG 1.5), propagate level 1, decode
    RGB, the geometry head; random weights (the time does not depend on them), after a 1-step
    warm-up -> a row per stage and the total, in seconds."""
    enc = latents.build_encoder(a.encoder).to(device).freeze()
    if not (enc.can_propagate and enc.has_geometry) or enc.dim != net.cfg.latent_dim:
        fix = 'pass a da3-* or vggt-* --encoder of its latent_dim, or --skip scene'
        raise cli.UserError(f'--encoder {a.encoder}: the scene runs the {a.preset} cascade on it; {fix}')
    dec = build_decoder(a, enc, device)
    cfg = net.cfg
    as_cascade = replace(cfg, upper_dim=cfg.latent_dim)  # M1->0: gld-paper-cascade, else M1's own shape
    cascade_cfg = model_lib.PRESETS.get(f'{a.preset}-cascade', as_cascade)
    cascade = random_dit(cascade_cfg, device).eval()
    if compiled:
        compile_blocks(cascade)
    stats = unit_stats(cascade_cfg)
    models = {1: (net.eval(), {'stats': stats}), 0: (cascade, {'stats': stats, 'upper_level': 1})}
    pipe = pipeline.Pipeline(enc, dec, models, progress=False)
    images = torch.rand(1, a.views, 3, a.size, a.size, device=device)
    c2w, K = arc_cameras(1, a.views)
    hw = (a.size // enc.patch, a.size // enc.patch)
    src_mask = (torch.arange(a.views) < 2)[None].to(device)
    cams = latents.model_cameras(c2w.to(device), K.to(device), src_mask, hw, patch=enc.patch)
    gen = torch.Generator().manual_seed(0)
    seconds = {}

    now = clock(device)

    def timed(stage, fn):
        sync(device)
        t0 = now()
        out = fn()
        sync(device)
        seconds[stage] = now() - t0
        return out

    def scene(steps):
        sampling = ('euler', steps, 1.5, gen)  # sampler, steps, CFG scale, generator
        cond = timed('encode', lambda: latents.source_condition(enc, images, 2))
        level1 = timed('M1', lambda: pipe.sample_level(1, cond[1], cams, None, *sampling))
        level0 = timed('M1->0', lambda: pipe.sample_level(0, cond[0], cams, level1, *sampling))
        cls = enc.first_view_cls(images, 1)
        propagate = timed('propagate', lambda: enc.propagate(level1, 1, cls, hw, return_cls=True))
        deeper, cls_deep = propagate
        norm = enc.normalize_levels([level0, level1, *deeper])
        timed('decode', lambda: dec(norm, hw))
        timed('geometry', lambda: enc.geometry(norm, a.size, a.size, cls_last=cls_deep[-1]))

    with torch.no_grad(), autocast:
        scene(1)  # compiles what the rows did not
        scene(a.steps)
    net.train()
    seconds['total'] = sum(seconds.values())
    rows = []
    for stage, s in seconds.items():
        rows.append({'part': f'scene, {a.steps} steps: {stage}', 'dtype': dtype, 'compiled': compiled, 's': s})
    return rows


def sdpa_backend_check(net, batch, device, autocast):
    """On GPU: the forward runs with only the flash kernel allowed, and the profiler shows it."""
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


# ----------------------------------------------------------------------------- --report: peaks, checks, files
def matmul_tflops(dtype, device, iters):
    """The machine's own limit: TFLOP/s of a square matmul (2048 on CPU, 8192 on GPU) in dtype."""
    n = 2048 if device.type == 'cpu' else 8192
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    seconds = timeit(lambda: a @ b, iters, 1, device)
    return 2 * n**3 / seconds / 1e12


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.exists():  # Linux, where platform.processor() is often empty
        for line in cpuinfo.read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or 'cpu'


def machine(device, iters):
    """Device, threads, torch, the matmul peaks measured now, and the denominators of
    fraction_of_peak: on a GPU of model.PEAK_TFLOPS its dense bf16 peak (MFU), else the measured
    matmul of each dtype."""
    if device.type == 'cuda':
        iters = 50  # an 8192 matmul takes a millisecond or two
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16}
    measured = {name: matmul_tflops(dtype, device, iters) for name, dtype in dtypes.items()}
    peak = dict(measured)
    source = 'the matmuls measured in this run'
    spec = model_lib.peak_tflops(device)
    if spec is not None:
        peak['bf16'] = spec
        source = "bf16: the GPU's dense bf16 peak (model.PEAK_TFLOPS); fp32: the matmul measured"
    return {
        'device': device_name(device),
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'clock': CLOCK_NAMES[clock(device)],
        'matmul_tflops': measured,
        'peak_tflops': peak,
        'peak_source': source,
    }


def path_outputs(net, batch, autocast, flash):
    """Loss, gradient (per parameter) and a 4-step Euler sample with CFG, minus its noise, of net on
    batch, from fixed t, eps and noise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, inputs = batch
    kernels = contextlib.nullcontext()
    if flash:
        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    velocity = inputs.velocity_fn(net)
    fixed = torch.Generator().manual_seed(1)
    with kernels, autocast:
        loss, _ = diffusion.flow_loss(velocity, x, inputs.src_mask, generator=fixed)
    loss.backward()
    grads = [p.grad.float() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    unconditional = inputs.velocity_fn(net, unconditional=True)
    sample = diffusion.SAMPLERS['euler']
    net.eval()
    with kernels, autocast:
        x_0 = sample(velocity, noise, steps=4, cfg_scale=1.5, uncond_fn=unconditional)
    net.train()
    # the sample's motion away from its noise: the noise, in both paths, would hide the error
    return {'loss': loss.item(), 'grads': grads, 'motion': x_0.float() - noise}


def fast_path_name(dtype, compiled, flash):
    parts = [dtype]
    if compiled:
        parts.append('compiled')
    if flash:
        parts.append('flash')
    return ', '.join(parts)


def compare(plain, fast):
    """The fast path against the plain one -> a row per CHECKS entry with its bound and verdict."""
    dot = 0.0
    squares = {'plain': 0.0, 'fast': 0.0}
    for p, f in zip(plain['grads'], fast['grads']):  # float64: float32 drifts over 10^8 entries
        dot += (p.double() * f.double()).sum().item()
        squares['plain'] += p.double().square().sum().item()
        squares['fast'] += f.double().square().sum().item()
    motion_error = (fast['motion'] - plain['motion']).norm() / plain['motion'].norm()
    values = {
        'loss relative difference': abs(fast['loss'] - plain['loss']) / abs(plain['loss']),
        'gradient cosine': dot / (squares['plain'] * squares['fast']) ** 0.5,
        '4-step sample relative error': motion_error.item(),
    }
    rows = []
    for name, value in values.items():
        bound, kind = CHECKS[name]
        passed = value <= bound if kind == 'max' else value >= bound
        rows.append({'check': name, 'value': value, 'bound': f'{kind} {bound:g}', 'pass': passed})
    return rows


REPORT_COLUMNS = ['part', 'dtype', 'compiled', 'checkpointing', 'ms', 's', 'samples_per_s', 'tokens_per_s']
REPORT_COLUMNS += ['tflops', 'fraction_of_peak', 'memory_gb', 'gb', 'error']


def cell(value):
    if isinstance(value, float):
        return f'{value:.4g}'
    if value is None:
        return ''
    return str(value)


def add(rows, *new):
    """Append rows, printing each as it comes (a run cut short keeps its rows in its log)."""
    for row in new:
        rows.append(row)
        print(' | '.join(f'{k} {cell(v)}' for k, v in row.items() if v is not None), flush=True)


def markdown(report):
    """The report as the markdown tables the README quotes."""
    m = report['machine']
    measured = ', '.join(f'{k} {v:.4g}' for k, v in m['matmul_tflops'].items())
    denominators = ', '.join(f'{k} {v:.4g}' for k, v in m['peak_tflops'].items())
    lines = [
        f'# {report["command"]}',
        '',
        f'{m["device"]}, {m["threads"]} threads, torch {m["torch"]}, times by {m["clock"]}. '
        f'Matmul TFLOP/s measured in this run: {measured}; '
        f'fraction_of_peak divides by {denominators} ({m["peak_source"]}).',
        '',
    ]
    if report.get('sdpa_backend'):
        lines += [f'SDPA backend (flash asserted): {report["sdpa_backend"]}', '']
    columns = [c for c in REPORT_COLUMNS if any(r.get(c) is not None for r in report['rows'])]
    lines += ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in report['rows']]
    if report['checks']:
        title = f'Fast path ({report["fast_path"]}) against the plain one (fp32, eager), same batch:'
        lines += ['', title, '', '| check | value | bound | pass |', '|---|---|---|---|']
        for c in report['checks']:
            lines.append(f'| {c["check"]} | {c["value"]:.6g} | {c["bound"]} | {c["pass"]} |')
    return '\n'.join(lines) + '\n'


def write_report(path, report):
    """FILE.json (each row with part, dtype, compiled, tflops, fraction_of_peak) and FILE.md."""
    for row in report['rows']:
        for key in ('dtype', 'compiled', 'tflops', 'fraction_of_peak'):
            row.setdefault(key, None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    path.with_suffix('.md').write_text(text)
    print(text)
    print(f'wrote {path} and {path.with_suffix(".md")}')


def print_ratios(rows):
    """compiled / eager and bf16 / fp32 speed-ups of the training and Euler steps."""
    steps = [r for r in rows if 'tokens_per_s' in r]
    ms = {(r['part'], r['dtype'], r['compiled'], r['checkpointing']): r['ms'] for r in steps}
    for (part, dtype, compiled, checkpointing), t in ms.items():
        eager = ms.get((part, dtype, False, checkpointing))
        if compiled and eager:
            print(f'{part}, {dtype}: compiled / eager speed-up {eager / t:.2f}x')
        fp32 = ms.get((part, 'fp32', compiled, checkpointing))
        if dtype == 'bf16' and fp32:
            print(f'{part}, compiled {compiled}: bf16 / fp32 speed-up {fp32 / t:.2f}x')


# ----------------------------------------------------------------------------- the suite
def main(argv=None):
    """Builds a random DiT of --preset, times the parts, prints a row each -> the rows."""
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    cfg = model_lib.PRESETS[a.preset]
    net = random_dit(cfg, device)
    batch = fake_batch(cfg, a.batch, a.views, a.size, device)
    T = (a.size // PATCH) ** 2  # tokens of a view
    params = model_lib.count_params(net) / 1e6
    print(
        f'{a.preset}: {params:.1f}M params, V={a.views}, {a.size}x{a.size} -> {a.views * T} tokens in 3D '
        f'attention, batch {a.batch}, {a.dtype}, {device} ({device_name(device)}), torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads'
    )
    command = ' '.join(sys.argv[1:] if argv is None else argv)
    report = {'command': f'python bench.py {command}', 'rows': [], 'checks': []}
    if a.report:
        report['machine'] = machine(device, a.iters)
    try:
        run_suite(a, device, net, batch, report)
    finally:  # a run cut short (recipes/gpu_bench.sh interrupts it at its time limit) keeps its rows
        if a.report:
            write_report(a.report, report)
    return report['rows']


def run_suite(a, device, net, batch, report):
    """The parts not in --skip, the most telling first (a lent GPU's time is short): the training and
    Euler steps eager, then compiled; the checks; the SDPA backend; the frozen parts or the scene."""
    skip = set(a.skip.split(',')) if a.skip else set()
    dtypes = a.dtype.split(',')
    casts = {}
    for dtype in dtypes:
        if dtype == 'bf16':
            casts[dtype] = torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            casts[dtype] = contextlib.nullcontext()
    autocast = casts[dtypes[-1]]  # the fast path, the SDPA check, the frozen parts, the scene
    peaks = {'fp32': None, 'bf16': model_lib.peak_tflops(device)}
    if a.report:
        peaks = report['machine']['peak_tflops']
    cfg = net.cfg
    checking = a.report and 'checks' not in skip
    if checking:  # with the last checkpointing setting, as the fast path: the GPU's fp32 fits so
        net.cfg = replace(cfg, checkpointing=a.checkpointing_runs[-1])
        plain = path_outputs(net, batch, contextlib.nullcontext(), flash=False)
    rows = report['rows']
    compiled_runs = [False]
    if a.compile and 'compile' not in skip:
        compiled_runs.append(True)
    for compiled in compiled_runs:
        if compiled:  # after every eager row: the blocks are compiled in place
            compile_blocks(net)
        for dtype, cast in casts.items():
            for checkpointing in a.checkpointing_runs:
                net.cfg = replace(cfg, checkpointing=checkpointing)
                if 'train' not in skip:
                    add(rows, train_row(net, batch, a, device, cast, peaks[dtype], dtype, compiled))
            if 'sample' not in skip:
                add(rows, bench_sample(net.eval(), batch, a, device, cast, peaks[dtype], dtype, compiled))
                net.train()
    flash = device.type == 'cuda' and dtypes[-1] == 'bf16'
    if checking:
        report['fast_path'] = fast_path_name(dtypes[-1], compiled_runs[-1], flash)
        report['checks'] = compare(plain, path_outputs(net, batch, autocast, flash))
    if flash:
        report['sdpa_backend'] = sdpa_backend_check(net, batch, device, autocast)
        add(rows, {'part': f'SDPA backend: {report["sdpa_backend"]}'})
    if 'frozen' not in skip:
        bench_frozen(a, device, autocast, rows)
    if a.report and 'scene' not in skip:
        add(rows, *bench_scene(a, net, device, autocast, dtypes[-1], compiled_runs[-1]))
    if device.type == 'cuda':  # the train rows reset the peak: the largest of theirs and since
        since = torch.cuda.max_memory_allocated() / 2**30
        peak_gb = max([since] + [r['memory_gb'] for r in rows if 'memory_gb' in r])
    else:  # Linux: ru_maxrss in KiB
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    add(rows, {'part': 'peak memory', 'gb': peak_gb})
    print_ratios(rows)


if __name__ == '__main__':
    cli.run_cli(main)
