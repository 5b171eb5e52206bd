"""test_gld.py: the test suite of gld. Behavioural tests that can fail: exact identities, parity with reference
implementations (depth-anything-3, scikit-image, the official GLD key layouts), overfitting, round trips, end-to-end runs.

    python -m pytest -q test_gld.py -m "not slow"   # the README's command (CPU, 2 cores, torch single-threaded)
    python -m pytest -q test_gld.py -m slow         # torch.compile against eager (minutes from a cold cache)

Layout, so that a new test has one place to go: one section per module in import order, bottom first (cameras,
data and synth, encoder, decoder, model and diffusion, the release files), then the entry scripts end to end on a
tiny synthetic set (the module-scoped `world` fixture trains 2-step runs of every stage once), the bundled models,
the exported formats read back by other tools, and bad input through the command lines. Shape legend: B batch,
V views, H W image, h w token grid, C channels, T tokens.
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors.torch import save_file

import bench
import cameras
import cli
import constants
import data
import decoder as decoder_lib
import diffusion
import dinov2 as dinov2_lib
import encoder as encoder_lib
import export
import latent_cache
import latents
import metrics
import model
import official
import pipeline
import runlog
import safety
import sample
import synth
import train
import vae as vae_lib
import vggt as vggt_lib

torch.set_num_threads(1)  # 2-core machines: one thread is faster than two under load, with the same results


@pytest.fixture(autouse=True)
def empty_working_directory(tmp_path_factory, monkeypatch):
    """Every test starts in an empty folder of its own: what it writes by relative path (runs/, out/, data_synth/)
    lands there, a checkout's runs/ never changes what 'auto' finds, and no test sees another's working directory,
    so each passes alone, in any order, under any -k."""
    monkeypatch.chdir(tmp_path_factory.mktemp('cwd'))


# ====================================================================================================
# cameras.py
# Behavioural tests for cameras.py (fast, CPU, float64).
# ====================================================================================================


@pytest.fixture
def float64():
    """Run a cameras test in float64 and restore the default dtype afterwards (other modules share the run)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_rotation(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, Rr = torch.linalg.qr(torch.randn(*shape, 3, 3, generator=g))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1))[..., None, :]
    return Q * torch.det(Q)[..., None, None]  # det +1


def random_poses(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return cameras.make_pose(random_rotation(n, seed=seed), torch.randn(n, 3, generator=g))


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


K0 = torch.tensor([[0.9, 0.0, 0.48], [0.0, 1.2, 0.53], [0.0, 0.0, 1.0]], dtype=torch.float64)


def project(c2w, K, X):
    """World point X (3,) -> normalised image coordinates (2,)."""
    x = K @ (cameras.c2w_to_w2c(c2w)[:3, :3] @ X + cameras.c2w_to_w2c(c2w)[:3, 3])
    return x[:2] / x[2]


# ---------------------------------------------------------------- conversions


@pytest.mark.usefixtures('float64')
def test_w2c_c2w_round_trip():
    c2w = random_poses(5)
    w2c = cameras.c2w_to_w2c(c2w)
    assert torch.allclose(w2c, torch.linalg.inv(c2w), atol=1e-12)
    assert torch.allclose(cameras.w2c_to_c2w(w2c), c2w, atol=1e-12)


@pytest.mark.usefixtures('float64')
def test_opengl_to_opencv_known_camera():
    # OpenGL camera at (1,2,3) looking down world -z with y up: in OpenCV it looks along -z, y down.
    gl = cameras.make_pose(torch.eye(3), torch.tensor([1.0, 2.0, 3.0]))
    cv = cameras.opengl_to_opencv(gl)
    assert torch.allclose(cv[:3, 2], torch.tensor([0.0, 0.0, -1.0]))  # forward
    assert torch.allclose(cv[:3, 1], torch.tensor([0.0, -1.0, 0.0]))  # down
    assert torch.allclose(cv[:3, 3], gl[:3, 3])
    assert torch.allclose(cameras.opengl_to_opencv(cv), gl)


@pytest.mark.usefixtures('float64')
def test_K_pixels_round_trip():
    Kpix = cameras.K_to_pixels(K0, 60, 80)
    assert torch.allclose(Kpix[0], torch.tensor([72.0, 0.0, 38.4]))
    assert torch.allclose(Kpix[1], torch.tensor([0.0, 72.0, 31.8]))
    assert torch.allclose(cameras.K_to_normalized(Kpix, 60, 80), K0)


@pytest.mark.usefixtures('float64')
def test_normalize_poses():
    c2w = torch.stack([random_poses(4, seed=1), random_poses(4, seed=2)])  # (B,V,4,4)
    rel, scale = cameras.normalize_poses(c2w, ref=-1)
    assert scale.shape == (2,)
    assert torch.allclose(rel[:, -1], torch.eye(4).expand(2, 4, 4), atol=1e-12)
    assert torch.allclose(rel[..., :3, 3].norm(dim=-1).amax(-1), torch.ones(2))
    # relative rotations preserved, relative translations scaled
    a, b = cameras.c2w_to_w2c(c2w[:, 0]) @ c2w[:, 1], cameras.c2w_to_w2c(rel[:, 0]) @ rel[:, 1]
    assert torch.allclose(a[:, :3, :3], b[:, :3, :3], atol=1e-10)
    assert torch.allclose(a[:, :3, 3] * scale[:, None], b[:, :3, 3], atol=1e-10)
    rel0, _ = cameras.normalize_poses(c2w, ref=0, by='max_abs')
    assert torch.allclose(rel0[:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-12)
    assert torch.allclose(rel0[..., :3, 3].abs().amax((-1, -2)), torch.ones(2))


@pytest.mark.usefixtures('float64')
def test_normalize_poses_identical_cameras():
    c2w = random_poses(1).expand(3, 4, 4)
    rel, scale = cameras.normalize_poses(c2w)
    assert torch.isfinite(rel).all() and scale.item() == 1.0
    assert torch.allclose(rel, torch.eye(4).expand(3, 4, 4), atol=1e-12)


# ---------------------------------------------------------------- rays


@pytest.mark.usefixtures('float64')
def test_plucker_unit_directions_orthogonal_moments():
    c2w = random_poses(3)
    r = cameras.plucker_rays(c2w, K0.expand(3, 3, 3), 5, 7)
    assert r.shape == (3, 6, 5, 7)
    d, m = r[:, :3], r[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(3, 5, 7))
    assert (d * m).sum(1).abs().max() < 1e-12
    # pixel (u, v) is sampled at its centre: the ray equals world_rays at ((u+.5)/W, (v+.5)/H)
    o, dd = cameras.world_rays(c2w[1], K0, torch.tensor([[(4 + 0.5) / 7, (2 + 0.5) / 5]]))
    assert torch.allclose(r[1, :3, 2, 4], dd[0])
    assert torch.allclose(r[1, 3:, 2, 4], torch.cross(o[0], dd[0], dim=0))


@pytest.mark.usefixtures('float64')
def test_plucker_centre_pixel_is_optical_axis_and_official_offset():
    c2w = random_poses(1)[0]
    K = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    r = cameras.plucker_rays(c2w, K, 5, 5)
    assert torch.allclose(r[:3, 2, 2], c2w[:3, 2])  # centre pixel of an odd image looks along +z
    official = cameras.plucker_rays(c2w, K, 5, 5, pixel_offset=(-0.5, 0.5))
    assert torch.allclose(official[..., 1:], r[..., :-1])  # x shifted by one pixel, y unchanged
    assert not torch.allclose(official, r)


@pytest.mark.usefixtures('float64')
def test_rays_of_two_cameras_meet_at_the_point():
    X = torch.tensor([0.3, -0.2, 4.0])
    cams = cameras.look_at(
        torch.tensor([[0.0, 0, 0], [2.0, 0.5, 0.5]]), torch.tensor([0.0, 0.0, 4.5]), torch.tensor([0.0, -1.0, 0.0])
    )
    for c2w in cams:
        xy = project(c2w, K0, X)
        o, d = cameras.world_rays(c2w, K0, xy[None])
        m = torch.cross(o[0], d[0], dim=0)
        assert torch.cross(X, d[0], dim=0).sub(m).norm() < 1e-10  # distance of X from the Plücker line
        assert torch.cross(X + 0.1, d[0], dim=0).sub(m).norm() > 1e-3


# ---------------------------------------------------------------- PRoPE


@pytest.mark.usefixtures('float64')
def test_prope_inverse_and_official_quirk():
    c2w = random_poses(4)
    K = K0.expand(4, 3, 3)
    P, P_inv = cameras.prope_matrices(c2w, K)
    assert torch.allclose(P_inv @ P, torch.eye(4).expand(4, 4, 4), atol=1e-10)
    P2, P_inv2 = cameras.prope_matrices(c2w, K, official=True)
    assert torch.allclose(P2, P)
    assert not torch.allclose(P_inv2 @ P2, torch.eye(4).expand(4, 4, 4), atol=1e-3)
    # principal point shifted to 0: a point on camera 0's optical axis maps to image x = y = 0
    Kc = K0.clone()
    Kc[:2, 2] = 0.5
    P, _ = cameras.prope_matrices(c2w[0], Kc)
    x = P @ torch.cat([c2w[0, :3, 3] + 3.0 * c2w[0, :3, 2], torch.ones(1)])
    assert torch.allclose(x[:2], torch.zeros(2), atol=1e-10) and abs(x[2] - 3.0) < 1e-10


@pytest.mark.usefixtures('float64')
@pytest.mark.parametrize('official', [False, True])
def test_prope_relative_to_world_frame(official):
    c2w, K = random_poses(3), K0.expand(3, 3, 3)
    T = random_poses(1, seed=7)[0]  # one rigid change of world frame for all cameras
    P, P_inv = cameras.prope_matrices(c2w, K, official)
    Pm, P_invm = cameras.prope_matrices(T @ c2w, K, official)
    rel = P[:, None] @ P_inv[None]  # (V,V,4,4): P_a P_inv_b
    assert torch.allclose(Pm[:, None] @ P_invm[None], rel, atol=1e-10)
    assert not torch.allclose(Pm, P, atol=1e-3)


# ---------------------------------------------------------------- rotations and trajectories


@pytest.mark.usefixtures('float64')
def test_quaternion_round_trip_including_half_turns():
    R = torch.cat([random_rotation(50), rot_y(math.pi)[None], torch.diag(torch.tensor([-1.0, -1, 1]))[None]])
    q = cameras.rotmat_to_quat(R)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(R))) and (q[:, 0] >= 0).all()
    assert torch.allclose(cameras.quat_to_rotmat(q), R, atol=1e-12)


@pytest.mark.usefixtures('float64')
def test_path_through_two_cameras_endpoints_and_constant_steps():
    a, b = random_poses(2, seed=3)
    traj, K = cameras.path_through(torch.stack([a, b]), torch.stack([K0, 2 * K0]), torch.linspace(0, 1, 7))
    assert traj.shape == (7, 4, 4)
    assert torch.allclose(traj[0], a, atol=1e-12) and torch.allclose(traj[-1], b, atol=1e-12)
    steps = cameras.rotation_angle(traj[:-1, :3, :3].transpose(-1, -2) @ traj[1:, :3, :3])
    assert steps.min() > 1e-3 and torch.allclose(steps, steps[0].expand(6), atol=1e-10)
    moves = (traj[1:, :3, 3] - traj[:-1, :3, 3]).norm(dim=-1)
    assert torch.allclose(moves, moves[0].expand(6))
    assert torch.allclose(K[3], 1.5 * K0)


@pytest.mark.usefixtures('float64')
def test_spiral_and_dolly():
    ref = random_poses(1, seed=4)[0]
    focus = ref[:3, 3] + 2.0 * ref[:3, 2]
    sp = cameras.spiral(ref, 9, radius=0.2, depth=2.0)
    to_f = torch.nn.functional.normalize(focus - sp[:, :3, 3], dim=-1)
    assert torch.allclose(sp[:, :3, 2], to_f, atol=1e-12)
    dist = (sp[:, :3, 3] - ref[:3, 3]).norm(dim=-1)  # 2 turns over 9 cameras: 0, 0.05, .., 0.2 (first turn), then 0.2
    assert torch.allclose(dist, torch.tensor([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2, 0.2]), atol=1e-12)
    assert torch.allclose(sp[0], ref, atol=1e-12)  # it starts at the reference camera
    dolly = cameras.forward_dolly(ref, 5, 1.0)
    assert torch.allclose(dolly[:, :3, :3], ref[:3, :3].expand(5, 3, 3))
    assert torch.allclose(dolly[-1, :3, 3], ref[:3, 3] + ref[:3, 2]) and torch.allclose(dolly[0], ref)


# ---------------------------------------------------------------- alignment and metrics


@pytest.mark.usefixtures('float64')
def test_umeyama_recovers_similarity():
    src = torch.randn(20, 3, generator=torch.Generator().manual_seed(5))
    R, s, t = random_rotation(seed=6), 2.5, torch.tensor([1.0, -2.0, 0.5])
    s_, R_, t_ = cameras.umeyama(src, s * src @ R.T + t)
    assert abs(s_ - s) < 1e-5 and torch.allclose(R_, R, atol=1e-5) and torch.allclose(t_, t, atol=1e-5)
    s_, R_, _ = cameras.umeyama(src, src @ R.T, with_scale=False)
    assert s_ == 1.0 and torch.allclose(R_, R, atol=1e-5)
    # mirrored target: the best proper rotation, never a reflection
    dst = src * torch.tensor([1.0, 1.0, -1.0])
    s_, R_, t_ = cameras.umeyama(dst=dst, src=src)
    assert abs(torch.det(R_) - 1) < 1e-10

    def residual(s):  # best t for this s and R_
        return (dst - s * src @ R_.T - (dst.mean(0) - s * R_ @ src.mean(0))).pow(2).sum()

    assert residual(s_) < min(residual(0.97 * s_), residual(1.03 * s_))
    assert torch.allclose(residual(s_), (dst - s_ * src @ R_.T - t_).pow(2).sum())


def square_trajectory(e=0.0):
    """gt: identity rotations, centres on a square (A,B,C,D); est: A,C raised by e and B,D lowered by
    e in z. By symmetry the best alignment has R = I and t = 0."""
    c = torch.tensor([[1.0, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]])
    gt = cameras.make_pose(torch.eye(3).expand(4, 3, 3), c)
    est = cameras.make_pose(torch.eye(3).expand(4, 3, 3), c + torch.tensor([[0, 0, e], [0, 0, -e]]).repeat(2, 1))
    return est, gt


@pytest.mark.usefixtures('float64')
def test_pose_metrics_zero_and_similarity_invariant():
    gt = random_poses(6, seed=8)
    assert all(v < 1e-6 for v in cameras.pose_metrics(gt, gt).values())
    g = torch.Generator().manual_seed(9)
    small = cameras.quat_to_rotmat(torch.cat([torch.ones(6, 1), 0.1 * torch.randn(6, 3, generator=g)], -1))
    noisy = cameras.make_pose(gt[:, :3, :3] @ small, gt[:, :3, 3] + 0.1 * torch.randn(6, 3, generator=g))
    m = cameras.pose_metrics(noisy, gt)
    assert min(m.values()) > 1e-3
    S = random_poses(1, seed=11)[0]
    moved = S @ noisy
    moved[:, :3, 3] = 3.0 * moved[:, :3, 3]  # a global similarity: rotate, translate, scale by 3
    m2 = cameras.pose_metrics(moved, gt)
    assert all(abs(m[k] - m2[k]) < 1e-8 for k in m)


@pytest.mark.usefixtures('float64')
def test_pose_metrics_hand_computed_translation():
    e = 0.1
    est, gt = square_trajectory(e)
    m = cameras.pose_metrics(est, gt, with_scale=False)  # aligned est = est: errors +-e in z
    assert abs(m['ate'] - e) < 1e-10 and abs(m['rpe_t'] - 2 * e) < 1e-10 and m['rpe_r'] < 1e-10
    s = 2 / (2 + e * e)  # Sim3: scale = sum of singular values / sum ||est_i||^2 = 8 / (4 (2 + e^2))
    m = cameras.pose_metrics(est, gt)  # aligned error_i = (s - 1) c_i + s delta_i
    assert abs(m['ate'] - math.sqrt(2 * (s - 1) ** 2 + s * s * e * e)) < 1e-10
    assert abs(m['rpe_t'] - 2 * math.sqrt((s - 1) ** 2 + s * s * e * e)) < 1e-10


@pytest.mark.usefixtures('float64')
def test_pose_metrics_hand_computed_rotation():
    est, gt = square_trajectory()
    a = math.radians(10.0)
    est[1, :3, :3] = rot_y(a)  # camera B turned about y, the direction of the B -> C step
    m = cameras.pose_metrics(est, gt)  # E_0 and E_1 rotate by 10 degrees, E_2 by 0; no translation error
    assert m['ate'] < 1e-10 and m['rpe_t'] < 1e-10
    assert abs(m['rpe_r'] - 10.0 * math.sqrt(2 / 3)) < 1e-8


# ====================================================================================================
# data.py
# chunk IO, resize/crop intrinsics, metrics, the synthetic renderer, view splits, loaders, error messages, DL3DV.
# ====================================================================================================


def random_c2w(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.linalg.det(q)[:, None, None]  # proper rotations
    return cameras.make_pose(q, torch.randn(n, 3, generator=gen, dtype=torch.float64)).float()


def smooth_images(n, H, W, gen):
    """Low-frequency images (JPEG keeps them nearly exact)."""
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), (H, W), mode='bilinear')


def scene_dict(key, V, H, W, gen):
    return {
        'key': key,
        'images': smooth_images(V, H, W, gen),
        'c2w': random_c2w(V, gen),
        'K': torch.tensor([[0.7, 0, 0.5], [0, 0.9, 0.45], [0, 0, 1]]).repeat(V, 1, 1),
        'timestamps': torch.arange(V) * 1000,
        'depths': 1 + torch.rand(V, H, W, generator=gen),
    }


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synth'))
    synth.write_synth(root, n_train=4, n_test=2, frames=10, size=28, seed=3, per_chunk=3)
    return root


def test_chunk_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scenes = [scene_dict(f's{i}', 5, 28, 42, gen) for i in range(2)]
    path = str(tmp_path / '000000.torch')
    synth.write_re10k_chunk(path, scenes)
    raw = torch.load(path, weights_only=True)
    assert raw[0]['cameras'].shape == (5, 18) and raw[0]['images'][0].dtype == torch.uint8
    assert torch.allclose(
        raw[0]['cameras'][:, 6:].reshape(5, 3, 4), cameras.c2w_to_w2c(scenes[0]['c2w'])[:, :3], atol=1e-6
    )
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
    blob = torch.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * 4.0**2)).expand(3, H, W)
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
    assert torch.allclose(metrics.psnr(pred, gt), torch.full((2, 3), 20.0), atol=1e-4)


def test_ssim_identity_and_skimage():
    skimage_metrics = pytest.importorskip('skimage.metrics')
    gen = torch.Generator().manual_seed(1)
    x = (smooth_images(2, 40, 36, gen) + 0.1 * torch.rand(2, 3, 40, 36, generator=gen)).clamp(0, 1).double()
    y = (x + 0.15 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    for cov in (False, True):
        ours = metrics.ssim(y, x, sample_covariance=cov)
        ref = [
            skimage_metrics.structural_similarity(
                x[i].numpy(),
                y[i].numpy(),
                channel_axis=0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=cov,
                data_range=1.0,
            )
            for i in range(2)
        ]
        assert ours.shape == (2,) and np.allclose(ours.numpy(), ref, atol=1e-4)
        assert ours.max() < 0.95


def test_depth_metrics_hand_case():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # the 0 is invalid
    pred = 2 * gt
    aligned = metrics.depth_metrics(pred, gt, align='median')
    assert aligned['absrel'] < 1e-9 and aligned['rmse'] < 1e-9 and aligned['delta1'] == 1.0
    raw = metrics.depth_metrics(pred, gt, align=None)
    assert raw['absrel'] == pytest.approx(1.0) and raw['delta1'] == 0.0
    assert raw['rmse'] == pytest.approx(np.sqrt((1 + 4 + 16) / 3))
    masked = metrics.depth_metrics(
        torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 2.0]]), mask=torch.tensor([[True, False]]), align=None
    )
    assert masked['absrel'] == 0.0


def test_forward_warp_into_its_own_camera_is_the_identity():
    """A source warped into its own camera with any positive depth is the source, every pixel covered (batch of 2)."""
    c2w, K = random_cameras(2)
    c2w = c2w.float()[:, None]  # (B,1,4,4)
    K = K.float()[:, None]
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(2, 1, 3, 24, 32, generator=gen)
    depth = 0.1 + 10 * torch.rand(2, 1, 24, 32, generator=gen)
    fill = torch.full((2, 1, 3, 1, 1), -1.0)
    warped, covered = metrics.forward_warp(colours, depth, c2w, K, c2w, K, fill)
    assert covered.all()
    assert torch.equal(warped, colours)


def test_forward_warp_nearest_point_wins_and_holes_get_the_fill():
    """Two planes seen by one camera (z = 1 red, z = 2 blue), warped into the camera moved 0.25 right: the planes shift
    4 and 2 px left; red wins wherever both land, whichever source comes first; the last 2 columns get the fill."""
    H = W = 32
    K = torch.tensor([[0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 1]]).expand(1, 2, 3, 3)  # 16 px focal length
    c2w = torch.eye(4).expand(1, 2, 4, 4)
    moved = torch.eye(4)
    moved[0, 3] = 0.25
    red = torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, H, W)
    blue = torch.tensor([0, 0, 1.0]).view(3, 1, 1).expand(3, H, W)
    fill = torch.tensor([0.5, 0.5, 0.5]).view(1, 1, 3, 1, 1)
    want = torch.cat([red[..., : W - 4], blue[..., W - 4 : W - 2], fill[0, 0].expand(3, H, 2)], -1)
    for near_first in (True, False):
        colours = torch.stack([red, blue] if near_first else [blue, red])[None]  # (1,2,3,H,W)
        depth = torch.tensor([1.0, 2.0] if near_first else [2.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, H, W)
        warped, covered = metrics.forward_warp(colours, depth, c2w, K, moved[None, None], K[:, :1], fill)
        assert torch.equal(warped[0, 0], want), near_first
        assert covered[0, 0, :, : W - 2].all() and not covered[0, 0, :, W - 2 :].any()


def test_forward_warp_leaves_no_cracks_where_a_surface_grows_up_to_twice():
    """A wall at z = 2 seen from 0.7 closer (1.54x larger): with 2x2 points per source pixel every target pixel that
    sees the wall is covered; with one point per pixel, cracks (the reason for sub)."""
    H = W = 32
    K = torch.tensor([[0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 1]]).expand(1, 1, 3, 3)
    closer = torch.eye(4)
    closer[2, 3] = 0.7
    colours = torch.rand(1, 1, 3, H, W, generator=torch.Generator().manual_seed(0))
    depth = torch.full((1, 1, H, W), 2.0)
    fill = torch.zeros(1, 1, 3, 1, 1)
    _, covered = metrics.forward_warp(colours, depth, torch.eye(4)[None, None], K, closer[None, None], K, fill)
    assert covered.all()
    _, covered = metrics.forward_warp(colours, depth, torch.eye(4)[None, None], K, closer[None, None], K, fill, sub=1)
    assert not covered.all()


def test_forward_warp_with_exact_depth_matches_the_rendered_target():
    """Two synthetic frames (0, 4) with their exact z-depth warped into the 3 frames between: 91% of the target pixels
    are covered (one point per pixel: 61%, cracks where a surface grows), and there the colour matches the render
    (measured: median error 2/255, 89% within 0.1; textures alias at edges; with inverted cameras 64/255 and 29%);
    the holes get the mean colour baseline's colour."""
    s = synth.synth_scene(0, frames=5, size=56)
    images = rearrange(torch.from_numpy(s['images']).float() / 255, 'V H W c -> 1 V c H W')
    depth = torch.from_numpy(s['depths'])[None]  # z-depth, exact (synth.render)
    c2w = s['c2w'][None]
    K = s['K'][None]
    views = torch.tensor([0, 4, 1, 2, 3])  # sources first
    images = images[:, views]
    depth = depth[:, views]
    c2w = c2w[:, views]
    K = K[:, views]
    _, mean = metrics.baselines(images, c2w, 2)
    sources = (images[:, :2], depth[:, :2], c2w[:, :2], K[:, :2])
    warped, covered = metrics.forward_warp(*sources, c2w[:, 2:], K[:, 2:], mean)
    error = (warped - images[:, 2:]).abs().amax(2)[covered]  # (pixels,) the largest channel's
    assert covered.float().mean() > 0.85
    assert error.median() <= 3 / 255
    assert (error < 0.1).float().mean() > 0.85
    holes = rearrange(~covered, 'B M H W -> B M 1 H W').expand_as(warped)
    assert torch.equal(warped[holes], mean[holes])


def test_synthetic_renderer_agrees_with_its_cameras():
    s = synth.synth_scene([7, 0, 0], frames=6, size=42)
    H = W = 42
    images, depth, c2w, K = (
        torch.from_numpy(s['images']).double() / 255,
        torch.from_numpy(s['depths']).double(),
        s['c2w'].double(),
        s['K'].double(),
    )
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
    rgb, t = synth.cast_rays(s['scene'], np.repeat(centre[None], H * W, 0), (world * flip).numpy() - centre)
    seen = np.abs(t - 1) < 1e-4
    assert seen.mean() > 0.3
    assert np.abs(np.round(rgb[seen] * 255) / 255 - images[a].reshape(-1, 3).numpy()[seen]).max() < 1.5 / 255
    R = s['c2w'][:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(6, 3, 3), atol=1e-5)
    assert (R[:, 1, 1] > 0.7).all()  # y-down world: every camera's y axis points roughly along world +y


def test_synthetic_is_deterministic():
    a, b = synth.synth_scene([1, 2, 3], frames=3, size=14), synth.synth_scene([1, 2, 3], frames=3, size=14)
    assert np.array_equal(a['images'], b['images']) and torch.equal(a['c2w'], b['c2w'])


def test_split_views():
    B, V = 3, 6
    batch = {
        'images': torch.arange(V).float().view(1, V, 1, 1, 1).expand(B, V, 3, 2, 2).clone(),
        'frames': torch.arange(V).expand(B, V).clone() * 10,
        'key': ['a', 'b', 'c'],
    }
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
    chunks = {
        s['key']: s
        for p in sorted(set(data.read_index(os.path.join(synth_root, 'train')).values()))
        for s in data.read_re10k_chunk(p)
    }
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
    synth.write_re10k_chunk(str(tmp_path / 'train' / '000000.torch'), scenes)
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
    with pytest.raises(cli.UserError, match='index.json'):
        data.SceneDataset(str(tmp_path), 'train')
    (tmp_path / 'train' / 'index.json').write_text('{}')
    with pytest.raises(cli.UserError, match='no scenes'):
        data.SceneDataset(str(tmp_path), 'train')
    with pytest.raises(cli.UserError, match=r'\(V, 18\)'):
        data.cameras_to_c2w_K(torch.zeros(4, 16), 'bad.torch')
    gen = torch.Generator().manual_seed(3)
    synth.write_re10k_chunk(str(tmp_path / 'train' / '000000.torch'), [scene_dict('odd', 3, 30, 40, gen)])
    (tmp_path / 'train' / 'index.json').write_text(json.dumps({'odd': '000000.torch'}))
    with pytest.raises(cli.UserError, match='not multiples of 14; pass --size 28x28'):
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
    with pytest.raises(cli.UserError, match='transforms.json'):
        data.read_dl3dv_scene(str(tmp_path), images=None)


def test_lpips_fn_feeds_the_package_in_its_range_and_is_optional(monkeypatch, capsys):
    import types

    class FakeLPIPS(torch.nn.Module):  # stands in for lpips.LPIPS: records its inputs, returns (N,1,1,1)
        def __init__(self, net, verbose):
            super().__init__()
            self.seen = []

        def forward(self, a, b):
            self.seen.append((a, b))
            return (a - b).pow(2).mean((1, 2, 3)).view(-1, 1, 1, 1)

    monkeypatch.setitem(sys.modules, 'lpips', types.SimpleNamespace(LPIPS=FakeLPIPS))
    fn = metrics.lpips_fn('cpu')
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(fn(x, y), torch.full((2,), 4.0))  # [0,1] -> [-1,1]: the distance of -1 and 1
    monkeypatch.setitem(sys.modules, 'lpips', None)  # not installed: None, with a one-line notice
    assert metrics.lpips_fn('cpu') is None and 'LPIPS disabled' in capsys.readouterr().out


def test_mixture_dataset_ratios_and_prefixes(tmp_path):
    synth.write_synth(str(tmp_path / 'a'), 2, 1, frames=6, size=28, seed=0)
    synth.write_synth(str(tmp_path / 'b'), 2, 1, frames=6, size=28, seed=1)
    mix = data.make_dataset(f're10k:{tmp_path / "a"}*3,{tmp_path / "b"}*1', split='train', num_views=2)
    A = data.make_dataset(str(tmp_path / 'a'), split='train', num_views=2)
    from_a = [any(torch.equal(mix[i]['images'], A[j]['images']) for j in range(len(A))) for i in range(len(mix))]
    assert len(mix) == 4 and from_a == [True, True, True, False]  # 3:1 of 4 items, cycling through a's scenes
    epoch0 = [mix[i]['frames'] for i in range(len(mix))]
    mix.set_epoch(1)  # reaches every part: each draws the frames of epoch 1
    B = data.make_dataset(str(tmp_path / 'b'), split='train', num_views=2)
    A.set_epoch(1)
    B.set_epoch(1)
    expected = [A[0], A[1], A[0], B[0]]
    for i, item in enumerate(expected):
        assert torch.equal(mix[i]['frames'], item['frames']) and torch.equal(mix[i]['images'], item['images'])
    assert any(not torch.equal(a, item['frames']) for a, item in zip(epoch0, expected))


# ====================================================================================================
# encoder.py (DA3, parity with depth-anything-3)
# Tests for encoder.py: parity with the depth_anything_3 package, propagation, geometry, loading, stats.
# ====================================================================================================

try:
    from depth_anything_3.cfg import create_object, load_config
    from depth_anything_3.model.reference_view_selector import select_reference_view as pkg_select
    from depth_anything_3.model.utils.transform import pose_encoding_to_extri_intri
    from depth_anything_3.registry import MODEL_REGISTRY
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
    mean = torch.tensor(constants.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(constants.IMAGENET_STD).view(3, 1, 1)
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
    enc = latents.build_encoder(preset, weights=net.state_dict()).eval()
    picked = []
    select = encoder_lib.select_reference_view
    monkeypatch.setattr(encoder_lib, 'select_reference_view', lambda t: picked.append(select(t)) or picked[-1])
    worst = {}
    torch.manual_seed(1)
    for H, W in SIZES:
        for S, mode in CASES:
            images = torch.rand(1, S, 3, H, W)
            ref, ours = package_outputs(net, images, mode), our_outputs(enc, images, mode)
            for k, v in ref.items():
                assert ours[k].shape == v.shape, k
                err = (ours[k] - v).abs()
                if k == 'intrinsics':  # pixel focal lengths reach 1e2..1e7 here: relative error
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
    x = torch.randn(16, 5, 3, 32)  # (B,S,N,C): only token 0 is read
    assert torch.equal(encoder_lib.select_reference_view(x[:, :, 0]), pkg_select(x, 'saddle_balanced'))


@pytest.mark.parametrize('preset', ['da3-tiny', 'da3-small'])
@torch.no_grad()
def test_propagation_identity(preset):
    torch.manual_seed(0)
    enc = latents.build_encoder(preset).eval()
    images = torch.rand(1, 3, 3, 42, 56)
    levels, cls = enc.encode(images, return_cls=True)
    for k in (0, 1):
        prop = enc.propagate(levels[k], k, cls[k], (3, 4))
        assert len(prop) == 3 - k
        for a, b in zip(prop, levels[k + 1 :]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # GLD: one token for all views, token 0 of the first view encoded alone
    first = enc.first_view_cls(images, 1)
    torch.testing.assert_close(first, enc.encode(images[:, :1], return_cls=True)[1][1][:, 0], atol=0, rtol=0)
    gld = enc.propagate(levels[1], 1, first, (3, 4))
    per_view = enc.propagate(levels[1], 1, first[:, None].expand_as(cls[1]), (3, 4))  # the same token in every view
    assert all(torch.equal(a, b) for a, b in zip(gld, per_view))
    assert not torch.allclose(gld[0], levels[2], atol=1e-3)  # not the views' own tokens
    one = enc.encode(images[:, :1])  # one view: the first view's token is its own, so the exact deeper levels
    for a, b in zip(enc.propagate(one[1], 1, enc.first_view_cls(images[:, :1], 1), (3, 4)), one[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


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
    ray = encoder_lib.rays_from_cameras(c2w, K, 12, 16).view(2, 2, 12, 16, 6)
    ray[..., :3] *= 0.5 + torch.rand(2, 2, 12, 16, 1, dtype=torch.float64)  # directions only up to scale
    conf = 1 + torch.rand(2, 2, 12, 16, dtype=torch.float64)
    c2w_est, K_est = encoder_lib.pose_from_rays(ray, conf)
    torch.testing.assert_close(c2w_est, c2w.view(2, 2, 4, 4), atol=1e-8, rtol=0)
    torch.testing.assert_close(K_est, K.view(2, 2, 3, 3), atol=1e-8, rtol=0)


def test_pose_from_rays_robust_to_outliers():
    c2w, K = random_cameras(2, seed=1)
    ray = encoder_lib.rays_from_cameras(c2w, K, 16, 16)
    torch.manual_seed(0)
    bad = torch.rand(2, 16, 16) < 0.2  # 20% random directions
    ray[..., :3][bad] = torch.randn(int(bad.sum()), 3, dtype=torch.float64)
    c2w_est, K_est = encoder_lib.pose_from_rays(ray, torch.ones(2, 16, 16, dtype=torch.float64))
    assert (c2w_est - c2w).abs().max() < 1e-6 and (K_est - K).abs().max() < 1e-6


def test_depth_to_points_and_ply(tmp_path):
    c2w, K = random_cameras(1)
    depth = 1 + torch.rand(1, 6, 8, dtype=torch.float64)
    pts = cameras.depth_to_points(depth, c2w, K)  # (1,6,8,3)
    cam = torch.einsum('ij,hwj->hwi', cameras.rigid_inverse(c2w[0])[:3], torch.cat([pts[0], torch.ones(6, 8, 1)], -1))
    uv = torch.einsum('ij,hwj->hwi', K[0], cam)
    torch.testing.assert_close(uv[..., 2], depth[0])
    torch.testing.assert_close(uv[..., :2] / uv[..., 2:], cameras.pixel_grid(6, 8, 'cpu')[..., :2])
    rgb = torch.rand(48, 3)
    path = tmp_path / 'cloud.ply'
    export.write_ply(path, pts, rgb)
    data = path.read_bytes()
    header, body = data.split(b'end_header\n')
    assert b'binary_little_endian' in header and b'element vertex 48' in header
    verts = np.frombuffer(body, dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('r', 'u1'), ('g', 'u1'), ('b', 'u1')])
    np.testing.assert_allclose(
        np.stack([verts['x'], verts['y'], verts['z']], -1), pts.reshape(-1, 3).numpy(), rtol=1e-6
    )
    assert (np.stack([verts['r'], verts['g'], verts['b']], -1) == (rgb * 255).round().numpy()).all()


def test_latent_stats(tmp_path):
    torch.manual_seed(0)
    enc = latents.build_encoder('da3-tiny').eval()
    batches = [torch.rand(2, 2, 3, 28, 42) for _ in range(3)]
    stats = latents.compute_latent_stats(enc, batches, levels=(0, 1))
    with torch.no_grad():
        for level in (0, 1):
            allx = torch.cat([enc.encode(b)[level].reshape(-1, enc.dim) for b in batches]).double()
            torch.testing.assert_close(stats.mean[level].double(), allx.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stats.var[level].double(), allx.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
            z = stats.normalize(allx.float(), level)
            torch.testing.assert_close(stats.denormalize(z, level), allx.float(), atol=1e-4, rtol=1e-5)
    for name in ('stats.safetensors', 'stats.pt'):
        stats.save(tmp_path / name)
        loaded = latents.LatentStats.load(tmp_path / name)
        assert torch.equal(loaded.mean[1], stats.mean[1]) and torch.equal(loaded.var[0], stats.var[0])
    C = enc.dim
    torch.save(
        {'mean': torch.randn(1, C, 1, 1), 'var': torch.rand(1, C, 1, 1), 'std': torch.rand(1, C, 1, 1)},
        tmp_path / 'normalization_stats_level1.pt',
    )
    loaded = official.load_official_stats(str(tmp_path))
    assert list(loaded.mean) == [1] and loaded.var[1].shape == (C,)


def test_bad_size_error():
    enc = latents.build_encoder('da3-tiny')
    with pytest.raises(ValueError, match='50x56'):
        enc.encode(torch.rand(1, 1, 3, 50, 56))


def test_weight_loading(tmp_path, capsys):
    small = latents.build_encoder('da3-small').state_dict()
    tiny = latents.build_encoder('da3-tiny')
    sd = tiny.state_dict()
    # hub layout: 'model.' prefix, one name per shared tensor (safetensors dedup), cam_enc ignored with a note
    from safetensors.torch import save_file

    hub = {'model.' + k: v.clone() + 1 for k, v in sd.items() if 'output_conv2_aux.0.2' not in k}
    hub['model.cam_enc.token_norm.weight'] = torch.ones(3)
    save_file(hub, tmp_path / 'model.safetensors')
    enc = latents.build_encoder('da3-tiny', weights=str(tmp_path / 'model.safetensors'))
    assert torch.equal(enc.head.norm.weight, sd['head.norm.weight'] + 1) and 'ignoring 1' in capsys.readouterr().out
    # GLD-style split release: backbone file + bare head file (no cam_dec: loads with a note)
    save_file({k: v for k, v in sd.items() if k.startswith('backbone.')}, tmp_path / 'backbone.safetensors')
    torch.save({k[5:]: v for k, v in sd.items() if k.startswith('head.')}, tmp_path / 'dpt_decoder.pt')
    enc = latents.build_encoder('da3-tiny', weights=[tmp_path / 'backbone.safetensors', tmp_path / 'dpt_decoder.pt'])
    assert torch.equal(enc.head.norm.weight, sd['head.norm.weight']) and 'no cam_dec' in capsys.readouterr().out
    # missing keys are listed
    partial = {k: v for k, v in sd.items() if not k.startswith('backbone.pretrained.blocks.9.')}
    with pytest.raises(cli.UserError, match=r'missing \(\d+\):\s+backbone.pretrained.blocks.9.norm1.weight'):
        encoder_lib.load_weights(tiny, partial)
    # wrong preset: the error names both presets and the flag
    with pytest.raises(cli.UserError, match="match preset 'da3-small', not 'da3-tiny': pass --encoder da3-small"):
        encoder_lib.load_weights(tiny, small)


def test_geometry_loss_and_training_step():
    torch.manual_seed(0)
    enc = latents.build_encoder('da3-tiny')
    images = torch.rand(1, 2, 3, 28, 42)
    c2w, K = random_cameras(2)
    c2w, K = c2w.float()[None], K.float()[None]
    depths = 1 + torch.rand(1, 2, 28, 42)
    depths[0, 1, :3] = 0  # invalid pixels
    out = enc(images)
    loss, parts = encoder_lib.geometry_loss(out, depths, c2w, K)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'depth', 'grad', 'ray'}
    assert enc.backbone.pretrained.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # perfect predictions with confidence 1 give zero loss (GT in view 0's frame, scale = mean depth)
    scale = depths[:, 0].mean()
    rel = torch.linalg.inv(c2w[:, :1]) @ c2w
    rel[..., :3, 3] /= scale
    h, w = out['ray'].shape[2:4]
    perfect = {
        'depth': depths / scale,
        'depth_conf': torch.ones_like(depths),
        'ray': encoder_lib.rays_from_cameras(rel, K, h, w),
        'ray_conf': torch.ones(1, 2, h, w),
    }
    loss, _ = encoder_lib.geometry_loss(perfect, depths, c2w, K)
    assert loss.abs() < 1e-5


# ====================================================================================================
# decoder.py (Stage 1)
# overfitting, level-wise dropout, the official converter (CPU, tiny sizes).
# ====================================================================================================

KEYS_FILE = (
    Path(__file__).resolve().parent / 'testdata' / 'official-gld-keys-decoder.txt'
)  # names and shapes of the release


def random_levels(B, V, T, feat_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, V, T, feat_dim, generator=g) for _ in range(4)]


def psnr(pred, gt):
    return float(-10 * torch.log10(((pred - gt) ** 2).mean()))


def test_sample_level_keep_never_drops_all_and_rate():
    g = torch.Generator().manual_seed(0)
    n = 20000
    for p in (0.5, 0.25):  # 0.25: a keep/drop mix-up shows (at 0.5 the two are alike)
        keep = decoder_lib.sample_level_keep(n, p, g)
        assert keep.shape == (n, 4) and keep.dtype == torch.bool
        assert keep.any(1).all()
        expected_drop = (p - p**4) / (1 - p**4)  # 0.4667 at 0.5: conditioned on "not all four dropped"
        drop_rate = (~keep).float().mean(0)
        assert torch.allclose(drop_rate, torch.full((4,), expected_drop), atol=0.015), (p, drop_rate)
    assert (~decoder_lib.sample_level_keep(1000, 0.0, g)).sum() == 0
    assert decoder_lib.sample_level_keep(2000, 0.9, g).any(1).all()


def test_dropped_level_has_no_influence():
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny').eval()
    dec.mask_tokens.data.normal_()  # non-zero mask tokens, as after training
    levels = random_levels(2, 2, 16, 192)
    keep = torch.tensor([[True, True, False, True], [False, True, True, True]])
    out = dec(levels, (4, 4), keep=keep)
    perturbed = [lv.clone() for lv in levels]
    perturbed[2][0] += 5 * torch.randn_like(perturbed[2][0])  # level 2 is dropped in sample 0
    perturbed[0][1] += 5 * torch.randn_like(perturbed[0][1])  # level 0 is dropped in sample 1
    assert torch.equal(dec(perturbed, (4, 4), keep=keep), out)
    perturbed[1][0] += 1.0  # a kept level does change the output
    assert not torch.allclose(dec(perturbed, (4, 4), keep=keep), out)
    # per-view keep (B,V,4) broadcasting agrees with per-sample keep (B,4)
    assert torch.equal(dec(levels, (4, 4), keep=keep[:, None].expand(2, 2, 4)), out)


def test_reconstruct_per_level_uses_keep_mechanism():
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny').eval()
    levels = random_levels(1, 2, 9, 192)
    out = decoder_lib.reconstruct_per_level(dec, levels, (3, 3))
    assert set(out) == {'all', 0, 1, 2, 3}
    assert torch.equal(out['all'], dec(levels, (3, 3)))
    only1 = torch.tensor([[False, True, False, False]])
    assert torch.equal(out[1], dec(levels, (3, 3), keep=only1))
    # zero-initialised mask tokens: a single level equals feeding zeros for the other three
    zeros = [lv if i == 1 else torch.zeros_like(lv) for i, lv in enumerate(levels)]
    assert torch.allclose(out[1], dec(zeros, (3, 3)), atol=1e-6)


def test_position_embedding_base_grid_and_layout():
    dec = decoder_lib.RGBDecoder('tiny')
    g, D = dec.cfg.base_grid, dec.cfg.width
    assert dec.pos_embed.shape == (1, 1 + g * g, D)
    assert torch.allclose(dec.pos_embed_at(g, g), dec.pos_embed, atol=1e-5)
    table = dec.pos_embed[0, 1:].view(g, g, D)  # (y, x, D)
    assert torch.equal(dec.pos_embed[0, 0], torch.zeros(D))  # CLS row
    # MAE convention: first half depends on the column x only, second half on the row y only
    assert torch.equal(table[0, :, : D // 2], table[3, :, : D // 2])
    assert torch.equal(table[:, 0, D // 2 :], table[:, 5, D // 2 :])
    assert not torch.allclose(table[0, 0, : D // 2], table[0, 1, : D // 2])
    assert torch.allclose(
        table[2, 5, : D // 4], torch.sin(5 * 1.0 / 10000 ** (torch.arange(D // 4) / (D // 4))), atol=1e-6
    )


def test_non_square_grid_puts_each_token_patch_in_its_place():
    """A 6 x 8 token grid: token (r, c) of view v (row-major) is the 14 x 14 pixel block at rows 14r.., columns 14c..,
    from the head's 588 outputs in the release's (py, px, rgb) order."""
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny').eval()
    heads = []

    def record(module, args, out):
        heads.append(out)

    dec.head.register_forward_hook(record)
    h, w = 6, 8
    out = dec(random_levels(1, 2, h * w, 192), (h, w))
    assert out.shape == (1, 2, 3, 84, 112)
    patches = heads[0]  # (BV,T,14*14*3)
    for v, r, c in [(0, 0, 0), (1, 5, 7), (0, 2, 6), (1, 4, 1)]:
        block = out[0, v, :, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14]
        expected = rearrange(patches[v, r * w + c], '(py px rgb) -> rgb py px', py=14, px=14)
        assert torch.equal(block, expected), (v, r, c)
    with pytest.raises(AssertionError):
        dec(random_levels(1, 1, 47, 192), (6, 8))


def test_overfit_one_batch():
    """Random features (fixed seed) -> fixed smooth images; measured 1.7 -> 33.2 dB after 300 Adam steps, lr 1e-3."""
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny')
    g = torch.Generator().manual_seed(1)
    levels = random_levels(1, 2, 16, 192, seed=1)
    target = F.interpolate(
        torch.rand(2, 3, 8, 8, generator=g), size=(56, 56), mode='bilinear', align_corners=False
    ).view(1, 2, 3, 56, 56)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    start = psnr(dec(levels, (4, 4)).detach(), target)
    for _ in range(300):
        loss, parts = decoder_lib.decoder_loss(dec(levels, (4, 4)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = psnr(dec(levels, (4, 4)).detach(), target)
    assert start < 10 and end > 30, (start, end)


def test_noise_augmentation_training_only():
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(noise_tau=0.8))
    levels = random_levels(1, 1, 4, 192)
    dec.train()
    assert not torch.allclose(dec(levels, (2, 2)), dec(levels, (2, 2)))
    # training draws from the run's generator (train.py's rng): one seed, one noise, whatever torch's global state
    first = dec(levels, (2, 2), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    assert torch.equal(dec(levels, (2, 2), generator=torch.Generator().manual_seed(3)), first)
    dec.eval()
    assert torch.equal(dec(levels, (2, 2)), dec(levels, (2, 2)))


def test_seam_filter_is_residual_and_starts_as_the_identity():
    """DecoderConfig.refine (ours; the bundled 'small' preset): a residual 3-conv filter on the image whose last conv
    starts at zero, so a fresh decoder equals the same weights without it; trained, it adds exactly refine(image).
    The paper's presets have none, so the release's weights load unchanged."""
    torch.manual_seed(0)
    dec, plain = (
        decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(refine=4)).eval(),
        decoder_lib.RGBDecoder('tiny').eval(),
    )
    plain.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith('refine.')})
    levels = random_levels(1, 2, 6, 192)
    assert torch.equal(dec(levels, (2, 3)), plain(levels, (2, 3)))
    torch.nn.init.normal_(dec.refine[-1].weight, std=0.1)
    base = plain(levels, (2, 3)).flatten(0, 1)  # (BV,3,H,W)
    assert torch.allclose(dec(levels, (2, 3)).flatten(0, 1), base + dec.refine(base), atol=1e-6)
    assert (dec(levels, (2, 3)).flatten(0, 1) - base).abs().mean() > 1e-2
    assert decoder_lib.PRESETS['xl'].refine == decoder_lib.PRESETS['tiny'].refine == 0


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny').eval()
    dec.mask_tokens.data.normal_()
    save_file(dec.state_dict(), str(tmp_path / 'dec.safetensors'))
    torch.manual_seed(1)
    other = decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(**dec.cfg.__dict__)).eval()
    other.load_state_dict(load_file(str(tmp_path / 'dec.safetensors')))
    levels = random_levels(1, 2, 12, 192)
    keep = torch.tensor([[True, False, True, False]])
    assert torch.equal(other(levels, (3, 4), keep=keep), dec(levels, (3, 4), keep=keep))


def official_layout(feat_dim, width, depth, mlp, patch, grid):
    """Key -> shape of an official GeneralDecoder_Variable state dict, written from the notes' key list."""
    shapes = {
        'decoder_pos_embed': (1, 1 + grid * grid, width),
        'trainable_cls_token': (1, 1, width),
        'decoder_embed.weight': (width, 4 * feat_dim),
        'decoder_embed.bias': (width,),
    }
    for i in range(depth):
        pre = f'decoder_layers.{i}.'
        for name in ('query', 'key', 'value'):
            shapes[f'{pre}attention.attention.{name}.weight'] = (width, width)
            shapes[f'{pre}attention.attention.{name}.bias'] = (width,)
        shapes.update(
            {
                f'{pre}attention.output.dense.weight': (width, width),
                f'{pre}attention.output.dense.bias': (width,),
                f'{pre}intermediate.dense.weight': (mlp, width),
                f'{pre}intermediate.dense.bias': (mlp,),
                f'{pre}output.dense.weight': (width, mlp),
                f'{pre}output.dense.bias': (width,),
            }
        )
        for ln in ('layernorm_before', 'layernorm_after'):
            shapes[f'{pre}{ln}.weight'], shapes[f'{pre}{ln}.bias'] = (width,), (width,)
    shapes.update(
        {
            'decoder_norm.weight': (width,),
            'decoder_norm.bias': (width,),
            'decoder_pred.weight': (patch * patch * 3, width),
            'decoder_pred.bias': (patch * patch * 3,),
        }
    )
    return shapes


def official_forward(sd, x, h, w, heads, patch, depth):
    """Independent re-statement of the official decoder (HF ViTMAE layer semantics): x (N,T,4F) -> (N,3,H,W)."""

    def lin(t, name):
        return F.linear(t, sd[name + '.weight'], sd[name + '.bias'])

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + '.weight'], sd[name + '.bias'], eps=1e-12)

    N, T, _ = x.shape
    pos = sd['decoder_pos_embed']
    D, g = pos.shape[-1], math.isqrt(pos.shape[1] - 1)
    grid = (
        F.interpolate(
            pos[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2), size=(h, w), mode='bicubic', align_corners=False
        )
        .permute(0, 2, 3, 1)
        .reshape(1, h * w, D)
    )
    t = torch.cat([sd['trainable_cls_token'].expand(N, -1, -1), lin(x, 'decoder_embed')], 1)
    t = t + torch.cat([pos[:, :1], grid], 1)
    for i in range(depth):
        pre = f'decoder_layers.{i}.'
        y = ln(t, pre + 'layernorm_before')
        q, k, v = (
            lin(y, pre + 'attention.attention.' + n).view(N, T + 1, heads, -1).transpose(1, 2)
            for n in ('query', 'key', 'value')
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        t = t + lin(att.transpose(1, 2).reshape(N, T + 1, D), pre + 'attention.output.dense')
        y = ln(t, pre + 'layernorm_after')
        t = t + lin(F.gelu(lin(y, pre + 'intermediate.dense')), pre + 'output.dense')
    out = lin(ln(t, 'decoder_norm'), 'decoder_pred')[:, 1:].reshape(N, h, w, patch, patch, 3)
    img = torch.einsum('nhwpqc->nchpwq', out).reshape(N, 3, h * patch, w * patch)
    mean, std = torch.tensor(constants.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(constants.IMAGENET_STD).view(3, 1, 1)
    return img * std + mean


def test_convert_official_small_matches_reference():
    g = torch.Generator().manual_seed(0)
    layout = official_layout(feat_dim=8, width=32, depth=2, mlp=64, patch=4, grid=4)
    sd = {k: 0.2 * torch.randn(s, generator=g) for k, s in layout.items()}
    cfg, ours = decoder_lib.convert_official(sd, heads=4)
    assert (cfg.feat_dim, cfg.width, cfg.depth, cfg.mlp, cfg.patch, cfg.base_grid) == (8, 32, 2, 64, 4, 4)
    assert cfg.imagenet_output
    dec = decoder_lib.RGBDecoder(cfg).eval()
    dec.load_state_dict(ours, strict=True)
    for h, w in ((4, 4), (3, 5)):
        levels = random_levels(2, 1, h * w, 8)
        expected = official_forward(sd, torch.cat(levels, -1).flatten(0, 1), h, w, 4, 4, 2)
        assert torch.allclose(dec(levels, (h, w))[:, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match='unexpected'):
        decoder_lib.convert_official({**sd, 'decoder_extra.weight': torch.zeros(1)}, heads=4)
    with pytest.raises(ValueError, match='missing'):
        decoder_lib.convert_official(
            {k: v for k, v in sd.items() if 'layers.1.attention.attention.key' not in k}, heads=4
        )
    with pytest.raises(ValueError, match='shapes'):
        decoder_lib.convert_official({**sd, 'decoder_layers.0.output.dense.bias': torch.zeros(31)}, heads=4)


def test_convert_official_xl_key_list():
    sd = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith('#'):
            key, shape = line.split('\t')
            sd[key] = torch.empty(eval(shape), device='meta')
    assert len(sd) == 456
    cfg, ours = decoder_lib.convert_official(sd)
    xl = decoder_lib.PRESETS['xl']
    assert cfg == decoder_lib.DecoderConfig(**{**xl.__dict__, 'imagenet_output': True})
    with torch.device('meta'):
        model = decoder_lib.RGBDecoder('xl')
    reference = model.state_dict()
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    # 422,536,396 official entries + our 4 x 1536 mask tokens
    assert sum(t.numel() for t in reference.values()) == 422_536_396 + 4 * 1536


def test_adversarial_step():
    torch.manual_seed(0)
    dec = decoder_lib.RGBDecoder('tiny')
    disc = decoder_lib.PatchDiscriminator(ch=8)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    levels = random_levels(1, 2, 16, 192)
    gt = torch.rand(1, 2, 3, 56, 56)
    pred = dec(levels, (4, 4))
    rec, _ = decoder_lib.decoder_loss(pred, gt)
    before = [p.detach().clone() for p in disc.parameters()]
    gan, parts = decoder_lib.adversarial_step(dec, disc, disc_opt, pred, gt, rec)
    assert torch.isfinite(parts['gan_weight']) and 0 < parts['gan_weight'] < 1e4
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # D was updated
    d_grads = [p.grad.clone() for p in disc.parameters()]
    (rec + gan).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, disc.parameters()))  # G's loss leaves D alone
    assert torch.isfinite(dec.head.weight.grad).all() and dec.head.weight.grad.abs().sum() > 0


# ====================================================================================================
# model.py and diffusion.py (Stage 3)
# Tests of model.py and diffusion.py: PRoPE / RoPE identities, equivariance, zero init, the sampler on Gaussian
# data, overfitting, CFG, camera dropout, the official checkpoint converter.
# ====================================================================================================

TESTDATA = Path(__file__).resolve().parent / 'testdata'  # the release's key lists: names and shapes
SMALL = replace(
    model.PRESETS['gld-tiny'], latent_dim=16, enc_width=32, enc_depth=2, head_width=48, head_depth=1, heads=2
)  # head dims 16 / 24


def rand_cams(B, V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(B, V, 3, 3, generator=g, dtype=torch.float64))[0].to(dtype)
    R = R * torch.linalg.det(R)[..., None, None].sign()  # proper rotations
    c2w = cameras.make_pose(R, torch.randn(B, V, 3, generator=g, dtype=dtype))
    K = torch.tensor([[1.1, 0, 0.5], [0, 1.3, 0.45], [0, 0, 1.0]]) + 0.05 * torch.rand(
        B, V, 3, 3, generator=g
    ) * torch.tensor([[1.0, 0, 1], [0, 1, 1], [0, 0, 0]])
    return c2w, K.to(dtype)


def make_batch(cfg, B=2, V=3, hw=(2, 3), n_src=1, seed=0, upper=False):
    g = torch.Generator().manual_seed(seed)
    T, C = hw[0] * hw[1], cfg.latent_dim
    c2w, K = rand_cams(B, V, seed)
    src = torch.zeros(B, V, dtype=torch.bool)
    src[:, :n_src] = True
    x = torch.randn(B, V, T, C, generator=g)
    return {
        'x_t': torch.randn(B, V, T, C, generator=g),
        't': torch.rand(B, generator=g),
        'x': x,
        'cond': x * src[:, :, None, None],
        'c2w': c2w,
        'K': K,
        'src': src,
        'hw': hw,
        'upper': torch.randn(B, V, T, cfg.upper_dim, generator=g) if upper else None,
    }


def randomize(net, seed=0, std=0.1):
    """Random weights everywhere (the zero-initialised adaLN / final layer included) so outputs are informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + ('norm' in name))  # norm weights around 1
    return net


def run(net, b, cams):
    return net(b['x_t'], b['t'], b['cond'], cams, upper=b['upper'])


# ----------------------------------------------------------------------------- attention and positions


@pytest.mark.parametrize('kind,official', [('prope', False), ('prope', True), ('rope2d', False), ('rope3d', False)])
def test_fast_attention_matches_reference(kind, official):
    B, V, hw, d, nh = 2, 3, (2, 3), 24, 2
    c2w, K = rand_cams(B, V)
    cams = latents.camera_inputs(c2w, K, torch.zeros(B, V, dtype=torch.bool), hw, official=official)
    pe = model.PositionEncoding(kind, d, cams, V)
    q, k, v = torch.randn(3, B, nh, V * hw[0] * hw[1], d).unbind(0)
    torch.testing.assert_close(pe.attend(q, k, v), model.reference_attention(q, k, v, pe), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['prope', 'rope3d', 'rope2d'])
def test_rotation_of_all_axes_at_once_is_rope_rotate_bit_for_bit(kind):
    """PositionEncoding.apply rotates every axis at once (a roll and two products): the floats of rope_rotate
    axis by axis, forward and inverse (sample.py's fp32 outputs stay bit-identical)."""
    B, V, hw, d = 2, 3, (2, 3), 48
    c2w, K = rand_cams(B, V)
    pe = model.PositionEncoding(kind, d, latents.camera_inputs(c2w, K, torch.zeros(B, V, dtype=torch.bool), hw), V)
    u = torch.randn(B, 2, V * hw[0] * hw[1], d)
    for role in ('q', 'out'):
        i = pe.start
        for size, _, _, cos, sin in pe.axes:
            expected = model.rope_rotate(u[..., i : i + size], cos, sin, inverse=role == 'out')
            assert torch.equal(pe.apply(u, role)[..., i : i + size], expected), (role, i)
            i += size
        assert torch.equal(pe.apply(u, role)[..., i:], u[..., i:])


def test_cpu_bf16_attention_is_sdpa_within_rounding():
    """model.attention: SDPA itself in fp32; in bf16 on CPU two matmuls and a softmax, equal to SDPA within bf16's
    rounding."""
    q, k, v = (2 * torch.randn(3, 2, 3, 40, 16)).unbind(0)  # logits of a few units: a peaked softmax
    assert torch.equal(model.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    bf16 = [x.to(torch.bfloat16) for x in (q, k, v)]
    exact = F.scaled_dot_product_attention(*[x.float() for x in bf16])
    fast = model.attention(*bf16)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - exact).norm() / exact.norm() < 1e-2


def test_model_reference_path_agrees():
    cfg = SMALL
    b = make_batch(cfg)
    net = randomize(model.GLD(cfg))
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    fast = run(net, b, cams)
    for blk in net.blocks:
        blk.attn.reference = True
    torch.testing.assert_close(run(net, b, cams), fast, atol=1e-5, rtol=1e-5)


def with_special_tokens(b, K, seed=1):
    """make_batch's latents, each view led by K special tokens (the targets' condition zero there too)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(b)
    for key in ('x_t', 'x', 'upper'):
        if b[key] is not None:
            B, V, _, D = b[key].shape
            out[key] = torch.cat([torch.randn(B, V, K, D, generator=g), b[key]], 2)
    out['cond'] = out['x'] * b['src'][:, :, None, None]
    return out


@pytest.mark.parametrize('cascade', [False, True])
def test_dit_special_tokens_join_attention_and_skip_prope(cascade):
    """GLD (VGGT)'s DiT (issue 28): K tokens lead each view. They skip PRoPE (pass the positions unchanged; the fast
    path equals the textbook one with identity transforms for them), join the 3D attention (view 0's change another
    view's patch outputs), the flow loss reaches their modules, the cascade ignores its upper level's; initialised
    as released. Without them the model has no such modules."""
    K = 2
    cfg = replace(SMALL, special_tokens=K, upper_dim=SMALL.latent_dim if cascade else 0)
    b = with_special_tokens(make_batch(cfg, upper=cascade), K)
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    assert not any(k.startswith('special') for k in model.GLD(SMALL).state_dict())
    torch.manual_seed(0)
    fresh = model.GLD(cfg)  # the release's init: zero output projection, positions N(0, 0.02), zero biases
    assert fresh.special_output_proj.weight.abs().max() == 0 and fresh.special_s_embedder.bias.abs().max() == 0
    assert 0.01 < fresh.special_pos_embed_x.std() < 0.03
    net = randomize(fresh)
    fast = run(net, b, cams)
    assert fast.shape == b['x_t'].shape
    for blk in net.blocks:
        blk.attn.reference = True
    torch.testing.assert_close(run(net, b, cams), fast, atol=1e-5, rtol=1e-5)
    for blk in net.blocks:
        blk.attn.reference = False
    pe = model.SpecialTokenPositions(model.PositionEncoding('prope', 16, cams, 3), K)
    u = torch.randn(2, 2, 3, K + 6, 16)
    applied = pe.apply(u.flatten(2, 3), 'kv').unflatten(2, (3, K + 6))
    assert torch.equal(applied[:, :, :, :K], u[:, :, :, :K])
    assert torch.equal(applied[:, :, :, K:].flatten(2, 3), pe.pe.apply(u[:, :, :, K:].flatten(2, 3), 'kv'))
    moved = {**b, 'x_t': b['x_t'].clone()}
    moved['x_t'][:, 0, :K] += 1  # view 0's special tokens
    assert not torch.allclose(run(net, moved, cams)[:, 2, K:], fast[:, 2, K:], atol=1e-4)
    if cascade:
        ignored = {**b, 'upper': b['upper'].clone()}
        ignored['upper'][:, :, :K] = 7
        assert torch.equal(run(net, ignored, cams), fast)

    def velocity(x_t, t):
        return net(x_t, t, b['cond'], cams, upper=b['upper'])

    loss, _ = diffusion.flow_loss(velocity, b['x'], b['src'], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert net.special_output_proj.weight.grad.abs().sum() > 0 and net.special_pos_embed_x.grad.abs().sum() > 0


@pytest.mark.parametrize('official', [False, True])
def test_prope_invariant_to_rigid_world_change(official):
    B, V, hw, d = 2, 3, (2, 2), 16
    c2w, K = rand_cams(B, V, dtype=torch.float64)
    G = rand_cams(1, 1, seed=5, dtype=torch.float64)[0][0, 0]  # one rigid transform for every camera
    q, k, v = torch.randn(3, B, 2, V * 4, d, dtype=torch.float64).unbind(0)
    src = torch.zeros(B, V, dtype=torch.bool)
    out = [
        model.PositionEncoding('prope', d, latents.camera_inputs(c, K, src, hw, official=official), V).attend(q, k, v)
        for c in (c2w, G @ c2w)
    ]
    torch.testing.assert_close(out[0], out[1], atol=1e-9, rtol=1e-9)


def test_rope_logits_depend_on_relative_positions_only():
    N, f = 7, 8
    freqs = 100.0 ** (-torch.arange(f // 2) / (f // 2))
    q, k = torch.randn(2, N, f, dtype=torch.float64).unbind(0)
    p = torch.randint(0, 10, (N,)).double()

    def logits(pos):
        angle = pos[:, None] * freqs
        return model.rope_rotate(q, angle.cos(), angle.sin()) @ model.rope_rotate(k, angle.cos(), angle.sin()).T

    torch.testing.assert_close(logits(p), logits(p + 13.0))
    assert not torch.allclose(logits(p), logits(p * 2))
    angle = p[:, None] * freqs  # the output transform undoes the input one
    torch.testing.assert_close(
        model.rope_rotate(model.rope_rotate(q, angle.cos(), angle.sin()), angle.cos(), angle.sin(), inverse=True), q
    )


@pytest.mark.parametrize('kind,d', [('prope', 48), ('rope2d', 48), ('rope3d', 56)])
def test_rope_frequencies_and_axes_as_documented(kind, d):
    """Each RoPE segment [start, start + 2n) of the head dims turns pair (start + i, start + n + i) by the token's
    position on its axis times base^(-i/n), [a, b] -> [a cos + b sin, -a sin + b cos]; the segments restated from the
    docs: prope x on [d/2, 3d/4), y on [3d/4, d); rope2d x on [0, d/2), y on [d/2, d); rope3d 2 floor(d/6) each for
    (view, y, x), the rest not rotated. Tokens run row-major in each view."""
    V, h, w, base = 2, 3, 5, 100.0
    six = 2 * (d // 6)
    segments = {
        'prope': [('x', d // 2, d // 4), ('y', 3 * d // 4, d // 4)],
        'rope2d': [('x', 0, d // 2), ('y', d // 2, d // 2)],
        'rope3d': [('view', 0, six), ('y', six, six), ('x', 2 * six, six)],
    }[kind]
    cams = latents.camera_inputs(*rand_cams(1, V), torch.zeros(1, V, dtype=torch.bool), (h, w))
    pe = model.PositionEncoding(kind, d, cams, V, base=base)
    view, y, x = torch.meshgrid(torch.arange(V), torch.arange(h), torch.arange(w), indexing='ij')
    position = {'view': view.flatten(), 'y': y.flatten(), 'x': x.flatten()}  # (N,) each
    N = V * h * w
    for axis, start, size in segments:
        n = size // 2
        for i in range(n):
            u = torch.zeros(1, 1, N, d)
            u[..., start + i] = 1  # [a, b] = [1, 0] in pair i of the segment
            angle = position[axis] * base ** (-i / n)
            expected = torch.zeros(1, 1, N, d)
            expected[..., start + i] = torch.cos(angle)
            expected[..., start + n + i] = -torch.sin(angle)
            torch.testing.assert_close(pe.apply(u, 'q'), expected, atol=1e-6, rtol=0, msg=f'{axis} pair {i}')
    rest = segments[-1][1] + segments[-1][2]  # dims after the last segment pass through
    u = torch.zeros(1, 1, N, d)
    u[..., rest:] = 1
    assert torch.equal(pe.apply(u, 'q'), u)


def test_view_permutation_permutes_output():
    cfg = SMALL
    b = make_batch(cfg, V=4, n_src=2)
    b['src'] = torch.tensor([[True, False, True, False], [False, True, True, False]])
    b['cond'] = b['x'] * b['src'][:, :, None, None]
    net = randomize(model.GLD(cfg))
    out = run(net, b, latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw']))
    perm = torch.tensor([2, 0, 3, 1])
    bp = {**b, **{k: b[k][:, perm] for k in ('x_t', 'cond', 'c2w', 'K', 'src')}}
    out_p = run(net, bp, latents.camera_inputs(bp['c2w'], bp['K'], bp['src'], bp['hw']))
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the model


def test_zero_init_outputs_zero_and_trains():
    cfg = model.PRESETS['gld-tiny']
    b = make_batch(cfg, V=2, hw=(2, 2))
    net = model.GLD(cfg)
    out = run(net, b, latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw']))
    assert out.shape == b['x_t'].shape and torch.equal(out, torch.zeros_like(out))
    (out - b['x']).pow(2).mean().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    assert net.final_layer.linear.bias.grad.abs().sum() > 0


def test_cascade_and_single_embedders_and_checkpointing():
    cfg = replace(SMALL, upper_dim=8, separate_embedders=False, pos='rope3d')
    b = make_batch(cfg, upper=True)
    net = randomize(model.GLD(cfg)).train()
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    out = run(net, b, cams)
    out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad()
    net.cfg = replace(cfg, checkpointing=True)
    out_ck = run(net, b, cams)
    out_ck.sum().backward()
    torch.testing.assert_close(out_ck, out)
    for g, p in zip(grads, [p for p in net.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    b2 = {**b, 'upper': b['upper'] + 1}  # the level-1 condition reaches the output
    assert not torch.allclose(run(net, b2, cams), out)


def test_camera_dropout_acts_only_through_cameras():
    cfg = SMALL
    b = make_batch(cfg, B=3)
    net = randomize(model.GLD(cfg))
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    drop = torch.tensor([True, False, True])
    dropped = latents.drop_cameras(cams, drop)
    out, out_d = run(net, b, cams), run(net, b, dropped)
    torch.testing.assert_close(out_d[~drop], out[~drop])  # kept samples untouched
    assert not torch.allclose(out_d[drop], out[drop])
    assert torch.equal(dropped['plucker'][:, :, 0], cams['plucker'][:, :, 0])  # the source/target mask survives
    other = latents.camera_inputs(*rand_cams(3, 3, seed=9), b['src'], b['hw'])  # different cameras, also dropped
    torch.testing.assert_close(run(net, b, latents.drop_cameras(other, drop))[drop], out_d[drop])


# ----------------------------------------------------------------------------- diffusion


def gaussian_velocity(mu, sigma):
    """Exact v*(x_t, t) = E[eps - x | x_t] for x ~ N(mu, diag sigma^2), x_t = (1-t) x + t eps."""

    def v(x_t, t):
        t = t[:, None, None, None]
        s2 = (1 - t) ** 2 * sigma**2 + t**2  # Var x_t
        return (t - (1 - t) * sigma**2) / s2 * (x_t - (1 - t) * mu) - mu

    return v


@pytest.mark.parametrize('a,std_tol', [(1.0, 0.05), (3.0, 0.12)])
def test_euler_sampler_reproduces_gaussian(a, std_tol):
    """The exact flow of N(0,1) -> N(mu, sigma^2) maps eps to mu + sigma eps, so Euler is compared with the exact
    transport of the same noise (no Monte-Carlo error). Measured at 50 steps, max over dims: mean error 0.0012 /
    0.0017, relative std error 0.043 / 0.10 (a = 1 / a = 3; Euler shrinks the spread, most for small sigma and
    large a, whose grid is coarse near t = 0); 4x smaller at 200 steps (first order)."""
    mu, sigma = (
        torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64),
        torch.tensor([0.5, 1.5, 0.25, 1.0], dtype=torch.float64),
    )
    noise = torch.randn(4000, 1, 1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + sigma * noise
    errors = []
    for steps in (50, 200):
        x = diffusion.euler_sample(gaussian_velocity(mu, sigma), noise, steps=steps, a=a)
        mean_err = (x.mean((0, 1, 2)) - exact.mean((0, 1, 2))).abs().max()
        std_err = ((x.std((0, 1, 2)) - exact.std((0, 1, 2))) / sigma).abs().max()
        errors.append(std_err)
        assert mean_err < 0.003 and std_err < std_tol * 50 / steps, (steps, mean_err, std_err)
    assert errors[1] < errors[0] / 3


@pytest.mark.parametrize('a', [1.0, 4.9])
def test_one_euler_step_from_noise_is_the_posterior_mean(a):
    """The bundled default sampler: with the exact velocity, one Euler step from t = 1 lands on E[x] = mu for every
    noise draw (v*(eps, 1) = eps - E[x]), whatever the shift; more steps transport the noise to samples instead."""
    mu, sigma = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.25], dtype=torch.float64)
    noise = torch.randn(64, 1, 1, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = diffusion.euler_sample(gaussian_velocity(mu, sigma), noise, steps=1, a=a)
    torch.testing.assert_close(one, mu.expand_as(one), rtol=0, atol=1e-12)
    many = diffusion.euler_sample(gaussian_velocity(mu, sigma), noise, steps=50, a=a)
    assert (many.std((0, 1, 2)) / sigma > 0.8).all()  # a spread of samples, not the mean


def test_cfg_scale_one_is_conditional_and_formula():
    noise = torch.randn(2, 2, 3, 4)

    def cond(x, t):
        return 0.5 * x + 1

    unc_calls = []

    def uncond(x, t):
        unc_calls.append(1)
        return -x

    ref = diffusion.euler_sample(cond, noise, steps=5, a=2.0)
    torch.testing.assert_close(
        diffusion.euler_sample(cond, noise, steps=5, a=2.0, cfg_scale=1.0, uncond_fn=uncond), ref
    )
    assert not unc_calls
    one = diffusion.euler_sample(cond, noise, steps=1, cfg_scale=1.5, uncond_fn=uncond)  # t: 1 -> 0, dt = -1
    torch.testing.assert_close(one, noise - (-noise + 1.5 * (0.5 * noise + 1 + noise)))
    outside = diffusion.euler_sample(cond, noise, steps=1, cfg_scale=1.5, uncond_fn=uncond, interval=(0, 0.5))
    torch.testing.assert_close(outside, diffusion.euler_sample(cond, noise, steps=1))


@pytest.mark.parametrize('a', [0.7, 1.0, 2.0, 19.6, 31.2])
def test_posterior_mean_sampler_is_one_euler_step_exactly(a):
    """SAMPLERS['mean'], x_1 - v(x_1, 1), is the Euler sampler's single step without CFG bit for bit at any shift: one
    conditional call at t = 1, whatever steps, cfg_scale or uncond_fn it is given (every sampler's arguments)."""
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    times = []

    def velocity(x, t):  # a nonlinear field
        times.append(t)
        return torch.sin(3 * x) * t[:, None, None, None] + x**2

    def never(x, t):
        pytest.fail('the posterior mean makes no unconditional call')

    one_step = diffusion.SAMPLERS['euler'](velocity, noise, steps=1, a=a)
    mean = diffusion.SAMPLERS['mean'](velocity, noise, steps=50, a=a, cfg_scale=1.5, uncond_fn=never, t_end=0.001)
    assert torch.equal(mean, one_step) and len(times) == 2
    assert all(torch.equal(t, torch.ones(2)) for t in times)


@pytest.mark.usefixtures('float64')
def test_point_mass_velocity_gives_zero_flow_loss_and_every_sampler_lands_on_the_point():
    """Data at one point x0: under x_t = (1 - t) x0 + t eps the exact velocity is v = eps - x0 = (x_t - x0) / t, a
    function of x_t and t alone, so its flow loss is 0 (another interpolation or the opposite sign is not), and every
    sampler carries any noise to x0 along it: training and sampling share one convention."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 3, 4, generator=g).expand(4, 2, 3, 4)  # (B,V,T,C): one scene, four times

    def exact(x_t, t):
        return (x_t - x0) / t[:, None, None, None]

    def opposite(x_t, t):
        return -exact(x_t, t)

    src = torch.tensor([[True, False]] * 4)
    t = torch.tensor([0.125, 0.25, 0.5, 0.75])
    loss, _ = diffusion.flow_loss(exact, x0, src, generator=g, t=t)
    assert loss < 1e-24
    loss, _ = diffusion.flow_loss(exact, x0, src, generator=g)  # times drawn by flow_loss
    assert loss < 1e-20
    wrong, _ = diffusion.flow_loss(opposite, x0, src, generator=g, t=t)
    assert wrong > 1  # 4 E|eps - x0|^2
    noise = torch.randn(x0.shape, generator=g)
    for name, sampler in diffusion.SAMPLERS.items():
        x = sampler(exact, noise, steps=3, a=3.0)
        torch.testing.assert_close(x, x0, rtol=0, atol=1e-12, msg=name)


def test_time_shift_and_loss_parts():
    assert diffusion.shift_alpha(8 * 18 * 18 * 1536) == pytest.approx(31.18, abs=0.01)
    t = torch.linspace(0, 1, 11)
    assert torch.equal(diffusion.shift_t(t, 1.0), t) and (diffusion.shift_t(t, 3.0) >= t).all()
    g = torch.Generator().manual_seed(0)
    assert diffusion.sample_t(5000, 'logit_normal', 3.0, g).mean() > diffusion.sample_t(5000, 'uniform', 1.0, g).mean()
    x = torch.randn(2, 4, 3, 5)
    src = torch.tensor([[True, False, False, False], [True, True, False, False]])
    loss, parts = diffusion.flow_loss(lambda x_t, t: torch.zeros_like(x_t), x, src, generator=g)
    torch.testing.assert_close(loss, (3 * parts['src'] + 5 * parts['tgt']) / 8)


def test_ema():
    net = torch.nn.Linear(3, 2)
    ema = diffusion.EMA(net, decay=0.5)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update(net)  # first update: d = min(0.5, (1 + 0) / (10 + 0)) = 0.1 (warm-up)
    torch.testing.assert_close(ema.state_dict()['weight'], w0 + 1.8)
    with ema.swapped(net):
        torch.testing.assert_close(net.weight, w0 + 1.8)
    torch.testing.assert_close(net.weight, w0 + 2.0)


def test_gld_tiny_overfits_fixed_batch():
    torch.manual_seed(0)
    cfg = model.PRESETS['gld-tiny']
    b = make_batch(cfg, B=2, V=4, hw=(4, 4))
    net = model.GLD(cfg)
    cams = latents.camera_inputs(cameras.normalize_poses(b['c2w'])[0], b['K'], b['src'], b['hw'])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    t = torch.tensor([0.3, 0.7])
    losses = []
    for _ in range(30):  # fixed t and noise: pure memorisation; measured 2.00 -> 0.04 after 30 steps (~50x)
        loss, _ = diffusion.flow_loss(
            lambda x_t, tt: net(x_t, tt, b['cond'], cams),
            b['x'],
            b['src'],
            generator=torch.Generator().manual_seed(1),
            t=t,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses


# ----------------------------------------------------------------------------- the DiT's inputs (latents.dit_inputs)


def level_stats(levels=(0, 1), C=None, seed=0):
    """LatentStats with a different mean and variance per level and channel (C: da3-tiny's 2C by default)."""
    C = C or latents.build_encoder('da3-tiny').dim
    g = torch.Generator().manual_seed(seed)
    mean = {level: torch.randn(C, generator=g) for level in levels}
    var = {level: 0.5 + torch.rand(C, generator=g) for level in levels}
    return latents.LatentStats(mean, var)


def restated_normalize(stats, x, level):
    """(x - mean) / sqrt(var + 1e-5) with the statistics of `level`, written out here."""
    return (x - stats.mean[level]) / torch.sqrt(stats.var[level] + 1e-5)


def test_training_inputs_of_the_cascade_are_the_normalised_true_levels():
    """M1->0's training batch at tau 0: x is level 0 of all views jointly, the condition level 0 of the sources alone
    (zeros at the targets), and `upper` level 1 of all views, each normalised by its own level's statistics."""
    enc = latents.build_encoder('da3-tiny').freeze()
    images, c2w, K = scene(B=2, V=3, H=28, W=28)
    src = torch.tensor([[True, False, False]] * 2)
    batch = {'images': images, 'c2w': c2w, 'K': K, 'src_mask': src}
    stats = level_stats()
    g = torch.Generator().manual_seed(0)
    x, inputs = latents.training_latents(enc, stats, batch, 0, upper_level=1, tau=0.0, cam_drop=0.0, generator=g)
    full = enc.encode(images)
    alone = enc.encode(images[:, :1])  # the source encoded without the targets
    torch.testing.assert_close(x, restated_normalize(stats, full[0], 0))
    torch.testing.assert_close(inputs.upper, restated_normalize(stats, full[1], 1))
    torch.testing.assert_close(inputs.cond[:, :1], restated_normalize(stats, alone[0], 0))
    assert not inputs.cond[:, 1:].any()
    x1, inputs1 = latents.training_latents(enc, stats, batch, 1, cam_drop=0.0, generator=g)  # M1: no upper level
    torch.testing.assert_close(x1, restated_normalize(stats, full[1], 1))
    assert inputs1.upper is None


def test_tau_noise_of_the_upper_level_keeps_unit_variance():
    """GLD 4.4: the true level 1 noised by sigma ~ |N(0, tau^2)| per sample, divided by sqrt(1 + sigma^2): a unit-
    variance input stays unit variance at any tau (without the division: 1 + tau^2 = 5 here), noised per sample."""
    B, V, T, C = 2000, 1, 4, 8
    g = torch.Generator().manual_seed(0)
    stats = latents.LatentStats({0: torch.zeros(C), 1: torch.zeros(C)}, {0: torch.ones(C), 1: torch.ones(C)})
    upper_raw = torch.randn(B, V, T, C, generator=g)
    cams = latents.camera_inputs(*rand_cams(B, V), torch.ones(B, V, dtype=torch.bool), (1, 1))
    cond = torch.zeros(B, V, T, C)
    clean = latents.dit_inputs(stats, 0, cond, cams, 1, upper_raw).upper
    noised = latents.dit_inputs(stats, 0, cond, cams, 1, upper_raw, tau=2.0, generator=g).upper
    assert float(noised.var()) == pytest.approx(float(clean.var()), abs=0.03)
    assert abs(float(noised.mean())) < 0.02
    # the part of the clean input kept per sample, 1 / sqrt(1 + sigma^2): its mean and spread over the samples
    kept = (noised * clean).mean((1, 2, 3)) / clean.pow(2).mean((1, 2, 3))
    sigma = 2.0 * torch.randn(10**6, generator=torch.Generator().manual_seed(1)).abs()
    expected = 1 / torch.sqrt(1 + sigma**2)  # mean 0.61, std 0.25
    assert float(kept.mean()) == pytest.approx(float(expected.mean()), abs=0.02)
    assert float(kept.std()) == pytest.approx(float(expected.std()), abs=0.03)


def test_training_flags_reach_the_dit_inputs(small_data, tmp_path, monkeypatch):
    """train.py --level 0 --tau 0.3 --cam-drop 0.2: every step builds M1->0's inputs with the upper level 1, that tau,
    that dropout probability and the run's own random stream."""
    real = latents.dit_inputs
    calls = []

    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, 'dit_inputs', spy)
    flags = ['--level', '0', '--tau', '0.3', '--cam-drop', '0.2', '--steps', '2', '--decoder-ckpt', 'none']
    train.main(['--data', str(small_data), *TRAIN_FAST, *flags, '--out', str(tmp_path / 'run')])
    assert len(calls) == 2
    for call in calls:
        assert (call['level'], call['upper_level'], call['tau'], call['cam_drop']) == (0, 1, 0.3, 0.2)
        assert isinstance(call['generator'], torch.Generator)


def dropped_samples(cams):
    """(B,) whether each sample's cameras are dropped: P = P_inv = I and zero rays (the target mask kept)."""
    eye = torch.eye(4)
    identity = (cams['P'] == eye).all((1, 2, 3)) & (cams['P_inv'] == eye).all((1, 2, 3))
    no_rays = (cams['plucker'][:, :, 1:] == 0).flatten(1).all(1)
    assert torch.equal(identity, no_rays)
    return identity


def test_camera_dropout_drops_at_its_rate_and_cfg_drops_every_sample():
    """--cam-drop p: each sample's cameras dropped with probability p (0 never, 1 always, 0.1 about 10%); CFG's
    unconditional cameras are every sample's dropped ones; kept samples keep their cameras unchanged."""
    B, V = 2000, 2
    src = torch.tensor([[True, False]] * B)
    cams = latents.camera_inputs(*rand_cams(B, V), src, (1, 1))
    stats = level_stats(C=4)
    cond = torch.zeros(B, V, 1, 4)
    g = torch.Generator().manual_seed(0)
    rates = {}
    for p in (0.0, 0.1, 1.0):
        inputs = latents.dit_inputs(stats, 0, cond, cams, cam_drop=p, generator=g)
        dropped = dropped_samples(inputs.cams)
        rates[p] = float(dropped.float().mean())
        assert dropped_samples(inputs.uncond_cams).all()
        assert torch.equal(inputs.cams['P'][~dropped], cams['P'][~dropped])
        assert torch.equal(inputs.cams['plucker'][:, :, 0], cams['plucker'][:, :, 0])  # the target mask
    assert rates[0.0] == 0 and rates[1.0] == 1 and 0.08 < rates[0.1] < 0.12, rates


class SpyNet(torch.nn.Module):
    """A stand-in DiT: records what each call receives and returns a velocity that depends on x_t alone."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, cond, cams, upper=None):
        self.calls.append({'cond': cond, 'cams': cams, 'upper': upper})
        return 0.5 * x_t


def test_cfg_gives_the_unconditional_branch_dropped_cameras_and_the_cascade_its_level_1():
    """Sampling the cascade with CFG (scale 2): each Euler step calls M_l on the true cameras, then on the dropped ones
    (P = P_inv = I, zero rays, the target mask kept), with the same condition; M1->0 reads the generated level 1
    normalised by level 1's statistics."""
    enc = latents.build_encoder('da3-tiny').freeze()
    dec = decoder_lib.RGBDecoder(replace(decoder_lib.PRESETS['tiny'], feat_dim=enc.dim)).eval()
    stats = level_stats()
    spies = {1: SpyNet(), 0: SpyNet()}
    models = {1: (spies[1], {'stats': stats, 'upper_level': None}), 0: (spies[0], {'stats': stats, 'upper_level': 1})}
    pipe = pipeline.Pipeline(enc, dec, models, boundary=1, log=quiet, progress=False)
    images, c2w, K = scene(B=1, V=3, H=28, W=28)
    out = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=2.0, seed=0)
    src = torch.tensor([[True, False, False]])
    true_cams = latents.model_cameras(c2w, K, src, (2, 2))
    alone = enc.encode(images[:, :1])
    for level, spy in spies.items():
        assert len(spy.calls) == 4  # (conditional, unconditional) x 2 steps
        for cond_call, uncond_call in zip(spy.calls[0::2], spy.calls[1::2]):
            torch.testing.assert_close(cond_call['cams']['P'], true_cams['P'])
            torch.testing.assert_close(cond_call['cams']['plucker'], true_cams['plucker'])
            assert dropped_samples(uncond_call['cams']).all()
            assert torch.equal(uncond_call['cams']['plucker'][:, :, 0], true_cams['plucker'][:, :, 0])
            torch.testing.assert_close(cond_call['cond'][:, :1], restated_normalize(stats, alone[level], level))
            assert not cond_call['cond'][:, 1:].any() and torch.equal(uncond_call['cond'], cond_call['cond'])
            if level == 0:
                upper = restated_normalize(stats, out['levels'][1], 1)
                torch.testing.assert_close(cond_call['upper'], upper, atol=1e-5, rtol=1e-5)
                assert torch.equal(uncond_call['upper'], cond_call['upper'])
            else:
                assert cond_call['upper'] is None


# ----------------------------------------------------------------------------- the released checkpoints


def read_keys(name):
    """testdata/<name>: 'key<TAB>(shape)' per line -> {key: shape}."""
    path = TESTDATA / name
    return {
        k: tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
        for k, shape in (line.rstrip('\n').split('\t') for line in path.open() if not line.startswith('#'))
    }


@pytest.mark.parametrize(
    'name,preset,cascade',
    [
        ('official-gld-keys-m1.txt', 'gld-paper', False),
        ('official-gld-keys-cascade.txt', 'gld-paper-cascade', True),
        ('official-gld-keys-cascade-ddt-old.txt', 'gld-paper-cascade', True),
    ],
)
def test_convert_official_full_size_keys(name, preset, cascade):
    keys = read_keys(name)
    sd = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    cfg, out = model.convert_official(sd, cascade=cascade)
    assert replace(cfg, double_silu=True) == model.PRESETS[preset]
    with torch.device('meta'):
        ref = model.GLD(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def official_form(net, cascade):
    """Our model's state dict as the release's DiTwDDTHead holds it: 1x1-conv embedders (D,Cin,1,1) and, for the
    cascade, the aliases of the single embedders that the training code's state dict carries too."""
    official = {
        k: v.view(*v.shape, 1, 1)
        if '_embedder' in k and k.endswith('proj.weight') and not k.startswith('camera')
        else v
        for k, v in net.state_dict().items()
    }
    if cascade:
        for kind in 'sx':
            for part in ('ref', 'tgt'):
                for p in ('weight', 'bias'):
                    official[f'{kind}_embedder_{part}.proj.{p}'] = official[f'{kind}_embedder.proj.{p}']
    return official


@pytest.mark.parametrize('cascade', [False, True])
def test_convert_official_tiny_round_trip(cascade):
    cfg = replace(SMALL, heads=2, upper_dim=SMALL.latent_dim if cascade else 0, separate_embedders=not cascade)
    net = randomize(model.GLD(cfg), seed=3)
    official = official_form(net, cascade)
    cfg2, sd = model.convert_official(official, cascade=cascade, heads=2)
    assert cfg2.upper_dim == cfg.upper_dim and cfg2.enc_depth == cfg.enc_depth
    net2 = model.GLD(cfg2)
    net2.load_state_dict(sd, strict=True)
    b = make_batch(cfg, upper=cascade)
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'], official=True)
    torch.testing.assert_close(run(net2, b, cams), run(net, b, cams))
    with pytest.raises(AssertionError):
        model.convert_official({**official, 'extra.weight': torch.zeros(1)}, cascade=cascade, heads=2)


def test_forward_compiles_without_graph_breaks():
    """The hot path has no host syncs or Python-side data dependence: dynamo traces it as one graph."""
    import torch._dynamo

    cfg = replace(SMALL, upper_dim=SMALL.latent_dim)
    net = model.GLD(cfg)
    b = make_batch(cfg, upper=True)
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net)(b['x_t'], b['t'], b['cond'], cams, upper=b['upper'])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ====================================================================================================
# the released GLD files (sample.py --official)
# Tests of the released-model path (pipeline.load_official_pipeline, official.OfficialConventions) at a small size.
#
# A fake release is written with random tensors in the release's folder layout (VGGT files beside DA3's), with its
# key names (1x1-conv embedders, the cascade's 8 aliased embedder keys, HF ViTMAE decoder names, the DA3 hub 'model.'
# prefix, dict stats (1,C,1,1)) and each file as the release's code saves or reads it (trainer dicts, EMA beside the
# live weights, 'decoder.' prefixes), at widths small enough for a CPU; every other layout is tested on its own. The
# layout writers are checked against the full-size key lists in testdata/ (the release's names and shapes, copied from the notes). Run:
#     OMP_NUM_THREADS=1 python -m pytest -q test_gld.py -k "official or release or layout or discovery"
# Shape legend: B batch, V views, H W image, h w token grid, C channels, T tokens.
# ====================================================================================================

C, C1, C2, HEADS = 192, 32, 48, 2  # da3-tiny levels; encoder / head widths; head dims 16 / 24 (PRoPE needs 8 | d)
CV = 128  # vggt-tiny levels, also its DiTs' head width


def official_model_layout(C, C1, C2, d1, d2, cascade, aliases=False):
    """Key -> shape of a released DiTwDDTHead state dict (notes section 2.2): M1 (DDT.py new mode) or the cascade
    (single embedders; aliases: the 8 duplicated {s,x}_embedder_{ref,tgt} keys of DDT.py old mode)."""
    shapes = {}
    embedders = (
        ['x_embedder', 's_embedder']
        if cascade
        else ['x_embedder_ref', 'x_embedder_tgt', 's_embedder_ref', 's_embedder_tgt']
    )
    if aliases:
        embedders += ['s_embedder_ref', 'x_embedder_ref', 's_embedder_tgt', 'x_embedder_tgt']
    for name in embedders:  # 1x1 convs over [cond | x_t] (M1) or [cond | F1] (cascade): 2C channels in
        D = C2 if name.startswith('x') else C1
        shapes[f'{name}.proj.weight'], shapes[f'{name}.proj.bias'] = (D, 2 * C, 1, 1), (D,)
    shapes.update(
        {
            's_projector.weight': (C2, C1),
            's_projector.bias': (C2,),
            't_embedder.W': (256,),
            't_embedder.mlp.0.weight': (C1, 512),
            't_embedder.mlp.0.bias': (C1,),
            't_embedder.mlp.2.weight': (C1, C1),
            't_embedder.mlp.2.bias': (C1,),
            'camera_embedder.proj.weight': (C1, 7, 14, 14),
            'camera_embedder.proj.bias': (C1,),
            'final_layer.norm_final.weight': (C2,),
            'final_layer.linear.weight': (C, C2),
            'final_layer.linear.bias': (C,),
            'final_layer.adaLN_modulation.1.weight': (2 * C2, C2),
            'final_layer.adaLN_modulation.1.bias': (2 * C2,),
        }
    )
    for i, D in enumerate([C1] * d1 + [C2] * d2):
        hidden = int(2 * 4 * D / 3)  # SwiGLU
        for name, shape in {
            'norm1.weight': (D,),
            'norm2.weight': (D,),
            'attn.qkv.weight': (3 * D, D),
            'attn.qkv.bias': (3 * D,),
            'attn.proj.weight': (D, D),
            'attn.proj.bias': (D,),
            'mlp.w12.weight': (2 * hidden, D),
            'mlp.w12.bias': (2 * hidden,),
            'mlp.w3.weight': (D, hidden),
            'mlp.w3.bias': (D,),
            'adaLN_modulation.1.weight': (6 * D, D),
            'adaLN_modulation.1.bias': (6 * D,),
        }.items():
            shapes[f'blocks.{i}.{name}'] = shape
    return shapes


def official_vggt_layout(C, C1, C2, d1, d2, K=5):
    """Key -> shape of a released GLD (VGGT) DiTwDDTHead (DDT.py new mode, M1 or the cascade: the same keys; notes
    section 6.6): M1's layout over [cond | x_t] of 2C channels plus the special tokens' modules (DDT.py:291-307)."""
    shapes = official_model_layout(C, C1, C2, d1, d2, cascade=False)
    shapes.update(
        {
            'special_pos_embed_s': (1, K, C1),
            'special_pos_embed_x': (1, K, C2),
            'special_s_embedder.weight': (C1, 2 * C),
            'special_s_embedder.bias': (C1,),
            'special_x_embedder.weight': (C2, 2 * C),
            'special_x_embedder.bias': (C2,),
            'special_output_proj.weight': (C, C2),  # Linear(C2, C), applied to the final layer's C: C2 = C
            'special_output_proj.bias': (C,),
        }
    )
    return shapes


def random_state_dict(layout, seed):
    """Random tensors of the layout; norm weights around 1, t_embedder.W ~ N(0,1) as released, others N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(s, generator=g) * (1.0 if k == 't_embedder.W' else 0.1) + ('norm' in k)
        for k, s in layout.items()
    }


def release_decoder(C=C, seed=1):
    """A small GeneralDecoder_Variable state dict (HF ViTMAE names) for levels of C channels."""
    return random_state_dict(official_layout(C, 32, 1, 64, 14, 4), seed)


def trainer_save(ema, noisy):
    """A stage-2 checkpoint as train_multiview_da3.py saves it (model.module's and the EMA's bare keys, the
    optimizer, the schedule and the config beside them)."""
    return {
        'model': noisy,
        'ema': ema,
        'opt': {'state': {}, 'param_groups': []},
        'scheduler': {'last_epoch': 7},
        'train_steps': 7,
        'epoch': 0,
        'steps_per_epoch': 10,
        'config_path': 'configs/training/DA3_level1.yaml',
        'training_cfg': {'base_lr': 5e-5},
        'cli_overrides': {'image_size': 504, 'precision': 'bf16'},
    }


def rae_state(dec):
    """A stage-1 RAE state dict: the decoder under 'decoder.', beside the encoder's entries."""
    return {**{'decoder.' + k: v for k, v in dec.items()}, 'encoder.blocks.0.weight': torch.zeros(2)}


def write_release(root):
    """A small fake of the release at root, laid out as its README.md says (hub SeonghuJeon/GLD snapshot + the git
    repository's model_stats/, VGGT files beside the DA3 ones), each file as the release's own code writes it.
    Returns the state dicts that must be loaded: M1's EMA and the decoder's EMA."""
    for d in ('pretrained_models/da3', 'pretrained_models/vggt', 'checkpoints', 'model_stats/da3', 'model_stats/vggt'):
        (root / d).mkdir(parents=True)
    torch.manual_seed(0)
    enc_sd = latents.build_encoder('da3-tiny').state_dict()
    save_file(
        {'model.' + k: v.clone() for k, v in enc_sd.items() if not k.startswith('head.')},
        root / 'pretrained_models' / 'da3' / 'model.safetensors',
    )  # DA3 hub layout
    torch.save(
        {'model': {'decoder.' + k[5:]: v for k, v in enc_sd.items() if k.startswith('head.')}},
        root / 'pretrained_models' / 'da3' / 'dpt_decoder.pt',
    )  # as RAE_DA3._init_dpt_decoder reads it
    dec = release_decoder()
    torch.save(
        {'model': rae_state({k: v + 1 for k, v in dec.items()}), 'ema': rae_state(dec)},  # RAE_DA3 reads 'ema' first
        root / 'pretrained_models' / 'mae_decoder.pt',
    )
    torch.save(
        {'ema': {'decoder.' + k: v for k, v in release_decoder(CV, 5).items()}},
        root / 'pretrained_models' / 'vggt' / 'mae_decoder.pt',
    )  # GLD (VGGT)'s decoder: not DA3's
    m1 = random_state_dict(official_model_layout(C, C1, C2, 2, 1, cascade=False), 2)
    torch.save(trainer_save(m1, {k: v + 1 for k, v in m1.items()}), root / 'checkpoints' / 'da3_level1.pt')
    cascade = random_state_dict(official_model_layout(C, C1, C2, 2, 1, cascade=True), 3)
    for name in ('s_embedder', 'x_embedder'):  # DDT.py old mode saves the aliases of the single embedders
        for part in ('ref', 'tgt'):
            for p in ('weight', 'bias'):
                cascade[f'{name}_{part}.proj.{p}'] = cascade[f'{name}.proj.{p}']
    torch.save(
        {**trainer_save(cascade, cascade), 'args': argparse.Namespace(lr=5e-5)}, root / 'checkpoints' / 'da3_cascade.pt'
    )
    # GLD (VGGT): VGGT-1B from its hub repo (vggt-tiny here, with a point-head tensor GLD skips), its DiTs (DDT.py
    # new mode, decoder width = levels' channels as the release needs), stats with the files' 'count' and 'level'
    (root / 'VGGT-1B').mkdir()
    vggt_sd = {**latents.build_encoder('vggt-tiny').state_dict(), 'point_head.norm.weight': torch.ones(CV)}
    torch.save(vggt_sd, root / 'VGGT-1B' / 'model.pt')  # as VGGT's README serves it
    for seed, name, d2 in ((6, 'vggt_level1.pt', 1), (7, 'vggt_cascade.pt', 1)):
        sd = random_state_dict(official_vggt_layout(CV, C1, CV, 2, d2), seed)
        torch.save(trainer_save(sd, {k: v + 1 for k, v in sd.items()}), root / 'checkpoints' / name)
    g = torch.Generator().manual_seed(4)
    for level in (0, 1):
        var = torch.rand(1, C, 1, 1, generator=g) + 0.5
        torch.save(
            {'mean': torch.randn(1, C, 1, 1, generator=g), 'var': var, 'std': var.sqrt()},
            root / 'model_stats' / 'da3' / f'normalization_stats_level{level}.pt',
        )
        for kind in ('normalization', 'special'):
            var = torch.rand(1, CV, 1, 1, generator=g) + 0.5
            mean = torch.randn(1, CV, 1, 1, generator=g)
            torch.save(
                {'mean': mean, 'var': var, 'std': var.sqrt(), 'count': torch.tensor(10), 'level': level},
                root / 'model_stats' / 'vggt' / f'{kind}_stats_level{level}.pt',
            )
    return m1, dec


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp('GLD')
    return root, write_release(root)


def load(root, log=None):
    return pipeline.load_official_pipeline(
        str(root), 'cpu', encoder_preset='da3-tiny', heads=HEADS, log=log if log is not None else (lambda *_: None)
    )


def scene(B=1, V=3, H=28, W=42, seed=0):
    """Random images and cameras: images (B,V,3,H,W), c2w (B,V,4,4), normalised K (B,V,3,3)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(B, V, 3, 3, generator=g, dtype=torch.float64))[0].float()
    R = R * torch.linalg.det(R)[..., None, None].sign()
    c2w = cameras.make_pose(R, torch.randn(B, V, 3, generator=g))
    K = torch.tensor([[0.9, 0, 0.52], [0, 1.2, 0.47], [0, 0, 1]]).expand(B, V, 3, 3).clone()
    return torch.rand(B, V, 3, H, W, generator=g), c2w, K


# ----------------------------------------------------------------------------- layouts and loading


@pytest.mark.parametrize(
    'name,cascade,aliases,d2',
    [
        ('official-gld-keys-m1.txt', False, False, 6),
        ('official-gld-keys-cascade.txt', True, True, 2),
        ('official-gld-keys-cascade-ddt-old.txt', True, False, 2),
    ],
)
def test_layout_writer_matches_release_key_lists(name, cascade, aliases, d2):
    """The small fakes use the writer that gives exactly the released keys and shapes at full size."""
    keys = read_keys(name)
    assert official_model_layout(1536, 768, 2048, 28, d2, cascade, aliases) == keys


def test_load_official_pipeline_and_generate(release):
    root, (m1_ema, dec_ema) = release
    logs = []
    pipe = load(root, logs.append)
    (net1, meta1), (net0, meta0) = pipe.models[1], pipe.models[0]
    assert pipe.boundary == 1 and isinstance(pipe.official, official.OfficialConventions)
    assert (meta1['upper_level'], meta0['upper_level'], meta1['level'], meta0['level']) == (None, 1, 1, 0)
    assert net1.cfg.separate_embedders and not net0.cfg.separate_embedders and net0.cfg.upper_dim == C
    assert net1.cfg.double_silu and net0.cfg.double_silu  # item 'double SiLU': set by convert_official
    assert pipe.dec.cfg.imagenet_output  # item 6
    stats0 = torch.load(root / 'model_stats' / 'da3' / 'normalization_stats_level0.pt')
    assert set(meta0['stats'].mean) == {0, 1} and meta0['stats'] is meta1['stats']
    assert torch.equal(meta0['stats'].var[0], stats0['var'].flatten())
    assert torch.equal(net1.blocks[0].attn.qkv.weight, m1_ema['blocks.0.attn.qkv.weight'])  # EMA, not 'model'
    assert torch.equal(pipe.dec.embed.weight, dec_ema['decoder_embed.weight'])  # DA3's decoder, its EMA
    assert any("using its 'ema' weights (not ['model'])" in line for line in logs)
    assert any("skipping the entries of ['encoder']" in line for line in logs)
    assert not any('loading it fully' in line for line in logs)  # issue 31: its args read as data (load_plain)
    images, c2w, K = scene()
    out = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=1.5, seed=0)
    assert [tuple(level.shape) for level in out['levels']] == [(1, 3, 6, C)] * 4
    # levels 2 and 3: level 1 through the frozen blocks with the first source's token; images and depth: decoded
    hw = (2, 3)
    deeper = pipe.enc.propagate(out['levels'][1], 1, pipe.enc.first_view_cls(images, 1), hw)
    assert all(torch.equal(a, b) for a, b in zip(out['levels'][2:], deeper))
    norm = pipe.enc.normalize_levels(out['levels'])
    assert torch.equal(out['images'], pipe.dec(norm, hw).clamp(0, 1))
    assert torch.equal(out['geometry']['depth'], pipe.enc.geometry(norm, 28, 42)['depth'])
    again = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=1.5, seed=0)
    other = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=1.5, seed=1)
    assert torch.equal(again['levels'][1], out['levels'][1])
    assert not torch.allclose(other['levels'][1], out['levels'][1])


def test_cli_official(release, tmp_path, monkeypatch, capsys):
    """python sample.py --official DIR on a dataset scene, with the small fake (encoder and heads patched in)."""
    root, _ = release
    synth.write_synth(str(tmp_path / 'data'), 2, 1, frames=6, size=56, seed=0)
    small = functools.partial(pipeline.load_official_pipeline, encoder_preset='da3-tiny', heads=HEADS)
    monkeypatch.setattr(pipeline, 'load_official_pipeline', small)
    out = tmp_path / 'out'
    sample.main(
        ['--official', str(root), '--data', str(tmp_path / 'data'), '--views', '3', '--steps', '2', '--out', str(out)]
    )
    assert (out / 'grid.png').exists() and (out / 'metrics.json').exists()
    printed = capsys.readouterr().out  # --steps 2: the release's 2 time-grid points, one Euler step per model
    assert 'M1: 1 Euler steps' in printed and 'M1->0: 1 Euler steps' in printed


# ----------------------------------------------------------------------------- GLD (VGGT) as released (issue 28)


@pytest.mark.parametrize(
    'name,d2,params',
    [('official-gld-keys-vggt-m1.txt', 6, 805_890_556), ('official-gld-keys-vggt-cascade.txt', 2, 503_758_676)],
)
def test_vggt_release_key_lists_convert_strictly(name, d2, params):
    """GLD (VGGT)'s DiTs at full size (testdata: written from the release's code, 2048-channel levels and DDT.py's
    special-token modules; the parameter counts are the notes' meta-device counts of the official class): the layout
    writer of the small fakes gives exactly them, and they convert strictly to our GLD with 5 special tokens."""
    keys = read_keys(name)
    assert official_vggt_layout(2048, 768, 2048, 28, d2) == keys
    assert sum(math.prod(shape) for shape in keys.values()) == params
    cascade = 'cascade' in name
    sd = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    cfg, out = model.convert_official(sd, cascade=cascade)
    got = (cfg.latent_dim, cfg.special_tokens, cfg.separate_embedders, cfg.upper_dim, cfg.head_depth)
    assert got == (2048, 5, True, 2048 if cascade else 0, d2)  # the cascade: DDT.py new mode, four embedders
    with torch.device('meta'):
        net = model.GLD(cfg)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert model.count_params(net) == params
    with pytest.raises(AssertionError, match='missing'):
        model.convert_official({k: v for k, v in sd.items() if k != 'special_pos_embed_x'}, cascade=cascade)


def test_vggt_release_decoder_key_list():
    """pretrained_models/vggt/mae_decoder.pt: the DA3 decoder's layout reading 4 x 2048 channels (testdata)."""
    sd = {k: torch.empty(shape, device='meta') for k, shape in read_keys('official-gld-keys-vggt-decoder.txt').items()}
    cfg, ours = decoder_lib.convert_official(sd)
    assert cfg.feat_dim == 2048 and len(sd) == 456
    with torch.device('meta'):
        reference = decoder_lib.RGBDecoder(cfg).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert sum(v.numel() for v in reference.values()) == 424_895_692 + 4 * 2048  # + our level-mask tokens


def load_vggt(root, log=None):
    return pipeline.load_official_pipeline(
        str(root), 'cpu', latent='vggt', encoder_preset='vggt-tiny', heads=HEADS, log=log or (lambda *_: None)
    )


def test_load_official_vggt_pipeline_and_generate(release):
    """GLD (VGGT) as released, from the fake release beside DA3's: VGGT-1B's weights (point head skipped), M1 and the
    cascade with their special-token modules (EMA), the VGGT decoder, patch and special statistics (the cascade's
    level-0 special tokens by level 1's, item 8), the 37 x 37 shift and the cascade in DDT.py's camera conventions;
    generation carries 5 special tokens per view through every level and the camera head reads them."""
    root, _ = release
    pipe = load_vggt(root)
    (net1, _), (net0, meta0) = pipe.models[1], pipe.models[0]
    assert (net1.cfg.special_tokens, net0.cfg.special_tokens, net0.cfg.upper_dim) == (5, 5, CV)
    assert net0.cfg.separate_embedders and pipe.official.cascade_levels == set()
    assert pipe.official.shift_tokens == 37 * 37
    m1 = torch.load(root / 'checkpoints' / 'vggt_level1.pt', weights_only=False)['ema']
    assert torch.equal(net1.special_pos_embed_s, m1['special_pos_embed_s'])
    vggt_file = torch.load(root / 'VGGT-1B' / 'model.pt')
    assert torch.equal(pipe.enc.aggregator.camera_token, vggt_file['aggregator.camera_token'])
    decoder = torch.load(root / 'pretrained_models' / 'vggt' / 'mae_decoder.pt')['ema']
    assert torch.equal(pipe.dec.embed.weight, decoder['decoder.decoder_embed.weight'])
    stats = meta0['stats']
    special1 = torch.load(root / 'model_stats' / 'vggt' / 'special_stats_level1.pt')
    assert stats.special_mean[1].shape == (5, CV) and torch.equal(stats.special_mean[1][3], special1['mean'].flatten())
    assert torch.equal(stats.special_var[0], stats.special_var[1])  # item 8
    patches0 = torch.load(root / 'model_stats' / 'vggt' / 'normalization_stats_level0.pt')
    assert torch.equal(stats.mean[0], patches0['mean'].flatten())
    images, c2w, K = scene()
    out = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=1.5, seed=0)
    assert [tuple(level.shape) for level in out['levels']] == [(1, 3, 5 + 6, CV)] * 4
    assert out['images'].shape == images.shape and torch.isfinite(out['images']).all()
    geo = out['geometry']
    assert geo['depth'].shape == (1, 3, 28, 42) and geo['c2w'].shape == (1, 3, 4, 4)
    norm = pipe.enc.normalize_levels(out['levels'])
    again = pipe.enc.geometry(norm, 28, 42, cls_last=out['levels'][3][:, :, :5])
    assert torch.equal(again['extrinsics'], geo['extrinsics'])  # the camera head reads level 3's special tokens


def test_official_vggt_refuses_models_without_special_tokens(release, tmp_path):
    root, _ = release
    broken = tmp_path / 'GLD'
    shutil.copytree(root, broken)
    sd = random_state_dict(official_model_layout(CV, C1, CV, 2, 1, cascade=False), 8)  # DA3-style, 128 channels
    torch.save({'ema': sd}, broken / 'checkpoints' / 'vggt_level1.pt')
    with pytest.raises(ValueError, match=r"vggt_level1.pt: 0 special tokens per view, but encoder 'vggt-tiny' gives 5"):
        load_vggt(broken)


def test_cli_official_vggt(release, tmp_path, monkeypatch, capsys):
    """sample.py --official DIR --encoder vggt-1b runs GLD (VGGT) (small fake); the release's VGGT eval samples
    100 time-grid points by default."""
    root, _ = release
    args = sample.build_parser().parse_args(['--official', str(root), '--encoder', 'vggt-1b'])
    sample.default_sampler(args)
    assert (args.steps, args.cfg_scale) == (100, 1.5)
    synth.write_synth(str(tmp_path / 'data'), 2, 1, frames=6, size=56, seed=0)
    small = functools.partial(pipeline.load_official_pipeline, encoder_preset='vggt-tiny', heads=HEADS)
    monkeypatch.setattr(pipeline, 'load_official_pipeline', small)
    out = tmp_path / 'out'
    run = ['--official', str(root), '--encoder', 'vggt-1b', '--data', str(tmp_path / 'data'), '--views', '3']
    res = sample.main(run + ['--steps', '2', '--out', str(out)])
    assert res['levels'][1].shape == (1, 3, 5 + 16, CV) and (out / 'grid.png').exists()
    assert 'M1->0: 1 Euler steps' in capsys.readouterr().out
    with pytest.raises(cli.UserError, match='the release has da3 and vggt models'):
        sample.main(['--official', str(root), '--encoder', 'dinov2-s'])


def test_missing_or_wrong_file_errors(release, tmp_path):
    root, _ = release
    broken = tmp_path / 'GLD'
    shutil.copytree(root, broken)
    os.remove(broken / 'checkpoints' / 'da3_cascade.pt')
    with pytest.raises(FileNotFoundError, match=r'no da3_cascade.pt .*SeonghuJeon/GLD'):
        load(broken)
    with pytest.raises(FileNotFoundError, match='no such folder'):
        load(tmp_path / 'nowhere')
    shutil.copy(root / 'pretrained_models' / 'mae_decoder.pt', broken / 'checkpoints' / 'da3_cascade.pt')
    with pytest.raises(ValueError, match=r'da3_cascade.pt: does not convert .*layouts known for a model file'):
        load(broken)


def hub_cache(cache, repo, files, rev='0123456789abcdef0123456789abcdef01234567'):
    """A huggingface_hub cache holding files {path in the repo: source file} of repo at rev, laid out as the library
    lays it out: models--ORG--NAME/refs/main (the commit) and snapshots/<commit>/<path>."""
    folder = cache / ('models--' + repo.replace('/', '--'))
    (folder / 'refs').mkdir(parents=True)
    (folder / 'refs' / 'main').write_text(rev)
    for rel, source in files.items():
        (folder / 'snapshots' / rev / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / 'snapshots' / rev / rel)
    return folder / 'snapshots' / rev


def test_hub_names_resolve_through_the_library_cache_offline(release, tmp_path):
    """`--official` alone and `--encoder-weights DA3-SMALL` through huggingface_hub itself, in a fresh process with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE in tmp_path (no network touched): cached files are used, a missing one is one
    line naming the repository and the offline alternative; the statistics come from --official-stats."""
    root, _ = release
    cache = tmp_path / 'hub'
    weights = {rel: root / rel for rel in official.OFFICIAL_FILES['da3'].values() if not rel.startswith('model_stats')}
    snapshot = hub_cache(cache, official.OFFICIAL_HUB, weights)
    stand_in = root / 'pretrained_models' / 'da3' / 'model.safetensors'  # a small file in its place
    encoder = hub_cache(cache, 'depth-anything/DA3-SMALL', {'model.safetensors': stand_in})
    synth.write_synth(str(tmp_path / 'data'), 0, 1, frames=6, size=56, seed=0)
    run = ['--data', str(tmp_path / 'data'), '--views', '3', '--steps', '2', '--out', str(tmp_path / 'out')]
    script = f"""
import functools, json, sys
import cli, official, pipeline, sample
small = functools.partial(pipeline.load_official_pipeline, encoder_preset='da3-tiny', heads={HEADS})
pipeline.load_official_pipeline = small
calls = {{
    'small': lambda: official.hub_weights('DA3-SMALL', 'da3-small'),
    'base': lambda: official.hub_weights('depth-anything/DA3-BASE', 'da3-base'),
    'mismatch': lambda: official.hub_weights('DA3-SMALL', 'da3-base'),
    'no stats': lambda: sample.main(['--official', *{run!r}]),
    'files': lambda: json.dumps(official.release_files(official.OFFICIAL_HUB, {str(root)!r})),
    'run': lambda: sample.main(['--official', '--official-stats', {str(root)!r}, *{run!r}]) and 'ran',
}}
answers = {{}}
for name, call in calls.items():
    try:
        answers[name] = str(call())
    except cli.UserError as e:
        answers[name] = 'error: ' + str(e)
print('ANSWERS ' + json.dumps(answers))
"""
    import subprocess

    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache), 'HF_HOME': str(tmp_path / 'hf')}
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, '-c', script], cwd=here, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith('ANSWERS ')]
    assert r.returncode == 0 and lines, r.stdout + r.stderr
    answers = json.loads(lines[0].removeprefix('ANSWERS '))
    assert answers['small'] == str(encoder / 'model.safetensors')
    assert answers['base'].startswith('error: depth-anything/DA3-BASE: cannot get model.safetensors (the hub')
    assert str(cache) in answers['base'] and answers['base'].endswith('pass --encoder-weights FILE')
    assert (
        answers['mismatch']
        == 'error: --encoder-weights DA3-SMALL: weights of --encoder da3-small, not da3-base; pass both'
    )
    assert (
        'are not on the hub SeonghuJeon/GLD' in answers['no stats']
        and f'git clone {official.OFFICIAL_GIT}' in answers['no stats']
    )
    assert answers['run'] == 'ran' and (tmp_path / 'out' / 'grid.png').exists()
    files = json.loads(answers['files'])  # the weights from the snapshot, the statistics from --official-stats
    assert sorted(files.values()) == sorted(
        [str(snapshot / rel) for rel in weights]
        + [str(root / rel) for rel in official.OFFICIAL_FILES['da3'].values() if rel.startswith('model_stats')]
    )


# ----------------------------------------------------------------------------- official vs clean conventions


def test_official_camera_inputs_differ_where_documented():
    """Items 1-3: with translations along one axis (largest |t| component = largest distance) the pose scale agrees,
    so P is equal and only the Plücker grid (offset) and P_inv (K' for K'^-1) differ; otherwise P differs too."""
    _, _, K = scene(V=3)
    c2w = cameras.make_pose(torch.eye(3).expand(1, 3, 3, 3), torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [2.5, 0, 0]]]))
    src = torch.tensor([[True, False, False]])
    off = latents.model_cameras(c2w, K, src, (2, 3), official=True)
    clean = latents.model_cameras(c2w, K, src, (2, 3), official=False)
    torch.testing.assert_close(off['P'], clean['P'])
    assert torch.equal(off['plucker'][:, :, :1], clean['plucker'][:, :, :1])  # the source/target mask
    assert not torch.allclose(off['plucker'][:, :, 1:], clean['plucker'][:, :, 1:], atol=1e-3)
    assert not torch.allclose(off['P_inv'], clean['P_inv'], atol=1e-3)
    torch.testing.assert_close(clean['P_inv'] @ clean['P'], torch.eye(4).expand(1, 3, 4, 4), atol=1e-5, rtol=0)
    _, c2w, K = scene(V=3, seed=1)
    off = latents.model_cameras(c2w, K, src, (2, 3), official=True)
    assert not torch.allclose(off['P'], latents.model_cameras(c2w, K, src, (2, 3))['P'], atol=1e-3)


@pytest.mark.parametrize('official', [False, True])
def test_plucker_map_samples_each_pixel_where_documented(official):
    """camera_inputs' Plücker map at pixel (u, v) of the (patch h) x (patch w) image is the ray through (u + 0.5,
    v + 0.5), the release's through (u - 0.5, v + 0.5) (OfficialConventions 2), written out here: d = R K^-1
    [x / W, y / H, 1] normalised, moment o x d; channel 0 is the target mask."""
    c2w, K = rand_cams(1, 2, seed=3, dtype=torch.float64)
    src = torch.tensor([[True, False]])
    patch = 4
    H, W = 8, 12  # the token grid (2, 3)
    cams = latents.camera_inputs(c2w, K, src, (2, 3), patch=patch, official=official)
    assert cams['plucker'].shape == (1, 2, 7, H, W)
    dx = -0.5 if official else 0.5
    for v, u in [(0, 0), (5, 7), (7, 11)]:
        pixel = torch.tensor([(u + dx) / W, (v + 0.5) / H, 1.0], dtype=torch.float64)
        d_cam = torch.linalg.solve(K[0], pixel)  # (V,3): K^-1 [x, y, 1]
        d = torch.einsum('vij,vj->vi', c2w[0, :, :3, :3], d_cam)
        d = d / d.norm(dim=-1, keepdim=True)
        o = c2w[0, :, :3, 3]
        rays = cams['plucker'][0, :, 1:, v, u]  # (V,6)
        torch.testing.assert_close(rays[:, :3], d)
        torch.testing.assert_close(rays[:, 3:], torch.linalg.cross(o, d))
    is_target = torch.tensor([0.0, 1.0], dtype=torch.float64)[:, None, None]
    assert torch.equal(cams['plucker'][0, :, 0], is_target.expand(2, H, W))


def test_official_conventions_match_direct_construction():
    """Items 4-5 rebuilt from c2w and pixel K directly: the cascade's K by 504, both models' CFG branch."""
    _, c2w, K = scene(B=2, V=3)
    H, W, hw = 28, 42, (2, 3)
    src = torch.tensor([[True, False, False]] * 2)
    cams = latents.model_cameras(c2w, K, src, hw, official=True)
    uncond = latents.drop_cameras(cams, torch.ones(2, dtype=torch.bool))
    rel, _ = cameras.normalize_poses(c2w, ref=-1, by='max_abs')

    def K_prime(Kpix, width, height):  # the official K normalisation: fx/W, fy/H, cx/W - 0.5, cy/H - 0.5
        return cameras.prope_K(cameras.K_to_normalized(Kpix, height, width))

    conv = official.OfficialConventions()
    m1, m1_unc = conv.model_cameras(1, cams, uncond)
    assert m1 is cams and torch.equal(m1_unc['plucker'], uncond['plucker'])
    expected = cameras.lift(K_prime(torch.eye(3), W, H)).expand(2, 3, 4, 4)
    assert torch.equal(m1_unc['P'], expected) and torch.equal(m1_unc['P_inv'], expected)
    assert m1_unc['P'][0, 0, 0, 0] == 1 / W and m1_unc['P'][0, 0, 0, 2] == -0.5
    cas, cas_unc = conv.model_cameras(0, cams, uncond)
    K504 = cameras.lift(K_prime(cameras.K_to_pixels(K, H, W), 504, 504))  # (B,V,4,4)
    torch.testing.assert_close(cas['P'], K504 @ cameras.rigid_inverse(rel), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cas['P_inv'], rel @ K504, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cas_unc['P'], K504, atol=1e-6, rtol=1e-6)
    assert torch.equal(cas_unc['P'], cas_unc['P_inv']) and torch.equal(cas['plucker'], cams['plucker'])


def test_clean_switches_give_the_clean_pipeline(release):
    """Same weights, same inputs: the official pipeline differs from one built with our clean conventions, each
    documented switch alone changes the output, and with every switch set back to clean it is the clean pipeline
    bit for bit (so nothing else differs)."""
    root, _ = release
    pipe = load(root)
    clean_models = {}
    for level, (net, meta) in pipe.models.items():
        clean = model.GLD(net.cfg).eval()
        clean.load_state_dict(net.state_dict())
        clean_models[level] = (clean, meta)
    clean_dec = decoder_lib.RGBDecoder(replace(pipe.dec.cfg, imagenet_output=False)).eval()
    clean_dec.load_state_dict(pipe.dec.state_dict())
    clean = pipeline.Pipeline(pipe.enc, clean_dec, clean_models, boundary=1, log=lambda *_: None)
    images, c2w, K = scene(seed=2)

    def run(p):
        return p.generate(images, c2w, K, n_src=1, steps=2, cfg_scale=1.5, seed=3)

    ref = run(clean)
    official = run(pipe)
    for level in (0, 1):
        assert not torch.allclose(official['levels'][level], ref['levels'][level], atol=1e-4)
    pipe.dec.cfg = replace(pipe.dec.cfg, imagenet_output=False)  # colour space back to clean, cameras official
    assert not torch.allclose(run(pipe)['images'], ref['images'], atol=1e-4)
    pipe.official = None  # cameras back to clean: now everything is
    out = run(pipe)
    assert all(torch.equal(a, b) for a, b in zip(out['levels'], ref['levels']))
    assert torch.equal(out['images'], ref['images'])
    pipe.dec.cfg = replace(pipe.dec.cfg, imagenet_output=True)  # colour space official, cameras clean
    out = run(pipe)
    assert torch.equal(out['levels'][1], ref['levels'][1]) and not torch.equal(out['images'], ref['images'])


# ----------------------------------------------------------------------------- every layout the release writes or reads


def quiet(*_):
    pass


@pytest.mark.parametrize('layout', ['RAE_DA3 ema', 'RAE_DA3 model', 'RAE_DA3 flat', 'stage-1 trainer', 'bare'])
def test_decoder_file_layouts_load_and_run(layout, tmp_path):
    """mae_decoder.pt as RAE_DA3.__init__ reads it ({'ema'|'model': {'decoder.*'}} or flat 'decoder.*', beside other
    modules' entries) and as the stage-1 trainer saves it ({'decoder', 'ema_decoder', ...}): the EMA weights load
    strictly and decode as the release's decoder does."""
    ema = random_state_dict(official_layout(8, 32, 2, 64, 4, 4), 6)
    live = {k: v + 1 for k, v in ema.items()}
    obj = {
        'RAE_DA3 ema': {'model': rae_state(live), 'ema': rae_state(ema)},
        'RAE_DA3 model': {'model': rae_state(ema)},
        'RAE_DA3 flat': rae_state(ema),
        'bare': ema,
        'stage-1 trainer': {'decoder': live, 'ema_decoder': ema, 'optimizer': {'state': {}}, 'step': 3},
    }[layout]
    torch.save(obj, tmp_path / 'mae_decoder.pt')
    cfg, sd = decoder_lib.convert_official(
        official.read_official(str(tmp_path / 'mae_decoder.pt'), 'decoder', quiet), heads=4
    )
    dec = decoder_lib.RGBDecoder(cfg).eval()
    dec.load_state_dict(sd, strict=True)
    levels = random_levels(2, 1, 12, 8)
    expected = official_forward(ema, torch.cat(levels, -1).flatten(0, 1), 3, 4, 4, 4, 2)
    torch.testing.assert_close(dec(levels, (3, 4))[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cascade', [False, True])
@pytest.mark.parametrize('layout', ['trainer', 'model only', 'flat', 'DDP prefixed'])
def test_model_file_layouts_load_and_run(layout, cascade, tmp_path):
    """da3_level1.pt / da3_cascade.pt as train_multiview_da3.py saves them ({'model', 'ema', 'opt', ...}) and as
    eval_gld_metric.py reads them (ema, else model, else flat; 'module.' dropped): the EMA weights run as saved."""
    cfg = replace(SMALL, heads=2, upper_dim=SMALL.latent_dim if cascade else 0, separate_embedders=not cascade)
    net = randomize(model.GLD(cfg), seed=3)
    ema = official_form(net, cascade)
    live = {k: v + 1 for k, v in ema.items()}
    obj = {
        'trainer': trainer_save(ema, live),
        'model only': {'model': ema},
        'flat': ema,
        'DDP prefixed': {'ema': {'module.' + k: v for k, v in ema.items()}},
    }[layout]
    torch.save(obj, tmp_path / 'm.pt')
    cfg2, sd = model.convert_official(
        official.read_official(str(tmp_path / 'm.pt'), 'model', quiet), cascade=cascade, heads=2
    )
    net2 = model.GLD(cfg2)
    net2.load_state_dict(sd, strict=True)
    b = make_batch(cfg, upper=cascade)
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'], official=True)
    torch.testing.assert_close(run(net2, b, cams), run(net, b, cams))


@pytest.mark.parametrize('layout', ['RAE_DA3 decoder', 'RAE_DA3 pred', 'bare'])
def test_head_file_layouts_load(layout, tmp_path):
    """dpt_decoder.pt as RAE_DA3._init_dpt_decoder reads it ({'model': {'decoder.*' | 'pred.*'}}) or a bare head:
    with the hub backbone file it loads strictly into DA3 and those are the head's weights."""
    torch.manual_seed(5)
    full = latents.build_encoder('da3-tiny').state_dict()
    head = {k[5:]: v for k, v in full.items() if k.startswith('head.')}
    obj = {
        'RAE_DA3 decoder': {'model': {'decoder.' + k: v for k, v in head.items()}},
        'RAE_DA3 pred': {'model': {'pred.' + k: v for k, v in head.items()}},
        'bare': head,
    }[layout]
    torch.save(obj, tmp_path / 'dpt_decoder.pt')
    save_file(
        {'model.' + k: v.clone() for k, v in full.items() if not k.startswith('head.')}, tmp_path / 'model.safetensors'
    )
    got = {'head.' + k: v for k, v in official.read_official(str(tmp_path / 'dpt_decoder.pt'), 'head', quiet).items()}
    enc = latents.build_encoder(
        'da3-tiny', {**official.read_official(str(tmp_path / 'model.safetensors'), 'encoder', quiet), **got}
    )
    assert all(torch.equal(v, full[k]) for k, v in enc.state_dict().items())


@pytest.mark.parametrize('layout', ['hub', 'bare'])
def test_encoder_file_layouts_load(layout, tmp_path):
    """model.safetensors in DA3's hub layout ('model.' prefix, as RAE_DA3 reads it) or with bare DA3Net keys: loads
    strictly into DA3, every tensor as saved."""
    torch.manual_seed(6)
    full = latents.build_encoder('da3-tiny').state_dict()
    save_file(
        {('model.' if layout == 'hub' else '') + k: v.clone() for k, v in full.items()}, tmp_path / 'model.safetensors'
    )
    sd = official.read_official(str(tmp_path / 'model.safetensors'), 'encoder', quiet)
    enc = latents.build_encoder('da3-tiny', sd)
    assert all(torch.equal(v, full[k]) for k, v in enc.state_dict().items())


def test_unknown_layouts_name_what_was_seen_and_what_is_known(release, tmp_path):
    root, _ = release
    with pytest.raises(
        ValueError,
        match=r"top-level keys: \['state_dict', 'step'\]; known layouts: \{'ema': state "
        r"dict, \.\.\.\}, \{'model'.*'ema_decoder'.*'decoder.'-prefixed",
    ):
        official.official_state_dict({'state_dict': {'a': torch.zeros(1)}, 'step': 1}, 'decoder', 'x.pt')
    with pytest.raises(ValueError, match=r'top-level keys: list'):
        official.official_state_dict([torch.zeros(1)], 'model', 'x.pt')
    broken = tmp_path / 'GLD'
    shutil.copytree(root, broken)
    torch.save(  # the release's 'count' and 'level' (model_stats/vggt) are skipped, another key is not
        {'mean': torch.zeros(1, C, 1, 1), 'var': torch.ones(1, C, 1, 1), 'count': 10, 'extra': torch.ones(1)},
        broken / 'model_stats' / 'da3' / 'normalization_stats_level1.pt',
    )
    with pytest.raises(ValueError, match=r'level1.pt: expected mean, var \(and std\) of 192 channels each'):
        load(broken)
    torch.save(
        {'mean': torch.zeros(1, C, 1, 1), 'var': torch.ones(1, C, 1, 1)},
        broken / 'model_stats' / 'da3' / 'normalization_stats_level1.pt',
    )  # without std: the release's reader
    torch.save(
        {'ema': {'decoder.decoder_embed.weight': torch.zeros(3, 4)}}, broken / 'pretrained_models' / 'mae_decoder.pt'
    )
    with pytest.raises(ValueError, match=r'mae_decoder.pt: does not convert .*layouts known for a decoder file'):
        load(broken)


def test_discovery_follows_the_release_layout(release, tmp_path):
    """DA3's files are picked beside VGGT's of the same names (README.md layout); VGGT's are found as VGGT's; a flat
    folder works by name; two DA3 candidates off the release paths are refused."""
    root, _ = release
    da3, vggt = official.find_official_files(str(root), 'da3'), official.find_official_files(str(root), 'vggt')
    assert {r: Path(p).relative_to(root).as_posix() for r, p in da3.items()} == official.OFFICIAL_FILES['da3']
    assert {r: Path(p).relative_to(root).as_posix() for r, p in vggt.items()} == official.OFFICIAL_FILES['vggt']
    flat = tmp_path / 'flat'
    (flat / 'sub').mkdir(parents=True)
    for p in da3.values():
        shutil.copy(p, flat / os.path.basename(p))
    (flat / 'pretrained_models' / 'vggt').mkdir(parents=True)  # VGGT's decoder still at its release path
    shutil.copy(vggt['decoder'], flat / 'pretrained_models' / 'vggt' / 'mae_decoder.pt')
    assert {r: os.path.basename(p) for r, p in official.find_official_files(str(flat)).items()} == {
        r: os.path.basename(p) for r, p in da3.items()
    }
    shutil.copy(da3['decoder'], flat / 'sub' / 'mae_decoder.pt')
    with pytest.raises(ValueError, match=r'2 candidates for da3 decoder'):
        official.find_official_files(str(flat))


# ----------------------------------------------------------------------------- the release's sampler


def release_sampling(num_steps, V, C, encoder_input_size=252, patch=14):
    """Restatement of the release's sampling (eval_gld_metric.py main, the transport's ODE on a torchdiffeq grid):
    -> (a, grid). a = sqrt(C h w V / 4096) with h = w = encoder_input_size // patch from the config; the grid is
    num_steps points of linspace(1, 0.001), each shifted to a t / (1 + (a - 1) t)."""
    a = math.sqrt(C * (encoder_input_size // patch) ** 2 * V / 4096)
    t = torch.linspace(1, 0.001, num_steps, dtype=torch.float64)
    return a, (a * t / (1 + (a - 1) * t)).tolist()


@pytest.mark.parametrize('num_steps', [2, 50])
def test_official_time_grid_is_the_releases(num_steps):
    """num_steps grid points = num_steps - 1 Euler steps, evaluated at the release's times and ending at its last."""
    V, Cl = 8, 32
    steps, a, t_end = official.OfficialConventions().time_schedule(num_steps, V, Cl)
    a_release, grid = release_sampling(num_steps, V, Cl)
    assert steps == num_steps - 1 and a == pytest.approx(a_release, rel=1e-12)
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        return torch.ones_like(x)

    x = diffusion.euler_sample(velocity, torch.zeros(1, 1, dtype=torch.float64), steps=steps, a=a, t_end=t_end)
    assert seen == pytest.approx(grid[:-1], abs=1e-12) and float(x) == pytest.approx(grid[-1] - 1, abs=1e-12)
    assert official.OfficialConventions().time_schedule(50, 8, 1536)[1] == pytest.approx(31.18, abs=0.01)


def test_official_shift_at_another_size(release, monkeypatch):
    """At 8 x 8 tokens (112 px) the official mode keeps the release's a (from its configured 18 x 18) and takes
    steps - 1 Euler steps to t = 0.001; the clean mode derives a from 8 x 8 and takes `steps` steps to 0."""
    root, _ = release
    pipe = load(root)
    calls, real = [], diffusion.euler_sample

    def spy(*args, **kw):
        calls.append((kw['steps'], kw['a'], kw['t_end']))
        return real(*args, **kw)

    monkeypatch.setitem(diffusion.SAMPLERS, 'euler', spy)
    images, c2w, K = scene(V=3, H=112, W=112)
    pipe.generate(images, c2w, K, n_src=1, steps=3, cfg_scale=1.0)
    a_release, _ = release_sampling(3, 3, C)
    assert calls == [(2, pytest.approx(a_release), 0.001)] * 2
    calls.clear()
    pipe.official = None
    pipe.generate(images, c2w, K, n_src=1, steps=3, cfg_scale=1.0)
    assert calls == [(3, pytest.approx(math.sqrt(3 * 64 * C / 4096)), 0.0)] * 2


# ====================================================================================================
# train.py, sample.py, bench.py end to end
# Integration tests of train.py, sample.py and bench.py at tiny scale on a tiny synthetic set.
# ====================================================================================================

TINY = [
    '--views',
    '4',
    '--batch-size',
    '2',
    '--steps',
    '2',
    '--log-every',
    '1',
    '--ckpt-every',
    '2',
    '--eval-every',
    '2',
    '--stats-batches',
    '1',
    '--warmup',
    '1',
]


@pytest.fixture(scope='module')
def world_runs(tmp_path_factory):
    """A tiny synthetic set (56 px, 4x4 tokens) and 2-step runs of every stage in <tmp>/runs, made once per module
    with cwd = <tmp> (the working directory is restored afterwards: tests take `world`)."""
    root = tmp_path_factory.mktemp('gld')
    synth.write_synth(str(root / 'data'), 4, 2, frames=10, size=56, seed=0)
    old = os.getcwd()
    os.chdir(root)
    try:
        return make_world_runs(root)
    finally:
        os.chdir(old)


@pytest.fixture
def world(world_runs, monkeypatch):
    """world_runs with cwd = its folder for this one test (its relative paths: runs/, out/)."""
    monkeypatch.chdir(world_runs['root'])
    return world_runs


def make_world_runs(root):
    d = ['--data', str(root / 'data')]
    runs = {
        'encoder': [
            '--stage',
            'encoder',
            '--encoder',
            'da3-tiny',
            '--seed',
            '1',
            '--lr',
            '1e-3',
            '--gap',
            '1-2',
            '--workers',
            '2',
            '--export',
            'exported',
        ],
        'decoder': [
            '--stage',
            'decoder',
            '--decoder',
            'tiny',
            '--encoder-weights',
            'auto',
            '--level-dropout',
            '0.5',
            '--noise-tau',
            '0.1',
            '--lpips',
            '--gan',
            '1',
            '--ema',
            '0.9',
            '--keep',
            '1',
            '--size',
            '42x56',
        ],
        'level1': [
            '--level',
            '1',
            '--model',
            'gld-tiny',
            '--src',
            '1-2',
            '--cam-drop',
            '0.5',
            '--t-dist',
            'logit_normal',
            '--accum',
            '2',
            '--checkpointing',
            '--decoder-ckpt',
            'auto',
        ],
        'level0': ['--level', '0', '--tau', '0.2', '--max-bad', '3', '--src-mode', 'ends'],
        'level2': ['--level', '2', '--pos', 'rope3d', '--decoder-ckpt', 'none', '--cache', '1'],
    }
    for argv in runs.values():
        train.main(d + TINY + argv)
    stats = torch.load(train.list_checkpoints('runs/level0')[-1], weights_only=False)['stats']
    from latents import LatentStats

    LatentStats.from_state_dict(stats).save(str(root / 'stats.safetensors'))
    runs['level0_ind'] = [
        '--level',
        '0',
        '--independent',
        '--stats',
        str(root / 'stats.safetensors'),
        '--resume',
        '--out',
        'runs/level0_ind',
        '--eval-every',
        '0',
    ]
    train.main(d + TINY + runs['level0_ind'])
    return {'root': root, 'data': str(root / 'data'), 'argv': runs}


def options(parser):
    return {o for a in parser._actions for o in a.option_strings if o.startswith('--') and o != '--help'}


def assert_loss_is_its_parts(name, row):
    """A training log row (one step): its loss from the parts it logs."""
    if name == 'encoder':  # DA3's geometry loss: depth, depth gradient and ray terms
        assert row['loss'] == pytest.approx(row['depth'] + row['grad'] + row['ray'], rel=1e-5)
    elif name == 'decoder':  # L1 (+ LPIPS) + 0.75 x the adaptive weight x the generator's GAN loss (--gan 1: step 2)
        gan = 0.75 * row.get('gan_weight', 0) * row.get('gan_g', 0)
        assert row['loss'] == pytest.approx(row['l1'] + row.get('lpips', 0) + gan, rel=1e-5)
    else:  # a DiT: the mean of its source and target views' losses; zero-initialised output: E|eps - x|^2 ~ 2
        assert min(row['src'], row['tgt']) <= row['loss'] <= max(row['src'], row['tgt'])
        assert 1.5 < row['loss'] < 2.5


def test_train_writes_checkpoints_logs_and_exports(world):
    for name in ['encoder', 'decoder', 'level1', 'level0', 'level2', 'level0_ind']:
        ck = train.list_checkpoints(f'runs/{name}')
        assert ck, name
        state = torch.load(ck[-1], weights_only=False)
        assert state['step'] == 2 and set(state) >= {'model', 'ema', 'optimizer', 'config', 'args', 'rng'}
        rows = [r for r in runlog.read_csv(f'runs/{name}/log.csv') if 'loss' in r]
        assert [r['step'] for r in rows] == [1, 2]
        for r in rows:
            assert_loss_is_its_parts(name, r)
    assert len(train.list_checkpoints('runs/decoder')) == 1  # --keep 1
    assert os.path.exists('runs/encoder/curves.png')
    meta, sd = pipeline.load_checkpoint('exported/encoder.safetensors')
    ck = torch.load(train.list_checkpoints('runs/encoder')[-1], weights_only=False)
    assert meta['kind'] == 'encoder' and all(
        torch.allclose(sd[k], ck['ema'][k].float(), atol=1e-2, rtol=1e-2) for k in sd
    )
    assert torch.load(train.list_checkpoints('runs/level0')[-1], weights_only=False)['upper_level'] == 1
    assert torch.load(train.list_checkpoints('runs/level0_ind')[-1], weights_only=False)['upper_level'] is None


def test_every_train_sample_bench_flag_is_exercised(world):
    used = (
        set(sum(world['argv'].values(), []))
        | set(TINY)
        | {
            '--data',
            '--out',
            '--resume',
            '--stage',
            '--level',
            '--init',
            '--compile',
            '--force',
            '--bf16',
            '--head-only',
            '--budget-minutes',
            '--schedule',
            '--min-lr',
        }
    )  # their own tests
    assert options(train.build_parser()) <= used, options(train.build_parser()) - used
    assert options(sample.build_parser()) <= set(sum(SAMPLE_RUNS, [])) | {
        '--official',
        '--encoder',
        '--sampler',
        '--official-stats',
        '--encoder-weights',
        '--view',
    }  # --official: test_cli_official; --encoder: test_every_latent_trains_...; --sampler: test_every_sampler_...;
    # --official-stats: test_hub_names_resolve_...; --encoder-weights, --view: test_view_flag_...
    bench_argv = [getattr(r, 'values', [r])[0] for r in BENCH_RUNS]  # pytest.param(argv, marks=...) -> argv
    assert options(bench.build_parser()) <= set(sum(bench_argv, [])) | set(BENCH_REPORT)  # --report: its own test


def test_init_starts_from_the_given_weights_and_statistics(world, tmp_path):
    src = train.list_checkpoints('runs/level1')[-1]
    ck = torch.load(src, weights_only=False)
    train.main(
        [
            '--data',
            world['data'],
            '--level',
            '1',
            '--views',
            '4',
            '--batch-size',
            '2',
            '--steps',
            '1',
            '--lr',
            '0',
            '--warmup',
            '1',
            '--eval-every',
            '0',
            '--init',
            src,
            '--out',
            str(tmp_path),
            '--export',
            str(tmp_path / 'x'),
        ]
    )
    new = torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=False)
    assert sorted(os.listdir(tmp_path / 'x')) == ['level1.json', 'level1.safetensors']  # named as sample.py finds it
    assert all(torch.equal(new['model'][k], ck['ema'][k]) for k in ck['ema'])  # lr 0: still the initial weights
    assert all(torch.equal(new['stats'][k], ck['stats'][k]) for k in ck['stats'])  # its normalisation, not recomputed


def test_latent_cache_holds_the_on_the_fly_latents_of_its_draws(synth_root, tmp_path, monkeypatch):
    enc = latents.build_encoder('da3-tiny').freeze()
    ds = data.SceneDataset(synth_root, 'train', num_views=4)
    cache = latent_cache.LatentCache.build(
        str(tmp_path / 'c.pt'), enc, ds, [0, 1], 0, draws=3, src=(1, 3), log=lambda *_: None
    )
    assert len(cache) == 3 * len(ds) and sorted(set(cache.n_src.tolist())) == [1, 2, 3]
    for k in (0, 5, len(cache) - 1):  # re-encode the draw's frames (sources first) on the fly
        d = cache.data
        scene, n = ds._scene(int(d['scene'][k])), int(d['n_src'][k])
        images = data.decode_frames(scene, d['frames'][k])[None]
        batch = {
            'images': images,
            'c2w': scene['c2w'][d['frames'][k]][None],
            'K': scene['K'][d['frames'][k]][None],
            'src_mask': (torch.arange(4) < n)[None],
        }
        fly, got = latents.encode_batch(enc, batch, [0, 1], 0), cache.batch([k])
        for a_, b_ in [(fly['full'][0], got['full'][0]), (fly['full'][1], got['full'][1]), (fly['cond'], got['cond'])]:
            assert torch.allclose(a_, b_, rtol=1e-3, atol=1e-3 * float(a_.abs().max()))  # float16 storage
        assert torch.equal(batch['c2w'], got['c2w']) and torch.equal(batch['src_mask'], got['src_mask'])
        assert not got['cond'][:, n:].any()  # targets carry no condition (leakage-free)
    # the file is tied to the encoder: same weights -> same file (loaded, nothing encoded); other weights -> another
    same = latent_cache.LatentCache.path_for('c', enc, synth_root, 4, 3, [0, 1], 0, (1, 3), 'random', 0)
    other = latent_cache.LatentCache.path_for(
        'c', latents.build_encoder('da3-tiny'), synth_root, 4, 3, [0, 1], 0, (1, 3), 'random', 0
    )
    assert same != other and same == latent_cache.LatentCache.path_for(
        'c', enc, synth_root, 4, 3, [0, 1], 0, (1, 3), 'random', 0
    )
    monkeypatch.setattr(enc, 'encode', lambda *a, **k: pytest.fail('an existing cache must not be rebuilt'))
    latent_cache.LatentCache.build(str(tmp_path / 'c.pt'), enc, ds, [0, 1], 0, draws=3, src=(1, 3), log=lambda *_: None)


def test_latent_cache_batches_one_source_count_each_draw_once_per_epoch():
    cache = latent_cache.LatentCache.__new__(latent_cache.LatentCache)
    cache.n_src = torch.tensor([1, 2, 3, 4] * 12)
    full = cache.batches(3, epoch=0)
    flat = sum(full, [])
    assert len(flat) == len(set(flat)) == 48 and all(len({int(cache.n_src[i]) for i in b}) == 1 for b in full)
    assert cache.batches(3, epoch=0) == full and cache.batches(3, epoch=1) != full
    r0, r1 = cache.batches(3, 0, rank=0, world=2), cache.batches(3, 0, rank=1, world=2)
    assert sorted(r0 + r1) == sorted(full) and not set(map(tuple, r0)) & set(map(tuple, r1))


def train_reference_and_fast(world, tmp_path, flag):
    """Three M1 steps as the plain reference and with a fast-path flag -> (reference, fast) run folders."""
    base = [
        '--data',
        world['data'],
        '--level',
        '1',
        '--views',
        '4',
        '--batch-size',
        '2',
        '--steps',
        '3',
        '--log-every',
        '1',
        '--eval-every',
        '0',
        '--stats-batches',
        '1',
        '--warmup',
        '1',
        '--lr',
        '1e-3',
        '--cam-drop',
        '0',
    ]
    train.main(base + ['--out', str(tmp_path / 'ref')])
    train.main(base + ['--out', str(tmp_path / 'fast'), flag])
    return tmp_path / 'ref', tmp_path / 'fast'


@pytest.mark.slow
def test_compiled_training_matches_eager(world, tmp_path):
    """train.py --compile (the fast path) takes the same steps as eager (the reference), to float tolerance."""
    eager, comp = (runlog.read_csv(d / 'log.csv') for d in train_reference_and_fast(world, tmp_path, '--compile'))
    assert [r['loss'] for r in comp] == pytest.approx([r['loss'] for r in eager], rel=1e-4)


def test_cpu_bf16_training_follows_fp32(world, tmp_path):
    """train.py --bf16 (CPU autocast, the fast path on AMX CPUs) takes the steps of fp32 (the reference) to bf16 precision."""
    dirs = train_reference_and_fast(world, tmp_path, '--bf16')
    ref, low = (runlog.read_csv(d / 'log.csv') for d in dirs)
    assert [r['loss'] for r in low] == pytest.approx([r['loss'] for r in ref], rel=1e-2)
    a, b = (torch.load(train.list_checkpoints(str(d))[-1], weights_only=False)['model'] for d in dirs)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run: bf16 matmuls change the weights a little


# every stage that trains, with the flags that draw random numbers: decoder noise, level dropout, camera dropout, tau
RESUME_RUNS = {
    'encoder': ['--stage', 'encoder', '--encoder', 'da3-tiny'],
    'vae': ['--stage', 'encoder', '--encoder', 'vae-tiny', '--size', '112x112', '--views', '3', '--batch-size', '1'],
    'decoder': ['--stage', 'decoder', '--level-dropout', '0.5'],
    'decoder_noise': ['--stage', 'decoder', '--noise-tau', '0.5'],
    'level1': ['--level', '1', '--cam-drop', '0.5', '--decoder-ckpt', 'none'],
    'level0': ['--level', '0', '--tau', '0.5', '--cam-drop', '0.5', '--decoder-ckpt', 'none'],
    # not yet: train.py's checkpoints hold neither the discriminator nor its optimizer (strict: a fix turns it red)
    'decoder_gan': ['--stage', 'decoder', '--gan', '0'],
}


@pytest.mark.parametrize('flags', RESUME_RUNS.values(), ids=RESUME_RUNS.keys())
def test_resume_continues_exactly(flags, small_data, tmp_path, monkeypatch):
    """Two steps in one run == one step, then --resume to two: the logged losses, the weights, the EMA and its update
    count, the optimizer and the run's random stream, bit for bit, for every stage that trains."""
    monkeypatch.chdir(tmp_path)  # 'auto' finds no runs/encoder here: the bundled encoder
    base = ['--data', str(small_data), *TRAIN_FAST, '--log-every', '1', '--ckpt-every', '1', '--lr', '1e-3']
    base += flags
    train.main(base + ['--steps', '2', '--out', 'a'])
    train.main(base + ['--steps', '1', '--out', 'b'])
    train.main(base + ['--steps', '2', '--out', 'b', '--resume'])
    la = runlog.read_csv(tmp_path / 'a' / 'log.csv')
    lb = runlog.read_csv(tmp_path / 'b' / 'log.csv')
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]
    a = torch.load(train.list_checkpoints('a')[-1], weights_only=False)
    b = torch.load(train.list_checkpoints('b')[-1], weights_only=False)
    assert a['step'] == b['step'] == 2 and a['ema_updates'] == b['ema_updates'] == 2
    for key in ('model', 'ema', 'optimizer'):
        assert same_state(a[key], b[key]), key
    assert torch.equal(a['rng'][0]['gen'], b['rng'][0]['gen'])  # the run's own stream drew the same numbers


def test_budget_minutes_ends_the_run_as_steps_would_and_resume_carries_the_clock(small_data, tmp_path, monkeypatch):
    """--budget-minutes: the first step whose clock reaches the budget is the last (its checkpoint, its log row, the
    export); --resume continues the clock from the checkpoint. The clock is made to read 30 s a step."""
    monkeypatch.chdir(tmp_path)
    reads = iter(range(0, 10**6, 30))

    def thirty_seconds_a_step():
        return next(reads)

    fake_time = argparse.Namespace(
        process_time=thirty_seconds_a_step, perf_counter=thirty_seconds_a_step, time=time.time
    )
    monkeypatch.setattr(runlog, 'time', fake_time)
    base = ['--data', str(small_data), *TRAIN_FAST, '--level', '1', '--steps', '10', '--out', 'r']
    train.main(base + ['--budget-minutes', '1.2', '--export', 'mine'])
    ck = torch.load(train.list_checkpoints('r')[-1], weights_only=True)
    assert ck['step'] == 3 and ck['train_min'] == 1.5  # 0.5, 1.0, 1.5 >= 1.2
    assert runlog.read_csv('r/log.csv')[-1]['train_min'] == 1.5
    assert os.path.isfile('mine/level1.safetensors')
    train.main(base + ['--budget-minutes', '2.2', '--resume'])
    ck = torch.load(train.list_checkpoints('r')[-1], weights_only=True)
    assert ck['step'] == 5 and ck['train_min'] == 2.5


def test_lr_schedule_warms_up_then_holds_or_follows_the_cosine_to_min_lr():
    args = train.get_args(['--level', '1', '--lr', '1.0', '--warmup', '10', '--steps', '110'])
    assert args.schedule == 'constant'  # the diffusion recipe (paper Tab. 11)
    assert [train.lr_at(s, args) for s in (0, 9, 10, 60, 110)] == [0.1, 1.0, 1.0, 1.0, 1.0]
    args = train.get_args(['--level', '1', '--lr', '1.0', '--warmup', '10', '--steps', '110', '--schedule', 'cosine'])
    args.min_lr = 0.1
    lrs = [train.lr_at(s, args) for s in (10, 60, 110, 200)]
    assert lrs == pytest.approx([1.0, 0.55, 0.1, 0.1])


def _ddp_worker(rank, port, argv):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train.main(argv)


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(world, tmp_path):
    """gloo, 2 ranks x batch 1 == 1 rank x batch 2 == 1 rank x batch 1 x accum 2 (level dropout off: deterministic)."""
    base = [
        '--data',
        world['data'],
        '--stage',
        'decoder',
        '--views',
        '4',
        '--steps',
        '3',
        '--log-every',
        '1',
        '--ckpt-every',
        '3',
        '--eval-every',
        '0',
        '--level-dropout',
        '0',
        '--lr',
        '1e-3',
        '--warmup',
        '1',
    ]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(
        _ddp_worker, args=(port, base + ['--batch-size', '1', '--out', str(tmp_path / 'ddp')]), nprocs=2
    )
    train.main(base + ['--batch-size', '2', '--out', str(tmp_path / 'one')])
    train.main(base + ['--batch-size', '1', '--accum', '2', '--out', str(tmp_path / 'acc')])

    def load(n):
        return torch.load(train.list_checkpoints(str(tmp_path / n))[-1], weights_only=False)['model']

    ddp, one, acc = load('ddp'), load('one'), load('acc')

    def dist(x, y):
        return torch.sqrt(sum(((x[k] - y[k]).float() ** 2).sum() for k in y))

    # the same global batch on one rank but half of it (rank 0's sample alone) is the scale of a real mismatch
    train.main(base + ['--batch-size', '1', '--out', str(tmp_path / 'half')])
    scale = dist(load('half'), one)
    assert scale > 1e-3
    # Adam turns float-reduction noise on near-zero gradients into small steps, hence a relative tolerance
    assert dist(ddp, one) < 0.02 * scale and dist(acc, one) < 0.02 * scale, (dist(ddp, one), dist(acc, one), scale)

    def first(n):  # step 1: the same weights everywhere
        return runlog.read_csv(tmp_path / n / 'log.csv')[0]['loss']

    assert first('ddp') == pytest.approx(first('one'), rel=1e-5) != first('half')  # the mean over ranks, not rank 0's


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
    argv = [
        '--data',
        world['data'],
        '--stage',
        'decoder',
        '--views',
        '4',
        '--batch-size',
        '2',
        '--log-every',
        '1',
        '--ckpt-every',
        '1',
        '--eval-every',
        '0',
        '--out',
        str(tmp_path),
    ]
    train.main(argv + ['--steps', '1'])
    before = torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=False)['model']
    monkeypatch.setattr(train.decoder_lib, 'decoder_loss', lambda pred, gt, lpips=None: (pred.sum() * float('nan'), {}))
    with pytest.raises(SystemExit, match='non-finite'):
        train.main(argv + ['--steps', '5', '--resume', '--max-bad', '2'])
    after = torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=False)
    assert after['step'] == 1 and all(torch.equal(before[k], after['model'][k]) for k in before)


SAMPLE_RUNS = [
    [
        '--ckpt-dir',
        'runs',
        '--views',
        '4',
        '--src',
        '2',
        '--scene',
        '0',
        '--seed',
        '1',
        '--cfg-scale',
        '2.0',
        '--lpips',
        '--steps',
        '2',
        '--out',
        'out/a',
        '--data',
        'DATA',
        '--split',
        'test',
    ],
    [
        '--ckpt-dir',
        'runs',
        '--views',
        '4',
        '--steps',
        '2',
        '--eval',
        '--eval-scenes',
        '1',
        '--out',
        'out/eval',
        '--data',
        'DATA',
    ],
    [
        '--ckpt-dir',
        'runs',
        '--images',
        'IM1',
        'IM0',
        '--cameras',
        'CAMS',
        '--size',
        '56x56',
        '--traj',
        'orbit',
        '--arc',
        '360',
        '--frames',
        '3',
        '--chunk',
        '2',
        '--steps',
        '2',
        '--out',
        'out/c',
        '--export',
        'ply,colmap,nerfstudio',
    ],
    [
        '--ckpt-dir',
        'runs',
        '--images',
        'IM0',
        'IM1',
        '--keep-estimate',
        '--traj',
        'spiral',
        '--frames',
        '2',
        '--steps',
        '2',
        '--out',
        'out/d',
    ],
    [
        '--ckpt-dir',
        'runs',
        '--views',
        '4',
        '--steps',
        '2',
        '--traj',
        'forward',
        '--frames',
        '2',
        '--out',
        'out/e',
        '--data',
        'DATA',
    ],
    [
        '--ckpt-dir',
        'runs',
        '--views',
        '4',
        '--steps',
        '2',
        '--boundary',
        '2',
        '--independent',
        '--out',
        'out/f',
        '--data',
        'DATA',
    ],
    ['--ckpt-dir', 'runs', '--recon', '--eval-scenes', '1', '--out', 'out/recon', '--data', 'DATA'],
]
BENCH_RUNS = [
    [
        '--preset',
        'gld-tiny',
        '--encoder',
        'da3-tiny',
        '--decoder',
        'tiny',
        '--views',
        '2',
        '--size',
        '28',
        '--batch',
        '1',
        '--dtype',
        'bf16',
        '--checkpointing',
        '--device',
        'cpu',
        '--iters',
        '1',
        '--warmup',
        '0',
    ],
    [
        '--views',
        '2',
        '--size',
        '28',
        '--batch',
        '1',
        '--iters',
        '1',
        '--warmup',
        '0',
        '--dtype',
        'fp32,bf16',
        '--skip',
        'frozen',
    ],
    pytest.param(
        [
            '--views',
            '2',
            '--size',
            '28',
            '--batch',
            '1',
            '--iters',
            '1',
            '--warmup',
            '1',
            '--compile',
            '--skip',
            'sample,frozen',
        ],
        marks=pytest.mark.slow,
    ),
]


@pytest.fixture(scope='module')
def user_images(world_runs):
    """Two images and a nerfstudio transforms.json written from a test scene."""
    ds = data.SceneDataset(world_runs['data'], split='test', num_views=4, eval=True)
    s = ds[0]
    folder = world_runs['root'] / 'user'
    folder.mkdir(exist_ok=True)
    frames = []
    for v in range(2):
        export.save_image(s['images'][v], str(folder / f'im{v}.png'))
        Kp = cameras.K_to_pixels(s['K'][v], 56, 56)
        frames.append(
            {
                'file_path': f'im{v}.png',
                'transform_matrix': cameras.opengl_to_opencv(s['c2w'][v]).tolist(),
                'fl_x': float(Kp[0, 0]),
                'fl_y': float(Kp[1, 1]),
                'cx': float(Kp[0, 2]),
                'cy': float(Kp[1, 2]),
                'w': 56,
                'h': 56,
            }
        )
    (folder / 'transforms.json').write_text(json.dumps({'frames': frames}))
    return folder


@pytest.mark.parametrize('i', range(len(SAMPLE_RUNS)))
def test_sample_runs_and_writes_every_output(world, user_images, i):
    argv = [
        {
            'DATA': world['data'],
            'IM0': str(user_images / 'im0.png'),
            'IM1': str(user_images / 'im1.png'),
            'CAMS': str(user_images / 'transforms.json'),
        }.get(x, x)
        for x in SAMPLE_RUNS[i]
    ]
    res = sample.main(argv)
    out = argv[argv.index('--out') + 1]
    files = set(os.listdir(out))
    args = sample.build_parser().parse_args(argv)
    if '--recon' in argv:
        table = json.loads(Path(out, 'recon.json').read_text())
        assert set(table) == {'all levels', 'level 0', 'level 1', 'level 2', 'level 3'}
        # recomputed: the first scene's views through the trained encoder and decoder, all levels and level 0 alone
        enc, dec = sample.load_decoder(args, 'cpu')
        images = data.collate_one(sample.read_dataset(args)[0])['images']
        levels = enc.normalize_levels(enc.encode(images))
        level0 = torch.tensor([[True, False, False, False]])
        for name, keep in (('all levels', None), ('level 0', level0)):
            psnr = metrics.psnr(dec(levels, (4, 4), keep=keep), images).mean()
            assert table[name]['psnr'] == pytest.approx(float(psnr), abs=1e-4), name
        return
    if '--eval' in argv:
        assert {'eval_n2.md', 'eval_n2.json', 'eval_n2_scenes.csv'} <= files
        table = json.loads(Path(out, 'eval_n2.json').read_text())
        assert {'gld', 'nearest source', 'mean colour', 'da3 on gt images'} <= set(table)
        return
    assert {'grid.png', 'depth.npy', 'points.ply', 'transforms.json', 'images', 'depth_000.png', 'video.mp4'} <= files
    targets = [f for f in os.listdir(os.path.join(out, 'images')) if f.startswith('target_')]
    if '--traj' not in argv:
        m = json.loads(Path(out, 'metrics.json').read_text())
        n_src = sample.count_sources(args)
        truth = sample.dataset_scene(args, n_src, 'cpu')['images'][:, n_src:]  # the scene's true target views
        psnr = metrics.psnr(res['images'][:, n_src:], truth).mean()
        assert m['gld']['psnr'] == pytest.approx(float(psnr), abs=1e-4) and 'ate' in m['gld']
    tf = json.loads(Path(out, 'transforms.json').read_text())
    assert len(tf['frames']) == len(targets) + 2


@pytest.mark.parametrize('pos', ['rope3d', 'prope'])
def test_flops_per_token_matches_a_counted_forward(pos):
    """bench.py's TFLOP/s and MFU rest on model.flops_per_token: it must agree with PyTorch's FLOP counter on a real
    forward (matmuls, linears and SDPA; the formula leaves out PRoPE's 4x4 transforms, which are O(D) per token)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = replace(model.PRESETS['gld-tiny'], pos=pos)
    b = make_batch(cfg, B=1, V=4, hw=(4, 4))
    cams = latents.camera_inputs(b['c2w'], b['K'], b['src'], b['hw'])
    with FlopCounterMode(display=False) as counter:
        model.GLD(cfg)(b['x_t'], b['t'], b['cond'], cams)
    assert counter.get_total_flops() == pytest.approx(model.flops_per_token(cfg, 4 * 16) * 4 * 16, rel=0.02)


@pytest.mark.parametrize('argv', BENCH_RUNS)
def test_bench_runs(argv):  # runs every flag; the FLOP count it reports is checked just above
    """Each train row's rates from its time: samples and tokens per second, and TFLOP/s of 3x the forward FLOPs
    (forward + backward) of its tokens."""
    rows = bench.main(argv)
    a = bench.parse_args(argv)
    V = a.views
    T = (a.size // 14) ** 2
    flops = 3 * model.flops_per_token(model.PRESETS[a.preset], V * T) * a.batch * V * T
    train_rows = [r for r in rows if r['part'].startswith('train step')]
    assert train_rows
    for r in train_rows:
        seconds = r['ms'] / 1e3
        assert r['samples_per_s'] == pytest.approx(a.batch / seconds)
        assert r['tokens_per_s'] == pytest.approx(a.batch * V * T / seconds)
        assert r['tflops'] == pytest.approx(flops / seconds / 1e12)


# the suite at tiny size; compiling is left out (minutes on CPU; BENCH_RUNS's slow run compiles the same blocks)
BENCH_REPORT = ['--suite', 'cpu', '--views', '2', '--size', '28', '--batch', '1', '--iters', '1', '--warmup', '0']
BENCH_REPORT += ['--steps', '2', '--skip', 'frozen,compile', '--report', 'REPORT']


def test_bench_report_measures_against_the_machine_and_checks_the_fast_path(tmp_path):
    """bench.py --report: the JSON's rows (training and Euler step in fp32 and bf16, the scene stage by stage), each
    fraction_of_peak over the matmul peak of its dtype measured in the same run, and the fast path (bf16) within its
    bounds of fp32 on the same batch; the markdown beside it holds both tables."""
    path = tmp_path / 'bench.json'
    bench.main([str(path) if x == 'REPORT' else x for x in BENCH_REPORT])
    report = json.loads(path.read_text())
    machine = report['machine']
    assert machine['threads'] == torch.get_num_threads() and machine['torch'] == torch.__version__
    assert machine['peak_tflops'] == machine['matmul_tflops'] and min(machine['matmul_tflops'].values()) > 0
    rows = report['rows']
    assert all({'part', 'dtype', 'compiled', 'tflops', 'fraction_of_peak'} <= set(r) for r in rows)
    steps = [r for r in rows if r['part'] in ('train step', 'Euler step, cfg')]
    assert {(r['part'], r['dtype'], r['compiled']) for r in steps} == {
        (part, dtype, False) for part in ('train step', 'Euler step, cfg') for dtype in ('fp32', 'bf16')
    }
    for r in steps:
        tokens = 2 * (28 // constants.PATCH) ** 2  # V=2 views of 2x2 tokens, batch 1
        assert r['tflops'] > 0 and r['tokens_per_s'] == pytest.approx(tokens / (r['ms'] / 1e3))
        assert r['fraction_of_peak'] == pytest.approx(r['tflops'] / machine['peak_tflops'][r['dtype']])
    scene = {r['part'].split(': ')[1]: r['s'] for r in rows if r['part'].startswith('scene, 2 steps')}
    assert set(scene) == {'encode', 'M1', 'M1->0', 'propagate', 'decode', 'geometry', 'total'}
    assert scene['total'] == pytest.approx(sum(s for stage, s in scene.items() if stage != 'total'))
    checks = {c['check']: c for c in report['checks']}
    assert set(checks) == set(bench.CHECKS) and all(c['pass'] for c in checks.values())
    # bf16 is a different computation: the differences are there, and small
    assert 0 < checks['loss relative difference']['value'] < 1e-3
    assert 0.999 < checks['gradient cosine']['value'] < 1
    assert 1e-4 < checks['4-step sample relative error']['value'] < 2e-2
    text = path.with_suffix('.md').read_text()
    assert '| train step | bf16 | False |' in text and '| gradient cosine |' in text


def test_bench_gpu_suite_is_the_papers_m1_and_needs_a_gpu():
    a = bench.parse_args(['--report', 'r.json', '--suite', 'gpu', '--device', 'cuda'])
    tokens = a.views * (a.size // constants.PATCH) ** 2
    assert (a.preset, tokens, a.batch, a.dtype, a.compile, a.steps) == ('gld-paper', 10368, 1, 'bf16', True, 50)
    assert a.checkpointing_runs == [False, True] and (a.encoder, a.decoder) == ('da3-base', 'xl')
    assert bench.parse_args(['--report', 'r.json', '--suite', 'gpu', '--views', '4', '--device', 'cuda']).views == 4
    with pytest.raises(cli.UserError, match='--suite gpu: .* needs a CUDA GPU'):
        bench.parse_args(['--report', 'r.json', '--suite', 'gpu', '--device', 'cpu'])


def test_ground_truth_latents_decode_like_the_decoder(world):
    """With ground-truth levels 0 and 1 in place of the diffusion models, the pipeline's target views equal the
    decoder's own reconstruction up to propagation with the first source's token 0 (checks cameras, view order,
    propagation and decoding together)."""
    pipe = pipeline.load_pipeline('runs')
    ds = data.SceneDataset(world['data'], split='test', num_views=4, eval=True)
    scene = data.split_views(data.collate_one(ds[0]), 2, mode='ends')
    images = scene['images']
    full = pipe.enc.encode(images)
    out = pipe.generate(images, scene['c2w'], scene['K'], 2, steps=1, given={0: full[0], 1: full[1]})
    recon = pipe.dec(pipe.enc.normalize_levels(full), (4, 4)).clamp(0, 1)
    err = (out['images'] - recon).abs().max()
    # levels 0 and 1 are exact; 2 and 3 are propagated from level 1 (token 0 from the first source alone)
    own = pipe.enc.propagate(full[1], 1, pipe.enc.encode(images, return_cls=True)[1][1], (4, 4))
    assert torch.allclose(own[0], full[2], atol=1e-4) and torch.allclose(own[1], full[3], atol=1e-4)
    assert metrics.psnr(out['images'], recon).min() > 30, float(err)


def test_sample_bad_inputs_name_the_file_and_the_fix(world, user_images, tmp_path, monkeypatch):
    def run(*args):
        return sample.main(['--ckpt-dir', 'runs', '--steps', '1', '--out', str(tmp_path / 'o'), *args])

    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not an image')
    with pytest.raises(cli.UserError, match='bad.png: cannot read the image'):
        run('--images', str(bad))
    other = tmp_path / 'other.png'
    shutil.copy(user_images / 'im0.png', other)
    with pytest.raises(cli.UserError, match=r'no camera for .*other.png'):
        run('--images', str(other), '--cameras', str(user_images / 'transforms.json'))
    tf = json.loads((user_images / 'transforms.json').read_text())
    tf['frames'][0]['transform_matrix'][0][3] = float('nan')
    (tmp_path / 'nan.json').write_text(json.dumps(tf))
    with pytest.raises(cli.UserError, match='NaN'):
        run(
            '--images',
            str(user_images / 'im0.png'),
            str(user_images / 'im1.png'),
            '--cameras',
            str(tmp_path / 'nan.json'),
        )
    monkeypatch.setattr(pipeline, 'WEIGHTS', str(tmp_path / 'no_weights'))
    with pytest.raises(cli.UserError, match='create it with: python train.py --stage encoder'):
        pipeline.load_pipeline(str(tmp_path / 'no_runs'))


def test_ema_warmup_follows_the_num_updates_rule():
    """d_n = min(decay, (1 + n) / (10 + n)): a short run's average leaves the (zero-initialised) start quickly."""
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.zero_()
    ema, expected = diffusion.EMA(net, decay=0.9995), 0.0
    net.weight.data.fill_(1.0)
    for n in range(50):
        ema.update(net)
        d = min(0.9995, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * 1.0
    assert float(ema.state_dict()['weight']) == pytest.approx(expected, abs=1e-6) and expected > 0.99
    ema.load_state_dict(ema.state_dict(), num_updates=7)
    assert ema.num_updates == 7


# ====================================================================================================
# the bundled tiny models (weights/tiny): the embedded default and its quality floor
# ====================================================================================================


@pytest.fixture(scope='module')
def bundled(tmp_path_factory):
    """The bundled pipeline and the first two test scenes of the default synthetic set (regenerated: same seeds)."""
    root = tmp_path_factory.mktemp('bundled')
    synth.write_synth(str(root), 0, 2, frames=24, size=112, seed=0)
    pipe = pipeline.load_pipeline(None)  # weights/tiny, found relative to sample.py
    ds = data.SceneDataset(str(root), split='test', eval=True)
    scenes = [data.split_views(data.collate_one(ds[i]), 2, mode='ends') for i in range(2)]
    return pipe, scenes


QUALITY_MARGIN_DB = 2.0  # measured: +4.42 and +3.07 dB over the nearest source view on these two scenes (10 steps)


def test_bundled_cascade_beats_the_nearest_source_view(bundled):
    """The quality floor: on 2 fixed test scenes with 10 Euler steps, the cascade's targets beat copying the nearest
    source view by a margin measured on the bundled models (README, Results)."""
    pipe, scenes = bundled
    for i, scene in enumerate(scenes):
        rows, _ = metrics.evaluate_scene(pipe, scene, 2, steps=10, cfg_scale=1.5, seed=i)
        assert rows['gld']['psnr'] > rows['nearest source']['psnr'] + QUALITY_MARGIN_DB, rows


def test_default_sampler_is_the_bundled_models_posterior_mean_and_the_papers_otherwise(capsys):
    """--steps / --cfg-scale left unset: 1 step without CFG for the bundled tiny models (with a note), the paper's 50
    steps with CFG 1.5 for a user's runs, the release and other encoders; a value given is kept."""
    cases = [
        ([], (1, 1.0)),
        (['--ckpt-dir', 'runs'], (50, 1.5)),
        (['--official', 'REL'], (50, 1.5)),
        (['--encoder', 'vggt-tiny'], (50, 1.5)),
        (['--steps', '50', '--cfg-scale', '1.5'], (50, 1.5)),
        (['--ckpt-dir', 'runs', '--steps', '1'], (1, 1.5)),
    ]
    for argv, want in cases:
        a = sample.build_parser().parse_args(argv)
        sample.default_sampler(a)
        assert (a.steps, a.cfg_scale) == want, argv
    assert capsys.readouterr().out.count('posterior mean') == 1  # the note comes with the bundled default only


def test_every_sampler_runs_through_sample_py_and_mean_is_the_bundled_default(small_data, tmp_path):
    """sample.py --sampler NAME for every diffusion.SAMPLERS entry on the bundled models: the bundled default (1 Euler
    step, no CFG) and --sampler mean give the same images bit for bit; --sampler mean refuses --steps/--cfg-scale."""
    base = ['--data', str(small_data), '--views', '4', '--export', '']
    images = {}
    for name in diffusion.SAMPLERS:
        images[name] = sample.main(base + ['--sampler', name, '--out', str(tmp_path / name)])['images']
        assert torch.isfinite(images[name]).all(), name
    assert torch.equal(images['mean'], images['euler'])
    with pytest.raises(cli.UserError, match='--sampler mean'):
        sample.main(base + ['--sampler', 'mean', '--steps', '4', '--out', str(tmp_path / 'refused')])
    a = sample.build_parser().parse_args(['--sampler', 'mean', '--official', 'REL'])
    sample.default_sampler(a)
    assert (a.steps, a.cfg_scale) == (2, 1.0)  # the release counts time-grid points: 2 = one step


def test_bundled_default_sampler_beats_the_nearest_source_view_by_3_db(bundled):
    """The bundled default (the posterior mean, one Euler step per level) on 2 fixed test scenes: at least 3 dB over
    copying the nearest source view (the bar of issue 13; measured: +5.17 and +3.60 dB)."""
    pipe, scenes = bundled
    steps, cfg_scale = sample.SAMPLER_DEFAULTS['bundled']
    for i, scene in enumerate(scenes):
        rows, _ = metrics.evaluate_scene(pipe, scene, 2, steps=steps, cfg_scale=cfg_scale, seed=i)
        assert rows['gld']['psnr'] > rows['nearest source']['psnr'] + 3.0, rows


def test_bundled_evaluation_reprojects_the_sources_with_depth_in_the_cameras_units(bundled):
    """The reprojection baseline on 2 fixed test scenes: DA3's depth on the sources, rescaled as the exports rescale it,
    is within 1.5x of the exact depth (measured: median ratio 0.80 and 1.16; unscaled 0.30 and 0.35), and the sources
    warped with it beat the mean colour by 1.5 dB (measured: +3.7 and +3.0 dB)."""
    pipe, scenes = bundled
    steps, cfg_scale = sample.SAMPLER_DEFAULTS['bundled']
    for i, scene in enumerate(scenes):
        depth = metrics.source_depth(pipe.enc, scene['images'][:, :2], scene['c2w'][:, :2], scene['K'][:, :2])
        ratio = (depth / scene['depths'][:, :2]).median()
        assert 1 / 1.5 < ratio < 1.5, ratio
        rows, _ = metrics.evaluate_scene(pipe, scene, 2, steps=steps, cfg_scale=cfg_scale, seed=i)
        assert rows['reprojection']['psnr'] > rows['mean colour']['psnr'] + 1.5, rows


def test_seen_tool_pools_the_error_of_the_masked_pixels_alone():
    """tools/seen.py's PSNR of a part: one MSE over exactly the masked pixels (errors of 0.1 there, 0.5 elsewhere)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tools', 'seen.py')
    spec = importlib.util.spec_from_file_location('seen', path)
    seen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seen)
    mask = torch.zeros(2, 3, 1, 4, 5, dtype=torch.bool)  # (B,M,1,H,W)
    mask[0, :, :, :2] = True
    truth = torch.zeros(2, 3, 3, 4, 5)
    pred = torch.where(mask, 0.1, 0.5).expand_as(truth)
    assert seen.pooled_psnr(pred, truth, mask) == pytest.approx(20.0)
    assert seen.pooled_psnr(pred, truth, ~mask) == pytest.approx(-20 * math.log10(0.5))


def test_bundled_decoder_decodes_each_single_level_better_than_the_mean_image(bundled):
    """Level-wise dropout made every single level decodable (paper Tab. 6): each beats the per-image mean colour."""
    pipe, scenes = bundled
    images = scenes[0]['images']
    levels = pipe.enc.normalize_levels(pipe.enc.encode(images))
    out = decoder_lib.reconstruct_per_level(pipe.dec, levels, (8, 8))
    mean_psnr = metrics.psnr(images.mean((-2, -1), keepdim=True).expand_as(images), images).mean()
    for level in ['all', 0, 1, 2, 3]:  # measured: 26.03-26.87 dB against 14.85 dB for the mean image
        assert metrics.psnr(out[level].clamp(0, 1), images).mean() > mean_psnr + 5.0, level


def read_ply_points(path):
    header, body = path.read_bytes().split(b'end_header\n')
    v = np.frombuffer(body, dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('r', 'u1'), ('g', 'u1'), ('b', 'u1')])
    return torch.from_numpy(np.stack([v['x'], v['y'], v['z']], -1).astype(np.float64))


def cross_view_depth_error(points, c2w, K, depths):
    """Median relative depth error of the points projected into every ground-truth view, where they land in the image."""
    V, H, W = depths.shape
    errs = []
    for u in range(V):
        w2c = cameras.c2w_to_w2c(c2w[u].double())
        p = points @ w2c[:3, :3].T + w2c[:3, 3]
        uv = p @ cameras.K_to_pixels(K[u].double(), H, W).T
        z = uv[:, 2]
        x, y = (uv[:, 0] / z).floor().long(), (uv[:, 1] / z).floor().long()
        ok = (z > 0) & (x >= 0) & (x < W) & (y >= 0) & (y < H)
        gz = depths[u].double()[y[ok], x[ok]]
        errs.append(((z[ok] - gz) / gz).abs())
    return torch.cat(errs).median()


def test_exported_point_cloud_reprojects_into_the_ground_truth_views(bundled, tmp_path):
    """sample.write_outputs' points.ply, fed the true depth and cameras as its geometry, lands at the true depth in the
    other ground-truth views (occlusions make a few points disagree); flipped depth does not, and depth off by a global
    scale is brought back by the sources' photo-consistency (export.depth_scale)."""
    pipe, scenes = bundled
    s = scenes[0]
    images, c2w, K, depths = s['images'], s['c2w'], s['K'], s['depths']
    res = {'images': images, 'geometry': {'depth': depths, 'depth_conf': torch.ones_like(depths), 'c2w': c2w, 'K': K}}
    sample.write_outputs(str(tmp_path / 'ok'), images, res, c2w, K, 2)
    err = cross_view_depth_error(read_ply_points(tmp_path / 'ok' / 'points.ply'), c2w[0], K[0], depths[0])
    assert err < 0.01, float(err)  # measured: 0.0034
    errs = {}
    for name, wrong in [('flipped', depths.flip(-1)), ('scaled', depths * 1.25)]:  # pixel layout, metric scale
        res['geometry']['depth'] = wrong
        sample.write_outputs(str(tmp_path / name), images, res, c2w, K, 2)
        errs[name] = cross_view_depth_error(read_ply_points(tmp_path / name / 'points.ply'), c2w[0], K[0], depths[0])
    assert errs['flipped'] > 0.05 and errs['scaled'] < 0.01, errs
    with open(tmp_path / 'scaled' / 'transforms.json') as f:
        assert json.load(f)['gld_depth_scale'] == pytest.approx(0.8, rel=0.02)


def test_flow_loss_bins_by_t_add_up_to_the_loss():
    x, mask = torch.randn(6, 3, 4, 8), torch.tensor([[True, False, False]] * 6)
    t = torch.tensor([0.05, 0.3, 0.3, 0.6, 0.9, 0.99])
    loss, parts = diffusion.flow_loss(
        lambda x_t, t_: torch.zeros_like(x_t), x, mask, t=t, generator=torch.Generator().manual_seed(0)
    )
    assert parts['t_bin_count'].tolist() == [1, 2, 1, 2]
    torch.testing.assert_close(parts['t_bin_sum'].sum() / 6, loss)


# ====================================================================================================
# export.py: the scene in the formats other tools open, read back by those tools (pycolmap, imageio) or
# by small independent readers written here from the format specifications
# ====================================================================================================


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A synthetic scene with exact depth and cameras (2 sources, 3 targets at 56 x 56), written in every format.
    DA3's cameras are the true ones, so the depth scale is exactly 1 and the points lie on the true surfaces."""
    s = synth.synth_scene(3, frames=5, size=56)
    order = [0, 4, 1, 2, 3]  # sources (the clip's ends) first, then the targets
    images = torch.from_numpy(s['images'][order]).permute(0, 3, 1, 2).float() / 255  # (V,3,H,W)
    depth, c2w, K = torch.from_numpy(s['depths'][order]), s['c2w'][order], s['K'][order]
    conf = torch.rand(depth.shape, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp('export')
    summary = export.write_scene(str(out), images, depth, conf, c2w, K, c2w, 2, formats=export.FORMATS)
    ply = (out / 'points.ply').read_bytes().split(b'end_header\n')[1]
    ply = np.frombuffer(ply, dtype=[('xyz', '<f4', 3), ('rgb', 'u1', 3)])
    return {
        'out': out,
        'images': images,
        'depth': depth,
        'c2w': c2w,
        'K': K,
        'summary': summary,
        'ply': ply,
        'names': export.view_names(5, 2),
    }


def read_colmap_text(folder):
    """COLMAP's text model, parsed from the format description alone: {'cameras': {id: (model, W, H, params)},
    'images': {id: (qvec wxyz, tvec, camera_id, name, [(x, y, point3D_id)])}, 'points': {id: (xyz, rgb, track)}}."""

    def rows(name):
        with open(os.path.join(folder, name)) as f:
            return [line.split() for line in f if line.strip() and not line.startswith('#')]

    cameras_ = {int(r[0]): (r[1], int(r[2]), int(r[3]), [float(x) for x in r[4:]]) for r in rows('cameras.txt')}
    with open(os.path.join(folder, 'images.txt')) as f:
        lines = [line.rstrip('\n') for line in f if not line.startswith('#')]
    images = {}
    for head, obs in zip(lines[0::2], lines[1::2]):
        r, o = head.split(), obs.split()
        images[int(r[0])] = (
            [float(x) for x in r[1:5]],
            [float(x) for x in r[5:8]],
            int(r[8]),
            r[9],
            [(float(o[i]), float(o[i + 1]), int(o[i + 2])) for i in range(0, len(o), 3)],
        )
    points = {
        int(r[0]): (
            [float(x) for x in r[1:4]],
            [int(x) for x in r[4:7]],
            [(int(r[i]), int(r[i + 1])) for i in range(8, len(r), 2)],
        )
        for r in rows('points3D.txt')
    }
    return {'cameras': cameras_, 'images': images, 'points': points}


def test_colmap_model_reads_back_in_pycolmap_and_as_text_with_the_same_cameras_and_points(exported):
    pycolmap = pytest.importorskip('pycolmap')
    e = exported
    sparse = e['out'] / 'sparse' / '0'
    rec = pycolmap.Reconstruction(str(sparse))
    text_only = e['out'] / 'text'
    text_only.mkdir(exist_ok=True)
    rec.write_text(str(text_only))  # COLMAP's own text model of our binary one, parsed by the reader above
    rec_txt, txt = pycolmap.Reconstruction(str(text_only)), read_colmap_text(text_only)
    V, H, W = e['depth'].shape
    Kp = cameras.K_to_pixels(e['K'].double(), H, W)
    w2c = cameras.c2w_to_w2c(e['c2w'].double())
    assert len(rec.images) == len(rec_txt.images) == len(txt['images']) == V
    assert len(rec.points3D) == len(rec_txt.points3D) == len(txt['points']) == len(e['ply']) == e['summary']['points']
    for image in rec.images.values():
        v = e['names'].index(image.name)  # the names the model refers to, written beside it
        assert (e['out'] / 'images' / image.name).exists()
        cam = rec.cameras[image.camera_id]
        assert cam.model.name == 'PINHOLE' and (cam.width, cam.height) == (W, H)
        np.testing.assert_allclose(cam.params, [Kp[v, 0, 0], Kp[v, 1, 1], Kp[v, 0, 2], Kp[v, 1, 2]], rtol=1e-9)
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        np.testing.assert_allclose(pose.matrix(), w2c[v, :3].numpy(), atol=1e-6)
        q, t, cam_id, name, obs = txt['images'][image.image_id]
        x, y, z, w = pose.rotation.quat  # pycolmap: (x, y, z, w); the text file: (w, x, y, z)
        assert name == image.name and cam_id == image.camera_id and len(obs) == len(image.points2D)
        np.testing.assert_allclose(np.array(q) * np.sign(q[0] * w), [w, x, y, z], atol=1e-9)
        np.testing.assert_allclose(t, pose.translation, atol=1e-9)
        np.testing.assert_allclose(txt['cameras'][cam_id][3], cam.params, rtol=1e-12)
        txt_pose = rec_txt.images[image.image_id].cam_from_world
        np.testing.assert_allclose((txt_pose() if callable(txt_pose) else txt_pose).matrix(), pose.matrix(), atol=1e-12)
    # every point reprojects onto its observation, in the view it came from
    err = []
    for pid, p in rec.points3D.items():
        el = p.track.elements[0]
        image = rec.images[el.image_id]
        v = e['names'].index(image.name)
        cam = w2c[v, :3, :3].numpy() @ p.xyz + w2c[v, :3, 3].numpy()
        uv = Kp[v].numpy() @ cam
        err.append(np.abs(uv[:2] / uv[2] - image.points2D[el.point2D_idx].xy).max())
        assert image.points2D[el.point2D_idx].point3D_id == pid and txt['points'][pid][2] == [
            (el.image_id, el.point2D_idx)
        ]
    assert max(err) < 1e-4, max(err)  # pixels; float32 rotations are orthonormal to ~1e-7
    ids = sorted(rec.points3D)  # ids 1..N follow the PLY's order
    xyz = np.stack([rec.points3D[i].xyz for i in ids])
    np.testing.assert_allclose(xyz, e['ply']['xyz'], atol=1e-5)
    assert (np.stack([rec.points3D[i].color for i in ids]) == e['ply']['rgb']).all()
    # ...and lands on the true surface seen from the other views (the scale is exact here)
    assert cross_view_depth_error(torch.from_numpy(xyz), e['c2w'], e['K'], e['depth']) < 0.01


def test_nerfstudio_transforms_read_back_by_data_to_the_same_cameras(exported):
    e = exported
    path = e['out'] / 'transforms.json'
    back = data.read_transforms(str(path))
    torch.testing.assert_close(back['c2w'], e['c2w'], atol=1e-6, rtol=0)
    torch.testing.assert_close(back['K'], e['K'], atol=1e-6, rtol=0)
    meta = json.loads(Path(path).read_text())
    assert meta['gld_depth_scale'] == pytest.approx(1.0) and meta['gld_units'] == export.UNITS['poses']
    assert (e['out'] / meta['ply_file_path']).exists()
    for v, f in enumerate(back['files']):  # every file it names exists and holds that view
        img = np.asarray(Image.open(e['out'] / f))
        assert (img == export.to_uint8(e['images'][v])).all()


def test_video_decodes_to_the_frames_written_and_falls_back_to_a_gif(tmp_path, monkeypatch, capsys):
    imageio = pytest.importorskip('imageio.v2')
    frames = list(torch.rand(7, 3, 42, 70, generator=torch.Generator().manual_seed(0)))
    path = export.write_video(frames, str(tmp_path / 'video'))
    reader = imageio.get_reader(path)
    assert path.endswith('.mp4') and reader.count_frames() == 7 and reader.get_data(0).shape == (42, 70, 3)
    monkeypatch.setitem(sys.modules, 'imageio_ffmpeg', None)  # as if it were not installed
    path = export.write_video(frames, str(tmp_path / 'fallback'))
    assert path.endswith('.gif') and Image.open(path).n_frames == 7
    assert capsys.readouterr().out.count('\n') == 1  # one line says why


def test_depth_scale_recovers_the_cameras_units(exported):
    """DA3's depth comes in its own scale: with two sources, their photo-consistency finds it whatever DA3's cameras
    say (true, still, or far off as the tiny head's (8x)); with one source, DA3's cameras are all there is (Umeyama)."""
    e = exported
    truth = 2.5
    da3_c2w = e['c2w'].clone()
    da3_c2w[:, :3, 3] /= truth
    scale, how = metrics.depth_scale(e['images'], e['depth'] / truth, e['c2w'], e['K'], da3_c2w, 1)
    assert how == 'da3 cameras' and scale == pytest.approx(truth, rel=1e-6)
    off = da3_c2w.clone()
    off[:, :3, 3] /= 6
    for cams in (da3_c2w, torch.eye(4).expand(5, 4, 4), off):
        scale, how = metrics.depth_scale(e['images'], e['depth'] / truth, e['c2w'], e['K'], cams, 2)
        assert how == 'source photo-consistency' and scale == pytest.approx(truth, rel=0.02), scale
    assert metrics.depth_scale(e['images'], e['depth'], e['c2w'], e['K'], torch.eye(4).expand(5, 4, 4), 1) == (
        1.0,
        'none',
    )
    with pytest.raises(argparse.ArgumentTypeError, match='unknown export format'):
        export.parse_formats('ply,obj')


def test_glb_reads_back_in_trimesh_with_the_ply_points_and_the_cameras(exported):
    """scene.glb: the PLY's points and colours, and a frustum per view whose apex is the camera centre of
    transforms.json, opening along its viewing direction (OpenGL -z), in the same world."""
    trimesh = pytest.importorskip('trimesh')
    e = exported
    scene = trimesh.load(e['out'] / 'scene.glb')
    points = scene.geometry['points']
    assert len(points.vertices) == len(e['ply']) == e['summary']['points'] and 'scene.glb' in e['summary']['files']
    np.testing.assert_array_equal(points.vertices, e['ply']['xyz'])
    np.testing.assert_array_equal(points.colors[:, :3], e['ply']['rgb'])
    frames = json.loads((e['out'] / 'transforms.json').read_text())['frames']
    stems = [Path(frame['file_path']).stem for frame in frames]
    assert sorted(scene.geometry) == sorted(['points', *stems])
    for frame, stem in zip(frames, stems):
        np.testing.assert_array_equal(scene.graph[stem][0], np.eye(4))  # no transform: the world as written
        c2w_gl = np.array(frame['transform_matrix'])
        frustum = scene.geometry[stem].vertices  # its 8 lines' ends
        ends, count = np.unique(frustum, axis=0, return_counts=True)
        apex = ends[count.argmax()]  # the end of 4 lines, the corners' of 3
        np.testing.assert_allclose(apex, c2w_gl[:3, 3], atol=1e-5)
        opening = frustum.mean(0) - apex
        assert opening @ -c2w_gl[:3, 2] > 0.9 * np.linalg.norm(opening)


def test_cameras_that_contradict_the_photos_are_named(exported):
    """The sources' photo error under the given cameras against the same cameras inverted and with OpenGL/OpenCV
    axes swapped: the true cameras pass; each mistake is named, with its fix."""
    e = exported
    args = (e['images'], e['depth'], e['c2w'], e['K'], 2)
    errors, warning = export.check_poses(*args)
    assert warning is None and errors['given'] < 0.5 * min(errors[name] for name in export.CAMERA_MISTAKES)
    assert e['summary']['camera_check'] == {'photo_error': pytest.approx(errors), 'warning': None}
    for name, (looks, fix, mistake) in export.CAMERA_MISTAKES.items():
        wrong = mistake(e['c2w'].double()).float()
        errors, warning = export.check_poses(e['images'], e['depth'], wrong, e['K'], 2)
        assert f'than the same cameras {name} (' in warning and looks in warning and warning.endswith(fix)
        assert min(errors, key=errors.get) == name


def test_view_flag_shows_the_run_it_wrote_and_is_refused_without_a_scene(tmp_path, capsys, monkeypatch):
    """sample.py --view hands its --out to view.show once the outputs are written (here with the bundled encoder
    named by --encoder-weights); with --eval, without the PLY or without viser it stops before any model loads."""
    for argv in (['--view', '--eval'], ['--view', '--export', 'colmap']):
        user_error(sample.main, [*argv, '--out', tmp_path / 'refused'], capsys, '--view shows the points and cameras')
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, 'viser', None)  # as if it were not installed
        user_error(sample.main, ['--view', '--out', tmp_path / 'refused'], capsys, 'needs viser: pip install viser')
    assert not (tmp_path / 'refused').exists()
    shown = []
    monkeypatch.setattr(sample.view, 'import_viser', lambda: None)  # the run below needs no viser
    monkeypatch.setattr(sample.view, 'show', shown.append)
    out = tmp_path / 'out'
    encoder = os.path.join(pipeline.WEIGHTS, 'encoder.safetensors')
    sample.main(['--encoder-weights', encoder, '--view', '--out', str(out)])
    assert shown == [str(out)] and (out / 'points.ply').exists() and (out / 'transforms.json').exists()


def viser_scene(port, timeout=30):
    """The messages a viser server sends a new client until its scene is replayed: [message dict with its binary
    buffers' lengths as 'lengths'] (viser's wire format: msgpack lengths, zstd msgpack, raw buffers)."""
    import msgspec
    import viser
    import zstandard
    from websockets.sync.client import connect

    messages = []
    url = f'ws://127.0.0.1:{port}'
    with connect(url, subprotocols=[f'viser-v{viser.__version__}'], max_size=None, open_timeout=timeout) as ws:
        while not any(m['type'] == 'ReplayDoneMessage' for m in messages):
            raw = ws.recv(timeout=timeout)
            size = int.from_bytes(raw[:8], 'little')
            packed = int.from_bytes(raw[8:16], 'little')
            inner = zstandard.ZstdDecompressor().decompress(raw[16 : 16 + packed], max_output_size=size)
            window = msgspec.msgpack.decode(inner)
            messages += [{**m, 'lengths': window['binaryBufferLengths']} for m in window['messages']]
    return messages


def test_view_serves_the_points_and_every_camera_to_a_browser(exported, tmp_path):
    """python view.py OUT as a user starts it: a websocket client receives the point cloud and a frustum at every
    camera of transforms.json; where Chromium is installed, a headless one renders the page to view.png."""
    pytest.importorskip('viser')
    import subprocess

    e = exported
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, 'view.py'), str(e['out']), '--port', str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith('showing') for line in lines):  # its line once it serves
            line = server.stdout.readline()
            assert line, ''.join(lines)
            lines.append(line)
        assert f'http://127.0.0.1:{port}' in lines[-1]
        messages = viser_scene(port)
        clouds = [m for m in messages if m['type'] == 'PointCloudMessage']
        assert [m['name'] for m in clouds] == ['/points']
        xyz = clouds[0]['props']['points']
        assert clouds[0]['lengths'][xyz['__binary_index']] == len(e['ply']) * 3 * 2  # float16 xyz of every point
        frames = json.loads((e['out'] / 'transforms.json').read_text())['frames']
        names = [f'/cameras/{Path(frame["file_path"]).stem}' for frame in frames]
        frustums = [m['name'] for m in messages if m['type'] == 'CameraFrustumMessage']
        assert sorted(frustums) == sorted(names)
        positions = {m['name']: m['position'] for m in messages if m['type'] == 'SetPositionMessage'}
        for name, frame in zip(names, frames):
            np.testing.assert_allclose(positions[name], np.array(frame['transform_matrix'])[:3, 3], atol=1e-5)
        chromium = shutil.which('chromium') or shutil.which('chromium-browser')
        if chromium:
            png = tmp_path / 'view.png'
            shot = ['--headless=new', '--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader']
            shot += [f'--screenshot={png}', '--window-size=800,600', '--virtual-time-budget=8000']
            subprocess.run([chromium, *shot, f'http://127.0.0.1:{port}'], capture_output=True, timeout=120)
            pixels = np.asarray(Image.open(png).convert('RGB')).reshape(-1, 3).astype(int)
            for rgb in (export.SOURCE_RGB, export.TARGET_RGB):  # the frustums' colours are drawn
                assert (np.abs(pixels - rgb).max(-1) < 40).sum() > 50, rgb
    finally:
        server.terminate()
        server.wait(timeout=30)


# ====================================================================================================
# Bad input through the command lines (train.py, sample.py, data.py): one line on stderr naming the file and the
# fix, exit status 2, no traceback, nothing on disk changed; never a silent substitution, never a lost run.
# ====================================================================================================


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """2 + 2 synthetic scenes (56 px, 10 frames); tests copy it before spoiling it."""
    root = tmp_path_factory.mktemp('bad_input')
    synth.write_synth(str(root / 'd'), 2, 2, frames=10, size=56, seed=0)
    return root / 'd'


def tree_hashes(*roots):
    """{path: SHA-256} of every file under the roots (files or folders)."""
    import hashlib

    files = [str(r) for r in roots if os.path.isfile(r)]
    files += [os.path.join(d, f) for r in roots if os.path.isdir(r) for d, _, fs in os.walk(r) for f in fs]
    return {f: hashlib.sha256(open(f, 'rb').read()).hexdigest() for f in files}


def user_error(main, argv, capsys, *needles, keep=()):
    """Run an entry point as its __main__ does (cli.run_cli) and check the UserError contract -> (the line,
    stdout)."""
    before = tree_hashes(*keep)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    assert 'Traceback' not in err[0] and all(n in err[0] for n in needles), (err[0], needles)
    assert tree_hashes(*keep) == before  # nothing already on disk changed
    return err[0], captured.out


def spoil_chunk(path, fn):
    """Rewrite a chunk file after fn(list of scenes) changed it (a new file: chunks read earlier stay memory-mapped)."""
    chunk = torch.load(path, weights_only=True)
    fn(chunk)
    torch.save(chunk, str(path) + '.new')
    os.replace(str(path) + '.new', path)
    data._load_chunk.cache_clear()


def copy_data(small_data, tmp_path):
    shutil.copytree(small_data, tmp_path / 'd')
    return tmp_path / 'd'


SAMPLE_FAST = ['--views', '4', '--steps', '1']
TRAIN_FAST = ['--views', '4', '--batch-size', '2', '--eval-every', '0', '--warmup', '1', '--stats-batches', '1']


def test_user_error_is_one_line_exit_2_without_traceback_in_a_subprocess(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('GLD_DEBUG', None)
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sample.py'),
            '--size',
            '50x50',
            '--out',
            str(tmp_path / 'o'),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        'error: --size 50x50: both sides must be positive multiples of 14, e.g. --size 42x42'
    ], r.stderr
    assert not (tmp_path / 'o').exists()  # reported before anything is written


def test_gld_debug_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch):
    monkeypatch.setenv('GLD_DEBUG', '1')
    with pytest.raises(SystemExit):
        cli.run_cli(sample.main, ['--size', '50x50'])
    err = capsys.readouterr().err
    assert 'Traceback' in err and err.strip().splitlines()[-1].startswith('error: --size 50x50')
    with pytest.raises(ZeroDivisionError):  # not a user's mistake: the traceback is kept
        cli.run_cli(lambda argv: 1 / 0)


def test_bad_frame_in_evaluation_names_scene_and_frame_never_another_scene(small_data, tmp_path, capsys):
    d = copy_data(small_data, tmp_path)
    spoil_chunk(
        d / 'test' / '000000.torch',
        lambda ch: ch[0]['images'].__setitem__(slice(None), [torch.tensor(list(b'no jpeg'), dtype=torch.uint8)] * 10),
    )
    for mode in (['--scene', '0'], ['--eval', '--eval-scenes', '2']):
        user_error(
            sample.main,
            ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST, *mode],
            capsys,
            'test/000000.torch: scene synth_test_00000 frame',
            'not a readable image',
            'drop the scene',
            keep=[d],
        )
    assert not (tmp_path / 'o' / 'eval_n2.md').exists()


def test_training_skips_a_bad_scene_with_a_warning_and_counts_it(small_data, tmp_path, capsys, monkeypatch):
    d = copy_data(small_data, tmp_path)
    spoil_chunk(
        d / 'train' / '000000.torch',
        lambda ch: ch[0]['images'].__setitem__(3, torch.tensor(list(b'no jpeg'), dtype=torch.uint8)),
    )
    monkeypatch.setattr(data, 'sample_frames', lambda n, v, gap, g: torch.arange(3, 3 + v))  # frame 3 is read
    with pytest.warns(UserWarning, match='skipping training scene synth_train_00000: .* frame 3: not a readable image'):
        train.main(['--data', str(d), '--stage', 'decoder', *TRAIN_FAST, '--steps', '2', '--out', str(tmp_path / 'r')])
    assert re.search(r'skipped [1-9]\d* training samples with unreadable frames', capsys.readouterr().out)


def test_missing_or_folder_frame_file_is_not_called_corrupt(tmp_path):
    write_dl3dv_scene(str(tmp_path / 'scenes' / 'abc'))
    os.remove(tmp_path / 'scenes' / 'abc' / 'images_4' / 'frame_00002.png')
    os.remove(tmp_path / 'scenes' / 'abc' / 'images_4' / 'frame_00003.png')
    os.makedirs(tmp_path / 'scenes' / 'abc' / 'images_4' / 'frame_00003.png')
    ds = data.SceneDataset(f'dl3dv:{tmp_path / "scenes"}', num_views=3, size=(14, 14), eval=True)
    with pytest.raises(
        data.FrameError, match=r'transforms.json: scene abc frame 1: .*frame_00002.png: no such image file'
    ):
        ds[0]
    with pytest.raises(data.FrameError, match='frame_00003.png: a folder, not an image'):
        data.decode_image(str(tmp_path / 'scenes' / 'abc' / 'images_4' / 'frame_00003.png'))


def test_frame_of_another_size_in_a_chunk(small_data, tmp_path, capsys):
    d = copy_data(small_data, tmp_path)
    first, last = data.read_eval_index(str(d / 'test' / 'eval_index.json'))['synth_test_00000'][0]
    spoil_chunk(
        d / 'test' / '000000.torch',
        lambda ch: ch[0]['images'].__setitem__(last, synth.encode_jpeg(torch.rand(3, 42, 56))),
    )
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        f'scene synth_test_00000 frame {last}: 42x56 pixels, but frame {first} is 56x56',
        'share one size',
        keep=[d],
    )
    spoil_chunk(
        d / 'test' / '000000.torch',
        lambda ch: ch[1]['images'].__setitem__(slice(None), [synth.encode_jpeg(torch.rand(3, 42, 56))] * 10),
    )  # a whole scene of another size
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', '--scene', '1', *SAMPLE_FAST],
        capsys,
        'scene synth_test_00001 is 42x56 pixels, but frame 0 of scene synth_test_00000 is 56x56',
        '--size HxW',
    )


def test_truncated_or_folder_chunk_names_the_file(small_data, tmp_path, capsys):
    d = copy_data(small_data, tmp_path)
    chunk = d / 'test' / '000000.torch'
    chunk.write_bytes(chunk.read_bytes()[:5000])
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        f'{chunk}: not a readable chunk file',
        'python data.py synth',
        keep=[d],
    )
    os.remove(chunk)
    os.makedirs(chunk)
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        f'{chunk}: a folder, not a chunk file',
        'index.json',
        keep=[d],
    )


@pytest.mark.parametrize(
    'spoil, needle',
    [
        (lambda c: c.__setitem__((2, 8), float('nan')), 'camera of view 2 holds NaN or inf values'),
        (lambda c: c.__setitem__((1, 6), 3.0), 'the rotation of view 1 is not orthonormal'),
        (lambda c: c.__setitem__((0, 0), -0.5), 'view 0 has focal lengths fx -0.5'),
    ],
)
def test_bad_cameras_are_refused_where_they_are_read(small_data, tmp_path, capsys, spoil, needle):
    d = copy_data(small_data, tmp_path)
    spoil_chunk(d / 'test' / '000000.torch', lambda ch: spoil(ch[0]['cameras']))
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        'test/000000.torch scene synth_test_00000',
        needle,
        keep=[d],
    )
    spoil_chunk(d / 'train' / '000000.torch', lambda ch: spoil(ch[0]['cameras']))
    user_error(
        train.main,
        ['--data', d, '--stage', 'decoder', *TRAIN_FAST, '--out', tmp_path / 'r'],
        capsys,
        'train/000000.torch scene synth_train_00000',
        needle,
        keep=[d],
    )


def test_error_in_a_dataloader_worker_is_one_line_too(tmp_path, capsys):
    synth.write_synth(str(tmp_path / 'd'), 2, 1, frames=6, size=28, seed=0, per_chunk=1)  # scene 1 in its own chunk
    spoil_chunk(
        tmp_path / 'd' / 'train' / '000001.torch', lambda ch: ch[0]['cameras'].__setitem__((0, 8), float('inf'))
    )
    user_error(
        train.main,
        ['--data', tmp_path / 'd', '--stage', 'decoder', *TRAIN_FAST, '--workers', '1', '--out', tmp_path / 'r'],
        capsys,
        'train/000001.torch scene synth_train_00001: camera of view 0 holds NaN',
    )
    user_error(
        train.main,
        ['--data', tmp_path / 'd', '--level', '0', '--stats', tmp_path / 'd', *TRAIN_FAST, '--out', tmp_path / 'r'],
        capsys,
        f'{tmp_path / "d"}: not a readable statistics file',
    )


def test_camera_rows_of_the_wrong_length(small_data, tmp_path, capsys):
    d = copy_data(small_data, tmp_path)
    spoil_chunk(d / 'test' / '000000.torch', lambda ch: ch[0].__setitem__('cameras', ch[0]['cameras'][:, :16]))
    user_error(
        sample.main,
        ['--data', d, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        'scene synth_test_00000: camera rows have shape (10, 16), expected (V, 18)',
        keep=[d],
    )


def test_sizes_data_folders_scenes_and_flags(small_data, tmp_path, capsys):
    user_error(
        train.main,
        ['--data', small_data, '--size', '30x30', '--out', tmp_path / 'r'],
        capsys,
        '--size 30x30: both sides must be positive multiples of 14, e.g. --size 28x28',
    )
    user_error(sample.main, ['--size', 'big', '--out', tmp_path / 'o'], capsys, '--size big: expected HxW')
    user_error(
        train.main, ['--data', small_data, '--gap', 'x', '--out', tmp_path / 'r'], capsys, '--gap x: expected a range'
    )
    user_error(
        train.main,
        ['--data', small_data, '--views', '4', '--src', '4-5', '--out', tmp_path / 'r'],
        capsys,
        '--src 4-5: a sample of --views 4 has 1..3 source views',
    )
    user_error(
        train.main,
        ['--data', f'{small_data}*x', '--out', tmp_path / 'r'],
        capsys,
        'the ratio after each * must be a number',
    )
    os.makedirs(tmp_path / 'empty')
    user_error(
        train.main,
        ['--data', tmp_path / 'empty', '--out', tmp_path / 'r'],
        capsys,
        f'{tmp_path / "empty" / "train" / "index.json"}: missing',
        'python data.py synth',
    )
    user_error(
        sample.main,
        ['--data', tmp_path / 'nothing', '--out', tmp_path / 'o'],
        capsys,
        'no such dataset folder',
        'python data.py synth',
    )
    user_error(
        sample.main,
        ['--data', small_data, '--scene', '7', '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        '--scene 7: the split has 2 scenes',
        keep=[small_data],
    )
    user_error(
        sample.main,
        ['--data', small_data, '--scene', 'nope', '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        '--scene nope: not in this split',
        '--scene synth_test_00000',
    )
    user_error(
        sample.main, ['--views', '4', '--src', '4', '--out', tmp_path / 'o'], capsys, '--src 4', '1..3 source views'
    )
    (tmp_path / 'a_file').write_text('x')
    user_error(
        sample.main,
        ['--out', tmp_path / 'a_file', '--views', '4'],
        capsys,
        f'--out {tmp_path / "a_file"}: cannot create',
        keep=[tmp_path / 'a_file'],
    )
    user_error(
        data.main,
        ['synth', '--out', tmp_path / 'a_file' / 'sub', '--train', '1', '--test', '0'],
        capsys,
        'cannot create the folder',
    )
    user_error(
        train.main,
        ['--data', small_data, '--stage', 'decoder', '--init', tmp_path, *TRAIN_FAST, '--out', tmp_path / 'r'],
        capsys,
        f'{tmp_path}: a folder, not a checkpoint file',
    )
    user_error(
        train.main,
        ['--data', small_data, '--batch-size', '4', '--out', tmp_path / 'r'],
        capsys,
        '2 scenes per process < batch size 4',
        'lower --batch-size',
    )


def test_views_are_honoured_with_an_evaluation_index(small_data, capsys):
    ds = data.SceneDataset(str(small_data), 'test', num_views=4, eval=True)
    index = data.read_eval_index(str(small_data / 'test' / 'eval_index.json'))
    context, target = index[ds.keys[0]]
    assert 'gives 2 context + 6 target frames per scene; --views 4' in capsys.readouterr().out
    assert ds[0]['frames'].tolist() == sorted(context + [target[1], target[4]]) and ds[0]['images'].shape[0] == 4
    assert len(data.SceneDataset(str(small_data), 'test', num_views=8, eval=True)[0]['frames']) == 8
    with pytest.raises(cli.UserError, match='--views 2: .* 2 context frames per scene; pass --views 3'):
        data.SceneDataset(str(small_data), 'test', num_views=2, eval=True)


def fake_run(folder, kind, meta, sd, step=1):
    """A training-checkpoint file as find_checkpoint finds it: <folder>/ckpt_<step>.pt."""
    os.makedirs(folder, exist_ok=True)
    torch.save({**meta, 'kind': kind, 'ema': sd}, os.path.join(folder, f'ckpt_{step:07d}.pt'))


def test_models_resolve_explicitly_and_refuse_another_encoders_latents(small_data, tmp_path, capsys):
    runs = tmp_path / 'runs'
    os.makedirs(runs)
    user_error(
        sample.main,
        ['--ckpt-dir', runs, '--data', small_data, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        f'{runs / "encoder"}: no encoder checkpoint',
        f'python train.py --stage encoder --out {runs / "encoder"}',
    )
    enc_meta, enc_sd = pipeline.load_checkpoint(os.path.join(pipeline.WEIGHTS, 'encoder.safetensors'))
    fake_run(runs / 'encoder', 'encoder', {}, enc_sd)
    enc_sha = pipeline.load_checkpoint(train.list_checkpoints(str(runs / 'encoder'))[0])[0]['sha256']
    dec_meta, dec_sd = pipeline.load_checkpoint(os.path.join(pipeline.WEIGHTS, 'decoder.safetensors'))
    other = {'preset': 'da3-tiny', 'weights': 'elsewhere.pt', 'sha256': '0' * 64}
    fake_run(runs / 'decoder', 'decoder', {'config': dec_meta['config'], 'encoder': other}, dec_sd)
    user_error(
        sample.main,
        ['--ckpt-dir', runs, '--data', small_data, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        'decoder/ckpt_0000001.pt: trained on latents of encoder elsewhere.pt (sha256 000000000000)',
        f'encoder here is {runs / "encoder" / "ckpt_0000001.pt"} (sha256 {enc_sha[:12]})',
        'python train.py --stage decoder',
        keep=[runs],
    )
    fake_run(
        runs / 'decoder', 'decoder', {'config': dec_meta['config'], 'encoder': {**other, 'sha256': enc_sha}}, dec_sd
    )
    _, out = user_error(
        sample.main,
        ['--ckpt-dir', runs, '--data', small_data, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        'no level1 checkpoint',
        f'python train.py --level 1 --out {runs / "level1"}',
        keep=[runs],
    )
    assert f'{runs / "decoder" / "ckpt_0000001.pt"} (sha256 ' in out  # every resolved model is printed with its hash
    user_error(
        sample.main,
        [
            '--ckpt-dir',
            runs,
            '--boundary',
            '2',
            '--independent',
            '--data',
            small_data,
            '--out',
            tmp_path / 'o',
            *SAMPLE_FAST,
        ],
        capsys,
        'python train.py --level 2 --out',
    )
    user_error(
        sample.main,
        ['--independent', '--data', small_data, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        'no bundled level0_ind model',
        'python train.py --level 0 --independent --export weights/mine',
        '--ckpt-dir weights/mine',
    )  # the ablation's models are not bundled (the 30 MB budget)


def test_training_records_the_encoder_file_and_hash(small_data, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.chdir(tmp_path)  # no runs/encoder here: --encoder-weights auto is the bundled encoder
    out = train.main(
        ['--data', str(small_data), '--stage', 'decoder', *TRAIN_FAST, '--steps', '1', '--out', str(tmp_path / 'r')]
    )
    ref = torch.load(train.list_checkpoints(out)[-1], weights_only=False)['encoder']
    bundled = os.path.join(pipeline.WEIGHTS, 'encoder.safetensors')
    parent = json.loads(Path(pipeline.WEIGHTS, 'encoder.json').read_text()).get('latents_sha256')  # --head-only
    assert ref == {
        'preset': 'da3-tiny',
        'weights': bundled,
        'sha256': parent or hashlib.sha256(Path(bundled).read_bytes()).hexdigest(),
    }
    assert ref['sha256'] == json.loads(Path(pipeline.WEIGHTS, 'level1.json').read_text())['encoder']['sha256']


def test_head_only_encoder_keeps_the_latents_so_the_bundled_models_load_from_an_export_folder(
    small_data, tmp_path, capsys
):
    """train.py --stage encoder --head-only: the backbone is bit-identical, the heads move, and the exports record the
    parent's hash as their latents'; sample.py --ckpt-dir takes a folder of exports; M2 warm-starts from M1's weights
    with level 2's own statistics, and the boundary-2 ablation runs from that folder."""
    mine, bundled = tmp_path / 'mine', os.path.join(pipeline.WEIGHTS, 'encoder.safetensors')
    shutil.copytree(pipeline.WEIGHTS, mine)
    user_error(
        train.main,
        ['--data', small_data, '--stage', 'encoder', '--head-only', *TRAIN_FAST, '--out', tmp_path / 'r'],
        capsys,
        '--head-only',
        '--init weights/tiny/encoder.safetensors',
    )
    train.main(
        [
            str(a)
            for a in [
                '--data',
                small_data,
                '--stage',
                'encoder',
                '--head-only',
                '--init',
                bundled,
                *TRAIN_FAST,
                '--steps',
                '3',
                '--lr',
                '1e-3',
                '--ema',
                '0',
                '--out',
                tmp_path / 'r',
                '--export',
                mine,
            ]
        ]
    )
    parent = pipeline.load_encoder('da3-tiny', bundled)
    child = pipeline.load_encoder('da3-tiny', str(mine / 'encoder.safetensors'))
    assert (
        child.source['sha256']
        == parent.source['sha256']
        != pipeline.load_checkpoint(str(mine / 'encoder.safetensors'))[0]['sha256']
    )
    images = data.collate_one(data.SceneDataset(str(small_data), 'test', num_views=4)[0])['images']
    for a, b in zip(parent.encode(images), child.encode(images)):
        assert torch.equal(a, b)
    assert not torch.allclose(parent(images)['depth'], child(images)['depth'])
    train.main(
        [
            str(a)
            for a in [
                '--data',
                small_data,
                '--level',
                '2',
                '--init',
                mine / 'level1.safetensors',
                *TRAIN_FAST,
                '--steps',
                '1',
                '--encoder-weights',
                mine / 'encoder.safetensors',
                '--out',
                tmp_path / 'm2',
                '--export',
                mine,
            ]
        ]
    )
    meta = pipeline.load_checkpoint(str(mine / 'level2.safetensors'))[0]
    assert sorted(meta['stats']) == ['mean2', 'var2'] and meta['encoder']['sha256'] == parent.source['sha256']
    capsys.readouterr()
    sample.main(
        [
            str(a)
            for a in [
                '--ckpt-dir',
                mine,
                '--boundary',
                '2',
                '--data',
                small_data,
                '--out',
                tmp_path / 'o',
                *SAMPLE_FAST,
            ]
        ]
    )
    out = capsys.readouterr().out
    assert all(f'{mine / n}.safetensors (sha256' in out for n in ('encoder', 'decoder', 'level2', 'level1', 'level0'))
    assert os.path.isfile(tmp_path / 'o' / 'grid.png')


def test_corrupt_or_altered_checkpoints_and_weights_name_the_file(small_data, tmp_path, capsys):
    runs = tmp_path / 'runs'
    _, enc_sd = pipeline.load_checkpoint(os.path.join(pipeline.WEIGHTS, 'encoder.safetensors'))
    fake_run(runs / 'encoder', 'encoder', {}, enc_sd)
    ck = runs / 'encoder' / 'ckpt_0000001.pt'
    ck.write_bytes(ck.read_bytes()[:20000])
    user_error(
        sample.main,
        ['--ckpt-dir', runs, '--data', small_data, '--out', tmp_path / 'o', *SAMPLE_FAST],
        capsys,
        f'{ck}: not a loadable checkpoint',
        'delete it',
        keep=[runs],
    )
    for name in ('level1.safetensors', 'level1.json', 'encoder.safetensors'):
        shutil.copy(os.path.join(pipeline.WEIGHTS, name), tmp_path / name)
    spoilt = bytearray((tmp_path / 'level1.safetensors').read_bytes())
    spoilt[-1] ^= 1
    (tmp_path / 'level1.safetensors').write_bytes(spoilt)
    user_error(
        train.main,
        [
            '--data',
            small_data,
            '--level',
            '1',
            *TRAIN_FAST,
            '--init',
            tmp_path / 'level1.safetensors',
            '--out',
            tmp_path / 'r',
        ],
        capsys,
        'level1.safetensors: checksum mismatch',
        'export it again with: python train.py',
        keep=[tmp_path / 'level1.safetensors'],
    )
    # weights without a sidecar: truncated, and of another preset (the flag, not a Python call)
    enc = tmp_path / 'encoder.safetensors'
    argv = ['--data', small_data, '--stage', 'decoder', '--encoder', 'da3-small', '--encoder-weights', enc]
    argv += [*TRAIN_FAST, '--out', tmp_path / 'r']
    user_error(
        train.main,
        argv,
        capsys,
        f"{enc}: the weights match preset 'da3-tiny', not 'da3-small': pass --encoder da3-tiny",
    )
    # with a sidecar: the same diagnostics, not PyTorch's key listing
    shutil.copy(os.path.join(pipeline.WEIGHTS, 'encoder.json'), tmp_path / 'encoder.json')
    line, _ = user_error(
        train.main,
        argv,
        capsys,
        'pass --encoder da3-tiny',
    )
    assert len(line) < 300
    os.remove(tmp_path / 'encoder.json')
    enc.write_bytes(enc.read_bytes()[:4000])
    user_error(
        train.main,
        ['--data', small_data, '--stage', 'decoder', '--encoder-weights', enc, *TRAIN_FAST, '--out', tmp_path / 'r'],
        capsys,
        f'{enc}: not a readable weights file',
        '--encoder-weights',
    )


def test_resume_falls_back_to_the_newest_loadable_checkpoint(small_data, tmp_path, capsys):
    argv = [
        '--data',
        str(small_data),
        '--stage',
        'decoder',
        *TRAIN_FAST,
        '--ckpt-every',
        '1',
        '--keep',
        '5',
        '--out',
        str(tmp_path / 'r'),
    ]
    train.main(argv + ['--steps', '1'])
    good = train.list_checkpoints(str(tmp_path / 'r'))[0]
    (tmp_path / 'r' / 'ckpt_0000002.pt').write_bytes(b'garbage')
    (tmp_path / 'r' / 'ckpt_0000003.pt').write_bytes(Path(good).read_bytes()[:3000])
    capsys.readouterr()
    train.main(argv + ['--steps', '2', '--resume'])
    out = capsys.readouterr().out
    assert 'skipping' in out and 'ckpt_0000003.pt' in out and 'ckpt_0000002.pt (' in out
    assert f'resumed from {good} at step 1' in out
    assert torch.load(tmp_path / 'r' / 'ckpt_0000002.pt', weights_only=False)['step'] == 2  # rewritten whole
    for p in train.list_checkpoints(str(tmp_path / 'r')):
        Path(p).write_bytes(b'garbage')
    user_error(
        train.main,
        argv + ['--steps', '4', '--resume'],
        capsys,
        '--resume: none of the 3 checkpoints',
        keep=[tmp_path / 'r'],
    )


def test_full_disk_while_checkpointing_keeps_the_previous_one(small_data, tmp_path, capsys, monkeypatch):
    import errno

    argv = [
        '--data',
        str(small_data),
        '--stage',
        'decoder',
        *TRAIN_FAST,
        '--ckpt-every',
        '1',
        '--out',
        str(tmp_path / 'r'),
    ]
    train.main(argv + ['--steps', '1'])
    real_save = torch.save

    def full_disk(obj, f):
        with open(f, 'wb') as file:
            file.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    user_error(
        train.main,
        argv + ['--steps', '2', '--resume'],
        capsys,
        'ckpt_0000002.pt: cannot write the checkpoint',
        'No space left on device',
        'continue with --resume',
        keep=[tmp_path / 'r' / 'ckpt_0000001.pt'],
    )
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(os.listdir(tmp_path / 'r')) == ['ckpt_0000001.pt', 'log.csv']  # no partial file left behind
    assert torch.load(tmp_path / 'r' / 'ckpt_0000001.pt', weights_only=False)['step'] == 1


@pytest.mark.parametrize('workers', ['0', '1'])
def test_ctrl_c_writes_a_checkpoint_at_the_step_in_flight(small_data, tmp_path, capsys, monkeypatch, workers, request):
    import multiprocessing
    import signal

    # Python's own SIGINT handler, as a terminal starts it (a background job of a script inherits SIGINT ignored,
    # and train.py restores what it found)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(functools.partial(signal.signal, signal.SIGINT, previous))
    argv = [
        '--data',
        str(small_data),
        '--stage',
        'decoder',
        *TRAIN_FAST,
        '--ckpt-every',
        '10',
        '--workers',
        workers,
        '--out',
        str(tmp_path / 'r'),
    ]
    real_lr_at = train.lr_at

    def lr_at(step, a):
        if step == 1:  # Ctrl-C during step 2, as a terminal sends it: to the DataLoader workers too
            for p in [*multiprocessing.active_children(), multiprocessing.current_process()]:
                os.kill(p.pid, signal.SIGINT)
        return real_lr_at(step, a)

    monkeypatch.setattr(train, 'lr_at', lr_at)
    with pytest.raises(SystemExit) as e:
        train.main(argv + ['--steps', '5'])
    assert (
        e.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )  # a 2nd Ctrl-C: at once
    assert 'interrupted: wrote' in capsys.readouterr().err
    assert torch.load(train.list_checkpoints(str(tmp_path / 'r'))[-1], weights_only=False)['step'] == 2
    monkeypatch.setattr(train, 'lr_at', real_lr_at)
    train.main(argv + ['--steps', '3', '--resume'])
    assert torch.load(train.list_checkpoints(str(tmp_path / 'r'))[-1], weights_only=False)['step'] == 3


# ---------------------------------------------------------------- nothing lost, nothing run (issue 31)
def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def fork(action, log):
    """action() in a forked copy of this process (its modules imported already), its output into log -> its pid.
    Its exit status: action's SystemExit code, 0 when it returns, 1 on another exception."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        with open(log, 'w', buffering=1) as f:
            sys.stdout = f
            sys.stderr = f
            try:
                action()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
    finally:
        os._exit(code)


def fork_ranks(argv, log_dir, world=2, before=None):
    """python train.py argv as torchrun runs it on `world` ranks (its environment), each rank a forked copy of this
    process, its output in log_dir/rank<r>.log -> the pids. before(rank) runs first in each (a test's patch)."""
    port = free_port()
    pids = []
    for rank in range(world):

        def launch(rank=rank):
            env = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
            os.environ.update({k: str(v) for k, v in env.items()})
            if before:
                before(rank)
            cli.run_cli(train.main, [str(a) for a in argv])

        pids.append(fork(launch, log_dir / f'rank{rank}.log'))
    return pids


def wait_all(pids, timeout=120):
    """-> the exit statuses of the processes, the time each ended (seconds)."""
    import time

    codes = {}
    ends = {}
    deadline = time.time() + timeout
    while len(codes) < len(pids) and time.time() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                ends[pid] = time.time()
        time.sleep(0.05)
    for pid in set(pids) - set(codes):  # a hang: end it, then fail
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert len(codes) == len(pids), f'{len(pids) - len(codes)} processes hung for {timeout}s'
    return [codes[p] for p in pids], [ends[p] for p in pids]


def same_state(a, b):
    """Whether two checkpoint values are equal bit for bit (tensors, containers, plain values)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


DDP_FAST = ['--stage', 'decoder', *TRAIN_FAST, '--batch-size', '1', '--log-every', '1', '--ckpt-every', '100']


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resumes_bit_for_bit(small_data, tmp_path):
    """Preemption: SIGTERM to one of 2 gloo ranks under torchrun at a random step; every rank stops after the step in
    flight, one checkpoint of it, then --resume ends equal, bit for bit, to an uninterrupted run."""
    import random
    import signal
    import subprocess
    import threading

    argv = ['--data', small_data, *DDP_FAST, '--steps', '10']
    whole = fork_ranks(argv + ['--out', tmp_path / 'whole'], tmp_path)  # the reference, beside torchrun's run
    at = random.randint(1, 5)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-port', free_port()]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    command = [str(a) for a in [*torchrun, script, *argv, '--out', tmp_path / 'cut']]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    printed = []
    ranks = []

    def end_all():  # a hang (ranks that disagree wait for each other): torchrun and its ranks end here
        for pid in [p.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    watchdog = threading.Timer(120, end_all)
    watchdog.start()
    try:
        for line in p.stdout:
            printed.append(line)
            if line.startswith(f'step {at} '):  # to one rank: every rank must stop with it
                ranks = [int(pid) for pid in Path(f'/proc/{p.pid}/task/{p.pid}/children').read_text().split()]
                os.kill(random.choice(ranks), signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        watchdog.cancel()
        end_all()
    codes, _ = wait_all(whole)
    assert codes == [0, 0], (tmp_path / 'rank0.log').read_text()
    cut = train.list_checkpoints(str(tmp_path / 'cut'))
    assert len(cut) == 1, ''.join(printed)
    step = torch.load(cut[0], weights_only=True)['step']
    assert at <= step < 10 and f'interrupted: wrote {cut[0]} at step {step}' in ''.join(printed), (at, printed)
    assert not (tmp_path / 'cut' / safety.LOCK).exists()
    codes, _ = wait_all(fork_ranks(argv + ['--out', tmp_path / 'cut', '--resume'], tmp_path))
    assert codes == [0, 0], (tmp_path / 'rank0.log').read_text()
    assert f'resumed from {cut[0]} at step {step}' in (tmp_path / 'rank0.log').read_text()
    whole = torch.load(train.list_checkpoints(str(tmp_path / 'whole'))[-1], weights_only=True)
    resumed = torch.load(train.list_checkpoints(str(tmp_path / 'cut'))[-1], weights_only=True)
    for key in ('model', 'ema', 'optimizer', 'rng', 'step', 'epoch', 'pos'):
        assert same_state(whole[key], resumed[key]), (key, at, step)


def test_budget_minutes_under_ddp_the_slowest_rank_ends_every_rank_at_its_step(small_data, tmp_path):
    """--budget-minutes on 2 gloo ranks whose clocks disagree: rank 1's reads 30 s a step (out of time after step 3
    with a 1.2-minute budget), rank 0's is real (far from it). Both must end after step 3, together, with one
    checkpoint of it; a rank that went on alone would wait for its partner's gradients until the timeout."""

    def slow_clock_on_rank_1(rank):
        if rank == 1:
            reads = iter(range(0, 10**6, 30))
            runlog.time = argparse.Namespace(process_time=lambda: next(reads), time=time.time)  # this fork only

    argv = ['--data', small_data, *DDP_FAST, '--steps', '10', '--budget-minutes', '1.2', '--out', tmp_path / 'r']
    codes, _ = wait_all(fork_ranks(argv, tmp_path, before=slow_clock_on_rank_1), timeout=60)
    assert codes == [0, 0], (tmp_path / 'rank0.log').read_text() + (tmp_path / 'rank1.log').read_text()
    checkpoints = train.list_checkpoints(str(tmp_path / 'r'))
    assert [torch.load(c, weights_only=True)['step'] for c in checkpoints] == [3]
    assert runlog.read_csv(str(tmp_path / 'r' / 'log.csv'))[-1]['step'] == 3


def test_a_full_disk_on_rank_0_stops_both_ranks_within_seconds(small_data, tmp_path):
    import errno

    def full_disk_on_rank_0(rank):
        def full_disk(path, write):
            raise OSError(errno.ENOSPC, 'No space left on device')

        if rank == 0:
            safety.write_file = full_disk  # in this forked rank only

    argv = ['--data', small_data, *DDP_FAST, '--steps', '20', '--ckpt-every', '2', '--out', tmp_path / 'r']
    codes, ends = wait_all(fork_ranks(argv, tmp_path, before=full_disk_on_rank_0), timeout=60)
    logs = [(tmp_path / f'rank{r}.log').read_text().strip().splitlines() for r in (0, 1)]
    assert codes == [2, 2] and abs(ends[0] - ends[1]) < 5, (codes, ends, logs)
    line = logs[0][-1]
    assert line.startswith('error: ') and 'ckpt_0000002.pt: cannot write the checkpoint' in line, logs[0]
    assert 'No space left on device' in line and 'Traceback' not in '\n'.join(logs[0] + logs[1])
    assert logs[1][-1] == f'error: rank 1 stopped: rank 0 failed: {line[len("error: ") :]}', logs[1]


def test_one_run_per_out_folder_and_sigterm_in_one_process(small_data, tmp_path, capsys):
    """A second train.py or sample.py on a folder in use stops with one line; SIGTERM: a checkpoint, exit 143; a lock
    whose process is gone (kill -9) is taken over with a notice."""
    import signal
    import time

    out = tmp_path / 'r'
    argv = ['--data', str(small_data), '--stage', 'decoder', *TRAIN_FAST, '--log-every', '1', '--out', str(out)]
    log = tmp_path / 'first.log'
    first = fork(functools.partial(cli.run_cli, train.main, argv + ['--steps', '1000', '--ckpt-every', '1000']), log)
    deadline = time.time() + 60
    while not (log.exists() and 'step 2 ' in log.read_text()):  # it holds the folder and trains
        assert time.time() < deadline and not os.waitpid(first, os.WNOHANG)[0], log.read_text()
        time.sleep(0.1)
    needles = (str(out), f'in use by process {first}', 'pass another --out', safety.LOCK)
    user_error(train.main, argv + ['--steps', '5'], capsys, *needles)
    user_error(sample.main, ['--out', out], capsys, *needles)
    os.kill(first, signal.SIGTERM)
    assert wait_all([first])[0] == [143] and 'interrupted: wrote' in log.read_text()
    step = torch.load(train.list_checkpoints(str(out))[-1], weights_only=True)['step']
    assert step >= 2 and not (out / safety.LOCK).exists()
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    (out / safety.LOCK).write_text(f'{gone} {socket.gethostname()}')
    capsys.readouterr()
    train.main(argv + ['--steps', str(step + 1), '--resume'])
    printed = capsys.readouterr().out
    assert f'process {gone} of its lock is gone' in printed and f'at step {step}' in printed
    assert not (out / safety.LOCK).exists()


def test_sigusr1_writes_a_checkpoint_at_the_step_in_flight(small_data, tmp_path, capsys, monkeypatch):
    import signal

    argv = ['--data', str(small_data), '--stage', 'decoder', *TRAIN_FAST, '--ckpt-every', '10', '--out', str(tmp_path)]
    real_lr_at = train.lr_at

    def lr_at(step, a):
        if step == 1:  # SLURM's --signal=USR1@T during step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_lr_at(step, a)

    monkeypatch.setattr(train, 'lr_at', lr_at)
    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as e:
        train.main(argv + ['--steps', '5'])
    assert e.value.code == 128 + signal.SIGUSR1 and signal.getsignal(signal.SIGUSR1) is handler  # 138, restored
    assert torch.load(train.list_checkpoints(str(tmp_path))[-1], weights_only=True)['step'] == 2


class RunsCode:
    """A pickle that runs code when it is loaded: it writes marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").write("ran")',))


def test_checkpoints_are_plain_data_and_planted_pickles_never_run(world, release, tmp_path, capsys, monkeypatch):
    """Every checkpoint train.py writes reads with weights_only=True; a pickle that would run code, planted where
    --resume, --init, --ckpt-dir and --official read one, is refused with one line naming the file and the class."""
    for name in ['encoder', 'decoder', 'level1', 'level0', 'level2', 'level0_ind']:
        assert torch.load(train.list_checkpoints(f'runs/{name}')[-1], weights_only=True)['step'] == 2
    legacy = np.random.get_state()  # numpy's RNG state as checkpoints held it before: still read
    torch.save({'numpy': legacy}, tmp_path / 'legacy.pt')
    assert np.array_equal(safety.load_plain(tmp_path / 'legacy.pt')['numpy'][1], legacy[1])
    marker = tmp_path / 'marker'
    planted = {'model': {}, 'ema': {}, 'optimizer': {}, 'step': 1, 'rng': [], 'args': RunsCode(marker)}
    torch.save(planted, tmp_path / 'planted.pt')
    torch.load(tmp_path / 'planted.pt', weights_only=False)  # the plant works: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / 'resume').mkdir()
    shutil.copy(tmp_path / 'planted.pt', tmp_path / 'resume' / 'ckpt_0000001.pt')
    (tmp_path / 'dir' / 'encoder').mkdir(parents=True)
    shutil.copy(tmp_path / 'planted.pt', tmp_path / 'dir' / 'encoder' / 'ckpt_0000001.pt')
    shutil.copytree(release[0], tmp_path / 'release')
    shutil.copy(tmp_path / 'planted.pt', tmp_path / 'release' / 'checkpoints' / 'da3_level1.pt')
    small = functools.partial(pipeline.load_official_pipeline, encoder_preset='da3-tiny', heads=HEADS)
    monkeypatch.setattr(pipeline, 'load_official_pipeline', small)
    refused = 'pickles Python objects (exec) that could run code when loaded; refused'
    argv = ['--data', world['data'], '--level', '1', *TRAIN_FAST, '--steps', '3']
    resume = argv + ['--out', tmp_path / 'resume', '--resume']
    _, printed = user_error(train.main, resume, capsys, '--resume: none of the 1 checkpoints')
    assert 'ckpt_0000001.pt: ' + refused in printed  # the reason it was skipped
    user_error(train.main, argv + ['--out', tmp_path / 'o', '--init', tmp_path / 'planted.pt'], capsys, refused)
    sampling = ['--data', world['data'], *SAMPLE_FAST, '--out', tmp_path / 'o']
    user_error(sample.main, sampling + ['--ckpt-dir', tmp_path / 'dir'], capsys, 'ckpt_0000001.pt: ' + refused)
    user_error(sample.main, sampling + ['--official', tmp_path / 'release'], capsys, 'da3_level1.pt: ' + refused)
    assert not marker.exists()


FS_CHANGES = [(os, 'replace'), (os, 'rename'), (os, 'link'), (os, 'remove'), (os, 'makedirs'), (os, 'mkdir')]
FS_CHANGES += [(shutil, 'rmtree'), (shutil, 'copy2'), (safety, 'exchange'), (safety, 'fsync')]


def run_killed_at(n, action, tmp_path):
    """action() in a forked process that kills itself (SIGKILL, as kill -9 does) at its n-th file system change ->
    None if it was killed, else how many it made. A change: a call of FS_CHANGES (killed before it), a file opened
    for writing (killed once it is created, empty), torch.save or safetensors' writer (killed with half the bytes
    written)."""
    import builtins
    import signal

    import safetensors.torch

    counted = tmp_path / 'changes'
    real_open = builtins.open
    real_os_open = os.open
    real_save = torch.save
    real_save_file = safetensors.torch.save_file

    def changes_counted():
        changes = []

        def change(partly=None):  # partly(): what the change has done when the kill comes
            changes.append(1)
            if len(changes) == n:
                if partly:
                    partly()
                os.kill(os.getpid(), signal.SIGKILL)

        def counting(fn):
            def changing(*args, **kwargs):
                change()
                return fn(*args, **kwargs)

            return changing

        def write_half(raw, path):
            with real_open(path, 'wb') as f:
                f.write(raw[: len(raw) // 2])

        def opening(file, mode='r', *args, **kwargs):
            if set(mode) & set('wax+'):
                change(lambda: real_open(file, mode, *args, **kwargs).close())
            return real_open(file, mode, *args, **kwargs)

        def os_opening(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                change(lambda: os.close(real_os_open(path, flags, *args, **kwargs)))
            return real_os_open(path, flags, *args, **kwargs)

        def saving(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            change(lambda: write_half(buffer.getvalue(), f))
            return real_save(obj, f, *args, **kwargs)

        def saving_file(tensors, path, *args, **kwargs):
            change(lambda: write_half(safetensors.torch.save(tensors), path))
            return real_save_file(tensors, path, *args, **kwargs)

        for module, name in FS_CHANGES:
            setattr(module, name, counting(getattr(module, name)))
        builtins.open = opening
        os.open = os_opening
        torch.save = saving
        safetensors.torch.save_file = saving_file
        action()
        with real_open(counted, 'w') as f:
            f.write(str(len(changes)))

    _, status = os.waitpid(fork(changes_counted, tmp_path / 'killed.log'), 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return None
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / 'killed.log').read_text()
    return int(counted.read_text())


def contents(folder):
    """{relative path: bytes} of the files under folder but its lock (a killed run's lock is stale, taken over)."""
    files = safety.files_under(folder) if os.path.isdir(folder) else []
    return {f: Path(folder, f).read_bytes() for f in files if f != safety.LOCK}


def test_kill_9_during_an_export_leaves_the_old_pair_or_the_new_one(tmp_path):
    """Every file-system change of an export is a kill point; after each kill the folder holds the previous export
    whole or the new one whole (with another model's export and a user's file), never a mixture; a later export
    clears what the killed one left."""
    cfg = decoder_lib.PRESETS['tiny']
    folder = tmp_path / 'mine'

    def export(seed, name='decoder'):
        torch.manual_seed(seed)
        net = decoder_lib.RGBDecoder(cfg)
        pipeline.export_weights('decoder', net, dataclasses.asdict(cfg), {}, str(folder), name)

    export(0)
    export(1, 'other')
    (folder / 'notes.txt').write_text('mine')
    old = contents(folder)
    shutil.copytree(folder, tmp_path / 'old')
    total = run_killed_at(10**9, functools.partial(export, 2), tmp_path)
    new = contents(folder)
    assert (
        new.keys() == old.keys()
        and new['decoder.json'] != old['decoder.json']
        and new['other.json'] == old['other.json']
    )
    for swap in ('exchange', 'two renames'):
        points = range(1, total + 1) if swap == 'exchange' else range(total - 8, total + 1)  # the latter: the swap
        for n in points:
            shutil.rmtree(folder)
            shutil.copytree(tmp_path / 'old', folder)
            action = functools.partial(export, 2)
            if swap == 'two renames':  # file systems without RENAME_EXCHANGE (NFS)
                action = functools.partial(no_exchange, action)
            killed = run_killed_at(n, action, tmp_path)
            if not folder.exists():  # between the two renames: the next lock_folder puts the old version back
                with safety.lock_folder(str(folder)):
                    pass
            assert contents(folder) in (old, new), (swap, n, killed)
            pipeline.load_checkpoint(str(folder / 'decoder.safetensors'))  # the pair's checksum holds
    export(3)
    assert [f for f in os.listdir(tmp_path) if f.startswith('.mine.')] == []  # the killed runs' temporaries


def no_exchange(action):
    def cannot(a, b):
        return False

    safety.exchange = cannot
    action()


def test_kill_9_while_building_the_latent_cache_leaves_no_file_it_trusts(small_data, tmp_path):
    """A cache file is the one an earlier writer tore, or the whole new one, wherever its build is killed; a torn or
    foreign file is found (key, rows, header checksum) and built again, never trusted."""
    enc = latents.build_encoder('da3-tiny').freeze()
    scenes = data.SceneDataset(str(small_data), 'train', num_views=4)
    path = tmp_path / 'cache' / 'scenes_v4.pt'
    logged = []
    build = functools.partial(
        latent_cache.LatentCache.build, str(path), enc, scenes, [0, 1], 0, 2, (1, 3), log=logged.append
    )
    total = run_killed_at(10**9, build, tmp_path)
    whole = path.read_bytes()
    torn = whole[: len(whole) // 2]  # what a writer without a rename leaves when it dies
    for n in range(1, total + 1):
        path.write_bytes(torn)
        run_killed_at(n, build, tmp_path)
        assert path.read_bytes() in (torn, whole), n
    path.write_bytes(torn)
    build()
    assert any('cannot be trusted (RuntimeError: unreadable): building it again' in line for line in logged)
    assert path.read_bytes() == whole
    assert os.listdir(path.parent) == [path.name]  # the killed builds' temporaries are gone
    cache = torch.load(path, weights_only=True)
    rows = len(cache['n_src'])
    assert latent_cache.cache_problem(cache, path.name, rows) == ''
    assert latent_cache.cache_problem(cache, 'other.pt', rows).startswith('its key is')  # a file under another name
    assert latent_cache.cache_problem(cache, path.name, rows + 1) == f'not {rows + 1} rows'
    cache['frames'][0, 0] += 1
    assert latent_cache.cache_problem(cache, path.name, rows) == 'its header checksum differs'


def test_kill_9_while_sample_writes_leaves_the_old_outputs_or_the_new_ones(world, tmp_path):
    """sample.py killed at points of its writing (its first changes, the middle, each step of the swap): --out holds
    the previous output set or the new one, each whole, and the user's own file."""
    out = tmp_path / 'out'
    sampling = ['--data', world['data'], *SAMPLE_FAST, '--out', str(out)]
    sample.main(sampling + ['--scene', '0'])
    (out / 'notes.txt').write_text('mine')
    old = contents(out)
    shutil.copytree(out, tmp_path / 'old')
    again = functools.partial(sample.main, sampling + ['--scene', '1', '--export', 'ply'])  # other files, fewer
    total = run_killed_at(10**9, again, tmp_path)
    new = contents(out)
    assert new['notes.txt'] == b'mine' and set(old) - set(new) and old['grid.png'] != new['grid.png']
    for n in [1, total // 2, total - 4, total - 3, total - 2]:  # the last: before and after the exchange
        shutil.rmtree(out)
        shutil.copytree(tmp_path / 'old', out)
        run_killed_at(n, again, tmp_path)
        assert contents(out) in (old, new), n
    again()
    assert contents(out) == new and [f for f in os.listdir(tmp_path) if f.startswith('.out.')] == []


# ---------------------------------------------------------------- a user's own photos (issue 18)


def write_photos(folder, scene, views, H, W):
    """Frames `views` of a dataset scene as a user has them: frame_XXX.png and a nerfstudio transforms.json."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for v in views:
        export.save_image(scene['images'][v], str(folder / f'frame_{v:03d}.png'))
        Kp = cameras.K_to_pixels(scene['K'][v], H, W)
        frames.append(
            {
                'file_path': f'frame_{v:03d}.png',
                'transform_matrix': cameras.opengl_to_opencv(scene['c2w'][v]).tolist(),
                'fl_x': float(Kp[0, 0]),
                'fl_y': float(Kp[1, 1]),
                'cx': float(Kp[0, 2]),
                'cy': float(Kp[1, 2]),
                'w': W,
                'h': H,
            }
        )
    (folder / 'transforms.json').write_text(json.dumps({'frames': frames}))
    return [str(folder / f'frame_{v:03d}.png') for v in views]


@pytest.fixture(scope='module')
def photos(world_runs):
    """Four frames of a 56-px test scene of the world fixture, with their cameras."""
    s = data.SceneDataset(world_runs['data'], split='test', num_views=4, eval=True)[1]
    return write_photos(world_runs['root'] / 'photos', s, range(4), 56, 56)


def run_photos(argv, out):
    sample.main(['--ckpt-dir', 'runs', '--steps', '1', '--frames', '2', '--out', str(out)] + argv)
    tf = json.loads((out / 'transforms.json').read_text())
    return tf, [f['is_source'] for f in tf['frames']]


def test_every_image_is_a_source_unless_src_holds_some_out(world, photos, tmp_path):
    cams = str(Path(photos[0]).parent / 'transforms.json')
    tf, src = run_photos(['--images', *photos[:3], '--cameras', cams], tmp_path / 'three')
    assert src == [True] * 3 + [False] * 2  # 3 images -> 3 sources, then the 2 trajectory targets
    assert sorted(os.listdir(tmp_path / 'three' / 'images'))[:3] == [
        'source_000.png',
        'source_001.png',
        'source_002.png',
    ]
    for f in tf['frames']:  # every file transforms.json names exists, the sources beside the targets
        assert os.path.isfile(tmp_path / 'three' / f['file_path'])
    tf, src = run_photos(['--images', *photos, '--cameras', cams, '--src', '2'], tmp_path / 'held')
    assert src == [True] * 2 + [False] * 2  # the 2 images after the sources are targets at their own cameras
    given = data.read_transforms(cams)['c2w']
    assert torch.allclose(data.read_transforms(str(tmp_path / 'held' / 'transforms.json'))['c2w'], given, atol=1e-5)
    assert 'psnr' in json.loads((tmp_path / 'held' / 'metrics.json').read_text())['gld']
    grid = np.asarray(Image.open(tmp_path / 'held' / 'grid.png'))
    assert grid.shape[:2] == (3 * 56, 4 * 56)  # sources | generated | ground truth of the held-out views
    assert np.array_equal(grid[112:, 112:168], np.asarray(Image.open(photos[2]).convert('RGB')))
    assert Image.open(tmp_path / 'three' / 'grid.png').size == (5 * 56, 2 * 56)  # no "ground truth" row for photos


def test_one_photo_moves_the_camera_on_every_preset(world, photos, tmp_path, capsys):
    cams = str(Path(photos[0]).parent / 'transforms.json')
    run_photos(['--images', photos[0], '--cameras', cams], tmp_path / 'one')
    t = data.read_transforms(str(tmp_path / 'one' / 'transforms.json'))
    assert t['c2w'].shape[0] == 3 and not torch.allclose(t['c2w'][1:, :3, 3], t['c2w'][0, :3, 3].expand(2, 3))
    src, K = t['c2w'][:1].double(), t['K'][:1].double()
    for traj in ('orbit', 'spiral', 'forward'):
        c2w, _ = cameras.preset_trajectory(src, K, traj, 6)
        assert (c2w[:, :3, 3] - src[0, :3, 3]).norm(dim=-1).max() > 0.01, traj
    capsys.readouterr()
    cameras.preset_trajectory(src, K, 'interp', 6)
    assert 'warning: --traj interp with 1 source(s) leaves every target at the source camera' in capsys.readouterr().out


@pytest.mark.usefixtures('float64')
def test_presets_start_at_the_sources_and_stay_within_their_span():
    centre, up = torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, -1.0, 0.0])
    eyes = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.2], [1.5, 0.0, 0.5]])
    src = cameras.look_at(eyes, centre.expand(3, 3), up)  # three cameras looking at one point
    K = torch.eye(3).expand(3, 3, 3).double()
    assert torch.allclose(cameras.axes_meeting_point(src), centre, atol=1e-9)
    c2w, _ = cameras.preset_trajectory(src, K, 'interp', 7)
    lo, hi = eyes.min(0).values, eyes.max(0).values
    assert ((c2w[:, :3, 3] >= lo - 1e-9) & (c2w[:, :3, 3] <= hi + 1e-9)).all()
    c2w, _ = cameras.preset_trajectory(src, K, 'orbit', 5)  # an arc about the centre from the first to the last source
    assert torch.allclose(c2w[0], src[0], atol=1e-9)
    radius = (src[0, :3, 3] - centre).norm()
    assert torch.allclose((c2w[:, :3, 3] - centre).norm(dim=-1), radius.expand(5))
    last = centre + (src[2, :3, 3] - centre) * radius / (src[2, :3, 3] - centre).norm()
    assert torch.allclose(c2w[-1, :3, 3], last, atol=1e-6)
    assert torch.allclose(c2w[:, :3, 2], torch.nn.functional.normalize(centre - c2w[:, :3, 3], dim=-1), atol=1e-9)
    turn, _ = cameras.preset_trajectory(src, K, 'orbit', 8, degrees=360)  # a full turn: around the centre, no repeat
    angles = torch.atan2(turn[:, 0, 3] - centre[0], turn[:, 2, 3] - centre[2])
    assert len(set(torch.round(torch.rad2deg(angles)).tolist())) == 8 and (angles.max() - angles.min()) > 5


def test_an_implausible_camera_estimate_is_one_line(world, photos, capsys, monkeypatch):
    real = encoder_lib.DA3.geometry

    def broken(self, *args, **kw):  # what real photos gave: fl_x 2469 vs fl_y 15 px, cx -998
        g = real(self, *args, **kw)
        g['K'] = g['K'].clone()
        g['K'][..., 0, 0], g['K'][..., 1, 1], g['K'][..., 0, 2] = 44.0, 0.27, -17.8
        return g

    monkeypatch.setattr(encoder_lib.DA3, 'geometry', broken)
    err, _ = user_error(
        sample.main,
        ['--ckpt-dir', 'runs', '--images', *photos[:2], '--steps', '1', '--out', world['root'] / 'out' / 'broken'],
        capsys,
        'implausible',
        'focal lengths',
        'principal point',
        '--cameras',
    )
    g = {
        'c2w': torch.eye(4).expand(2, 4, 4),
        'K': torch.tensor([[0.8, 0, 0.5], [0, 0.8, 0.5], [0, 0, 1]]).expand(2, 3, 3),
    }
    with pytest.raises(cli.UserError, match='apart at a median depth'):  # two photos, one camera centre
        cameras.check_estimate(g['c2w'], g['K'], torch.ones(2, 8, 8), 8, 8)
    cameras.check_estimate(g['c2w'][:1], g['K'][:1], torch.ones(1, 8, 8), 8, 8)  # one photo: no baseline to check


def test_points_overlay_the_given_cameras(bundled, tmp_path):
    """--images with --cameras: points.ply lies in the user's world, at the true depth of the source views (as well as
    the tiny DA3 sees depth), also when the user's unit is twice as large; transforms.json says whose world it is."""
    _, scenes = bundled
    s = {k: v[0] if torch.is_tensor(v) else v for k, v in scenes[0].items()}
    errs = {}
    for unit in (1.0, 2.0):
        scaled = {**s, 'c2w': s['c2w'].clone()}
        scaled['c2w'][:, :3, 3] *= unit
        paths = write_photos(tmp_path / f'photos{unit}', scaled, range(2), 112, 112)
        out = tmp_path / f'out{unit}'
        sample.main(
            [
                '--images',
                *paths,
                '--cameras',
                str(tmp_path / f'photos{unit}'),
                '--steps',
                '2',
                '--frames',
                '1',
                '--out',
                str(out),
            ]
        )
        errs[unit] = float(
            cross_view_depth_error(
                read_ply_points(out / 'points.ply'), scaled['c2w'][:2], s['K'][:2], s['depths'][:2] * unit
            )
        )
        tf = json.loads((out / 'transforms.json').read_text())
        assert 'the given cameras' in tf['gld_frame'] and str(tmp_path / f'photos{unit}') in tf['gld_frame']
        assert json.loads((out / 'metrics.json').read_text())['export']['frame'] == tf['gld_frame']
    assert errs[1.0] < 0.35 and errs[2.0] < 0.35, errs  # measured: 0.25 both; by the tiny head's centres: 5.6


def test_a_second_run_into_the_same_out_leaves_only_its_files(world, photos, tmp_path, capsys):
    cams = str(Path(photos[0]).parent / 'transforms.json')
    out = tmp_path / 'out'
    run_photos(['--images', *photos[:2], '--cameras', cams, '--frames', '4'], out)
    (out / 'notes.txt').write_text('mine')  # a file of the user's: never removed
    capsys.readouterr()
    run_photos(['--images', *photos[:2], '--cameras', cams, '--frames', '1', '--export', 'ply,nerfstudio'], out)
    printed = capsys.readouterr().out
    run_photos(
        ['--images', *photos[:2], '--cameras', cams, '--frames', '1', '--export', 'ply,nerfstudio'], tmp_path / 'fresh'
    )

    def rel(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    assert rel(out) == sorted(rel(tmp_path / 'fresh') + ['notes.txt'])
    assert 'removed' in printed and f'({len(rel(tmp_path / "fresh"))} files)' in printed


TINY_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'recipes', 'tiny.sh')


def recipe_commands(path):
    """The argv of every `python train.py` command of a recipe script, continuation lines joined."""
    import shlex

    with open(path) as f:
        script = f.read().replace('\\\n', ' ')
    lines = [line.strip() for line in script.splitlines()]
    commands = [line for line in lines if line.startswith('python train.py ')]
    return [shlex.split(command, comments=True)[2:] for command in commands]


def test_readme_training_commands_keep_the_bundled_weights(small_data, tmp_path, capsys, monkeypatch):
    # the README's training chain lives in recipes/tiny.sh
    exporting = [argv for argv in recipe_commands(TINY_RECIPE) if '--export' in argv]
    commands = [' '.join(argv) for argv in exporting]
    assert len(commands) >= 5 and all(c.split('--export ')[1].split()[0] == 'weights/mine' for c in commands), commands
    argv = ['--data', str(small_data), '--stage', 'decoder', *TRAIN_FAST, '--steps', '1', '--out', str(tmp_path / 'r')]
    user_error(
        train.main,
        argv + ['--export', pipeline.WEIGHTS],
        capsys,
        '--export',
        'bundled models',
        '--force',
        keep=[pipeline.WEIGHTS],
    )
    assert not os.path.exists(tmp_path / 'r')  # refused before any work
    # the bundled encoder by name: 'auto' would look in the stand-in below (or in runs/encoder)
    bundled_encoder = os.path.join(pipeline.WEIGHTS, 'encoder.safetensors')
    encoder = ['--encoder-weights', bundled_encoder]
    monkeypatch.setattr(pipeline, 'WEIGHTS', str(tmp_path / 'bundled'))  # --force replaces them (here: a stand-in)
    train.main(argv + encoder + ['--export', str(tmp_path / 'bundled'), '--force'])
    assert os.path.isfile(tmp_path / 'bundled' / 'decoder.safetensors')  # named after the model
    assert 'decoder: encoder' in capsys.readouterr().out  # the stage names the encoder file it used


def test_the_tiny_recipe_runs_end_to_end_at_two_steps(small_data, tmp_path, monkeypatch):
    """bash recipes/tiny.sh in miniature: every train.py command in order, 2 steps each on the small
    data, in a tmp folder; each finds the checkpoints and exports of the commands before it."""
    import subprocess

    assert subprocess.run(['bash', '-n', TINY_RECIPE]).returncode == 0
    commands = recipe_commands(TINY_RECIPE)
    assert len(commands) >= 15
    # the recipe's runs/ and weights/mine/ (its --out, --export, --init, 'auto') land here
    monkeypatch.chdir(tmp_path)
    tiny = ['--data', str(small_data), *TRAIN_FAST, '--steps', '2']
    for argv in commands:
        # an --init checkpoint of an earlier run: its last step, which is 2 here
        argv = [re.sub(r'ckpt_\d{7}\.pt$', 'ckpt_0000002.pt', arg) for arg in argv]
        train.main(argv + tiny)
    exported = sorted(path.stem for path in (tmp_path / 'weights' / 'mine').glob('*.safetensors'))
    assert exported == ['decoder', 'encoder', 'level0', 'level0_ind', 'level1', 'level2', 'level3']


def test_the_scaling_probe_gives_every_width_the_same_cpu_minutes(small_data, tmp_path):
    """bash recipes/scaling.sh in miniature (a budget of 0.01 CPU minutes): the three widths each stop at the first
    step past the budget, with an export of their preset's width."""
    import subprocess

    env = {**os.environ, 'BUDGET': '0.01', 'DATA': str(small_data), 'RUNS': str(tmp_path)}
    recipe = os.path.join(os.path.dirname(TINY_RECIPE), 'scaling.sh')
    small = [*TRAIN_FAST, '--steps', '50', '--ckpt-every', '50']
    subprocess.run(['bash', recipe, *small], env=env, check=True, capture_output=True)
    for preset in ('gld-tiny', 'gld-tiny-2x', 'gld-tiny-4x'):
        run = tmp_path / f'probe_{preset}'
        ck = torch.load(train.list_checkpoints(str(run))[-1], weights_only=True)
        assert 0.01 <= ck['train_min'] and ck['step'] < 50  # it stopped for the budget, not for --steps
        meta = json.loads((run / 'export' / 'level1.json').read_text())
        assert meta['config']['enc_width'] == model.PRESETS[preset].enc_width


def write_colmap_text(folder, c2w, K, H, W, names):
    """cameras.txt and images.txt (no points) of a COLMAP text model, from the format description."""
    os.makedirs(folder, exist_ok=True)
    w2c = cameras.c2w_to_w2c(c2w.double())
    q, t, Kp = cameras.rotmat_to_quat(w2c[:, :3, :3]), w2c[:, :3, 3], cameras.K_to_pixels(K.double(), H, W)

    def g(xs):
        return ' '.join(f'{float(x):.17g}' for x in xs)

    with open(os.path.join(folder, 'cameras.txt'), 'w') as f:
        f.write('# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n')
        f.writelines(f'{v + 1} PINHOLE {W} {H} {g([k[0, 0], k[1, 1], k[0, 2], k[1, 2]])}\n' for v, k in enumerate(Kp))
    with open(os.path.join(folder, 'images.txt'), 'w') as f:
        f.write('# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n# POINTS2D[] as (X, Y, POINT3D_ID)\n')
        f.writelines(f'{v + 1} {g(q[v])} {g(t[v])} {v + 1} {n}\n\n' for v, n in enumerate(names))


@pytest.mark.usefixtures('float64')
def test_cameras_convert_from_colmap_nerfstudio_and_npz(tmp_path):
    gen = torch.Generator().manual_seed(5)
    V, H, W = 3, 28, 42
    c2w = random_c2w(V, gen).double()
    K = torch.tensor([[0.9, 0, 0.48], [0, 1.2, 0.52], [0, 0, 1]], dtype=torch.float64).expand(V, 3, 3)
    points = {
        'view': torch.tensor([0, 1, 2]),
        'xyz': torch.randn(3, 3, dtype=torch.float64),
        'rgb': torch.zeros(3, 3, dtype=torch.uint8),
        'uv': torch.rand(3, 2, dtype=torch.float64),
    }
    names = [f'photo_{v}.jpg' for v in range(V)]

    def same(cams):
        return (
            torch.allclose(cams['c2w'].double(), c2w, atol=1e-5)
            and torch.allclose(cams['K'].double(), K, atol=1e-6)
            and cams['names'] == names
        )

    for text in (False, True):  # COLMAP binary (as export.py writes it) and text (as COLMAP does), read back
        project = tmp_path / ('text' if text else 'bin')
        if text:
            write_colmap_text(str(project / 'sparse' / '0'), c2w, K, H, W, names)
        else:
            export.write_colmap(str(project / 'sparse' / '0'), c2w, K, H, W, names, points)
        cams = export.read_cameras(str(project))
        assert same(cams) and cams['size'] == (H, W) and cams['files'][0] == str(project / 'images' / names[0])
        if not text:
            pycolmap = pytest.importorskip('pycolmap')
            rec = pycolmap.Reconstruction(str(project / 'sparse' / '0'))
            assert sorted(im.name for im in rec.images.values()) == names
        export.write_transforms(
            str(project / 'transforms.json'), cams['c2w'], cams['K'], H, W, ['images/' + n for n in names], [True] * V
        )  # then nerfstudio in
        tf = export.read_cameras(str(project / 'transforms.json'))
        assert same({**tf, 'names': [os.path.basename(n) for n in tf['names']]})
        assert tf['files'][0] == str(project / 'images' / names[0])
    npz = tmp_path / 'npz'
    npz.mkdir()
    for v in range(V):
        np.savez(npz / f'photo_{v}.npz', c2w=c2w[v].numpy(), K=cameras.K_to_pixels(K[v], H, W).numpy())
    cams = export.read_cameras(str(npz), image_size=(H, W))
    assert same({**cams, 'names': [n + '.jpg' for n in cams['names']]})
    with pytest.raises(cli.UserError, match='add H and W'):
        export.read_cameras(str(npz))


def write_release_demo(folder, s, views, invert=False):
    """Frames of a synth_scene s as the GLD release's demo/<scene>/nerfstudio/images_4 holds them: frame_NNNNN.png
    beside frame_NNNNN.npz with pose (camera-to-world, OpenGL camera axes) and intrinsic (pixels); invert: each pose
    written as its inverse (world-to-camera), the mistake check_poses names -> the image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    H, W = s['images'].shape[1:3]
    paths = []
    for v in views:
        stem = folder / f'frame_{v + 1:05d}'
        Image.fromarray(s['images'][v]).save(f'{stem}.png')
        pose = cameras.opengl_to_opencv(s['c2w'][v].double())
        if invert:
            pose = cameras.rigid_inverse(pose)
        np.savez(f'{stem}.npz', pose=pose.numpy(), intrinsic=cameras.K_to_pixels(s['K'][v].double(), H, W).numpy())
        paths.append(f'{stem}.png')
    return paths


def test_release_demo_frames_run_and_inverted_poses_are_named(tmp_path, capsys):
    """--cameras on a folder of the release's demo frames, read as its reader reads them; through sample.py with the
    bundled models, the same poses inverted run with one warning line naming the mistake, kept in metrics.json."""
    s = synth.synth_scene([0, 1, 2], frames=4, size=112)
    demo = tmp_path / 'demo' / 'scene' / 'nerfstudio' / 'images_4'
    write_release_demo(demo, s, (0, 3))
    cams = export.read_cameras(str(demo), image_size=(112, 112))
    torch.testing.assert_close(cams['c2w'], s['c2w'][[0, 3]].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(cams['K'], s['K'][[0, 3]].float(), atol=1e-6, rtol=0)
    paths = write_release_demo(tmp_path / 'inverted', s, (0, 3), invert=True)
    out = tmp_path / 'out'
    capsys.readouterr()
    sample.main(['--images', *paths, '--cameras', str(tmp_path / 'inverted'), '--frames', '2', '--out', str(out)])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning: ')]
    assert len(warnings) == 1 and 'than the same cameras inverted in OpenGL axes' in warnings[0], warnings
    assert "(transforms.json, the GLD release's pose) given as camera-to-world; invert them" in warnings[0]
    check = json.loads((out / 'metrics.json').read_text())['export']['camera_check']
    assert check['warning'] == warnings[0].removeprefix('warning: ')
    assert check['photo_error']['inverted in OpenGL axes'] < check['photo_error']['given'] / 1.5


def test_images_of_different_sizes_are_named_with_their_sizes(tmp_path):
    for name, size in (('a.png', (56, 28)), ('b.png', (42, 28))):
        Image.new('RGB', size).save(tmp_path / name)
    with pytest.raises(cli.UserError, match=r'differ in size \(.*a.png 56x28, .*b.png 42x28\); resize them'):
        sample.read_images([str(tmp_path / 'a.png'), str(tmp_path / 'b.png')])


def test_cameras_of_other_photos_are_refused(world, photos, tmp_path, capsys):
    """A camera file matched by name must not hand one scene's camera to another scene's photo of the same name."""
    other = write_photos(
        tmp_path / 'other', data.SceneDataset(world['data'], split='test', num_views=4, eval=True)[0], range(2), 56, 56
    )
    run_photos(['--images', *photos[:2], '--cameras', str(Path(photos[0]).parent)], tmp_path / 'o')
    user_error(
        sample.main,
        [
            '--ckpt-dir',
            'runs',
            '--images',
            *other,
            '--cameras',
            Path(photos[0]).parent,
            '--steps',
            '1',
            '--out',
            tmp_path / 'o',
        ],
        capsys,
        'frame_000.png',
        'other photos',
        keep=[tmp_path / 'o'],
    )  # the failed run leaves the earlier outputs as they were


def test_progress_is_tqdm_on_a_terminal_and_plain_lines_in_logs(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, every in ((Terminal(), 10.0), (io.StringIO(), 0), (io.StringIO(), 10.0)):
        monkeypatch.setattr(sys, 'stderr', stream)
        for _ in cli.progress(range(3), desc='steps', every=every):
            pass
        text = stream.getvalue()
        if isinstance(stream, Terminal):  # tqdm's bar, redrawn in place
            assert text.count('\r') >= 2 and re.search(r'steps: 100%.*3/3', text), text
        elif every:  # a log file: a loop shorter than `every` seconds writes nothing
            assert text == ''
        else:  # a log file, every step: one plain line per status, the last at 3/3
            lines = text.splitlines()
            assert '\r' not in text and text.endswith('\n'), text
            assert [line.split('|')[0] for line in lines] == [f'steps: {p:3d}%' for p in (0, 33, 67, 100)], text
            assert lines[-1].split('|')[2].startswith(' 3/3 ')


def test_the_readme_camera_example_reads_as_documented(tmp_path):
    readme = Path(os.path.dirname(os.path.abspath(sample.__file__)), 'README.md').read_text()
    example = readme.split('## Your own photos')[1].split('```json\n')[1].split('```')[0]
    (tmp_path / 'transforms.json').write_text(example)
    cams = export.read_cameras(str(tmp_path / 'transforms.json'))
    assert cams['names'] == ['frame_000.jpg', 'frame_007.jpg']
    assert torch.allclose(cams['c2w'][1, :3, 3], torch.tensor([0.5, 0.0, 0.0]))  # 0.5 units to the right
    assert torch.allclose(cams['c2w'][0, :3, 2], torch.tensor([0.0, 0.0, -1.0]))  # OpenGL: the camera looks along -z
    assert torch.allclose(cams['K'][0], torch.tensor([[410 / 504, 0, 0.5], [0, 410 / 280, 0.5], [0, 0, 1]]))


# ====================================================================================================
# Other latent spaces behind one switch (issue 17): vggt.py, dinov2.py, vae.py through latents.build_encoder.
# Official layouts: VGGT-1B from testdata/vggt-1b-keys.txt, DINOv2 (hub .pth) and the SD VAE (ldm) written
# below from their published architectures; large models on the meta device.
# ====================================================================================================


def meta_state_dict(shapes):
    return {k: torch.empty(s, device='meta') for k, s in shapes.items()}


def dinov2_hub_keys(C, depth, registers=0, grid=37):
    """facebookresearch/dinov2 DinoVisionTransformer state-dict keys and shapes (GELU MLP ratio 4, LayerScale)."""
    keys = {
        'cls_token': (1, 1, C),
        'pos_embed': (1, 1 + grid * grid, C),
        'mask_token': (1, C),
        'patch_embed.proj.weight': (C, 3, 14, 14),
        'patch_embed.proj.bias': (C,),
        'norm.weight': (C,),
        'norm.bias': (C,),
    }
    if registers:
        keys['register_tokens'] = (1, registers, C)
    for i in range(depth):
        for n, s in [
            ('norm1', (C,)),
            ('norm2', (C,)),
            ('attn.qkv', (3 * C, C)),
            ('attn.proj', (C, C)),
            ('mlp.fc1', (4 * C, C)),
            ('mlp.fc2', (C, 4 * C)),
        ]:
            keys[f'blocks.{i}.{n}.weight'], keys[f'blocks.{i}.{n}.bias'] = s, (s[0],)
        keys[f'blocks.{i}.ls1.gamma'] = keys[f'blocks.{i}.ls2.gamma'] = (C,)
    return keys


def sd_vae_ldm_keys(ch=128, mult=(1, 2, 4, 4), res=2, z=4):
    """CompVis ldm AutoencoderKL (kl-f8) keys and shapes: encoder.down.i.block.j, mid.attn_1, decoder.up.i (by level)."""
    keys = {}

    def conv(name, cin, cout, k):
        keys[name + '.weight'], keys[name + '.bias'] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[name + '.weight'] = keys[name + '.bias'] = (c,)

    def resnet(name, cin, cout):
        (
            norm(name + '.norm1', cin),
            conv(name + '.conv1', cin, cout, 3),
            norm(name + '.norm2', cout),
            conv(name + '.conv2', cout, cout, 3),
        )
        if cin != cout:
            conv(name + '.nin_shortcut', cin, cout, 1)

    def mid(name, c):
        resnet(name + '.block_1', c, c), resnet(name + '.block_2', c, c), norm(name + '.attn_1.norm', c)
        for n in ('q', 'k', 'v', 'proj_out'):
            conv(f'{name}.attn_1.{n}', c, c, 1)

    conv('encoder.conv_in', 3, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(res):
            resnet(f'encoder.down.{i}.block.{j}', cin, ch * m)
            cin = ch * m
        if i < len(mult) - 1:
            conv(f'encoder.down.{i}.downsample.conv', cin, cin, 3)
    mid('encoder.mid', cin), norm('encoder.norm_out', cin), conv('encoder.conv_out', cin, 2 * z, 3)
    (
        conv('quant_conv', 2 * z, 2 * z, 1),
        conv('post_quant_conv', z, z, 1),
        conv('decoder.conv_in', z, cin, 3),
        mid('decoder.mid', cin),
    )
    for i in reversed(range(len(mult))):
        for j in range(res + 1):
            resnet(f'decoder.up.{i}.block.{j}', cin, ch * mult[i])
            cin = ch * mult[i]
        if i > 0:
            conv(f'decoder.up.{i}.upsample.conv', cin, cin, 3)
    norm('decoder.norm_out', cin), conv('decoder.conv_out', cin, 3, 3)
    return keys


def vggt_1b_keys():
    path = TESTDATA / 'vggt-1b-keys.txt'  # VGGT-1B's names, shapes and dtypes (facebookresearch/vggt, meta device)
    with open(path) as f:
        rows = [line.rstrip('\n').split('\t') for line in f if line.strip() and not line.startswith('#')]
    return {k: tuple(int(d) for d in re.findall(r'\d+', s)) for k, s, _ in rows}


def check_strict_loading(enc, official, extra_prefix_ok=()):
    """official {key: shape} loads into enc (meta); a missing key, an extra key and a wrong shape each fail readably."""
    sd = meta_state_dict(official)
    family = {vggt_lib.VGGT: vggt_lib, dinov2_lib.DINOv2: dinov2_lib, vae_lib.VAE: vae_lib}[type(enc)]
    family.load_weights(enc, sd)
    own = {k: v for k, v in (enc.vit if isinstance(enc, dinov2_lib.DINOv2) else enc).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in own.items()} == {
        k: s for k, s in official.items() if not k.startswith(extra_prefix_ok)
    }
    first = sorted(official)[0]
    broken = {**{k: v for k, v in sd.items() if k != first}, 'blocks.99.extra': torch.empty(3, device='meta')}
    wrong = sorted(k for k in official if k.endswith('.weight') and not k.startswith(extra_prefix_ok))[0]
    broken[wrong] = torch.empty(1, device='meta')
    with pytest.raises(ValueError) as e:
        family.load_weights(enc, broken)
    msg = str(e.value)
    assert 'missing (1)' in msg and first in msg and 'blocks.99.extra' in msg and wrong in msg and 'shape' in msg


def test_vggt_1b_loads_its_official_layout_strictly():
    official = vggt_1b_keys()
    assert len(official) == 1797
    with torch.device('meta'):
        enc = latents.build_encoder('vggt-1b')
    check_strict_loading(enc, official, extra_prefix_ok=vggt_lib.IGNORED_PREFIXES)
    n = sum(p.numel() for k, p in enc.named_parameters() if k.startswith('aggregator.'))
    assert n == 909_112_320 and enc.dim == 2048  # the notes' count for aggregator.*


@pytest.mark.parametrize(
    'name,dim,depth,reg,params',
    [
        ('dinov2-s', 384, 12, 0, 22_056_576),
        ('dinov2-b-reg', 768, 12, 4, 86_583_552),
        ('dinov2-l', 1024, 24, 0, 304_368_640),
    ],
)
def test_dinov2_loads_the_hub_layout_strictly(name, dim, depth, reg, params):
    official = dinov2_hub_keys(dim, depth, reg)
    assert sum(math.prod(s) for s in official.values()) == params  # ViT-S/B/L14 as published
    with torch.device('meta'):
        enc = latents.build_encoder(name)
    check_strict_loading(enc, official)
    assert (enc.dim, enc.num_levels, enc.has_geometry, enc.can_propagate) == (dim, 1, False, False)


def test_sd_vae_loads_the_ldm_layout_strictly(capsys):
    official = sd_vae_ldm_keys()
    assert len(official) == 248 and sum(math.prod(s) for s in official.values()) == 83_653_863  # SD's kl-f8
    with torch.device('meta'):
        enc = latents.build_encoder('vae')
    check_strict_loading(enc, official)
    full_ckpt = {
        **{'first_stage_model.' + k: v for k, v in meta_state_dict(official).items()},
        'model.diffusion_model.out.0.weight': torch.empty(4, device='meta'),
        'first_stage_model.loss.logvar': torch.empty((), device='meta'),
    }
    vae_lib.load_weights(enc, full_ckpt)  # an SD checkpoint: its first stage, the loss skipped with a note
    assert 'ignoring 1 loss.*' in capsys.readouterr().out
    tiny = latents.build_encoder('vae-tiny')  # the same architecture and layout at 32 channels
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == sd_vae_ldm_keys(32, (1, 1, 2, 2), 1)


@torch.no_grad()
def test_vggt_propagation_reproduces_the_deeper_levels():
    """A level leads with its views' 5 special tokens (issue 28); resumed from level k with them, the frozen pairs
    reproduce every deeper level exactly, special tokens included (notes 6.4); the learned initial tokens do not."""
    torch.manual_seed(0)
    enc = latents.build_encoder('vggt-tiny').freeze()
    images = torch.rand(1, 3, 3, 42, 56)
    levels, special = enc.encode(images, return_cls=True)
    assert [lv.shape for lv in levels] == [(1, 3, 17, 128)] * 4 and special[0].shape == (1, 3, 5, 128)
    assert enc.special == 5 and torch.equal(levels[2][:, :, :5], special[2])
    for k in (0, 1, 2):
        prop, prop_special = enc.propagate(levels[k], k, None, (3, 4), return_cls=True)
        assert len(prop) == 3 - k
        for a, b in zip(prop + prop_special, levels[k + 1 :] + special[k + 1 :]):
            assert torch.equal(a, b)
    frame_half = levels[1].clone()
    frame_half[..., :64] = 0  # the state is the global half: the frame half of level k is not read
    assert all(map(torch.equal, enc.propagate(frame_half, 1, None, (3, 4)), levels[2:]))
    learned = levels[1].clone()
    learned[:, :, :5, 64:] = enc.aggregator.special_tokens(1, 3)  # the initial tokens instead of level 1's
    assert not torch.allclose(enc.propagate(learned, 1, None, (3, 4))[1], levels[3], atol=1e-3)
    assert torch.equal(enc.normalize_levels(levels)[3], levels[3][:, :, 5:])  # heads and decoder: the patches


@torch.no_grad()
def test_vggt_pipeline_resumes_from_the_generated_special_tokens():
    """The cascade's propagation resumes from the generated level 1's own special tokens: given the true level 1,
    levels 2, 3 are exactly the encoder's; changing the generated special tokens changes the camera head's output
    (it reads the propagated ones), while level 1's patches stay as given."""
    torch.manual_seed(0)
    enc = latents.build_encoder('vggt-tiny').freeze()
    dec_cfg = replace(decoder_lib.PRESETS['tiny'], feat_dim=enc.dim, num_levels=4, patch=14)
    pipe = pipeline.Pipeline(enc, decoder_lib.RGBDecoder(dec_cfg).eval(), {}, log=lambda *_: None, progress=False)
    images, c2w, K = scene(V=3)
    true = enc.encode(images)
    out = pipe.generate(images, c2w, K, n_src=1, given={1: true[1], 0: true[0]})
    assert all(map(torch.equal, out['levels'][2:], true[2:]))
    moved = true[1].clone()
    moved[:, 1:, :5] += 0.5 * torch.randn(1, 2, 5, enc.dim) * moved[:, 1:, :5].std()  # the targets' special tokens
    out2 = pipe.generate(images, c2w, K, n_src=1, given={1: moved, 0: true[0]})
    assert torch.equal(out2['levels'][1][:, :, 5:], true[1][:, :, 5:])
    assert not torch.allclose(out2['geometry']['extrinsics'], out['geometry']['extrinsics'], atol=1e-4)


def test_latent_stats_of_special_tokens(synth112, monkeypatch, tmp_path):
    """VGGT's special tokens get their own statistics, pooled over the 5 tokens as released (issue 28): computed
    from the encoder, stored per token, applied to a level's first 5 tokens, saved and loaded; a --stats file
    without them is refused for vggt-*."""
    torch.manual_seed(0)
    enc = latents.build_encoder('vggt-tiny').eval()
    batches = [torch.rand(1, 2, 3, 28, 28) for _ in range(2)]
    stats = latents.compute_latent_stats(enc, batches, levels=(1,))
    with torch.no_grad():
        feats = [enc.encode(b)[1] for b in batches]
    special = torch.cat([f[:, :, :5].reshape(-1, enc.dim) for f in feats]).double()
    patches = torch.cat([f[:, :, 5:].reshape(-1, enc.dim) for f in feats]).double()
    assert stats.special_mean[1].shape == (5, enc.dim)
    torch.testing.assert_close(stats.special_mean[1][2].double(), special.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.special_var[1][4].double(), special.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.mean[1].double(), patches.mean(0), atol=1e-5, rtol=1e-5)
    level = feats[0]
    z = stats.normalize(level, 1)
    special_std = torch.sqrt(stats.special_var[1] + 1e-5)
    torch.testing.assert_close(z[:, :, :5], (level[:, :, :5] - stats.special_mean[1]) / special_std)
    torch.testing.assert_close(z[:, :, 5:], (level[:, :, 5:] - stats.mean[1]) / torch.sqrt(stats.var[1] + 1e-5))
    torch.testing.assert_close(stats.denormalize(z, 1), level, atol=1e-4, rtol=1e-5)
    stats.save(tmp_path / 's.safetensors')
    loaded = latents.LatentStats.load(tmp_path / 's.safetensors')
    assert torch.equal(loaded.special_var[1], stats.special_var[1])
    latents.LatentStats(stats.mean, stats.var).save(tmp_path / 'patches_only.pt')
    monkeypatch.chdir(synth112)
    run = ['--data', 'data', '--encoder', 'vggt-tiny', '--views', '3', '--batch-size', '1', '--steps', '1']
    with pytest.raises(cli.UserError, match=r"no \['special_mean1'\] for vggt-tiny"):
        train.main(run + ['--stats', str(tmp_path / 'patches_only.pt'), '--out', str(tmp_path / 'run')])


@torch.no_grad()
def test_vggt_frames_other_than_the_first_are_permutation_equivariant():
    """Frame blocks are per view and global attention is a set over views; only frame 0 (the reference) has its own
    camera and register tokens: permuting frames 1.. permutes every output, moving frame 0 does not."""
    torch.manual_seed(1)
    enc = latents.build_encoder('vggt-tiny').freeze()
    images = torch.rand(1, 4, 3, 28, 42)
    levels, special = enc.encode(images, return_cls=True)
    perm = torch.tensor([0, 3, 1, 2])
    lv_p, sp_p = enc.encode(images[:, perm], return_cls=True)
    for a, b in zip(levels + special, lv_p + sp_p):
        torch.testing.assert_close(a[:, perm], b, atol=1e-5, rtol=1e-4)
    swap = torch.tensor([1, 0, 2, 3])
    assert not torch.allclose(enc.encode(images[:, swap])[3][:, swap], levels[3], atol=1e-3)
    agg = enc.aggregator  # with one token set for all frames, frame 0 is no longer special
    agg.camera_token[:, 0], agg.register_token[:, 0] = agg.camera_token[:, 1], agg.register_token[:, 1]
    torch.testing.assert_close(enc.encode(images[:, swap])[3][:, swap], enc.encode(images)[3], atol=1e-5, rtol=1e-4)


def test_vggt_token_layout_follows_the_notes_checklist(monkeypatch):
    """Checklist items 4-7: [camera, reg x4, patches] per frame, frame 0 index 0 of the learned tokens and the others
    index 1; RoPE (0,0) for the 5 special tokens and (y+1, x+1) for patches, the same per-frame positions in the
    global blocks; the DINO stage's patch tokens after its final norm follow the special tokens."""
    torch.manual_seed(2)
    enc = latents.build_encoder('vggt-tiny').freeze()
    agg = enc.aggregator
    sp = agg.special_tokens(2, 3)
    assert sp.shape == (2, 3, 5, 64)
    assert torch.equal(sp[1, 0, 0], agg.camera_token[0, 0, 0]) and torch.equal(sp[0, 2, 0], agg.camera_token[0, 1, 0])
    assert torch.equal(sp[0, 0, 1:], agg.register_token[0, 0]) and torch.equal(sp[1, 1, 1:], agg.register_token[0, 1])
    pos = encoder_lib.rope_positions((2, 3), 5, 'cpu')
    assert pos[:5].eq(0).all() and pos[5:].tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        x = agg.tokens(images)
        mean, std = (
            torch.tensor(constants.IMAGENET_MEAN).view(3, 1, 1),
            torch.tensor(constants.IMAGENET_STD).view(3, 1, 1),
        )
        assert torch.equal(x[:, :, 5:], agg.patch_embed(((images - mean) / std).flatten(0, 1)).unflatten(0, (1, 2)))
    seen = []
    tables = encoder_lib.rope_tables
    monkeypatch.setattr(encoder_lib, 'rope_tables', lambda p, hd: seen.append(p.clone()) or tables(p, hd))
    with torch.no_grad():
        enc.encode(images)
    assert torch.equal(seen[1], seen[0].repeat(2, 1))  # global: each frame keeps its own positions


@torch.no_grad()
def test_dinov2_features_are_raes_and_per_view():
    torch.manual_seed(3)
    enc = latents.build_encoder('dinov2-s-reg').freeze()
    with torch.no_grad():
        enc.vit.norm.weight.uniform_(0.5, 2)  # an affine RAE drops
    images = torch.rand(1, 3, 3, 28, 42)
    (lv,) = enc.encode(images)
    assert lv.shape == (1, 3, 6, 384)
    torch.testing.assert_close(lv.mean(-1), torch.zeros(1, 3, 6), atol=1e-5, rtol=0)  # LayerNorm without affine
    torch.testing.assert_close(lv.var(-1, unbiased=False), torch.ones(1, 3, 6), atol=1e-3, rtol=0)
    torch.testing.assert_close(enc.encode(images[:, 1:2])[0][:, 0], lv[:, 1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_vae_tokens_are_2x2_patches_of_the_scaled_posterior_mean():
    torch.manual_seed(4)
    vae = latents.build_encoder('vae-tiny').freeze()
    images = torch.rand(1, 2, 3, 32, 48)
    (lv,) = vae.encode(images)
    mean = vae.posterior(images.flatten(0, 1))[0] * vae.cfg.scale  # (2,4,4,6)
    assert lv.shape == (1, 2, 2 * 3, 16) and (vae.dim, vae.patch) == (16, 16)
    torch.testing.assert_close(lv[0, 1, 4], mean[1, :, 2:4, 2:4].flatten())  # token (1,1): channels (z, py, px)
    rgb = vae.rgb_decoder()([lv], (2, 3))
    torch.testing.assert_close(rgb, vae.decode_latent(mean / vae.cfg.scale).unflatten(0, (1, 2)))
    with pytest.raises(ValueError, match='multiples of 16'):
        vae.encode(torch.rand(1, 1, 3, 28, 28))


def test_da3_tiny_recon_is_the_same_vit_trained_for_pixels_only():
    """The DINO analogue of the convergence comparison: da3-tiny's backbone (same keys and shapes), no geometry head,
    a linear pixel head laid out patch by patch, whose MSE a few steps on one batch bring down."""
    torch.manual_seed(0)
    tiny, recon = (latents.build_encoder(n) for n in ('da3-tiny', 'da3-tiny-recon'))

    def backbone(m):
        return {k: v.shape for k, v in m.state_dict().items() if k.startswith('backbone.')}

    assert backbone(tiny) == backbone(recon) and tiny.has_geometry and not recon.has_geometry
    assert not any(k.startswith(('head.', 'cam_dec.')) for k in recon.state_dict())
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        recon.pixel_head.weight.zero_()
        recon.pixel_head.bias.copy_(torch.arange(3 * 14 * 14.0))
        tiled = recon.reconstruct(images)  # every 14x14 patch is the bias
    torch.testing.assert_close(tiled[0, 1, :, 14:, 28:], torch.arange(3 * 14 * 14.0).view(3, 14, 14))
    recon.pixel_head.reset_parameters()
    opt = torch.optim.Adam(recon.parameters(), 2e-3)
    losses = []
    for _ in range(40):
        loss, parts = recon.training_loss({'images': images})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(parts['mse']))
    assert losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope='module')
def synth112(tmp_path_factory):
    """A synthetic set at 112 px: a multiple of DA3/VGGT/DINOv2's 14 and of the VAE token's 16."""
    root = tmp_path_factory.mktemp('synth112')
    synth.write_synth(str(root / 'data'), 2, 1, frames=6, size=112, seed=5)
    return root


@pytest.mark.parametrize('name', ['da3-tiny', 'da3-tiny-recon', 'vggt-tiny', 'dinov2-s', 'vae-tiny'])
def test_every_latent_trains_and_samples_with_only_the_encoder_switched(name, synth112, monkeypatch):
    """The same commands with --encoder NAME: (the tiny VAE's own training,) the RGB decoder where the latent needs
    one, the default diffusion level, then the pipeline; what the latent lacks is said in the outputs."""
    monkeypatch.chdir(synth112)
    for folder in ('runs', 'out'):
        shutil.rmtree(folder, ignore_errors=True)
    run = [
        '--data',
        'data',
        '--encoder',
        name,
        '--views',
        '3',
        '--batch-size',
        '1',
        '--steps',
        '1',
        '--log-every',
        '1',
        '--eval-every',
        '1',
        '--stats-batches',
        '1',
        '--warmup',
        '1',
    ]
    enc = latents.build_encoder(name)
    if hasattr(
        enc, 'training_loss'
    ):  # da3-tiny(-recon), vae-tiny: trained here (--ckpt-dir below takes every model from runs/)
        train.main(['--stage', 'encoder'] + run)
        assert train.list_checkpoints(
            f'runs/{pipeline.model_name("encoder", name)}'
        )  # where pipeline.load_encoder finds it
    if not enc.has_rgb_decoder:
        train.main(['--stage', 'decoder'] + run)
    out = train.main(run)
    assert out == f'runs/level{min(1, enc.num_levels - 1)}' + ('' if name == 'da3-tiny' else f'-{name}')
    if enc.num_levels > 1:  # the cascade's M1->0: sampling with --ckpt-dir takes every model from runs/
        train.main(['--level', '0'] + run)
    ck = torch.load(train.list_checkpoints(out)[-1], weights_only=False)
    assert ck['config']['latent_dim'] == enc.dim and ck['config']['cam_patch'] == enc.patch
    # GLD (VGGT): 5 special tokens per view diffused, with their own statistics (issue 28)
    assert ck['config']['special_tokens'] == enc.special and ('special_mean1' in ck['stats']) == (enc.special > 0)
    res = sample.main(
        ['--ckpt-dir', 'runs', '--encoder', name, '--data', 'data', '--views', '3', '--steps', '1', '--out', 'out']
    )
    assert res['images'].shape[2:] == (3, 112, 112) and len(res['levels']) == enc.num_levels
    assert res['levels'][0].shape[2] == enc.special + (112 // enc.patch) ** 2
    meta = json.loads(Path('out/metrics.json').read_text())
    if enc.has_geometry:
        assert res['geometry']['depth'].shape[2:] == (112, 112) and os.path.exists('out/depth.npy')
    else:
        assert res['geometry'] == {} and 'no geometry head' in meta['export'] and not os.path.exists('out/depth.npy')


def test_what_a_latent_lacks_is_refused_or_said(synth112, monkeypatch, tmp_path):
    monkeypatch.chdir(synth112)
    run = ['--data', 'data', '--views', '3', '--batch-size', '1', '--steps', '1', '--eval-every', '0']
    with pytest.raises(cli.UserError, match='no training objective'):
        train.main(['--stage', 'encoder', '--encoder', 'dinov2-s'] + run)
    with pytest.raises(cli.UserError, match='its own decoder'):
        train.main(['--stage', 'decoder', '--encoder', 'vae-tiny'] + run)
    with pytest.raises(cli.UserError, match=r'levels 0\.\.0'):
        train.main(['--level', '1', '--encoder', 'dinov2-s'] + run)
    with pytest.raises(cli.UserError, match='python train.py --stage decoder --encoder dinov2-s'):
        pipeline.load_pipeline(None, encoder='dinov2-s')  # only da3-tiny has bundled models
    with pytest.raises(cli.UserError, match='unknown encoder; pass one of .*vggt-1b'):
        latents.build_encoder('vggt-2b')
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / 'a.png')
    with pytest.raises(cli.UserError, match='no geometry head to estimate cameras'):
        sample.user_scene([str(tmp_path / 'a.png')], '', None, latents.build_encoder('dinov2-s'))


@pytest.mark.parametrize(
    'name,parts',
    [
        ('vggt-tiny', {'encode (vggt-tiny)', 'propagate level 1 -> 2, 3', 'RGB decode (tiny)', 'geometry head'}),
        ('vae-tiny', {'encode (vae-tiny)', 'RGB decode (own)'}),
    ],
)
def test_bench_times_what_each_latent_has(name, parts):
    rows = bench.main(
        [
            '--encoder',
            name,
            '--views',
            '2',
            '--size',
            '32' if name == 'vae-tiny' else '28',
            '--batch',
            '1',
            '--iters',
            '1',
            '--warmup',
            '0',
            '--skip',
            'train,sample',
        ]
    )
    timed = [r for r in rows if 'ms' in r]
    assert {r['part'] for r in timed} == parts and all(r['ms'] > 0 for r in timed)


# ----------------------------------------------------------------------------- project structure
IMPORT_LAYERS = [
    ('train', 'sample', 'bench'),
    ('pipeline', 'latent_cache', 'view'),
    ('official',),
    ('latents',),
    ('vggt', 'vae'),
    ('dinov2',),
    ('export', 'decoder'),
    ('encoder', 'model', 'diffusion'),
    ('data', 'geometry_head'),
    ('metrics', 'synth'),
    ('cameras', 'safety'),
    ('cli', 'constants', 'runlog'),
]


def test_imports_flow_one_way_as_the_readme_says():
    """Each module imports only modules of later layers (README "Files"); the entry scripts never import each other."""
    import ast

    here = os.path.dirname(os.path.abspath(__file__))
    layer = {m: i for i, ms in enumerate(IMPORT_LAYERS) for m in ms}
    assert set(layer) == {f[:-3] for f in os.listdir(here) if f.endswith('.py') and not f.startswith('test_')}
    readme = Path(here, 'README.md').read_text()
    assert ' -> '.join(', '.join(f'`{m}.py`' for m in ms) for ms in IMPORT_LAYERS[1:]) in ' '.join(readme.split())
    for m, i in layer.items():
        tree = ast.parse(Path(here, m + '.py').read_text())
        deps = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        }
        bad = [d for d in deps if d in layer and layer[d] <= i]
        assert not bad, f'{m}.py imports {bad}, which are not to its right'
