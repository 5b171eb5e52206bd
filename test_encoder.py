"""Tests for encoder.py: parity with the depth_anything_3 package, propagation, geometry, loading, stats."""
import numpy as np
import pytest
import torch

import encoder as E

try:
    from depth_anything_3.cfg import create_object, load_config
    from depth_anything_3.registry import MODEL_REGISTRY
    from depth_anything_3.model.reference_view_selector import select_reference_view as pkg_select
    from depth_anything_3.model.utils.transform import pose_encoding_to_extri_intri
    from depth_anything_3.utils.geometry import affine_inverse
    HAVE_DA3 = True
except ImportError:
    HAVE_DA3 = False
needs_da3 = pytest.mark.skipif(not HAVE_DA3, reason='depth_anything_3 (PyPI 0.1.1) is not importable')

SIZES = [(56, 56), (42, 70)]
CASES = [(2, 'first'), (3, 'first'), (3, 'saddle_balanced')]


@torch.no_grad()
def perturbed_package_net(preset, seed=0):
    """The package's net with random weights; constant-initialised tensors (LayerScale, LN, cls and
    pos tokens) are perturbed so that every weight influences the outputs."""
    torch.manual_seed(seed)
    net = create_object(load_config(MODEL_REGISTRY[preset])).eval()
    for p in net.parameters():
        if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            p.copy_(p + (0.1 if p.flatten()[0] != 0 else 0.2) * torch.randn_like(p))
    return net


@torch.no_grad()
def package_outputs(net, images, mode):
    """Reference tensors from the package: exported levels, camera tokens, head and cam_dec outputs."""
    mean = torch.tensor(E.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(E.IMAGENET_STD).view(3, 1, 1)
    x = (images - mean) / std
    H, W = x.shape[-2:]
    feats, _ = net.backbone(x, cam_token=None, export_feat_layers=[], ref_view_strategy=mode)
    out = dict(net.head(feats, H, W, patch_start_idx=0))
    c2w, K = pose_encoding_to_extri_intri(net.cam_dec(feats[-1][1]), (H, W))
    out.update(extrinsics=affine_inverse(c2w), intrinsics=K)
    out.update({f'level{i}': f[0] for i, f in enumerate(feats)})
    out.update({f'cam_token{i}': f[1] for i, f in enumerate(feats)})
    return out


@torch.no_grad()
def our_outputs(enc, images, mode):
    H, W = images.shape[-2:]
    levels, cls = enc.encode(images, ref_view=mode, return_cls=True)
    norm = enc.normalize_levels(levels)
    out = enc.geometry(norm, H, W, cls_last=cls[-1])
    out.update({f'level{i}': f for i, f in enumerate(norm)})
    out.update({f'cam_token{i}': c for i, c in enumerate(cls)})
    return out


def parity_table(preset, monkeypatch):
    net = perturbed_package_net(preset)
    enc = E.build_encoder(preset, weights=net.state_dict()).eval()
    picked = []
    select = E.select_reference_view
    monkeypatch.setattr(E, 'select_reference_view', lambda t: picked.append(select(t)) or picked[-1])
    worst = {}
    torch.manual_seed(1)
    for H, W in SIZES:
        for S, mode in CASES:
            images = torch.rand(1, S, 3, H, W)
            ref, ours = package_outputs(net, images, mode), our_outputs(enc, images, mode)
            for k, v in ref.items():
                assert ours[k].shape == v.shape, k
                err = (ours[k] - v).abs()
                if k == 'intrinsics':   # pixel focal lengths reach 1e2..1e7 here: relative error
                    err = err / v.abs().clamp_min(1)
                err = err.max().item()
                worst[k] = max(worst.get(k, 0.0), err)
    print(f'\n{preset} parity (max abs err over sizes {SIZES}, (S, ref) {CASES}; intrinsics relative):')
    for k, e in worst.items():
        print(f'  {k:12s} {e:.2e}')
    return worst, picked


@needs_da3
def test_parity_da3_small(monkeypatch):
    worst, picked = parity_table('da3-small', monkeypatch)
    assert max(worst.values()) <= 1e-4, worst
    assert any(int(p[0]) != 0 for p in picked), 'saddle_balanced never chose a view other than 0'


@needs_da3
def test_parity_da3_base(monkeypatch):
    worst, _ = parity_table('da3-base', monkeypatch)
    assert max(worst.values()) <= 1e-4, worst


@needs_da3
def test_reference_selection_matches_package():
    torch.manual_seed(0)
    x = torch.randn(16, 5, 3, 32)                      # (B,S,N,C): only token 0 is read
    assert torch.equal(E.select_reference_view(x[:, :, 0]), pkg_select(x, 'saddle_balanced'))


@pytest.mark.parametrize('preset', ['da3-tiny', 'da3-small'])
@torch.no_grad()
def test_propagation_identity(preset):
    torch.manual_seed(0)
    enc = E.build_encoder(preset).eval()
    images = torch.rand(1, 3, 3, 42, 56)
    levels, cls = enc.encode(images, return_cls=True)
    for k in (0, 1):
        prop = enc.propagate(levels[k], k, cls[k], (3, 4))
        assert len(prop) == 3 - k
        for a, b in zip(prop, levels[k + 1:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    gld = enc.propagate(levels[1], 1, enc.first_view_cls(images, 1), (3, 4))   # GLD: one token for all
    assert [g.shape for g in gld] == [lv.shape for lv in levels[2:]]


def random_cameras(n, seed=0):
    """n random c2w (n,4,4) and normalised K (n,3,3) with off-centre principal points."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.linalg.det(Q).sign()[:, None, None]
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = Q, torch.randn(n, 3, generator=g, dtype=torch.float64)
    K = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    K[:, 0, 0], K[:, 1, 1] = 0.7 + torch.rand(n, generator=g), 0.7 + torch.rand(n, generator=g)
    K[:, 0, 2], K[:, 1, 2] = 0.3 + 0.4 * torch.rand(n, generator=g), 0.3 + 0.4 * torch.rand(n, generator=g)
    return c2w, K


def test_pose_from_rays_exact_off_centre():
    c2w, K = random_cameras(4)
    ray = E.rays_from_cameras(c2w, K, 12, 16).view(2, 2, 12, 16, 6)
    ray[..., :3] *= 0.5 + torch.rand(2, 2, 12, 16, 1, dtype=torch.float64)   # directions only up to scale
    conf = 1 + torch.rand(2, 2, 12, 16, dtype=torch.float64)
    c2w_est, K_est = E.pose_from_rays(ray, conf)
    torch.testing.assert_close(c2w_est, c2w.view(2, 2, 4, 4), atol=1e-8, rtol=0)
    torch.testing.assert_close(K_est, K.view(2, 2, 3, 3), atol=1e-8, rtol=0)


def test_pose_from_rays_robust_to_outliers():
    c2w, K = random_cameras(2, seed=1)
    ray = E.rays_from_cameras(c2w, K, 16, 16)
    torch.manual_seed(0)
    bad = torch.rand(2, 16, 16) < 0.2                                      # 20% random directions
    ray[..., :3][bad] = torch.randn(int(bad.sum()), 3, dtype=torch.float64)
    c2w_est, K_est = E.pose_from_rays(ray, torch.ones(2, 16, 16, dtype=torch.float64))
    assert (c2w_est - c2w).abs().max() < 1e-6 and (K_est - K).abs().max() < 1e-6


def test_depth_to_points_and_ply(tmp_path):
    c2w, K = random_cameras(1)
    depth = 1 + torch.rand(1, 6, 8, dtype=torch.float64)
    pts = E.depth_to_points(depth, c2w, K)                                # (1,6,8,3)
    cam = torch.einsum('ij,hwj->hwi', E.rigid_inverse(c2w[0]), torch.cat([pts[0], torch.ones(6, 8, 1)], -1))
    uv = torch.einsum('ij,hwj->hwi', K[0], cam)
    torch.testing.assert_close(uv[..., 2], depth[0])
    torch.testing.assert_close(uv[..., :2] / uv[..., 2:], E.pixel_grid(6, 8, 'cpu')[..., :2])
    rgb = torch.rand(48, 3)
    path = tmp_path / 'cloud.ply'
    E.write_ply(path, pts, rgb)
    data = path.read_bytes()
    header, body = data.split(b'end_header\n')
    assert b'binary_little_endian' in header and b'element vertex 48' in header
    verts = np.frombuffer(body, dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('r', 'u1'), ('g', 'u1'), ('b', 'u1')])
    np.testing.assert_allclose(np.stack([verts['x'], verts['y'], verts['z']], -1), pts.reshape(-1, 3).numpy(), rtol=1e-6)
    assert (np.stack([verts['r'], verts['g'], verts['b']], -1) == (rgb * 255).round().numpy()).all()


def test_latent_stats(tmp_path):
    torch.manual_seed(0)
    enc = E.build_encoder('da3-tiny').eval()
    batches = [torch.rand(2, 2, 3, 28, 42) for _ in range(3)]
    stats = E.compute_latent_stats(enc, batches, levels=(0, 1))
    with torch.no_grad():
        for l in (0, 1):
            allx = torch.cat([enc.encode(b)[l].reshape(-1, enc.dim) for b in batches]).double()
            torch.testing.assert_close(stats.mean[l].double(), allx.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stats.var[l].double(), allx.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
            z = stats.normalize(allx.float(), l)
            torch.testing.assert_close(stats.denormalize(z, l), allx.float(), atol=1e-4, rtol=1e-5)
    for name in ('stats.safetensors', 'stats.pt'):
        stats.save(tmp_path / name)
        loaded = E.LatentStats.load(tmp_path / name)
        assert torch.equal(loaded.mean[1], stats.mean[1]) and torch.equal(loaded.var[0], stats.var[0])
    C = enc.dim
    torch.save({'mean': torch.randn(1, C, 1, 1), 'var': torch.rand(1, C, 1, 1), 'std': torch.rand(1, C, 1, 1)},
               tmp_path / 'normalization_stats_level1.pt')
    official = E.load_official_stats(str(tmp_path))
    assert list(official.mean) == [1] and official.var[1].shape == (C,)


def test_bad_size_error():
    enc = E.build_encoder('da3-tiny')
    with pytest.raises(ValueError, match='50x56'):
        enc.encode(torch.rand(1, 1, 3, 50, 56))


def test_weight_loading(tmp_path, capsys):
    small = E.build_encoder('da3-small').state_dict()
    tiny = E.build_encoder('da3-tiny')
    sd = tiny.state_dict()
    # hub layout: 'model.' prefix, one name per shared tensor (safetensors dedup), cam_enc ignored with a note
    from safetensors.torch import save_file
    hub = {'model.' + k: v.clone() + 1 for k, v in sd.items() if 'output_conv2_aux.0.2' not in k}
    hub['model.cam_enc.token_norm.weight'] = torch.ones(3)
    save_file(hub, tmp_path / 'model.safetensors')
    enc = E.build_encoder('da3-tiny', weights=str(tmp_path / 'model.safetensors'))
    assert torch.equal(enc.head.norm.weight, sd['head.norm.weight'] + 1) and 'ignoring 1' in capsys.readouterr().out
    # GLD-style split release: backbone file + bare head file (no cam_dec: loads with a note)
    save_file({k: v for k, v in sd.items() if k.startswith('backbone.')}, tmp_path / 'backbone.safetensors')
    torch.save({k[5:]: v for k, v in sd.items() if k.startswith('head.')}, tmp_path / 'dpt_decoder.pt')
    enc = E.build_encoder('da3-tiny', weights=[tmp_path / 'backbone.safetensors', tmp_path / 'dpt_decoder.pt'])
    assert torch.equal(enc.head.norm.weight, sd['head.norm.weight']) and 'no cam_dec' in capsys.readouterr().out
    # missing keys are listed
    partial = {k: v for k, v in sd.items() if not k.startswith('backbone.pretrained.blocks.9.')}
    with pytest.raises(ValueError, match=r'missing \(\d+\):\s+backbone.pretrained.blocks.9.norm1.weight'):
        E.load_weights(tiny, partial)
    # wrong preset: the error names both presets
    with pytest.raises(ValueError, match="matches preset 'da3-small', not 'da3-tiny'"):
        E.load_weights(tiny, small)


def test_geometry_loss_and_training_step():
    torch.manual_seed(0)
    enc = E.build_encoder('da3-tiny')
    images = torch.rand(1, 2, 3, 28, 42)
    c2w, K = random_cameras(2)
    c2w, K = c2w.float()[None], K.float()[None]
    depths = 1 + torch.rand(1, 2, 28, 42)
    depths[0, 1, :3] = 0                                                  # invalid pixels
    out = enc(images)
    loss, parts = E.geometry_loss(out, depths, c2w, K)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'depth', 'grad', 'ray'}
    assert enc.backbone.pretrained.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # perfect predictions with confidence 1 give zero loss (GT in view 0's frame, scale = mean depth)
    scale = depths[:, 0].mean()
    rel = torch.linalg.inv(c2w[:, :1]) @ c2w
    rel[..., :3, 3] /= scale
    h, w = out['ray'].shape[2:4]
    perfect = {'depth': depths / scale, 'depth_conf': torch.ones_like(depths),
               'ray': E.rays_from_cameras(rel, K, h, w), 'ray_conf': torch.ones(1, 2, h, w)}
    loss, _ = E.geometry_loss(perfect, depths, c2w, K)
    assert loss.abs() < 1e-5
