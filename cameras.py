"""Cameras: conventions, pose normalisation, depth and projection, Plücker rays, PRoPE,
trajectories, checks, metrics.

Conventions (every module follows them): poses are OpenCV camera-to-world c2w (...,4,4), x right, y
down, z forward. Intrinsics K (...,3,3) are normalised (row 0 / W, row 1 / H: principal point
~(0.5, 0.5) at any resolution); pixel (u, v) covers [u, u+1) x [v, v+1), centre +0.5. Shape legend:
B batch, V views, H W image, N points, n trajectory length. References: PRoPE (Li et al. 2025);
Umeyama 1991; evo (ATE/RPE); the GLD release for its quirks.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from cli import UserError


# ----------------------------------------------------------------------------- camera checks
def check_cameras(c2w, K, where):
    """c2w (V,4,4) finite and rigid (1e-3), K (V,3,3) with positive focals, else a UserError."""

    def first(mask):  # the first offending view
        return int(mask.nonzero()[0, 0])

    finite = torch.isfinite(c2w).flatten(1).all(1)
    finite &= torch.isfinite(K).flatten(1).all(1)
    if not finite.all():
        v = first(~finite)
        problem = f'camera of view {v} holds NaN or inf values'
        raise UserError(f'{where}: {problem}; fix or drop that frame')
    R = rotation(c2w).double()
    identity = torch.eye(3, dtype=R.dtype)
    RRt = R @ R.mT
    err = (RRt - identity).abs().flatten(1).amax(1)
    det = torch.linalg.det(R)
    ortho = (err < 1e-3) & (det > 0)
    if not ortho.all():
        v = first(~ortho)
        raise UserError(
            f'{where}: the rotation of view {v} is not orthonormal '
            f'(|R R^T - I| = {err[v]:.2g}, det {det[v]:.3g}); '
            'write rigid camera poses (OpenCV c2w / w2c)'
        )
    fx = K[:, 0, 0]
    fy = K[:, 1, 1]
    focal = (fx > 0) & (fy > 0)
    if not focal.all():
        v = first(~focal)
        raise UserError(
            f'{where}: view {v} has focal lengths fx {fx[v]:.3g}, fy {fy[v]:.3g}; '
            'they must be positive (normalised: fx / W, fy / H)'
        )


def check_estimate(c2w, K, depth, H, W):
    """UserError unless fx/fy is within 2x, pp inside, centres >= 1% of the median depth apart."""
    fx = K[:, 0, 0] * W
    fy = K[:, 1, 1] * H
    pp = K[:, :2, 2]
    problems = []
    aspect = (fx / fy).clamp_min(1e-9)
    skewed = (aspect > 2) | (aspect < 0.5)
    if skewed.any():
        v = int(aspect.log().abs().argmax())
        problems.append(f'focal lengths fx {fx[v]:.4g}, fy {fy[v]:.4g} px of photo {v}')
    outside = (pp < 0) | (pp > 1)
    if outside.any():
        v = int((pp - 0.5).abs().amax(-1).argmax())
        px = pp[v, 0] * W
        py = pp[v, 1] * H
        point = f'({px:.4g}, {py:.4g}) px'
        problems.append(f'principal point {point} of photo {v}, outside the {W}x{H} image')
    if len(c2w) > 1:
        centres = translation(c2w)
        gaps = (centres[:, None] - centres[None, :]).norm(dim=-1)  # (V,V)
        baseline = float(gaps.max())
        median = float(depth.median())
        if baseline < 0.01 * median:
            problems.append(f'the photos {baseline:.2g} apart at a median depth of {median:.3g}')
    if problems:
        found = '; '.join(problems)
        raise UserError(
            f'the cameras DA3 estimated for --images are implausible ({found}); '
            'pass your cameras with --cameras (see README, "Your own photos"), '
            'or --keep-estimate to go on anyway'
        )


# ----------------------------------------------------------------------------- basic conversions
def rotation(T):  # (...,4,4) -> (...,3,3)
    return T[..., :3, :3]


def translation(T):  # (...,4,4) -> (...,3); of a c2w, the camera centre
    return T[..., :3, 3]


def make_pose(R, t):  # (...,3,3), (...,3) -> (...,4,4)
    T = R.new_zeros(*R.shape[:-2], 4, 4)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1
    return T


def rigid_inverse(T):  # [R t; 0 1]^-1 = [R^T  -R^T t; 0 1]
    Rt = rotation(T).mT
    t = T[..., :3, 3:]  # (...,3,1)
    t_inv = -(Rt @ t)[..., 0]  # (...,3)
    return make_pose(Rt, t_inv)


c2w_to_w2c = rigid_inverse
w2c_to_c2w = rigid_inverse


def K_to_pixels(K, H, W):
    return K * K.new_tensor([[W], [H], [1.0]])


def K_to_normalized(Kpix, H, W):
    return Kpix / Kpix.new_tensor([[W], [H], [1.0]])


def opengl_to_opencv(c2w):  # OpenGL/nerfstudio (y up, z back) <-> OpenCV c2w: negate camera y, z
    return c2w * c2w.new_tensor([1.0, -1.0, -1.0, 1.0])  # scales columns 0..3


def normalize_poses(c2w, ref=-1, by='norm'):
    """c2w (...,V,4,4) relative to view `ref`, in unit extent -> (c2w_rel, scale (...,)). by='norm':
    the largest ||t|| is 1 (ours); 'max_abs': the largest |t_i| (the release); coinciding: 1."""
    if by not in ('norm', 'max_abs'):
        raise ValueError(f"by must be 'norm' or 'max_abs', got {by!r}")
    ref_c2w = c2w.select(-3, ref).unsqueeze(-3)  # (...,1,4,4)
    rel = rigid_inverse(ref_c2w) @ c2w  # (...,V,4,4)
    t = translation(rel)  # (...,V,3)
    if by == 'norm':
        extent = t.norm(dim=-1).amax(-1)
    else:
        extent = t.abs().amax((-1, -2))
    inverse = 1 / extent.clamp_min(1e-8)
    ones = torch.ones_like(extent)
    scale = torch.where(extent > 1e-8, inverse, ones)  # (...,)
    rel[..., :3, 3] = t * scale[..., None, None]
    return rel, scale


# ----------------------------------------------------------------------------- rays and PRoPE
def world_rays(c2w, K, xy):
    """Rays through normalised xy (...,N,2) -> centres (...,1,3), unit directions (...,N,3)."""
    ones = torch.ones_like(xy[..., :1])
    pts = torch.cat([xy, ones], -1)  # (...,N,3) homogeneous
    d_cam = pts @ torch.linalg.inv(K).mT  # (...,N,3) K^-1 [x, y, 1]
    d_world = d_cam @ rotation(c2w).mT
    centres = translation(c2w)[..., None, :]  # (...,1,3)
    return centres, F.normalize(d_world, dim=-1)


def pixel_centres(H, W, offset=(0.5, 0.5), device=None, dtype=torch.float32):
    """Normalised [(u + offset_x) / W, (v + offset_y) / H] of every pixel (u, v) -> (H,W,2)."""
    u = torch.arange(W, dtype=dtype, device=device)
    v = torch.arange(H, dtype=dtype, device=device)
    x = (u + offset[0]) / W
    y = (v + offset[1]) / H
    grid_y, grid_x = torch.meshgrid(y, x, indexing='ij')
    return torch.stack([grid_x, grid_y], -1)


def pixel_grid(h, w, device, dtype=torch.float64):
    """Normalised pixel centres, homogeneous: [(x+0.5)/w, (y+0.5)/h, 1] -> (h,w,3)."""
    xy = pixel_centres(h, w, device=device, dtype=dtype)  # (h,w,2)
    ones = torch.ones_like(xy[..., :1])
    return torch.cat([xy, ones], -1)


def depth_to_points(depth, c2w, K):
    """z-depth (...,H,W), c2w (...,4,4), normalised K (...,3,3) -> world points (...,H,W,3)."""
    H, W = depth.shape[-2:]
    pix = pixel_grid(H, W, depth.device, depth.dtype)
    rays = torch.einsum('...ij,hwj->...hwi', torch.linalg.inv(K), pix)
    cam = rays * depth[..., None]  # camera-frame points
    world = torch.einsum('...ij,...hwj->...hwi', c2w[..., :3, :3], cam)
    return world + c2w[..., None, None, :3, 3]


def project(points, c2w, K, H, W):
    """World points (...,N,3) into cameras c2w (...,4,4), normalised K (...,3,3) -> pixel
    coordinates (...,N,2) (pixel u spans [u, u+1)), z-depth (...,N); meaningless where z <= 0."""
    w2c = c2w_to_w2c(c2w)
    R = rotation(w2c)
    t = translation(w2c)[..., None, :]  # (...,1,3)
    points_cam = points @ R.mT + t
    # (...,N,3): [z u, z v, z]
    uvz = points_cam @ K_to_pixels(K, H, W).mT
    z = uvz[..., 2:]
    pixels = uvz[..., :2] / z.clamp_min(1e-9)
    return pixels, z[..., 0]


def plucker_rays(c2w, K, H, W, pixel_offset=(0.5, 0.5)):
    """Plücker map (...,6,H,W): [d, o x d] of the ray through each pixel + pixel_offset."""
    centres = pixel_centres(H, W, pixel_offset, K.device, K.dtype)
    xy = rearrange(centres, 'H W xy -> (H W) xy')
    o, d = world_rays(c2w, K, xy)  # (...,1,3), (...,HW,3)
    moment = torch.linalg.cross(o.expand_as(d), d)  # o x d
    rays = torch.cat([d, moment], -1)  # (...,HW,6)
    return rearrange(rays, '... (H W) c -> ... c H W', H=H)


def prope_matrices(c2w, K, official=False):
    """PRoPE P = lift(K') w2c, P_inv = P^-1 = c2w lift(K'^-1) (...,4,4): logits see P_a P_b^-1."""
    Kc = prope_K(K)
    P = lift(Kc) @ rigid_inverse(c2w)
    if official:  # the release's P_inv = c2w lift(K'), so P_inv P != I
        P_inv = c2w @ lift(Kc)
    else:
        P_inv = c2w @ lift(torch.linalg.inv(Kc))
    return P, P_inv


def prope_K(K):  # K' of PRoPE: the normalised principal point shifted by -0.5 (image centre at 0)
    shift = K.new_tensor([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])
    return K - shift


def lift(K):  # PRoPE's lift: K (...,3,3) in the top-left of a 4x4 identity
    identity = torch.eye(4, dtype=K.dtype, device=K.device)
    L = identity.expand(*K.shape[:-2], 4, 4).clone()
    L[..., :3, :3] = K
    return L


# ----------------------------------------------------------------------------- quaternions
def rotmat_to_quat(m):
    """Rotations (...,3,3) -> unit quaternions (...,4) (w, x, y, z), w >= 0."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.flatten(-2).unbind(-1)  # (...,) each
    tr = m00 + m11 + m22
    q2 = torch.stack(
        [
            1 + tr,
            1 + 2 * m00 - tr,
            1 + 2 * m11 - tr,
            1 + 2 * m22 - tr,
        ],
        -1,
    )  # (...,4) = 4 q_i^2
    wx = m21 - m12
    wy = m02 - m20
    wz = m10 - m01
    xy = m01 + m10
    xz = m02 + m20
    yz = m12 + m21
    # row i = 4 q_i q, normalised; the pivot, the largest q_i^2, is the exact one
    cand = torch.stack(
        [
            torch.stack([q2[..., 0], wx, wy, wz], -1),
            torch.stack([wx, q2[..., 1], xy, xz], -1),
            torch.stack([wy, xy, q2[..., 2], yz], -1),
            torch.stack([wz, xz, yz, q2[..., 3]], -1),
        ],
        -2,
    )  # (...,4,4)
    pivot = q2.argmax(-1, keepdim=True)  # (...,1)
    index = pivot[..., None].expand(*pivot.shape, 4)  # (...,1,4)
    row = cand.gather(-2, index)[..., 0, :]  # (...,4) the pivot's row
    q = F.normalize(row, dim=-1)
    sign = torch.where(q[..., :1] < 0, -1.0, 1.0)  # w >= 0
    return q * sign


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
    if dot < 0:
        q1 = -q1
        dot = -dot
    theta = torch.arccos(dot.clamp(max=1.0))
    if theta < 1e-6:  # (nearly) the same rotation: linear interpolation is exact enough
        q = torch.lerp(q0, q1, t[:, None])
        return F.normalize(q, dim=-1)
    sin_theta = torch.sin(theta)
    w0 = torch.sin((1 - t) * theta) / sin_theta
    w1 = torch.sin(t * theta) / sin_theta
    return w0[:, None] * q0 + w1[:, None] * q1


# ----------------------------------------------------------------------------- trajectories
def path_through(c2w, K, s):
    """c2w (n,4,4), K at s (n,) in [0, N-1] along c2w (N,4,4), K: rotations slerped, rest lerped."""
    last = len(c2w) - 1
    segment = s.floor().long().clamp(0, max(last - 1, 0))  # (n,) the segment of each camera
    poses = []
    Ks = []
    fractions = (s - segment).tolist()
    for a, t in zip(segment.tolist(), fractions):
        b = min(a + 1, last)
        qa = rotmat_to_quat(rotation(c2w[a]))
        qb = rotmat_to_quat(rotation(c2w[b]))
        q = slerp(qa, qb, s.new_tensor([t]))  # (1,4)
        R = quat_to_rotmat(q)[0]
        centre = torch.lerp(translation(c2w[a]), translation(c2w[b]), t)
        poses.append(make_pose(R, centre))
        Ks.append(torch.lerp(K[a], K[b], t))
    return torch.stack(poses), torch.stack(Ks)


def arc(c2w_ref, centre, up, degrees, n):
    """n cameras: c2w_ref turned about the axis (centre, up) by 0..degrees (a full turn: no end)."""
    steps = n + 1 if abs(degrees) >= 360 else n
    end = math.radians(degrees)
    angle = torch.linspace(0, end, steps, dtype=c2w_ref.dtype)[:n]
    k = F.normalize(up.to(c2w_ref.dtype), dim=0)  # the unit axis
    cross = k.new_zeros(3, 3)  # cross @ v = k x v
    cross[0, 1] = -k[2]
    cross[0, 2] = k[1]
    cross[1, 0] = k[2]
    cross[1, 2] = -k[0]
    cross[2, 0] = -k[1]
    cross[2, 1] = k[0]
    cos = angle.cos()[:, None, None]
    sin = angle.sin()[:, None, None]
    identity = torch.eye(3, dtype=k.dtype)
    R = cos * identity + sin * cross + (1 - cos) * torch.outer(k, k)  # (n,3,3), Rodrigues
    arm = translation(c2w_ref) - centre  # (3,) from the axis to the camera
    eye = centre + arm @ R.mT  # (n,3)
    return make_pose(R @ rotation(c2w_ref), eye)


def axes_meeting_point(c2w):
    """The point nearest the optical axes (least squares); None if parallel or behind a camera."""
    o = translation(c2w)  # (N,3)
    d = c2w[:, :3, 2]  # (N,3) viewing directions
    outer = d[:, :, None] * d[:, None, :]  # (N,3,3) d d^T
    P = torch.eye(3, dtype=o.dtype) - outer  # projections orthogonal to each axis
    A = P.sum(0)
    b = (P @ o[:, :, None]).sum(0)[:, 0]
    if len(c2w) < 2:
        return None
    if torch.linalg.eigvalsh(A)[0] < 1e-3 * len(c2w):  # (nearly) parallel axes
        return None
    p = torch.linalg.solve(A, b)
    in_front = ((p - o) * d).sum(-1) > 0
    return p if bool(in_front.all()) else None


def look_at(eye, target, up):
    """OpenCV c2w (...,4,4) at eye (...,3), z towards target, y (down) opposite up."""
    z = F.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(z, up.expand_as(z))
    x = F.normalize(right, dim=-1)
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z], -1)  # the camera axes as columns
    return make_pose(R, eye)


def spiral(c2w_ref, n, radius=0.1, depth=1.0, turns=2.0):
    """n cameras circling c2w_ref in its image plane (radius grows over a turn), `depth` ahead."""
    R = rotation(c2w_ref)
    c = translation(c2w_ref)
    end = 2 * math.pi * turns
    angle = torch.linspace(0, end, n, dtype=R.dtype, device=R.device)
    theta = angle[:, None]  # (n,1)
    r = radius * (theta / (2 * math.pi)).clamp(max=1)  # (n,1)
    direction = theta.cos() * R[:, 0] + theta.sin() * R[:, 1]  # (n,3) in the image plane
    eye = c + r * direction
    target = c + depth * R[:, 2]
    return look_at(eye, target.expand_as(eye), -R[:, 1])


def forward_dolly(c2w_ref, n, distance):
    """n cameras from c2w_ref along its viewing axis by distance (ends included)."""
    steps = torch.linspace(0, distance, n, dtype=c2w_ref.dtype, device=c2w_ref.device)
    s = steps[:, None]  # (n,1)
    R = rotation(c2w_ref).expand(n, 3, 3)
    return make_pose(R, translation(c2w_ref) + s * c2w_ref[:3, 2])


def preset_trajectory(c2w_src, K_src, traj, n, degrees=None):
    """Targets c2w (n,4,4), K of traj from sources c2w_src (N,4,4), in units of their largest
    distance from the first; orbit: about where the optical axes meet (else ahead of the first)
    by `degrees` (default: to the last source)."""
    a = c2w_src[0]
    N = len(c2w_src)
    offsets = translation(c2w_src) - translation(a)
    dist = float(offsets.norm(dim=-1).max())
    if dist <= 1e-6:
        dist = 1.0
    K = K_src[:1].expand(n, 3, 3)
    up = -a[:3, 1]
    if traj == 'interp':
        s = torch.linspace(0, N - 1, n + 2, dtype=c2w_src.dtype)[1:-1]
        c2w, K = path_through(c2w_src, K_src, s)
    elif traj == 'orbit':
        centre = axes_meeting_point(c2w_src)
        if centre is None:
            centre = translation(a) + a[:3, 2] * dist
        if degrees is None:
            u = translation(a) - centre
            w = translation(c2w_src[-1]) - centre
            sine = float(torch.linalg.cross(u, w) @ up)  # |u| |w| sin, about up
            cosine = float(u @ w)
            degrees = math.degrees(math.atan2(sine, cosine))
            if abs(degrees) <= 1:
                degrees = 30.0
        c2w = arc(a, centre, up, degrees, n)
    elif traj == 'spiral':
        c2w = spiral(a, n, radius=0.2 * dist, depth=dist)
    else:
        c2w = forward_dolly(a, n, 0.5 * dist)
    shifts = translation(c2w) - translation(a)
    moved = shifts.norm(dim=-1).max() / dist
    turns = rotation(a).T @ rotation(c2w)
    turned = rotation_angle(turns).abs().max()
    if float(moved + turned) < 1e-3:
        print(
            f'warning: --traj {traj} with {N} source(s) leaves every target at the source camera; '
            'pass --traj orbit, spiral or forward to move'
        )
    return c2w, K


# ----------------------------------------------------------------------------- pose metrics
def umeyama(src, dst, with_scale=True):
    """Similarity (s, R, t) minimising sum ||dst - (s R src + t)||^2, src, dst (N,3); R proper."""
    mu_s = src.mean(0)
    mu_d = dst.mean(0)
    xs = src - mu_s  # (N,3)
    xd = dst - mu_d
    cov = xd.T @ xs / len(src)  # (3,3) cross-covariance
    U, D, Vh = torch.linalg.svd(cov)
    S = src.new_ones(3)
    if torch.det(U) * torch.det(Vh) < 0:
        S[2] = -1  # reflection fix
    R = U @ torch.diag(S) @ Vh
    if with_scale:
        var_src = xs.pow(2).sum(-1).mean()
        s = (D * S).sum() / var_src
    else:
        s = src.new_tensor(1.0)
    t = mu_d - s * R @ mu_s
    return s, R, t


def rotation_angle(R):  # radians, of (...,3,3) rotations, via atan2 (accurate near 0 and pi)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = R.flatten(-2).unbind(-1)  # (...,) each
    skew = torch.stack(
        [
            m21 - m12,
            m02 - m20,
            m10 - m01,
        ],
        -1,
    )  # (...,3) = 2 sin(angle) axis
    cos = (m00 + m11 + m22 - 1) / 2
    return torch.atan2(skew.norm(dim=-1) / 2, cos)


def pose_metrics(est_c2w, gt_c2w, with_scale=True):
    """ATE, RPE (delta 1; rpe_r in degrees) of est_c2w vs gt_c2w (V,4,4), as evo --align
    --correct_scale: P = umeyama(est, gt centres) est, E_i = (Q_i^-1 Q_{i+1})^-1 (P_i^-1 P_{i+1}),
    Q the ground truth."""
    est_centres = translation(est_c2w)
    gt_centres = translation(gt_c2w)
    s, R, t = umeyama(est_centres, gt_centres, with_scale)
    centres = s * est_centres @ R.T + t
    est = make_pose(R @ rotation(est_c2w), centres)  # (V,4,4)
    err = (translation(est) - gt_centres).norm(dim=-1)  # (V,)
    ate = err.pow(2).mean().sqrt()
    gt_steps = rigid_inverse(gt_c2w[:-1]) @ gt_c2w[1:]
    est_steps = rigid_inverse(est[:-1]) @ est[1:]
    E = rigid_inverse(gt_steps) @ est_steps  # (V-1,4,4)
    moves = translation(E).norm(dim=-1)  # (V-1,)
    rpe_t = moves.pow(2).mean().sqrt()
    angles = torch.rad2deg(rotation_angle(rotation(E)))  # (V-1,)
    rpe_r = angles.pow(2).mean().sqrt()
    return {
        'ate': ate.item(),
        'rpe_r': rpe_r.item(),
        'rpe_t': rpe_t.item(),
    }
