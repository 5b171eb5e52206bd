"""Behavioural tests for cameras.py (fast, CPU, float64)."""
import math

import pytest
import torch

import cameras as cam



@pytest.fixture(autouse=True)
def float64():
    """Run every test in float64 and restore the default dtype afterwards (other modules share the run)."""
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
    return cam.make_pose(random_rotation(n, seed=seed), torch.randn(n, 3, generator=g))


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


K0 = torch.tensor([[0.9, 0.0, 0.48], [0.0, 1.2, 0.53], [0.0, 0.0, 1.0]], dtype=torch.float64)


def project(c2w, K, X):
    """World point X (3,) -> normalised image coordinates (2,)."""
    x = K @ (cam.c2w_to_w2c(c2w)[:3, :3] @ X + cam.c2w_to_w2c(c2w)[:3, 3])
    return x[:2] / x[2]


# ---------------------------------------------------------------- conversions

def test_w2c_c2w_round_trip():
    c2w = random_poses(5)
    w2c = cam.c2w_to_w2c(c2w)
    assert torch.allclose(w2c, torch.linalg.inv(c2w), atol=1e-12)
    assert torch.allclose(cam.w2c_to_c2w(w2c), c2w, atol=1e-12)


def test_opengl_to_opencv_known_camera():
    # OpenGL camera at (1,2,3) looking down world -z with y up: in OpenCV it looks along -z, y down.
    gl = cam.make_pose(torch.eye(3), torch.tensor([1.0, 2.0, 3.0]))
    cv = cam.opengl_to_opencv(gl)
    assert torch.allclose(cv[:3, 2], torch.tensor([0.0, 0.0, -1.0]))  # forward
    assert torch.allclose(cv[:3, 1], torch.tensor([0.0, -1.0, 0.0]))  # down
    assert torch.allclose(cv[:3, 3], gl[:3, 3])
    assert torch.allclose(cam.opengl_to_opencv(cv), gl)


def test_K_pixels_round_trip():
    Kpix = cam.K_to_pixels(K0, 60, 80)
    assert torch.allclose(Kpix[0], torch.tensor([72.0, 0.0, 38.4]))
    assert torch.allclose(Kpix[1], torch.tensor([0.0, 72.0, 31.8]))
    assert torch.allclose(cam.K_to_normalized(Kpix, 60, 80), K0)


def test_normalize_poses():
    c2w = torch.stack([random_poses(4, seed=1), random_poses(4, seed=2)])  # (B,V,4,4)
    rel, scale = cam.normalize_poses(c2w, ref=-1)
    assert scale.shape == (2,)
    assert torch.allclose(rel[:, -1], torch.eye(4).expand(2, 4, 4), atol=1e-12)
    assert torch.allclose(rel[..., :3, 3].norm(dim=-1).amax(-1), torch.ones(2))
    # relative rotations preserved, relative translations scaled
    a, b = cam.c2w_to_w2c(c2w[:, 0]) @ c2w[:, 1], cam.c2w_to_w2c(rel[:, 0]) @ rel[:, 1]
    assert torch.allclose(a[:, :3, :3], b[:, :3, :3], atol=1e-10)
    assert torch.allclose(a[:, :3, 3] * scale[:, None], b[:, :3, 3], atol=1e-10)
    rel0, _ = cam.normalize_poses(c2w, ref=0, by='max_abs')
    assert torch.allclose(rel0[:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-12)
    assert torch.allclose(rel0[..., :3, 3].abs().amax((-1, -2)), torch.ones(2))


def test_normalize_poses_identical_cameras():
    c2w = random_poses(1).expand(3, 4, 4)
    rel, scale = cam.normalize_poses(c2w)
    assert torch.isfinite(rel).all() and scale.item() == 1.0
    assert torch.allclose(rel, torch.eye(4).expand(3, 4, 4), atol=1e-12)


# ---------------------------------------------------------------- rays

def test_plucker_unit_directions_orthogonal_moments():
    c2w = random_poses(3)
    r = cam.plucker_rays(c2w, K0.expand(3, 3, 3), 5, 7)
    assert r.shape == (3, 6, 5, 7)
    d, m = r[:, :3], r[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(3, 5, 7))
    assert (d * m).sum(1).abs().max() < 1e-12
    # pixel (u, v) is sampled at its centre: the ray equals world_rays at ((u+.5)/W, (v+.5)/H)
    o, dd = cam.world_rays(c2w[1], K0, torch.tensor([[(4 + 0.5) / 7, (2 + 0.5) / 5]]))
    assert torch.allclose(r[1, :3, 2, 4], dd[0])
    assert torch.allclose(r[1, 3:, 2, 4], torch.cross(o[0], dd[0], dim=0))


def test_plucker_centre_pixel_is_optical_axis_and_official_offset():
    c2w = random_poses(1)[0]
    K = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    r = cam.plucker_rays(c2w, K, 5, 5)
    assert torch.allclose(r[:3, 2, 2], c2w[:3, 2])  # centre pixel of an odd image looks along +z
    official = cam.plucker_rays(c2w, K, 5, 5, pixel_offset=(-0.5, 0.5))
    assert torch.allclose(official[..., 1:], r[..., :-1])  # x shifted by one pixel, y unchanged
    assert not torch.allclose(official, r)


def test_rays_of_two_cameras_meet_at_the_point():
    X = torch.tensor([0.3, -0.2, 4.0])
    cams = cam.look_at(torch.tensor([[0.0, 0, 0], [2.0, 0.5, 0.5]]), torch.tensor([0.0, 0.0, 4.5]),
                       torch.tensor([0.0, -1.0, 0.0]))
    for c2w in cams:
        xy = project(c2w, K0, X)
        o, d = cam.world_rays(c2w, K0, xy[None])
        m = torch.cross(o[0], d[0], dim=0)
        assert torch.cross(X, d[0], dim=0).sub(m).norm() < 1e-10  # distance of X from the Plücker line
        assert torch.cross(X + 0.1, d[0], dim=0).sub(m).norm() > 1e-3


# ---------------------------------------------------------------- PRoPE

def test_prope_inverse_and_official_quirk():
    c2w = random_poses(4)
    K = K0.expand(4, 3, 3)
    P, P_inv = cam.prope_matrices(c2w, K)
    assert torch.allclose(P_inv @ P, torch.eye(4).expand(4, 4, 4), atol=1e-10)
    P2, P_inv2 = cam.prope_matrices(c2w, K, official=True)
    assert torch.allclose(P2, P)
    assert not torch.allclose(P_inv2 @ P2, torch.eye(4).expand(4, 4, 4), atol=1e-3)
    # principal point shifted to 0: a point on camera 0's optical axis maps to image x = y = 0
    Kc = K0.clone()
    Kc[:2, 2] = 0.5
    P, _ = cam.prope_matrices(c2w[0], Kc)
    x = P @ torch.cat([c2w[0, :3, 3] + 3.0 * c2w[0, :3, 2], torch.ones(1)])
    assert torch.allclose(x[:2], torch.zeros(2), atol=1e-10) and abs(x[2] - 3.0) < 1e-10


@pytest.mark.parametrize('official', [False, True])
def test_prope_relative_to_world_frame(official):
    c2w, K = random_poses(3), K0.expand(3, 3, 3)
    T = random_poses(1, seed=7)[0]  # one rigid change of world frame for all cameras
    P, P_inv = cam.prope_matrices(c2w, K, official)
    Pm, P_invm = cam.prope_matrices(T @ c2w, K, official)
    rel = P[:, None] @ P_inv[None]  # (V,V,4,4): P_a P_inv_b
    assert torch.allclose(Pm[:, None] @ P_invm[None], rel, atol=1e-10)
    assert not torch.allclose(Pm, P, atol=1e-3)


# ---------------------------------------------------------------- rotations and trajectories

def test_quaternion_round_trip_including_half_turns():
    R = torch.cat([random_rotation(50), rot_y(math.pi)[None], torch.diag(torch.tensor([-1.0, -1, 1]))[None]])
    q = cam.rotmat_to_quat(R)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(R))) and (q[:, 0] >= 0).all()
    assert torch.allclose(cam.quat_to_rotmat(q), R, atol=1e-12)


def test_interpolate_cameras_endpoints_and_constant_steps():
    a, b = random_poses(2, seed=3)
    traj = cam.interpolate_cameras(a, b, 7)
    assert traj.shape == (7, 4, 4)
    assert torch.allclose(traj[0], a, atol=1e-12) and torch.allclose(traj[-1], b, atol=1e-12)
    steps = cam.rotation_angle(traj[:-1, :3, :3].transpose(-1, -2) @ traj[1:, :3, :3])
    assert steps.min() > 1e-3 and torch.allclose(steps, steps[0].expand(6), atol=1e-10)
    moves = (traj[1:, :3, 3] - traj[:-1, :3, 3]).norm(dim=-1)
    assert torch.allclose(moves, moves[0].expand(6))
    K = cam.interpolate_K(K0, 2 * K0, 3)
    assert torch.allclose(K[1], 1.5 * K0)


def test_orbit_looks_at_centre():
    center = torch.tensor([0.0, 0.0, 2.0])
    traj = cam.orbit(center, 2.0, 8, elevation_deg=15.0)
    to_c = center - traj[:, :3, 3]
    assert torch.allclose(to_c.norm(dim=-1), torch.full((8,), 2.0))
    assert torch.allclose(traj[:, :3, 2], to_c / 2.0, atol=1e-12)
    R = traj[:, :3, :3]
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3).expand(8, 3, 3), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(8))
    assert torch.allclose(cam.orbit(center, 2.0, 4)[0], torch.eye(4), atol=1e-12)  # starts at the identity


def test_spiral_and_dolly():
    ref = random_poses(1, seed=4)[0]
    focus = ref[:3, 3] + 2.0 * ref[:3, 2]
    sp = cam.spiral(ref, 9, radius=0.2, depth=2.0)
    to_f = torch.nn.functional.normalize(focus - sp[:, :3, 3], dim=-1)
    assert torch.allclose(sp[:, :3, 2], to_f, atol=1e-12)
    assert torch.allclose((sp[:, :3, 3] - ref[:3, 3]).norm(dim=-1), torch.full((9,), 0.2))
    dolly = cam.forward_dolly(ref, 5, 1.0)
    assert torch.allclose(dolly[:, :3, :3], ref[:3, :3].expand(5, 3, 3))
    assert torch.allclose(dolly[-1, :3, 3], ref[:3, 3] + ref[:3, 2]) and torch.allclose(dolly[0], ref)


# ---------------------------------------------------------------- alignment and metrics

def test_umeyama_recovers_similarity():
    src = torch.randn(20, 3, generator=torch.Generator().manual_seed(5))
    R, s, t = random_rotation(seed=6), 2.5, torch.tensor([1.0, -2.0, 0.5])
    s_, R_, t_ = cam.umeyama(src, s * src @ R.T + t)
    assert abs(s_ - s) < 1e-5 and torch.allclose(R_, R, atol=1e-5) and torch.allclose(t_, t, atol=1e-5)
    s_, R_, _ = cam.umeyama(src, src @ R.T, with_scale=False)
    assert s_ == 1.0 and torch.allclose(R_, R, atol=1e-5)
    # mirrored target: the best proper rotation, never a reflection
    dst = src * torch.tensor([1.0, 1.0, -1.0])
    s_, R_, t_ = cam.umeyama(dst=dst, src=src)
    assert abs(torch.det(R_) - 1) < 1e-10

    def residual(s):  # best t for this s and R_
        return (dst - s * src @ R_.T - (dst.mean(0) - s * R_ @ src.mean(0))).pow(2).sum()
    assert residual(s_) < min(residual(0.97 * s_), residual(1.03 * s_))
    assert torch.allclose(residual(s_), (dst - s_ * src @ R_.T - t_).pow(2).sum())


def square_trajectory(e=0.0):
    """gt: identity rotations, centres on a square (A,B,C,D); est: A,C raised by e and B,D lowered by
    e in z. By symmetry the best alignment has R = I and t = 0."""
    c = torch.tensor([[1.0, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]])
    gt = cam.make_pose(torch.eye(3).expand(4, 3, 3), c)
    est = cam.make_pose(torch.eye(3).expand(4, 3, 3), c + torch.tensor([[0, 0, e], [0, 0, -e]]).repeat(2, 1))
    return est, gt


def test_pose_metrics_zero_and_similarity_invariant():
    gt = random_poses(6, seed=8)
    assert all(v < 1e-6 for v in cam.pose_metrics(gt, gt).values())
    g = torch.Generator().manual_seed(9)
    small = cam.quat_to_rotmat(torch.cat([torch.ones(6, 1), 0.1 * torch.randn(6, 3, generator=g)], -1))
    noisy = cam.make_pose(gt[:, :3, :3] @ small, gt[:, :3, 3] + 0.1 * torch.randn(6, 3, generator=g))
    m = cam.pose_metrics(noisy, gt)
    assert min(m.values()) > 1e-3
    S = random_poses(1, seed=11)[0]
    moved = S @ noisy
    moved[:, :3, 3] = 3.0 * moved[:, :3, 3]  # a global similarity: rotate, translate, scale by 3
    m2 = cam.pose_metrics(moved, gt)
    assert all(abs(m[k] - m2[k]) < 1e-8 for k in m)


def test_pose_metrics_hand_computed_translation():
    e = 0.1
    est, gt = square_trajectory(e)
    m = cam.pose_metrics(est, gt, with_scale=False)  # aligned est = est: errors +-e in z
    assert abs(m['ate'] - e) < 1e-10 and abs(m['rpe_t'] - 2 * e) < 1e-10 and m['rpe_r'] < 1e-10
    s = 2 / (2 + e * e)  # Sim3: scale = sum of singular values / sum ||est_i||^2 = 8 / (4 (2 + e^2))
    m = cam.pose_metrics(est, gt)  # aligned error_i = (s - 1) c_i + s delta_i
    assert abs(m['ate'] - math.sqrt(2 * (s - 1) ** 2 + s * s * e * e)) < 1e-10
    assert abs(m['rpe_t'] - 2 * math.sqrt((s - 1) ** 2 + s * s * e * e)) < 1e-10


def test_pose_metrics_hand_computed_rotation():
    est, gt = square_trajectory()
    a = math.radians(10.0)
    est[1, :3, :3] = rot_y(a)  # camera B turned about y, the direction of the B -> C step
    m = cam.pose_metrics(est, gt)  # E_0 and E_1 rotate by 10 degrees, E_2 by 0; no translation error
    assert m['ate'] < 1e-10 and m['rpe_t'] < 1e-10
    assert abs(m['rpe_r'] - 10.0 * math.sqrt(2 / 3)) < 1e-8
