"""Integration tests of train.py, sample.py and bench.py at tiny scale on a tiny synthetic set."""
import json
import os
import re
import socket

import pytest
import torch

import bench
import data
import sample
import train

TINY = ['--views', '4', '--batch-size', '2', '--steps', '2', '--log-every', '1', '--ckpt-every', '2', '--eval-every', '2',
        '--stats-batches', '1', '--warmup', '1']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A tiny synthetic set (56 px, 4x4 tokens) and 2-step runs of every stage in <tmp>/runs, cwd = <tmp>."""
    root = tmp_path_factory.mktemp('gld')
    data.write_synth(str(root / 'data'), 4, 2, frames=10, size=56, seed=0)
    old = os.getcwd()
    os.chdir(root)
    d = ['--data', str(root / 'data')]
    runs = {
        'encoder': ['--stage', 'encoder', '--encoder', 'da3-tiny', '--seed', '1', '--lr', '1e-3', '--gap', '1-2',
                    '--workers', '2', '--wandb', 'gld-test', '--export', 'exported'],
        'decoder': ['--stage', 'decoder', '--decoder', 'tiny', '--encoder-weights', 'auto', '--level-dropout', '0.5',
                    '--noise-tau', '0.1', '--lpips', '--gan', '1', '--ema', '0.9', '--keep', '1', '--size', '42x56'],
        'level1': ['--level', '1', '--model', 'gld-tiny', '--src', '1-2', '--cam-drop', '0.5', '--t-dist', 'logit_normal',
                   '--accum', '2', '--checkpointing', '--decoder-ckpt', 'auto'],
        'level0': ['--level', '0', '--tau', '0.2', '--max-bad', '3'],
        'level2': ['--level', '2', '--pos', 'rope3d', '--decoder-ckpt', 'none', '--compile'],
    }
    for name, argv in runs.items():
        train.main(d + TINY + argv)
    stats = torch.load(train.list_checkpoints('runs/level0')[-1], weights_only=False)['stats']
    from encoder import LatentStats
    LatentStats.from_state_dict(stats).save(str(root / 'stats.safetensors'))
    runs['level0_ind'] = ['--level', '0', '--independent', '--stats', str(root / 'stats.safetensors'), '--resume',
                          '--out', 'runs/level0_ind', '--eval-every', '0']
    train.main(d + TINY + runs['level0_ind'])
    yield {'root': root, 'data': str(root / 'data'), 'argv': runs}
    os.chdir(old)


def options(parser):
    return {o for a in parser._actions for o in a.option_strings if o.startswith('--') and o != '--help'}


def test_train_writes_checkpoints_logs_and_exports(world):
    for name in ['encoder', 'decoder', 'level1', 'level0', 'level2', 'level0_ind']:
        ck = train.list_checkpoints(f'runs/{name}')
        assert ck, name
        state = torch.load(ck[-1], weights_only=False)
        assert state['step'] == 2 and set(state) >= {'model', 'ema', 'optimizer', 'config', 'args', 'rng'}
        rows = train.read_csv(f'runs/{name}/log.csv')
        assert [r['step'] for r in rows if 'loss' in r] == [1, 2] and all(r['loss'] > 0 for r in rows if 'loss' in r)
    assert len(train.list_checkpoints('runs/decoder')) == 1  # --keep 1
    assert os.path.exists('runs/encoder/loss.png')
    meta, sd = sample.load_checkpoint('exported/encoder.safetensors')
    ck = torch.load(train.list_checkpoints('runs/encoder')[-1], weights_only=False)
    assert meta['kind'] == 'encoder' and all(torch.allclose(sd[k], ck['ema'][k].float(), atol=1e-2, rtol=1e-2) for k in sd)
    assert torch.load(train.list_checkpoints('runs/level0')[-1], weights_only=False)['upper_level'] == 1
    assert torch.load(train.list_checkpoints('runs/level0_ind')[-1], weights_only=False)['upper_level'] is None


def test_every_train_sample_bench_flag_is_exercised(world):
    used = set(sum(world['argv'].values(), [])) | set(TINY) | {'--data', '--out', '--resume', '--stage', '--level'}
    assert options(train.build_parser()) <= used, options(train.build_parser()) - used
    assert options(sample.build_parser()) <= set(sum(SAMPLE_RUNS, [])) | {'--official'}  # --official: test_official.py
    assert options(bench.build_parser()) <= set(sum(BENCH_RUNS, []))


def test_resume_continues_exactly(world, tmp_path):
    base = ['--data', world['data'], '--level', '1', '--views', '4', '--batch-size', '2', '--log-every', '1',
            '--ckpt-every', '2', '--eval-every', '0', '--stats-batches', '1', '--warmup', '1', '--lr', '1e-3']
    train.main(base + ['--steps', '4', '--out', str(tmp_path / 'a')])
    train.main(base + ['--steps', '2', '--out', str(tmp_path / 'b')])
    train.main(base + ['--steps', '4', '--out', str(tmp_path / 'b'), '--resume'])
    la, lb = train.read_csv(tmp_path / 'a' / 'log.csv'), train.read_csv(tmp_path / 'b' / 'log.csv')
    assert [r['loss'] for r in la] == pytest.approx([r['loss'] for r in lb], rel=1e-6, abs=1e-7)
    sa = torch.load(train.list_checkpoints(str(tmp_path / 'a'))[-1], weights_only=False)['model']
    sb = torch.load(train.list_checkpoints(str(tmp_path / 'b'))[-1], weights_only=False)['model']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _ddp_worker(rank, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(argv)


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(world, tmp_path):
    """gloo, 2 ranks x batch 1 == 1 rank x batch 2 == 1 rank x batch 1 x accum 2 (level dropout off: deterministic)."""
    base = ['--data', world['data'], '--stage', 'decoder', '--views', '4', '--steps', '3', '--log-every', '1',
            '--ckpt-every', '3', '--eval-every', '0', '--level-dropout', '0', '--lr', '1e-3', '--warmup', '1']
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, base + ['--batch-size', '1', '--out', str(tmp_path / 'ddp')]), nprocs=2)
    train.main(base + ['--batch-size', '2', '--out', str(tmp_path / 'one')])
    train.main(base + ['--batch-size', '1', '--accum', '2', '--out', str(tmp_path / 'acc')])
    load = lambda n: torch.load(train.list_checkpoints(str(tmp_path / n))[-1], weights_only=False)['model']
    ddp, one, acc = load('ddp'), load('one'), load('acc')
    dist = lambda x, y: torch.sqrt(sum(((x[k] - y[k]).float() ** 2).sum() for k in y))
    # the same global batch on one rank but half of it (rank 0's sample alone) is the scale of a real mismatch
    train.main(base + ['--batch-size', '1', '--out', str(tmp_path / 'half')])
    scale = dist(load('half'), one)
    assert scale > 1e-3
    # Adam turns float-reduction noise on near-zero gradients into small steps, hence a relative tolerance
    assert dist(ddp, one) < 0.02 * scale and dist(acc, one) < 0.02 * scale, (dist(ddp, one), dist(acc, one), scale)


def test_interrupted_checkpoint_write_keeps_the_good_one(tmp_path, monkeypatch):
    good = train.save_checkpoint(str(tmp_path), 1, {'step': 1, 'w': torch.ones(3)}, keep=2)
    real_save = torch.save

    def dying_save(obj, f):
        real_save({'partial': True}, f)
        raise KeyboardInterrupt('killed mid-write')
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path), 2, {'step': 2, 'w': torch.zeros(3)}, keep=2)
    assert train.list_checkpoints(str(tmp_path)) == [good]
    assert torch.load(good, weights_only=False)['step'] == 1


def test_non_finite_losses_skip_then_stop_and_keep_the_checkpoint(world, tmp_path, monkeypatch):
    argv = ['--data', world['data'], '--stage', 'decoder', '--views', '4', '--batch-size', '2', '--log-every', '1',
            '--ckpt-every', '1', '--eval-every', '0', '--out', str(tmp_path)]
    train.main(argv + ['--steps', '1'])
    before = torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=False)['model']
    monkeypatch.setattr(train.decoder_lib, 'decoder_loss', lambda pred, gt, lpips=None: (pred.sum() * float('nan'), {}))
    with pytest.raises(SystemExit, match='non-finite'):
        train.main(argv + ['--steps', '5', '--resume', '--max-bad', '2'])
    after = torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=False)
    assert after['step'] == 1 and all(torch.equal(before[k], after['model'][k]) for k in before)


SAMPLE_RUNS = [
    ['--ckpt-dir', 'runs', '--views', '4', '--src', '2', '--scene', '0', '--seed', '1', '--cfg', '2.0', '--lpips',
     '--steps', '2', '--out', 'out/a', '--data', 'DATA', '--split', 'test'],
    ['--ckpt-dir', 'runs', '--views', '4', '--steps', '2', '--eval', '--eval-scenes', '1', '--out', 'out/eval', '--data', 'DATA'],
    ['--ckpt-dir', 'runs', '--images', 'IM0', 'IM1', '--cameras', 'CAMS', '--size', '56x56', '--traj', 'orbit',
     '--frames', '3', '--chunk', '2', '--steps', '2', '--out', 'out/c'],
    ['--ckpt-dir', 'runs', '--images', 'IM0', 'IM1', '--traj', 'spiral', '--frames', '2', '--steps', '2', '--out', 'out/d'],
    ['--ckpt-dir', 'runs', '--views', '4', '--steps', '2', '--traj', 'forward', '--frames', '2', '--out', 'out/e', '--data', 'DATA'],
    ['--ckpt-dir', 'runs', '--views', '4', '--steps', '2', '--boundary', '2', '--independent', '--out', 'out/f', '--data', 'DATA'],
    ['--ckpt-dir', 'runs', '--recon', '--eval-scenes', '1', '--out', 'out/recon', '--data', 'DATA'],
]
BENCH_RUNS = [
    ['--preset', 'gld-tiny', '--encoder', 'da3-tiny', '--decoder', 'tiny', '--views', '2', '--size', '28', '--batch', '1',
     '--dtype', 'bf16', '--checkpointing', '--device', 'cpu', '--iters', '1', '--warmup', '0', '--formula'],
    ['--views', '2', '--size', '28', '--batch', '1', '--iters', '1', '--warmup', '1', '--compile', '--skip', 'sample,frozen'],
]


@pytest.fixture(scope='module')
def user_images(world):
    """Two images and a nerfstudio transforms.json written from a test scene."""
    ds = data.SceneDataset(world['data'], split='test', num_views=4, eval=True)
    s = ds[0]
    folder = world['root'] / 'user'
    folder.mkdir(exist_ok=True)
    frames = []
    for v in range(2):
        sample.save_image(s['images'][v], str(folder / f'im{v}.png'))
        Kp = sample.cameras.K_to_pixels(s['K'][v], 56, 56)
        frames.append({'file_path': f'im{v}.png', 'transform_matrix': sample.cameras.opengl_to_opencv(s['c2w'][v]).tolist(),
                       'fl_x': float(Kp[0, 0]), 'fl_y': float(Kp[1, 1]), 'cx': float(Kp[0, 2]), 'cy': float(Kp[1, 2]), 'w': 56, 'h': 56})
    json.dump({'frames': frames}, open(folder / 'transforms.json', 'w'))
    return folder


@pytest.mark.parametrize('i', range(len(SAMPLE_RUNS)))
def test_sample_runs_and_writes_every_output(world, user_images, i):
    argv = [{'DATA': world['data'], 'IM0': str(user_images / 'im0.png'), 'IM1': str(user_images / 'im1.png'),
             'CAMS': str(user_images)}.get(x, x) for x in SAMPLE_RUNS[i]]
    sample.main(argv)
    out = argv[argv.index('--out') + 1]
    files = set(os.listdir(out))
    if '--recon' in argv:
        table = json.load(open(os.path.join(out, 'recon.json')))
        assert set(table) == {'all levels', 'level 0', 'level 1', 'level 2', 'level 3'}
        assert all(0 < t['psnr'] < 60 for t in table.values())
        return
    if '--eval' in argv:
        assert {'eval_n2.md', 'eval_n2.json', 'eval_n2_scenes.csv'} <= files
        table = json.load(open(os.path.join(out, 'eval_n2.json')))
        assert {'gld', 'nearest source', 'mean colour', 'da3 on gt images'} <= set(table)
        return
    assert {'grid.png', 'depth.npy', 'points.ply', 'transforms.json', 'target_000.png', 'depth_000.png'} <= files
    assert 'video.gif' in files or 'video.mp4' in files
    if '--traj' not in argv:
        m = json.load(open(os.path.join(out, 'metrics.json')))
        assert m['gld']['psnr'] > 0 and 'ate' in m['gld']
    tf = json.load(open(os.path.join(out, 'transforms.json')))
    assert len(tf['frames']) == len([f for f in files if f.startswith('target_')]) + 2


@pytest.mark.parametrize('i', range(len(BENCH_RUNS)))
def test_bench_runs(i):
    rows = bench.main(BENCH_RUNS[i])
    train_rows = [r for r in rows if r['part'].startswith('train step')]
    assert train_rows and all(r['tokens/s'] > 0 and r['TFLOP/s'] > 0 for r in train_rows)


def test_ground_truth_latents_decode_like_the_decoder(world):
    """With ground-truth levels 0 and 1 in place of the diffusion models, the pipeline's target views equal the
    decoder's own reconstruction up to propagation with the first source's token 0 (checks cameras, view order,
    propagation and decoding together)."""
    pipe = sample.load_pipeline('runs')
    ds = data.SceneDataset(world['data'], split='test', num_views=4, eval=True)
    scene = data.split_views(sample.collate_one(ds[0]), 2, mode='ends')
    images = scene['images']
    full = pipe.enc.encode(images)
    out = pipe.generate(images, scene['c2w'], scene['K'], 2, steps=1, given={0: full[0], 1: full[1]})
    recon = pipe.dec(pipe.enc.normalize_levels(full), (4, 4)).clamp(0, 1)
    err = (out['images'] - recon).abs().max()
    # levels 0 and 1 are exact; 2 and 3 are propagated from level 1 (token 0 from the first source alone)
    own = pipe.enc.propagate(full[1], 1, pipe.enc.encode(images, return_cls=True)[1][1], (4, 4))
    assert torch.allclose(own[0], full[2], atol=1e-4) and torch.allclose(own[1], full[3], atol=1e-4)
    assert data.psnr(out['images'], recon).min() > 30, float(err)
