"""Tests for data.py: chunk IO, resize/crop intrinsics, metrics, the synthetic renderer, view splits, loaders,
error messages, DL3DV parsing. Run: OMP_NUM_THREADS=1 python -m pytest -q test_data.py"""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cameras
import data


def random_c2w(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.linalg.det(q)[:, None, None]  # proper rotations
    return cameras.make_pose(q, torch.randn(n, 3, generator=gen, dtype=torch.float64)).float()


def smooth_images(n, H, W, gen):
    """Low-frequency images (JPEG keeps them nearly exact)."""
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), (H, W), mode='bilinear')


def scene_dict(key, V, H, W, gen):
    return {'key': key, 'images': smooth_images(V, H, W, gen), 'c2w': random_c2w(V, gen),
            'K': torch.tensor([[0.7, 0, 0.5], [0, 0.9, 0.45], [0, 0, 1]]).repeat(V, 1, 1),
            'timestamps': torch.arange(V) * 1000, 'depths': 1 + torch.rand(V, H, W, generator=gen)}


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synth'))
    data.write_synth(root, n_train=4, n_test=2, frames=10, size=28, seed=3, per_chunk=3)
    return root


def test_chunk_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scenes = [scene_dict(f's{i}', 5, 28, 42, gen) for i in range(2)]
    path = str(tmp_path / '000000.torch')
    data.write_re10k_chunk(path, scenes)
    raw = torch.load(path, weights_only=True)
    assert raw[0]['cameras'].shape == (5, 18) and raw[0]['images'][0].dtype == torch.uint8
    assert torch.allclose(raw[0]['cameras'][:, 6:].reshape(5, 3, 4), cameras.c2w_to_w2c(scenes[0]['c2w'])[:, :3], atol=1e-6)
    back = data.read_re10k_chunk(path)
    for s, b in zip(scenes, back):
        assert b['key'] == s['key']
        assert torch.allclose(b['c2w'], s['c2w'], atol=1e-6) and torch.allclose(b['K'], s['K'], atol=1e-7)
        assert (b['images'] - s['images']).abs().mean() < 0.02 and b['images'].shape == s['images'].shape
        assert torch.allclose(b['depths'].float(), s['depths'], rtol=1e-3)
        assert torch.equal(b['timestamps'], s['timestamps'])


def test_resize_and_crop_keeps_projection():
    """A blob drawn at the projection of a 3D point lands at the projection with the new K after resize + crop."""
    H, W = 60, 80
    K = torch.tensor([[0.8, 0, 0.47], [0, 1.0, 0.55], [0, 0, 1]])
    X = torch.tensor([0.3, -0.2, 2.0])
    def project(K, H, W):
        p = cameras.K_to_pixels(K, H, W) @ X
        return p[:2] / p[2]  # pixel coordinates (x, y), pixel centres at +0.5
    u, v = project(K, H, W)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing='ij')
    blob = torch.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * 4.0 ** 2)).expand(3, H, W)
    img, K2 = data.resize_and_crop(blob[None], K[None], (42, 42))
    assert img.shape == (1, 3, 42, 42)
    w = img[0, 0] ** 4  # sharpen the blob, then take its centroid
    ys2, xs2 = torch.meshgrid(torch.arange(42) + 0.5, torch.arange(42) + 0.5, indexing='ij')
    centroid = torch.stack([(w * xs2).sum() / w.sum(), (w * ys2).sum() / w.sum()])
    assert torch.allclose(centroid, project(K2[0], 42, 42), atol=0.3)
    with pytest.raises(ValueError, match='multiples of 14'):
        data.resize_and_crop(blob[None], K[None], (40, 42))


def test_resize_and_crop_depth_nearest():
    d = torch.arange(4.0).repeat_interleave(14).reshape(1, 1, 56).expand(1, 56, 56)
    img, K, d2 = data.resize_and_crop(torch.rand(1, 3, 56, 56), torch.eye(3)[None], (28, 28), d)
    assert set(d2.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}  # nearest: no blended depths


def test_psnr_known_mse():
    gt = torch.zeros(2, 3, 3, 8, 8)
    pred = gt + 0.1  # mse 0.01 -> 20 dB
    assert torch.allclose(data.psnr(pred, gt), torch.full((2, 3), 20.0), atol=1e-4)


def test_ssim_identity_and_skimage():
    metrics = pytest.importorskip('skimage.metrics')
    gen = torch.Generator().manual_seed(1)
    x = (smooth_images(2, 40, 36, gen) + 0.1 * torch.rand(2, 3, 40, 36, generator=gen)).clamp(0, 1).double()
    y = (x + 0.15 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(data.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    for cov in (False, True):
        ours = data.ssim(y, x, sample_covariance=cov)
        ref = [metrics.structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=cov, data_range=1.0) for i in range(2)]
        assert ours.shape == (2,) and np.allclose(ours.numpy(), ref, atol=1e-4)
        assert ours.max() < 0.95


def test_depth_metrics_hand_case():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # the 0 is invalid
    pred = 2 * gt
    aligned = data.depth_metrics(pred, gt, align='median')
    assert aligned['absrel'] < 1e-9 and aligned['rmse'] < 1e-9 and aligned['delta1'] == 1.0
    raw = data.depth_metrics(pred, gt, align=None)
    assert raw['absrel'] == pytest.approx(1.0) and raw['delta1'] == 0.0
    assert raw['rmse'] == pytest.approx(np.sqrt((1 + 4 + 16) / 3))
    masked = data.depth_metrics(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 2.0]]), mask=torch.tensor([[True, False]]), align=None)
    assert masked['absrel'] == 0.0


def test_synthetic_renderer_agrees_with_its_cameras():
    s = data.synth_scene([7, 0, 0], frames=6, size=42)
    H = W = 42
    images, depth, c2w, K = torch.from_numpy(s['images']).double() / 255, torch.from_numpy(s['depths']).double(), \
        s['c2w'].double(), s['K'].double()
    a, b = 0, 3
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing='ij')
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3).double()  # (HW,3)
    cam_a = (pix @ torch.linalg.inv(cameras.K_to_pixels(K[a], H, W)).T) * depth[a].reshape(-1, 1)  # z = depth
    world = cam_a @ c2w[a, :3, :3].T + c2w[a, :3, 3]
    w2c_b = cameras.c2w_to_w2c(c2w[b])
    cam_b = world @ w2c_b[:3, :3].T + w2c_b[:3, 3]
    proj = cam_b @ cameras.K_to_pixels(K[b], H, W).T
    uv = (proj[:, :2] / proj[:, 2:]).floor().long()
    inside = (cam_b[:, 2] > 0.1) & (uv >= 0).all(1) & (uv[:, 0] < W) & (uv[:, 1] < H)
    iu, iv = uv[inside, 0], uv[inside, 1]
    visible = (depth[b][iv, iu] - cam_b[inside, 2]).abs() < 0.03 * cam_b[inside, 2]  # depth test
    assert visible.sum() > 0.3 * H * W
    diff = (images[a].reshape(-1, 3)[inside][visible] - images[b][iv, iu][visible]).abs().amax(1)
    assert diff.median() < 0.03 and (diff < 0.2).float().mean() > 0.75  # nearest-pixel lookup: edges differ
    # exact: rays from camera b's centre to the unprojected points hit them first (t = 1) with the same colour
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)  # stored y-down world -> modelling frame
    centre = (c2w[b, :3, 3] * flip).numpy()
    rgb, t = data.cast_rays(s['scene'], np.repeat(centre[None], H * W, 0), (world * flip).numpy() - centre)
    seen = np.abs(t - 1) < 1e-4
    assert seen.mean() > 0.3
    assert np.abs(np.round(rgb[seen] * 255) / 255 - images[a].reshape(-1, 3).numpy()[seen]).max() < 1.5 / 255
    R = s['c2w'][:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(6, 3, 3), atol=1e-5)
    assert (R[:, 1, 1] > 0.7).all()  # y-down world: every camera's y axis points roughly along world +y


def test_synthetic_is_deterministic():
    a, b = data.synth_scene([1, 2, 3], frames=3, size=14), data.synth_scene([1, 2, 3], frames=3, size=14)
    assert np.array_equal(a['images'], b['images']) and torch.equal(a['c2w'], b['c2w'])


def test_split_views():
    B, V = 3, 6
    batch = {'images': torch.arange(V).float().view(1, V, 1, 1, 1).expand(B, V, 3, 2, 2).clone(),
             'frames': torch.arange(V).expand(B, V).clone() * 10, 'key': ['a', 'b', 'c']}
    out = data.split_views(batch, 2, generator=torch.Generator().manual_seed(0))
    order = out['images'][:, :, 0, 0, 0].long()
    assert torch.equal(out['frames'], order * 10) and out['key'] == batch['key']
    assert out['src_mask'].tolist() == [[True, True, False, False, False, False]] * B
    for row in order.tolist():
        assert sorted(row) == list(range(V)) and row[:2] == sorted(row[:2]) and row[2:] == sorted(row[2:])
    ends = data.split_views(batch, 2, mode='ends')
    assert ends['frames'][0].tolist() == [0, 50, 10, 20, 30, 40]
    with pytest.raises(ValueError):
        data.split_views(batch, V)


def test_sample_frames_gaps():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = data.sample_frames(30, 5, (2, 4), g)
        gaps = f.diff()
        assert f.min() >= 0 and f.max() < 30 and ((gaps >= 2) & (gaps <= 4)).all()
    short = data.sample_frames(9, 5, (1, 5), g)  # gaps shrink to fit: at most 2
    assert short.diff().max() <= 2 and short.max() < 9


def test_dataset_and_loader_match_chunks(synth_root):
    ds = data.SceneDataset(synth_root, 'train', num_views=4, gap=(1, 2), seed=0)
    chunks = {s['key']: s for p in sorted(set(data.read_index(os.path.join(synth_root, 'train')).values()))
              for s in data.read_re10k_chunk(p)}
    loader = data.make_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=0)
    loader.sampler.set_epoch(1)
    ds.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert b['images'].shape == (2, 4, 3, 28, 28) and b['depths'].shape == (2, 4, 28, 28)
        for i, key in enumerate(b['key']):
            s, f = chunks[key], b['frames'][i]
            assert (f.diff() >= 1).all() and (f.diff() <= 2).all()
            assert torch.equal(b['c2w'][i], s['c2w'][f]) and torch.equal(b['K'][i], s['K'][f])
            assert torch.equal(b['images'][i], s['images'][f])
            assert torch.allclose(b['depths'][i], s['depths'][f].float())
    item = ds[0]
    assert torch.equal(item['frames'], ds[0]['frames'])  # deterministic per (seed, epoch, index)


def test_eval_index_and_buckets(synth_root):
    ev = data.SceneDataset(synth_root, 'test', num_views=8, eval=True)
    index = data.read_eval_index(os.path.join(synth_root, 'test', 'eval_index.json'))
    ctx, tgt = index[ev.keys[0]]
    item = ev[0]
    assert item['frames'].tolist() == sorted(ctx + tgt) and len(tgt) == 6
    b = data.split_views({k: v[None] if torch.is_tensor(v) else [v] for k, v in item.items()}, 2, mode='ends')
    assert b['frames'][0, :2].tolist() == ctx
    bk = data.SceneDataset(synth_root, 'train', num_views=3, size='buckets')
    assert bk.buckets == data.BUCKETS_112
    sizes = {tuple(x['images'].shape[-2:]) for x in data.make_loader(bk, 2, shuffle=False)}
    assert sizes <= set(data.BUCKETS_112)


def test_corrupt_jpeg_is_skipped(tmp_path):
    gen = torch.Generator().manual_seed(2)
    scenes = [scene_dict(f'scene{i}', 3, 28, 28, gen) for i in range(3)]
    os.makedirs(tmp_path / 'train')
    data.write_re10k_chunk(str(tmp_path / 'train' / '000000.torch'), scenes)
    chunk = torch.load(tmp_path / 'train' / '000000.torch', weights_only=True)
    chunk[1]['images'][1] = torch.tensor(list(b'not a jpeg at all'), dtype=torch.uint8)
    torch.save(chunk, tmp_path / 'train' / '000000.torch')
    (tmp_path / 'train' / 'index.json').write_text(json.dumps({s['key']: '000000.torch' for s in scenes}))
    ds = data.SceneDataset(str(tmp_path), 'train', num_views=3)
    with pytest.warns(UserWarning, match='scene1'):
        item = ds[1]
    assert item['key'] == 'scene2'
    assert len(list(data.make_loader(ds, 1, shuffle=False))) == 3


def test_clear_errors(tmp_path):
    os.makedirs(tmp_path / 'train')
    with pytest.raises(FileNotFoundError, match='index.json'):
        data.SceneDataset(str(tmp_path), 'train')
    (tmp_path / 'train' / 'index.json').write_text('{}')
    with pytest.raises(ValueError, match='no scenes'):
        data.SceneDataset(str(tmp_path), 'train')
    with pytest.raises(ValueError, match=r'\(V, 18\)'):
        data.cameras_to_c2w_K(torch.zeros(4, 16), 'bad.torch')
    gen = torch.Generator().manual_seed(3)
    data.write_re10k_chunk(str(tmp_path / 'train' / '000000.torch'), [scene_dict('odd', 3, 30, 40, gen)])
    (tmp_path / 'train' / 'index.json').write_text(json.dumps({'odd': '000000.torch'}))
    with pytest.raises(ValueError, match='not multiples of 14'):
        data.SceneDataset(str(tmp_path), 'train', num_views=2)
    assert data.SceneDataset(str(tmp_path), 'train', num_views=2, size=(28, 28))[0]['images'].shape == (2, 3, 28, 28)


def write_dl3dv_scene(folder, n=3):
    """A tiny nerfstudio scene: intrinsics at 80x60, images_4 at 20x15; camera i at (i, 2, 3) looking down -z (OpenGL)."""
    os.makedirs(os.path.join(folder, 'images_4'))
    frames = []
    for i in range(n):
        name = f'frame_{i + 1:05d}.png'
        Image.fromarray(np.full((15, 20, 3), 40 * i, np.uint8)).save(os.path.join(folder, 'images_4', name))
        m = np.eye(4)
        m[:3, 3] = [i, 2, 3]
        frames.append({'file_path': f'images/{name}', 'transform_matrix': m.tolist()})
    meta = {'w': 80, 'h': 60, 'fl_x': 64.0, 'fl_y': 60.0, 'cx': 40.0, 'cy': 30.0, 'frames': frames[::-1]}
    with open(os.path.join(folder, 'transforms.json'), 'w') as f:
        json.dump(meta, f)


def test_dl3dv_transforms(tmp_path):
    write_dl3dv_scene(str(tmp_path / 'scenes' / 'abc'))
    s = data.read_dl3dv_scene(str(tmp_path / 'scenes' / 'abc'))
    assert s['key'] == 'abc' and s['images'].shape == (3, 3, 15, 20) and s['timestamps'].tolist() == [1, 2, 3]
    assert torch.allclose(s['K'][0], torch.tensor([[0.8, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]))
    assert torch.allclose(s['c2w'][1, :3, :3], torch.diag(torch.tensor([1.0, -1.0, -1.0])))  # y, z flipped
    assert torch.allclose(s['c2w'][1, :3, 3], torch.tensor([1.0, 2.0, 3.0]))
    point = torch.tensor([1.0, 3.0, 1.0, 1.0])  # OpenGL: 2 ahead (-z) and 1 up (+y) of camera 1
    cam = cameras.c2w_to_w2c(s['c2w'][1]) @ point
    assert cam[2] == pytest.approx(2.0) and cam[1] == pytest.approx(-1.0)  # OpenCV: z forward, y down
    assert abs(s['images'][2].mean() - 80 / 255) < 1e-6  # frames sorted by file name
    ds = data.SceneDataset(f'dl3dv:{tmp_path / "scenes"}', num_views=2, size=(14, 14))
    assert len(ds) == 1 and ds[0]['images'].shape == (2, 3, 14, 14)
    with pytest.raises(FileNotFoundError, match='transforms.json'):
        data.read_image_folder(str(tmp_path))


def test_lpips_fn_is_optional():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fn = data.lpips_fn('cpu')
    assert fn is None or callable(fn)


def test_mixture_dataset_ratios_and_prefixes(tmp_path):
    data.write_synth(str(tmp_path / 'a'), 2, 1, frames=6, size=28, seed=0)
    data.write_synth(str(tmp_path / 'b'), 2, 1, frames=6, size=28, seed=1)
    mix = data.make_dataset(f're10k:{tmp_path / "a"}*3,{tmp_path / "b"}*1', split='train', num_views=2)
    A = data.make_dataset(str(tmp_path / 'a'), split='train', num_views=2)
    from_a = [any(torch.equal(mix[i]['images'], A[j]['images']) for j in range(len(A))) for i in range(len(mix))]
    assert len(mix) == 4 and from_a == [True, True, True, False]  # 3:1 of 4 items, cycling through a's scenes
    mix.set_epoch(1)
