"""diffusion.py: rectified flow for GLD: time shift, training loss, the samplers (Euler with CFG), EMA.

Convention (the only one in this repo): x_t = (1 - t) x + t eps, eps ~ N(0, I); the model predicts v = eps - x =
dx_t/dt; t = 1 is noise, t = 0 data. Tensors (B,V,T,C) (B batch, V views, T tokens, C channels), one t per sample.
Time shift (RAE): t' = a t / (1 + (a - 1) t), a = sqrt(m / 4096), m = V*h*w*C generated jointly; one a from the
modelled latents for training and sampling (the release: 19.6 and 31.2). Training t: uniform (GLD) or logit-normal.
References: rectified flow (Liu et al.; Lipman et al.); Esser et al. (logit-normal t, shift); RAE (Zheng et al.);
Ho & Salimans (CFG); GLD (arXiv 2603.22275) A.1.
"""

import contextlib
import math

import torch


def shift_alpha(m):
    """The shift a for m = V*h*w*C dimensions generated jointly."""
    return math.sqrt(m / 4096)


def shift_t(t, a):
    """Time t in [0,1] shifted by a; a > 1 pushes times toward the noise end (t = 1)."""
    return a * t / (1 + (a - 1) * t)


def sample_t(B, dist='uniform', a=1.0, generator=None):
    """B training times (on the generator's device): uniform or logit-normal(0,1), then shifted by a."""
    dev = generator.device if generator is not None else 'cpu'
    if dist == 'uniform':
        u = torch.rand(B, generator=generator, device=dev)
    elif dist == 'logit_normal':
        u = torch.sigmoid(torch.randn(B, generator=generator, device=dev))
    else:
        raise ValueError(f"dist must be 'uniform' or 'logit_normal', got {dist!r}")
    return shift_t(u, a)


T_BINS = 4  # the training log reports the loss in 4 bins of t


def flow_loss(velocity_fn, x, src_mask, generator=None, a=1.0, t=None, dist='uniform'):
    """Velocity MSE over all views: velocity_fn(x_t, t (B,)) -> v; x (B,V,T,C) clean; src_mask (B,V) -> (loss, {'src',
    'tgt': MSE of those views (0 without any), 't_bin_sum', 't_bin_count': per-sample losses in T_BINS bins of t})."""
    if t is None:
        t = sample_t(x.shape[0], dist, a, generator)
    t = t.to(x.device, x.dtype)  # (B,)
    dev = generator.device if generator is not None else x.device  # the generator may live on the CPU
    eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    t_b = t[:, None, None, None]  # (B,1,1,1)
    x_t = (1 - t_b) * x + t_b * eps
    v = velocity_fn(x_t, t)
    target = eps - x  # dx_t/dt
    per_view = (v.float() - target.float()).pow(2).mean((2, 3))  # (B,V)
    is_src = src_mask.float()
    is_tgt = 1 - is_src
    parts = {
        'src': (per_view * is_src).sum() / is_src.sum().clamp_min(1),
        'tgt': (per_view * is_tgt).sum() / is_tgt.sum().clamp_min(1),
    }
    per_sample = per_view.mean(1).detach()  # (B,)
    bins = (t.detach() * T_BINS).long().clamp(0, T_BINS - 1)  # (B,) the bin of each sample's t
    parts['t_bin_sum'] = per_sample.new_zeros(T_BINS).index_add_(0, bins, per_sample)
    ones = torch.ones_like(per_sample)
    parts['t_bin_count'] = per_sample.new_zeros(T_BINS).index_add_(0, bins, ones)
    return per_view.mean(), parts


def cfg_velocity(velocity_fn, uncond_fn, cfg_scale, interval=(0, 1)):
    """The velocity a sampler follows, v(x_t, t_cur float): with CFG v = v_u + cfg_scale (v_c - v_u) at the times in
    interval (cfg_scale = 1: no unconditional call); velocity_fn / uncond_fn (x_t, t (B,)) -> v."""
    assert cfg_scale == 1.0 or uncond_fn is not None, 'cfg_scale != 1 needs uncond_fn'

    def velocity(x, t_cur):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=x.dtype)
        v = velocity_fn(x, t)
        if cfg_scale != 1.0 and interval[0] <= t_cur <= interval[1]:
            v_u = uncond_fn(x, t)
            v = v_u + cfg_scale * (v - v_u)
        return v

    return velocity


# Every sampler takes euler_sample's arguments and returns x at t_end; times are python floats (no device syncs).
@torch.no_grad()
def euler_sample(
    velocity_fn,  # (x_t, t (B,)) -> v: the conditional model
    noise,  # x_1 (B,V,T,C) at t = 1
    steps=50,  # steps on the time grid shift_t(1 -> t_end, a)
    a=1.0,  # the time shift
    cfg_scale=1.0,  # CFG's scale; 1: off
    uncond_fn=None,  # (x_t, t) -> v: CFG's unconditional model
    interval=(0, 1),  # the times at which CFG applies
    t_end=0.0,  # where the grid ends (the release: 0.001)
):
    """The paper's sampler: deterministic Euler steps of the ODE dx/dt = v with CFG (cfg_velocity)."""
    velocity = cfg_velocity(velocity_fn, uncond_fn, cfg_scale, interval)
    grid = [1 - (1 - t_end) * i / steps for i in range(steps + 1)]  # steps + 1 times from 1 to t_end
    ts = [shift_t(t, a) for t in grid]
    x = noise
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t_cur)
        x = x + (t_next - t_cur) * v
    return x


@torch.no_grad()
def posterior_mean(velocity_fn, noise, steps=1, a=1.0, cfg_scale=1.0, uncond_fn=None, interval=(0, 1), t_end=0.0):
    """E[x_0 | condition] in one model call: at t = 1, x_1 = eps and v = E[eps - x_0 | x_1], so x_1 - v is the mean
    (one Euler step from t = 1 to 0 without CFG). The bundled models' default; the other arguments, euler_sample's,
    are ignored."""
    t = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    v = velocity_fn(noise, t)
    return noise - v


SAMPLERS = {'euler': euler_sample, 'mean': posterior_mean}  # sample.py --sampler; a fork adds e.g. Heun here


class EMA:
    """EMA of a model's floating-point state, shadow <- d shadow + (1-d) weights, with the warm-up d = min(decay,
    (1 + n) / (10 + n)) after n updates (TensorFlow's rule). state_dict() is a plain model state dict."""

    def __init__(self, model, decay=0.9995):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        """One step of the average after an optimiser step."""
        n = self.num_updates
        d = min(self.decay, (1 + n) / (10 + n))  # the warm-up
        self.num_updates += 1
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def swapped(self, model):
        """Temporarily run the model with the EMA weights (evaluation), then restore the live ones."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(live)

    def state_dict(self):
        """The averaged weights, in the model's own layout (checkpoints store them as 'ema')."""
        return self.shadow

    def load_state_dict(self, sd, num_updates=0):
        """num_updates: the count saved beside the state (a state without one restarts the warm-up)."""
        devices = {k: v.device for k, v in self.shadow.items()}
        self.shadow = {k: v.detach().clone().to(devices[k]) for k, v in sd.items()}
        self.num_updates = num_updates
