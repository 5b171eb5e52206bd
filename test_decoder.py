"""Behavioural tests of decoder.py (CPU, tiny sizes). Run: OMP_NUM_THREADS=1 python -m pytest -q test_decoder.py"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import decoder as dec_lib

torch.set_num_threads(1)
KEYS_FILE = Path(__file__).parent.parent / 'shared' / 'notes' / 'official-gld-keys-decoder.txt'


def random_levels(B, V, T, feat_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, V, T, feat_dim, generator=g) for _ in range(4)]


def psnr(pred, gt):
    return float(-10 * torch.log10(((pred - gt) ** 2).mean()))


def test_sample_level_keep_never_drops_all_and_rate():
    g = torch.Generator().manual_seed(0)
    n, p = 20000, 0.5
    keep = dec_lib.sample_level_keep(n, p, g)
    assert keep.shape == (n, 4) and keep.dtype == torch.bool
    assert keep.any(1).all()
    expected_drop = (p - p ** 4) / (1 - p ** 4)       # 0.4667: conditioned on "not all four dropped"
    drop_rate = (~keep).float().mean(0)
    assert torch.allclose(drop_rate, torch.full((4,), expected_drop), atol=0.015), drop_rate
    assert (~dec_lib.sample_level_keep(1000, 0.0, g)).sum() == 0
    assert dec_lib.sample_level_keep(2000, 0.9, g).any(1).all()


def test_dropped_level_has_no_influence():
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny').eval()
    dec.mask_tokens.data.normal_()                      # non-zero mask tokens, as after training
    levels = random_levels(2, 2, 16, 192)
    keep = torch.tensor([[True, True, False, True], [False, True, True, True]])
    out = dec(levels, (4, 4), keep=keep)
    perturbed = [lv.clone() for lv in levels]
    perturbed[2][0] += 5 * torch.randn_like(perturbed[2][0])     # level 2 is dropped in sample 0
    perturbed[0][1] += 5 * torch.randn_like(perturbed[0][1])     # level 0 is dropped in sample 1
    assert torch.equal(dec(perturbed, (4, 4), keep=keep), out)
    perturbed[1][0] += 1.0                                      # a kept level does change the output
    assert not torch.allclose(dec(perturbed, (4, 4), keep=keep), out)
    # per-view keep (B,V,4) broadcasting agrees with per-sample keep (B,4)
    assert torch.equal(dec(levels, (4, 4), keep=keep[:, None].expand(2, 2, 4)), out)


def test_reconstruct_per_level_uses_keep_mechanism():
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny').eval()
    levels = random_levels(1, 2, 9, 192)
    out = dec_lib.reconstruct_per_level(dec, levels, (3, 3))
    assert set(out) == {'all', 0, 1, 2, 3}
    assert torch.equal(out['all'], dec(levels, (3, 3)))
    only1 = torch.tensor([[False, True, False, False]])
    assert torch.equal(out[1], dec(levels, (3, 3), keep=only1))
    # zero-initialised mask tokens: a single level equals feeding zeros for the other three
    zeros = [lv if i == 1 else torch.zeros_like(lv) for i, lv in enumerate(levels)]
    assert torch.allclose(out[1], dec(zeros, (3, 3)), atol=1e-6)


def test_position_embedding_base_grid_and_layout():
    dec = dec_lib.RGBDecoder('tiny')
    g, D = dec.cfg.base_grid, dec.cfg.width
    assert dec.pos_embed.shape == (1, 1 + g * g, D)
    assert torch.allclose(dec.pos_embed_at(g, g), dec.pos_embed, atol=1e-5)
    table = dec.pos_embed[0, 1:].view(g, g, D)                  # (y, x, D)
    assert torch.equal(dec.pos_embed[0, 0], torch.zeros(D))     # CLS row
    # MAE convention: first half depends on the column x only, second half on the row y only
    assert torch.equal(table[0, :, :D // 2], table[3, :, :D // 2])
    assert torch.equal(table[:, 0, D // 2:], table[:, 5, D // 2:])
    assert not torch.allclose(table[0, 0, :D // 2], table[0, 1, :D // 2])
    assert torch.allclose(table[2, 5, :D // 4], torch.sin(5 * 1.0 / 10000 ** (torch.arange(D // 4) / (D // 4))),
                          atol=1e-6)


def test_non_square_grid_runs():
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny').eval()
    out = dec(random_levels(1, 2, 6 * 8, 192), (6, 8))
    assert out.shape == (1, 2, 3, 84, 112) and torch.isfinite(out).all()
    with pytest.raises(AssertionError):
        dec(random_levels(1, 1, 47, 192), (6, 8))


def test_overfit_one_batch():
    """Random features (fixed seed) -> fixed smooth images; measured 1.7 -> 33.2 dB after 300 Adam steps, lr 1e-3."""
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny')
    g = torch.Generator().manual_seed(1)
    levels = random_levels(1, 2, 16, 192, seed=1)
    target = F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=(56, 56), mode='bilinear',
                           align_corners=False).view(1, 2, 3, 56, 56)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    start = psnr(dec(levels, (4, 4)).detach(), target)
    for _ in range(300):
        loss, parts = dec_lib.decoder_loss(dec(levels, (4, 4)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = psnr(dec(levels, (4, 4)).detach(), target)
    assert start < 10 and end > 30, (start, end)


def test_noise_augmentation_training_only():
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder(dec_lib.DecoderConfig(noise_tau=0.8))
    levels = random_levels(1, 1, 4, 192)
    dec.train()
    assert not torch.allclose(dec(levels, (2, 2)), dec(levels, (2, 2)))
    dec.eval()
    assert torch.equal(dec(levels, (2, 2)), dec(levels, (2, 2)))


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny').eval()
    dec.mask_tokens.data.normal_()
    save_file(dec.state_dict(), str(tmp_path / 'dec.safetensors'))
    torch.manual_seed(1)
    other = dec_lib.RGBDecoder(dec_lib.DecoderConfig(**dec.cfg.__dict__)).eval()
    other.load_state_dict(load_file(str(tmp_path / 'dec.safetensors')))
    levels = random_levels(1, 2, 12, 192)
    keep = torch.tensor([[True, False, True, False]])
    assert torch.equal(other(levels, (3, 4), keep=keep), dec(levels, (3, 4), keep=keep))


def official_layout(feat_dim, width, depth, mlp, patch, grid):
    """Key -> shape of an official GeneralDecoder_Variable state dict, written from the notes' key list."""
    shapes = {'decoder_pos_embed': (1, 1 + grid * grid, width), 'trainable_cls_token': (1, 1, width),
              'decoder_embed.weight': (width, 4 * feat_dim), 'decoder_embed.bias': (width,)}
    for i in range(depth):
        pre = f'decoder_layers.{i}.'
        for name in ('query', 'key', 'value'):
            shapes[f'{pre}attention.attention.{name}.weight'] = (width, width)
            shapes[f'{pre}attention.attention.{name}.bias'] = (width,)
        shapes.update({f'{pre}attention.output.dense.weight': (width, width), f'{pre}attention.output.dense.bias':
                       (width,), f'{pre}intermediate.dense.weight': (mlp, width), f'{pre}intermediate.dense.bias':
                       (mlp,), f'{pre}output.dense.weight': (width, mlp), f'{pre}output.dense.bias': (width,)})
        for ln in ('layernorm_before', 'layernorm_after'):
            shapes[f'{pre}{ln}.weight'], shapes[f'{pre}{ln}.bias'] = (width,), (width,)
    shapes.update({'decoder_norm.weight': (width,), 'decoder_norm.bias': (width,),
                   'decoder_pred.weight': (patch * patch * 3, width), 'decoder_pred.bias': (patch * patch * 3,)})
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
    grid = F.interpolate(pos[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2), size=(h, w), mode='bicubic',
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, D)
    t = torch.cat([sd['trainable_cls_token'].expand(N, -1, -1), lin(x, 'decoder_embed')], 1)
    t = t + torch.cat([pos[:, :1], grid], 1)
    for i in range(depth):
        pre = f'decoder_layers.{i}.'
        y = ln(t, pre + 'layernorm_before')
        q, k, v = (lin(y, pre + 'attention.attention.' + n).view(N, T + 1, heads, -1).transpose(1, 2)
                   for n in ('query', 'key', 'value'))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        t = t + lin(att.transpose(1, 2).reshape(N, T + 1, D), pre + 'attention.output.dense')
        y = ln(t, pre + 'layernorm_after')
        t = t + lin(F.gelu(lin(y, pre + 'intermediate.dense')), pre + 'output.dense')
    out = lin(ln(t, 'decoder_norm'), 'decoder_pred')[:, 1:].reshape(N, h, w, patch, patch, 3)
    img = torch.einsum('nhwpqc->nchpwq', out).reshape(N, 3, h * patch, w * patch)
    mean, std = torch.tensor(dec_lib.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(dec_lib.IMAGENET_STD).view(3, 1, 1)
    return img * std + mean


def test_convert_official_small_matches_reference():
    g = torch.Generator().manual_seed(0)
    layout = official_layout(feat_dim=8, width=32, depth=2, mlp=64, patch=4, grid=4)
    sd = {k: 0.2 * torch.randn(s, generator=g) for k, s in layout.items()}
    cfg, ours = dec_lib.convert_official(sd, heads=4)
    assert (cfg.feat_dim, cfg.width, cfg.depth, cfg.mlp, cfg.patch, cfg.base_grid) == (8, 32, 2, 64, 4, 4)
    assert cfg.imagenet_output
    dec = dec_lib.RGBDecoder(cfg).eval()
    dec.load_state_dict(ours, strict=True)
    for h, w in ((4, 4), (3, 5)):
        levels = random_levels(2, 1, h * w, 8)
        expected = official_forward(sd, torch.cat(levels, -1).flatten(0, 1), h, w, 4, 4, 2)
        assert torch.allclose(dec(levels, (h, w))[:, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match='unexpected'):
        dec_lib.convert_official({**sd, 'decoder_extra.weight': torch.zeros(1)}, heads=4)
    with pytest.raises(ValueError, match='missing'):
        dec_lib.convert_official({k: v for k, v in sd.items() if 'layers.1.attention.attention.key' not in k}, heads=4)
    with pytest.raises(ValueError, match='shapes'):
        dec_lib.convert_official({**sd, 'decoder_layers.0.output.dense.bias': torch.zeros(31)}, heads=4)


@pytest.mark.skipif(not KEYS_FILE.exists(), reason='official key list not available')
def test_convert_official_xl_key_list():
    sd = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith('#'):
            key, shape = line.split('\t')
            sd[key] = torch.empty(eval(shape), device='meta')
    assert len(sd) == 456
    cfg, ours = dec_lib.convert_official(sd)
    xl = dec_lib.PRESETS['xl']
    assert cfg == dec_lib.DecoderConfig(**{**xl.__dict__, 'imagenet_output': True})
    with torch.device('meta'):
        model = dec_lib.RGBDecoder('xl')
    reference = model.state_dict()
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    # 422,536,396 official entries + our 4 x 1536 mask tokens
    assert sum(t.numel() for t in reference.values()) == 422_536_396 + 4 * 1536


def test_adversarial_step():
    torch.manual_seed(0)
    dec = dec_lib.RGBDecoder('tiny')
    disc = dec_lib.PatchDiscriminator(ch=8)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    levels = random_levels(1, 2, 16, 192)
    gt = torch.rand(1, 2, 3, 56, 56)
    pred = dec(levels, (4, 4))
    rec, _ = dec_lib.decoder_loss(pred, gt)
    before = [p.detach().clone() for p in disc.parameters()]
    gan, parts = dec_lib.adversarial_step(dec, disc, disc_opt, pred, gt, rec)
    assert torch.isfinite(parts['gan_weight']) and 0 < parts['gan_weight'] < 1e4
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))      # D was updated
    d_grads = [p.grad.clone() for p in disc.parameters()]
    (rec + gan).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, disc.parameters()))   # G's loss leaves D alone
    assert torch.isfinite(dec.head.weight.grad).all() and dec.head.weight.grad.abs().sum() > 0
