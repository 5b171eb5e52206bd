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


def shift_alpha(m):  # the shift for m = V*h*w*C dimensions generated jointly
    return math.sqrt(m / 4096)


def shift_t(t, a):  # a > 1 pushes times in [0,1] toward the noise end (t = 1)
    return a * t / (1 + (a - 1) * t)


def sample_t(B, dist='uniform', a=1.0, generator=None):
    """B training times (on the generator's device): uniform or logit-normal(0,1), then shifted by a."""
    if dist not in ('uniform', 'logit_normal'):
        raise ValueError(f"dist must be 'uniform' or 'logit_normal', got {dist!r}")
    dev = generator.device if generator is not None else 'cpu'
    u = (
        torch.rand(B, generator=generator, device=dev)
        if dist == 'uniform'
        else torch.sigmoid(torch.randn(B, generator=generator, device=dev))
    )
    return shift_t(u, a)


T_BINS = 4  # the training log reports the loss in 4 bins of t


def flow_loss(velocity_fn, x, src_mask, generator=None, a=1.0, t=None, dist='uniform'):
    """Velocity MSE over all views: velocity_fn(x_t, t (B,)) -> v; x (B,V,T,C) clean; src_mask (B,V) -> (loss, {'src',
    'tgt': MSE of those views (0 without any), 't_bin_sum', 't_bin_count': per-sample losses in T_BINS bins of t})."""
    t = (sample_t(x.shape[0], dist, a, generator) if t is None else t).to(x.device, x.dtype)  # (B,)
    dev = generator.device if generator is not None else x.device  # the generator may live on the CPU
    eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    per_view = (velocity_fn(x_t, t).float() - (eps - x).float()).pow(2).mean((2, 3))  # (B,V)
    m = src_mask.float()
    parts = {
        'src': (per_view * m).sum() / m.sum().clamp_min(1),
        'tgt': (per_view * (1 - m)).sum() / (1 - m).sum().clamp_min(1),
    }
    per_sample, bins = per_view.mean(1).detach(), (t.detach() * T_BINS).long().clamp(0, T_BINS - 1)  # (B,), (B,)
    parts['t_bin_sum'] = per_sample.new_zeros(T_BINS).index_add_(0, bins, per_sample)
    parts['t_bin_count'] = per_sample.new_zeros(T_BINS).index_add_(0, bins, torch.ones_like(per_sample))
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


# Every sampler: (velocity_fn, noise, steps, a, cfg_scale, uncond_fn, interval, t_end) -> x at t_end, from noise
# x_1 at t = 1 on `steps` steps of the time grid shift_t(1 -> t_end, a). Times are python floats: no device syncs.
@torch.no_grad()
def euler_sample(velocity_fn, noise, steps=50, a=1.0, cfg_scale=1.0, uncond_fn=None, interval=(0, 1), t_end=0.0):
    """The paper's sampler: deterministic Euler steps of the ODE dx/dt = v with CFG (cfg_velocity)."""
    velocity = cfg_velocity(velocity_fn, uncond_fn, cfg_scale, interval)
    ts = [shift_t(1 - (1 - t_end) * i / steps, a) for i in range(steps + 1)]
    x = noise
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    return x


@torch.no_grad()
def posterior_mean(velocity_fn, noise, steps=1, a=1.0, cfg_scale=1.0, uncond_fn=None, interval=(0, 1), t_end=0.0):
    """E[x_0 | condition] in one model call: at t = 1, x_1 = eps and v = E[eps - x_0 | x_1], so x_1 - v is the mean
    (one Euler step from t = 1 to 0 without CFG). The bundled models' default; steps, a, cfg_scale, interval, t_end
    are those of every sampler and ignored."""
    t = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    return noise - velocity_fn(noise, t)


SAMPLERS = {'euler': euler_sample, 'mean': posterior_mean}  # sample.py --sampler; a fork adds e.g. Heun here


class EMA:
    """EMA of a model's floating-point state, shadow <- d shadow + (1-d) weights, with the warm-up d = min(decay,
    (1 + n) / (10 + n)) after n updates (TensorFlow's rule). state_dict() is a plain model state dict."""

    def __init__(self, model, decay=0.9995):
        self.decay, self.num_updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
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
        return self.shadow

    def load_state_dict(self, sd, num_updates=0):
        """num_updates: the count saved beside the state (a state without one restarts the warm-up)."""
        self.shadow = {k: v.detach().clone().to(self.shadow[k].device) for k, v in sd.items()}
        self.num_updates = num_updates
