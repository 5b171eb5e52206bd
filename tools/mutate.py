"""tools/mutate.py: does the suite catch the bugs that matter? Targeted mutation testing of gld.

Each entry of MUTATIONS is one small, plausible bug: an exact snippet of one file and what a slip would make of it.
The repository is copied once to a scratch folder; for each mutation that one file is changed, pytest runs there,
and the mutation is caught (a test fails) or missed (every selected test passes); a snippet that is no longer in the
file (the code moved on) is reported stale, to be updated. Not a test (pytest does not collect tools/) and not run by
CI: a habit. When a bug slips past the suite, add its mutation here beside the test that now catches it.

    python tools/mutate.py                   # every mutation, the suite: pytest -x -q -m 'not slow' (an hour or more)
    python tools/mutate.py --own             # each mutation against the tests of its concept (its own -k): minutes
    python tools/mutate.py -k 'resume'       # every mutation against the tests matching this -k
    python tools/mutate.py --only rope,cfg   # only the mutations whose name contains one of these
    python tools/mutate.py --list            # name, file and own -k of every mutation

Runs are single-threaded (OMP_NUM_THREADS=1) and write no bytecode; the unmutated selection runs first and must pass.
Exit status 1 when a mutation is missed or stale.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = {'.git', '__pycache__', '.pytest_cache', '.ruff_cache', 'runs', 'out', 'mine'}  # not copied


class Mutation(NamedTuple):
    name: str  # what the bug is
    file: str  # the file it lives in, relative to the repository
    original: str  # an exact snippet of that file (its first occurrence is replaced)
    mutated: str  # the snippet with the bug
    tests: str  # pytest -k of the tests of its concept (--own)


MUTATIONS = [
    # the flow: one convention for training and sampling
    Mutation(
        'flow: interpolation swapped',
        'diffusion.py',
        'x_t = (1 - t_b) * x + t_b * eps',
        'x_t = t_b * x + (1 - t_b) * eps',
        'point_mass or overfits',
    ),
    Mutation(
        'flow: velocity target sign', 'diffusion.py', 'target = eps - x', 'target = x - eps', 'point_mass or overfits'
    ),
    Mutation(
        'flow: Euler step against the velocity',
        'diffusion.py',
        'x = x + (t_next - t_cur) * v',
        'x = x - (t_next - t_cur) * v',
        'point_mass or euler or posterior',
    ),
    Mutation(
        'flow: posterior mean sign',
        'diffusion.py',
        'return noise - v',
        'return noise + v',
        'point_mass or posterior or sampler',
    ),
    Mutation(
        'flow: time shift inverted',
        'diffusion.py',
        'return a * t / (1 + (a - 1) * t)',
        'return t / (a + (1 - a) * t)',
        'shift or euler or official_time',
    ),
    Mutation(
        'cfg: guidance from the conditional velocity',
        'diffusion.py',
        'v = v_u + cfg_scale * (v - v_u)',
        'v = v + cfg_scale * (v - v_u)',
        'cfg',
    ),
    Mutation('ema: no warm-up', 'diffusion.py', 'd = min(self.decay, (1 + n) / (10 + n))', 'd = self.decay', 'ema'),
    Mutation('ema: lerp weight swapped', 'diffusion.py', 'lerp_(v.detach(), 1 - d)', 'lerp_(v.detach(), d)', 'ema'),
    # the DiT's inputs: the cascade, tau, camera dropout, CFG's branch
    Mutation(
        'cascade: conditioned on the generated level',
        'latents.py',
        "upper_raw = raw['full'][upper_level]",
        "upper_raw = raw['full'][level]",
        'cascade_are_the',
    ),
    Mutation(
        'cascade: upper normalised with the wrong statistics',
        'latents.py',
        'upper = stats.normalize(upper_raw, upper_level)',
        'upper = stats.normalize(upper_raw, level)',
        'cascade_are_the or cfg_gives',
    ),
    Mutation(
        'cascade: tau noise without VP normalisation',
        'latents.py',
        'upper = (upper + sigma * eps) / torch.sqrt(1 + sigma**2)',
        'upper = upper + sigma * eps',
        'tau_noise',
    ),
    Mutation(
        'cascade: level 0 conditioned on level 2',
        'pipeline.py',
        'return 1 if level == 0',
        'return 2 if level == 0',
        'test_train_writes or cascade',
    ),
    Mutation(
        'condition: normalised zeros leak at the targets',
        'latents.py',
        'cond = stats.normalize(cond_raw, level) * is_source',
        'cond = stats.normalize(cond_raw, level)',
        'cascade_are_the or cfg_gives',
    ),
    Mutation(
        'condition: the first source encoded with the targets',
        'latents.py',
        'for f in enc.encode(images[:, :n_src]):',
        'for f in [level[:, :n_src] for level in enc.encode(images)]:',
        'cascade_are_the or cfg_gives or latent_cache',
    ),
    Mutation(
        'cam-drop: comparison inverted',
        'latents.py',
        "device='cpu') < cam_drop",
        "device='cpu') > cam_drop",
        'camera_dropout',
    ),
    Mutation(
        'cfg: unconditional branch given the true cameras',
        'latents.py',
        'cams = self.uncond_cams if unconditional else self.cams',
        'cams = self.cams',
        'cfg_gives',
    ),
    Mutation(
        'cam-drop: rays kept',
        'latents.py',
        'plucker[:, :, 1:] *= keep',
        'plucker[:, :, :1] *= keep',
        'camera_dropout or cfg_gives',
    ),
    Mutation(
        'cam-drop: the target mask dropped too',
        'latents.py',
        'plucker[:, :, 1:] *= keep',
        'plucker[:, :, :] *= keep',
        'camera_dropout or cfg_gives',
    ),
    Mutation(
        'cam-drop: not passed to the training inputs',
        'train.py',
        'self.cam_drop = args.cam_drop',
        'self.cam_drop = 0.0',
        'training_flags',
    ),
    Mutation(
        'cascade: tau not passed to the training inputs',
        'train.py',
        'self.tau = args.tau',
        'self.tau = 0.0',
        'training_flags',
    ),
    # positional encodings and camera inputs
    Mutation(
        'rope: frequency exponent over the whole segment',
        'model.py',
        'dtype=torch.float32) / (size // 2)',
        'dtype=torch.float32) / size',
        'rope',
    ),
    Mutation(
        'rope: PRoPE axes swapped',
        'model.py',
        'axes = [(d // 4, x), (d // 4, y)]',
        'axes = [(d // 4, y), (d // 4, x)]',
        'rope',
    ),
    Mutation('rope: rope3d axis order', 'model.py', 'for p in (view, y, x)]', 'for p in (view, x, y)]', 'rope'),
    Mutation('rope: token column from the row count', 'model.py', 'x = n % w', 'x = n % h', 'rope'),
    Mutation(
        'rope: rotation sense',
        'model.py',
        '[cos * a + sin * b, -sin * a + cos * b]',
        '[cos * a - sin * b, sin * a + cos * b]',
        'rope',
    ),
    Mutation(
        'plucker: official pixel offset',
        'latents.py',
        'offset = (-0.5, 0.5) if official',
        'offset = (0.5, -0.5) if official',
        'plucker or official_camera',
    ),
    Mutation(
        'plucker: pixel corners, not centres',
        'latents.py',
        'if official else (0.5, 0.5)',
        'if official else (0.0, 0.0)',
        'plucker',
    ),
    Mutation(
        'plucker: mask marks the sources',
        'latents.py',
        'is_target = (~src_mask).to(rays.dtype)',
        'is_target = src_mask.to(rays.dtype)',
        'plucker or cfg_gives',
    ),
    Mutation(
        'cameras: poses relative to the first view',
        'latents.py',
        'normalize_poses(c2w, ref=-1, by=by)',
        'normalize_poses(c2w, ref=0, by=by)',
        'official_conventions or official_camera',
    ),
    Mutation(
        'prope: the official P_inv in the clean mode',
        'cameras.py',
        'P_inv = c2w @ lift(torch.linalg.inv(Kc))',
        'P_inv = c2w @ lift(Kc)',
        'prope or official_camera',
    ),
    # resume: every stage, bit for bit
    Mutation(
        'resume: EMA update count not restored',
        'train.py',
        "ema.load_state_dict(ck['ema'], ck.get('ema_updates', 0))",
        "ema.load_state_dict(ck['ema'])",
        'resume_continues',
    ),
    Mutation(
        'resume: optimizer not restored',
        'train.py',
        "    opt.load_state_dict(ck['optimizer'])\n",
        '',
        'resume_continues',
    ),
    Mutation(
        'resume: data position not restored',
        'train.py',
        "batches.pos = ck['pos']",
        'batches.pos = 0',
        'resume_continues',
    ),
    Mutation(
        "resume: the run's random stream not restored",
        'train.py',
        'set_rng_state(ck[',
        'rng_state(ck[',
        'resume_continues',
    ),
    Mutation(
        'rng: decoder noise from the global RNG',
        'train.py',
        'keep=keep.to(images.device), generator=rng)',
        'keep=keep.to(images.device))',
        'resume_continues',
    ),
    Mutation(
        "rng: the VAE's posterior sample from the global RNG",
        'train.py',
        'training_loss(batch, generator=rng)',
        'training_loss(batch)',
        'resume_continues',
    ),
    # the decoder
    Mutation(
        'decoder: noise in evaluation too',
        'decoder.py',
        'if self.training and self.cfg.noise_tau > 0:',
        'if self.cfg.noise_tau > 0:',
        'noise_augmentation',
    ),
    Mutation(
        'decoder: level dropout keeps the dropped',
        'decoder.py',
        'generator=generator) >= p',
        'generator=generator) < p',
        'level_keep or dropped_level',
    ),
    Mutation(
        'decoder: token grid transposed',
        'decoder.py',
        "'bv (h w) (py px c) -> bv c (h py) (w px)'",
        "'bv (w h) (py px c) -> bv c (h py) (w px)'",
        'non_square or overfit_one',
    ),
    # propagation
    Mutation(
        "propagation: the last view's token",
        'encoder.py',
        'self.encode(images[:, :1], return_cls=True)',
        'self.encode(images[:, -1:], return_cls=True)',
        'propagation_identity or ground_truth_latents',
    ),
    # the reprojection baseline
    Mutation(
        'reprojection: the farthest point wins a pixel',
        'metrics.py',
        "zbuffer.scatter_reduce(0, pixel, z, 'amin')",
        "zbuffer.scatter_reduce(0, pixel, -z, 'amin').neg()",
        'forward_warp',
    ),
    Mutation(
        'reprojection: points projected with c2w, not w2c',
        'cameras.py',
        '    w2c = c2w_to_w2c(c2w)\n    R = rotation(w2c)',
        '    w2c = c2w\n    R = rotation(w2c)',
        'forward_warp',
    ),
    Mutation(
        "reprojection: DA3's depth left in its own scale",
        'metrics.py',
        'scaled.append(depth * scale)',
        'scaled.append(depth)',
        'bundled_evaluation_reprojects',
    ),
    Mutation(
        'reprojection: one point per source pixel (cracks)',
        'metrics.py',
        'K_tgt, fill, sub=2):',
        'K_tgt, fill, sub=1):',
        'forward_warp',
    ),
    # training on a time budget and the lr schedule
    Mutation(
        'budget: the clock restarts at --resume',
        'train.py',
        "clock.minutes = ck.get('train_min', 0.0)",
        'clock.minutes = 0.0',
        'budget_minutes',
    ),
    Mutation(
        'budget: the run ends a step late',
        'train.py',
        '0 < args.budget_minutes <= clock.minutes',
        '0 < args.budget_minutes < clock.minutes - 0.5',
        'budget_minutes',
    ),
    Mutation(
        'budget: under DDP the fastest rank decides',
        'train.py',
        'dist.all_reduce(flag, op=dist.ReduceOp.MAX)',
        'dist.all_reduce(flag, op=dist.ReduceOp.MIN)',
        'budget_minutes_under_ddp',
    ),
    Mutation(
        'schedule: the cosine upside down',
        'train.py',
        '(1 + math.cos(math.pi * q))',
        '(1 - math.cos(math.pi * q))',
        'lr_schedule',
    ),
]


def copy_repo(dst):
    """The working tree without caches, runs and outputs (tests write their own in tmp folders)."""

    def ignore(folder, names):
        return [n for n in names if n in SKIPPED or n.startswith('data_synth')]

    shutil.copytree(REPO, dst, ignore=ignore)


def run_pytest(folder, k, timeout):
    """pytest in folder -> (status, the first failing test or the last line of its output, seconds)."""
    cmd = [sys.executable, '-m', 'pytest', 'test_gld.py', '-x', '-q', '-m', 'not slow', '-p', 'no:cacheprovider']
    if k:
        cmd += ['-k', k]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1'}
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'caught', f'timeout after {timeout}s', time.time() - start
    seconds = time.time() - start
    lines = (done.stdout + done.stderr).strip().splitlines() or ['(no output)']
    failed = [line.split(' - ')[0] for line in lines if line.startswith(('FAILED', 'ERROR'))]
    detail = failed[0] if failed else lines[-1]
    # pytest's exit status: 0 all passed, 1 a test failed, 2-4 interrupted or errors, 5 nothing collected
    status = {0: 'missed', 1: 'caught', 2: 'caught', 5: 'no tests'}.get(done.returncode, 'error')
    return status, detail, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-k', default='', help="pytest -k for every mutation (default: the whole suite, -m 'not slow')")
    p.add_argument('--own', action='store_true', help="each mutation against its own tests (its 'tests' -k)")
    p.add_argument('--only', default='', help='comma list: the mutations whose name contains one of these')
    p.add_argument('--timeout', type=int, default=3600, help='seconds per pytest run (a hang counts as caught)')
    p.add_argument('--list', action='store_true', help='print the mutations and exit')
    args = p.parse_args()
    chosen = MUTATIONS
    if args.only:
        words = args.only.split(',')
        chosen = [m for m in MUTATIONS if any(w in m.name for w in words)]
    if args.list:
        for m in chosen:
            print(f'{m.name:55} {m.file:12} -k {m.tests!r}')
        return 0
    scratch = tempfile.mkdtemp(prefix='gld-mutate-')
    repo = os.path.join(scratch, 'gld')
    copy_repo(repo)
    print(f'scratch copy: {repo}')
    baselines = sorted({m.tests if args.own else args.k for m in chosen})
    for k in baselines:  # the unmutated selections must pass, or every mutation would look caught
        status, detail, seconds = run_pytest(repo, k, args.timeout)
        if status != 'missed':
            print(f'baseline -k {k!r} does not pass ({status}: {detail}); fix the suite first', file=sys.stderr)
            return 2
        print(f'baseline -k {k!r}: passes ({seconds:.0f}s)')
    results = []
    for m in chosen:
        path = os.path.join(repo, m.file)
        with open(path) as f:
            source = f.read()
        if m.original not in source:
            results.append((m, 'stale', 'snippet not found', 0.0))
            print(f'stale   {m.name} ({m.file}): snippet not found')
            continue
        with open(path, 'w') as f:
            f.write(source.replace(m.original, m.mutated, 1))
        try:
            status, detail, seconds = run_pytest(repo, m.tests if args.own else args.k, args.timeout)
        finally:
            with open(path, 'w') as f:
                f.write(source)
        results.append((m, status, detail, seconds))
        print(f'{status:7} {m.name} ({m.file}, {seconds:.0f}s): {detail}', flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    caught = sum(status == 'caught' for _, status, _, _ in results)
    judged = sum(status in ('caught', 'missed') for _, status, _, _ in results)
    print(f'\nscore: {caught} / {judged} caught', end='')
    others = [f'{status}: {m.name}' for m, status, _, _ in results if status not in ('caught', 'missed')]
    print(f'; {len(others)} not judged ({"; ".join(others)})' if others else '')
    return 0 if caught == judged and not others else 1


if __name__ == '__main__':
    sys.exit(main())
