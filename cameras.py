"""Cameras: conventions, pose normalisation, Plücker rays, PRoPE matrices, trajectories, camera checks, pose metrics.

Conventions (every module follows them): poses are OpenCV camera-to-world c2w (...,4,4), x right, y down, z forward.
Intrinsics K (...,3,3) are normalised (row 0 / W, row 1 / H: principal point ~(0.5, 0.5) at any resolution); pixel
(u, v) covers [u, u+1) x [v, v+1), centre +0.5. Shape legend: B batch, V views, H W image, N points, n trajectory
length. References: PRoPE (Li et al. 2025); Umeyama 1991; evo (ATE/RPE); the GLD release for its quirks.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from cli import UserError


# ----------------------------------------------------------------------------- checks of cameras read or estimated
def check_cameras(c2w, K, where):
    """c2w (V,4,4) finite and rigid (1e-3), K (V,3,3) with positive focals, else a UserError naming where, the view."""
    bad = lambda mask: int(mask.nonzero()[0, 0])  # the first offending view
    finite = torch.isfinite(c2w).flatten(1).all(1) & torch.isfinite(K).flatten(1).all(1)
    if not finite.all():
        raise UserError(f'{where}: camera of view {bad(~finite)} holds NaN or inf values; fix or drop that frame')
    R = c2w[:, :3, :3].double()
    err = (R @ R.transpose(-1, -2) - torch.eye(3, dtype=R.dtype)).abs().flatten(1).amax(1)
    ortho = (err < 1e-3) & (torch.linalg.det(R) > 0)
    if not ortho.all():
        v = bad(~ortho)
        raise UserError(
            f'{where}: the rotation of view {v} is not orthonormal (|R R^T - I| = {float(err[v]):.2g}, '
            f'det {float(torch.linalg.det(R[v])):.3g}); write rigid camera poses (OpenCV c2w / w2c)'
        )
    focal = (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0)
    if not focal.all():
        v = bad(~focal)
        raise UserError(
            f'{where}: view {v} has focal lengths fx {float(K[v, 0, 0]):.3g}, fy {float(K[v, 1, 1]):.3g}; '
            'they must be positive (normalised: fx / W, fy / H)'
        )


def check_estimate(c2w, K, depth, H, W):
    """DA3's estimate (fx/fy within 2x, principal point inside, centres >= 1% of median depth apart), else UserError."""
    fx, fy, pp, problems = K[:, 0, 0] * W, K[:, 1, 1] * H, K[:, :2, 2], []
    aspect = (fx / fy).clamp_min(1e-9)
    if ((aspect > 2) | (aspect < 0.5)).any():
        v = int((aspect.log().abs()).argmax())
        problems.append(f'focal lengths fx {float(fx[v]):.4g}, fy {float(fy[v]):.4g} px of photo {v}')
    if ((pp < 0) | (pp > 1)).any():
        v = int(((pp - 0.5).abs().amax(-1)).argmax())
        problems.append(
            f'principal point ({float(pp[v, 0] * W):.4g}, {float(pp[v, 1] * H):.4g}) px of photo {v}, '
            f'outside the {W}x{H} image'
        )
    baseline = float((c2w[:, None, :3, 3] - c2w[None, :, :3, 3]).norm(dim=-1).max()) if len(c2w) > 1 else None
    if baseline is not None and baseline < 0.01 * float(depth.median()):
        problems.append(f'the photos {baseline:.2g} apart at a median depth of {float(depth.median()):.3g}')
    if problems:
        raise UserError(
            'the cameras DA3 estimated for --images are implausible ('
            + '; '.join(problems)
            + '); pass your cameras with --cameras (see README, "Your own photos"), or --keep-estimate '
            'to go on anyway'
        )


# ----------------------------------------------------------------------------- basic conversions
def make_pose(R, t):  # (...,3,3), (...,3) -> (...,4,4)
    T = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3], T[..., :3, 3], T[..., 3, 3] = R, t, 1
    return T


def rigid_inverse(T):  # [R t; 0 1]^-1 = [R^T  -R^T t; 0 1]
    Rt = T[..., :3, :3].transpose(-1, -2)
    return make_pose(Rt, -(Rt @ T[..., :3, 3:])[..., 0])


c2w_to_w2c = w2c_to_c2w = rigid_inverse


def K_to_pixels(K, H, W):
    return K * K.new_tensor([[W], [H], [1.0]])


def K_to_normalized(Kpix, H, W):
    return Kpix / Kpix.new_tensor([[W], [H], [1.0]])


def opengl_to_opencv(c2w):  # OpenGL/nerfstudio (y up, z back) <-> OpenCV c2w: negate camera y, z
    return c2w * c2w.new_tensor([1.0, -1.0, -1.0, 1.0])  # scales columns 0..3


def normalize_poses(c2w, ref=-1, by='norm'):
    """c2w (...,V,4,4) relative to view `ref` in unit extent -> (c2w_rel, scale (...,)): by='norm', the largest ||t||
    becomes 1 (ours); 'max_abs', the largest |t| component (the release, ref=-1). Coinciding cameras get scale 1."""
    rel = rigid_inverse(c2w.select(-3, ref).unsqueeze(-3)) @ c2w  # (...,V,4,4)
    t = rel[..., :3, 3]  # (...,V,3)
    if by not in ('norm', 'max_abs'):
        raise ValueError(f"by must be 'norm' or 'max_abs', got {by!r}")
    extent = t.norm(dim=-1).amax(-1) if by == 'norm' else t.abs().amax((-1, -2))
    scale = torch.where(extent > 1e-8, 1 / extent.clamp_min(1e-8), torch.ones_like(extent))  # (...,)
    rel[..., :3, 3] = t * scale[..., None, None]
    return rel, scale


# ----------------------------------------------------------------------------- rays and PRoPE
def world_rays(c2w, K, xy):  # rays through normalised xy (...,N,2): centres (...,1,3), unit directions (...,N,3)
    pts = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)  # (...,N,3) homogeneous
    d_cam = pts @ torch.linalg.inv(K).transpose(-1, -2)  # (...,N,3) K^-1 [x, y, 1]
    d = F.normalize(d_cam @ c2w[..., :3, :3].transpose(-1, -2), dim=-1)  # rotate into the world
    return c2w[..., None, :3, 3], d


def pixel_centres(H, W, offset=(0.5, 0.5), device=None, dtype=torch.float32):
    """Normalised coordinates [(u + offset_x) / W, (v + offset_y) / H] of every pixel -> (H,W,2) (x, y)."""
    u = (torch.arange(W, dtype=dtype, device=device) + offset[0]) / W
    v = (torch.arange(H, dtype=dtype, device=device) + offset[1]) / H
    return torch.stack(torch.meshgrid(v, u, indexing='ij')[::-1], -1)


def plucker_rays(c2w, K, H, W, pixel_offset=(0.5, 0.5)):
    """Plücker map (...,6,H,W): [d, o x d] of the ray through each pixel (u, v) + pixel_offset (release: -0.5, 0.5)."""
    xy = rearrange(pixel_centres(H, W, pixel_offset, K.device, K.dtype), 'H W xy -> (H W) xy')
    o, d = world_rays(c2w, K, xy)  # (...,1,3), (...,HW,3)
    rays = torch.cat([d, torch.linalg.cross(o.expand_as(d), d, dim=-1)], -1)  # (...,HW,6): [d, moment o x d]
    return rearrange(rays, '... (H W) c -> ... c H W', H=H)


def prope_matrices(c2w, K, official=False):
    """PRoPE P = lift(K') w2c, P_inv = P^-1 = c2w lift(K'^-1) (...,4,4); logits see P_a P_b^-1 only (frame-invariant).
    official=True: the release's P_inv = c2w lift(K') (K', not K'^-1), so there P_inv P != I."""
    Kc = prope_K(K)
    return lift(Kc) @ rigid_inverse(c2w), c2w @ lift(Kc if official else torch.linalg.inv(Kc))


def prope_K(K):  # K' of PRoPE: the normalised principal point shifted by -0.5 (image centre at 0)
    return K - K.new_tensor([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])


def lift(K):  # PRoPE's lift: K (...,3,3) in the top-left of a 4x4 identity
    L = torch.eye(4, dtype=K.dtype, device=K.device).expand(*K.shape[:-2], 4, 4).clone()
    L[..., :3, :3] = K
    return L


# ----------------------------------------------------------------------------- quaternions (w, x, y, z)
def rotmat_to_quat(m):
    """Rotations (...,3,3) -> unit quaternions (...,4) (w, x, y, z), w >= 0; row i of cand is 4 q_i q (pivot i)."""
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    q2 = torch.stack([1 + tr, *(1 + 2 * m[..., i, i] - tr for i in range(3))], -1)  # (...,4) = 4 q_i^2
    wx, wy, wz = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    xy, xz, yz = m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1]
    cand = torch.stack(
        [
            torch.stack([q2[..., 0], wx, wy, wz], -1),
            torch.stack([wx, q2[..., 1], xy, xz], -1),
            torch.stack([wy, xy, q2[..., 2], yz], -1),
            torch.stack([wz, xz, yz, q2[..., 3]], -1),
        ],
        -2,
    )
    i = q2.argmax(-1, keepdim=True)  # (...,1) the pivot
    q = F.normalize(cand.gather(-2, i[..., None].expand(*i.shape, 4))[..., 0, :], dim=-1)  # (...,4)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


def quat_to_rotmat(q):  # (...,4) (w, x, y, z), any norm -> (...,3,3)
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    entries = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        -1,
    )  # (...,9), row-major
    return rearrange(entries, '... (row col) -> ... row col', row=3)


def slerp(q0, q1, t):  # along the shorter arc: q0, q1 (4,), t (n,) in [0,1] -> (n,4)
    dot = (q0 * q1).sum()
    q1, dot = (-q1, -dot) if dot < 0 else (q1, dot)
    theta = torch.arccos(dot.clamp(max=1.0))
    if theta < 1e-6:  # (nearly) the same rotation: linear interpolation is exact enough
        return F.normalize(torch.lerp(q0, q1, t[:, None]), dim=-1)
    w0, w1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return w0[:, None] * q0 + w1[:, None] * q1


# ----------------------------------------------------------------------------- trajectories (each returns c2w (n,4,4))
def path_through(c2w, K, s):
    """c2w (n,4,4), K (n,3,3) at s (n,) in [0, N-1] on the path through c2w (N,4,4), K: slerp rotations, lerp rest."""
    i = s.floor().long().clamp(0, max(len(c2w) - 2, 0))  # (n,) the segment of each camera
    poses, Ks = [], []
    for j, t in zip(i.tolist(), (s - i).tolist()):
        b = min(j + 1, len(c2w) - 1)
        q = slerp(rotmat_to_quat(c2w[j, :3, :3]), rotmat_to_quat(c2w[b, :3, :3]), s.new_tensor([t]))
        poses.append(make_pose(quat_to_rotmat(q)[0], torch.lerp(c2w[j, :3, 3], c2w[b, :3, 3], t)))
        Ks.append(torch.lerp(K[j], K[b], t))
    return torch.stack(poses), torch.stack(Ks)


def arc(c2w_ref, centre, up, degrees, n):
    """n cameras: c2w_ref (4,4) turned about the axis (centre, up) by 0..degrees (a full turn excludes its end)."""
    angle = torch.linspace(0, math.radians(degrees), n + 1 if abs(degrees) >= 360 else n, dtype=c2w_ref.dtype)[:n]
    k = F.normalize(up.to(c2w_ref.dtype), dim=0)  # the unit axis
    cross = torch.zeros(3, 3, dtype=k.dtype, device=k.device)
    cross[0, 1], cross[0, 2], cross[1, 0], cross[1, 2], cross[2, 0], cross[2, 1] = -k[2], k[1], k[2], -k[0], -k[1], k[0]
    c, s = angle.cos()[:, None, None], angle.sin()[:, None, None]
    R = c * torch.eye(3, dtype=k.dtype) + s * cross + (1 - c) * torch.outer(k, k)  # (n,3,3) Rodrigues
    eye = centre + (c2w_ref[:3, 3] - centre) @ R.transpose(-1, -2)  # (n,3)
    return make_pose(R @ c2w_ref[:3, :3], eye)


def axes_meeting_point(c2w):  # least-squares point nearest the optical axes; None if parallel or behind one
    o, d = c2w[:, :3, 3], c2w[:, :3, 2]  # (N,3) centres and viewing directions
    P = torch.eye(3, dtype=o.dtype) - d[:, :, None] * d[:, None, :]  # (N,3,3) projections orthogonal to each axis
    A, b = P.sum(0), (P @ o[:, :, None]).sum(0)[:, 0]
    if len(c2w) < 2 or torch.linalg.eigvalsh(A)[0] < 1e-3 * len(c2w):
        return None
    p = torch.linalg.solve(A, b)
    return p if bool((((p - o) * d).sum(-1) > 0).all()) else None


def look_at(eye, target, up):  # OpenCV c2w (...,4,4) at eye (...,3), z towards target, y (down) opposite up
    z = F.normalize(target - eye, dim=-1)
    x = F.normalize(torch.linalg.cross(z, up.expand_as(z), dim=-1), dim=-1)
    return make_pose(torch.stack([x, torch.linalg.cross(z, x, dim=-1), z], -1), eye)  # y = z x x


def spiral(c2w_ref, n, radius=0.1, depth=1.0, turns=2.0):
    """n cameras circling c2w_ref in its image plane (radius growing over the first turn), looking `depth` ahead."""
    R, c = c2w_ref[:3, :3], c2w_ref[:3, 3]
    theta = torch.linspace(0, 2 * math.pi * turns, n, dtype=R.dtype, device=R.device)[:, None]  # (n,1)
    r = radius * (theta / (2 * math.pi)).clamp(max=1)  # (n,1)
    eye = c + r * (theta.cos() * R[:, 0] + theta.sin() * R[:, 1])  # (n,3)
    return look_at(eye, (c + depth * R[:, 2]).expand_as(eye), -R[:, 1])


def forward_dolly(c2w_ref, n, distance):  # n cameras from c2w_ref along its viewing axis by distance (ends included)
    s = torch.linspace(0, distance, n, dtype=c2w_ref.dtype, device=c2w_ref.device)[:, None]  # (n,1)
    return make_pose(c2w_ref[:3, :3].expand(n, 3, 3), c2w_ref[:3, 3] + s * c2w_ref[:3, 2])


def preset_trajectory(c2w_src, K_src, traj, n, degrees=None):
    """Targets c2w (n,4,4), K of preset traj from sources c2w_src (N,4,4), in units of their largest distance from the
    first; orbit: about where the optical axes meet (else a unit ahead) by `degrees` (default: to the last source)."""
    a, N = c2w_src[0], len(c2w_src)
    dist = float((c2w_src[:, :3, 3] - a[:3, 3]).norm(dim=-1).max())
    dist = dist if dist > 1e-6 else 1.0
    if traj == 'interp':
        c2w, K = path_through(c2w_src, K_src, torch.linspace(0, N - 1, n + 2, dtype=c2w_src.dtype)[1:-1])
    else:
        K, up = K_src[:1].expand(n, 3, 3), -a[:3, 1]
        if traj == 'orbit':
            centre = axes_meeting_point(c2w_src) if N > 1 else None
            centre = centre if centre is not None else a[:3, 3] + a[:3, 2] * dist
            if degrees is None:
                u, w = a[:3, 3] - centre, c2w_src[-1, :3, 3] - centre
                degrees = math.degrees(math.atan2(float(torch.linalg.cross(u, w) @ up), float(u @ w)))
                degrees = degrees if abs(degrees) > 1 else 30.0
            c2w = arc(a, centre, up, degrees, n)
        else:
            c2w = spiral(a, n, radius=0.2 * dist, depth=dist) if traj == 'spiral' else forward_dolly(a, n, 0.5 * dist)
    moved = (c2w[:, :3, 3] - a[:3, 3]).norm(dim=-1).max() / dist
    if float(moved + rotation_angle(a[:3, :3].T @ c2w[:, :3, :3]).abs().max()) < 1e-3:
        print(
            f'warning: --traj {traj} with {N} source(s) leaves every target at the source camera; pass '
            '--traj orbit, spiral or forward to move'
        )
    return c2w, K


# ----------------------------------------------------------------------------- alignment and pose metrics
def umeyama(src, dst, with_scale=True):
    """Similarity (s, R, t) minimising sum ||dst - (s R src + t)||^2, src, dst (N,3); R proper (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d  # (N,3)
    U, D, Vh = torch.linalg.svd(xd.T @ xs / len(src))  # cross-covariance (3,3)
    S = torch.ones(3, dtype=src.dtype, device=src.device)
    if torch.det(U) * torch.det(Vh) < 0:
        S[2] = -1  # reflection fix
    R = U @ torch.diag(S) @ Vh
    s = (D * S).sum() / xs.pow(2).sum(-1).mean() if with_scale else src.new_tensor(1.0)
    return s, R, mu_d - s * R @ mu_s


def rotation_angle(R):  # radians, of (...,3,3) rotations, via atan2 (accurate near 0 and pi)
    skew = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
    )  # (...,3) = 2 sin(angle) axis
    cos = (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2
    return torch.atan2(skew.norm(dim=-1) / 2, cos)


def pose_metrics(est_c2w, gt_c2w, with_scale=True):
    """ATE, RPE (delta 1; rpe_r in degrees) of est_c2w vs gt_c2w (V,4,4), aligned as evo --align --correct_scale:
    P = umeyama(est, gt centres) est, E_i = (Q_i^-1 Q_{i+1})^-1 (P_i^-1 P_{i+1}), Q the ground truth."""
    s, R, t = umeyama(est_c2w[:, :3, 3], gt_c2w[:, :3, 3], with_scale)
    est = make_pose(R @ est_c2w[:, :3, :3], s * est_c2w[:, :3, 3] @ R.T + t)  # (V,4,4)
    ate = (est[:, :3, 3] - gt_c2w[:, :3, 3]).norm(dim=-1).pow(2).mean().sqrt()
    E = rigid_inverse(rigid_inverse(gt_c2w[:-1]) @ gt_c2w[1:]) @ (rigid_inverse(est[:-1]) @ est[1:])  # (V-1,4,4)
    rpe_t = E[:, :3, 3].norm(dim=-1).pow(2).mean().sqrt()
    rpe_r = torch.rad2deg(rotation_angle(E[:, :3, :3])).pow(2).mean().sqrt()
    return {'ate': ate.item(), 'rpe_r': rpe_r.item(), 'rpe_t': rpe_t.item()}
