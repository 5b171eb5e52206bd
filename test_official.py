"""Tests of the released-model path (sample.load_official_pipeline, sample.OfficialConventions) at a small size.

A fake release is written with random tensors under exactly the official file names, key names and layouts
(1x1-conv embedders, the cascade's 8 aliased embedder keys, HF ViTMAE decoder names, the DA3 hub 'model.' prefix,
a bare DualDPT head file, dict stats (1,C,1,1), checkpoint wrappers), at widths small enough for a CPU. The
layout writers are checked against the full-size key lists in shared/notes. Run:
    OMP_NUM_THREADS=1 python -m pytest -q test_official.py
Shape legend: B batch, V views, H W image, h w token grid, C channels, T tokens.
"""
import argparse
import functools
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cameras
import data
import decoder as decoder_lib
import encoder as encoder_lib
import model as model_lib
import sample
from test_decoder import official_layout as official_decoder_layout

torch.set_num_threads(1)
NOTES = Path(__file__).resolve().parent.parent / 'shared' / 'notes'
C, C1, C2, HEADS = 192, 32, 48, 2  # da3-tiny levels; encoder / head widths; head dims 16 / 24 (PRoPE needs 8 | d)


def official_model_layout(C, C1, C2, d1, d2, cascade, aliases=False):
    """Key -> shape of a released DiTwDDTHead state dict (notes section 2.2): M1 (DDT.py new mode) or the cascade
    (single embedders; aliases: the 8 duplicated {s,x}_embedder_{ref,tgt} keys of DDT.py old mode)."""
    shapes = {}
    embedders = ['x_embedder', 's_embedder'] if cascade else \
        ['x_embedder_ref', 'x_embedder_tgt', 's_embedder_ref', 's_embedder_tgt']
    if aliases:
        embedders += ['s_embedder_ref', 'x_embedder_ref', 's_embedder_tgt', 'x_embedder_tgt']
    for name in embedders:  # 1x1 convs over [cond | x_t] (M1) or [cond | F1] (cascade): 2C channels in
        D = C2 if name.startswith('x') else C1
        shapes[f'{name}.proj.weight'], shapes[f'{name}.proj.bias'] = (D, 2 * C, 1, 1), (D,)
    shapes.update({'s_projector.weight': (C2, C1), 's_projector.bias': (C2,), 't_embedder.W': (256,),
                   't_embedder.mlp.0.weight': (C1, 512), 't_embedder.mlp.0.bias': (C1,),
                   't_embedder.mlp.2.weight': (C1, C1), 't_embedder.mlp.2.bias': (C1,),
                   'camera_embedder.proj.weight': (C1, 7, 14, 14), 'camera_embedder.proj.bias': (C1,),
                   'final_layer.norm_final.weight': (C2,), 'final_layer.linear.weight': (C, C2),
                   'final_layer.linear.bias': (C,), 'final_layer.adaLN_modulation.1.weight': (2 * C2, C2),
                   'final_layer.adaLN_modulation.1.bias': (2 * C2,)})
    for i, D in enumerate([C1] * d1 + [C2] * d2):
        hidden = int(2 * 4 * D / 3)  # SwiGLU
        for name, shape in {'norm1.weight': (D,), 'norm2.weight': (D,), 'attn.qkv.weight': (3 * D, D),
                            'attn.qkv.bias': (3 * D,), 'attn.proj.weight': (D, D), 'attn.proj.bias': (D,),
                            'mlp.w12.weight': (2 * hidden, D), 'mlp.w12.bias': (2 * hidden,),
                            'mlp.w3.weight': (D, hidden), 'mlp.w3.bias': (D,),
                            'adaLN_modulation.1.weight': (6 * D, D), 'adaLN_modulation.1.bias': (6 * D,)}.items():
            shapes[f'blocks.{i}.{name}'] = shape
    return shapes


def random_state_dict(layout, seed):
    """Random tensors of the layout; norm weights around 1, t_embedder.W ~ N(0,1) as released, others N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (1.0 if k == 't_embedder.W' else 0.1) + ('norm' in k)
            for k, s in layout.items()}


def write_release(root):
    """A small fake of the hub repo SeonghuJeon/GLD at root; returns M1's EMA state dict (the one to be loaded)."""
    (root / 'pretrained_models' / 'da3').mkdir(parents=True)
    (root / 'model_stats' / 'da3').mkdir(parents=True)
    torch.manual_seed(0)
    enc_sd = encoder_lib.build_encoder('da3-tiny').state_dict()
    save_file({'model.' + k: v.clone() for k, v in enc_sd.items() if not k.startswith('head.')},
              root / 'pretrained_models' / 'da3' / 'model.safetensors')  # DA3 hub layout
    torch.save({k[5:]: v for k, v in enc_sd.items() if k.startswith('head.')},
               root / 'pretrained_models' / 'da3' / 'dpt_decoder.pt')  # the head alone
    torch.save(random_state_dict(official_decoder_layout(C, 32, 1, 64, 14, 4), 1), root / 'mae_decoder.pt')
    m1 = random_state_dict(official_model_layout(C, C1, C2, 2, 1, cascade=False), 2)
    noisy = {k: v + 1 for k, v in m1.items()}
    torch.save({'model': noisy, 'ema': {'module.' + k: v for k, v in m1.items()}, 'step': 7}, root / 'da3_level1.pt')
    cascade = random_state_dict(official_model_layout(C, C1, C2, 2, 1, cascade=True), 3)
    for name in ('s_embedder', 'x_embedder'):  # DDT.py old mode saves the aliases of the single embedders
        for part in ('ref', 'tgt'):
            for p in ('weight', 'bias'):
                cascade[f'{name}_{part}.proj.{p}'] = cascade[f'{name}.proj.{p}']
    torch.save({'ema': cascade, 'args': argparse.Namespace(lr=5e-5)}, root / 'da3_cascade.pt')
    g = torch.Generator().manual_seed(4)
    for level in (0, 1):
        var = torch.rand(1, C, 1, 1, generator=g) + 0.5
        torch.save({'mean': torch.randn(1, C, 1, 1, generator=g), 'var': var, 'std': var.sqrt()},
                   root / 'model_stats' / 'da3' / f'normalization_stats_level{level}.pt')
    return m1


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp('GLD')
    return root, write_release(root)


def load(root, log=None):
    return sample.load_official_pipeline(str(root), 'cpu', encoder_preset='da3-tiny', heads=HEADS,
                                         log=log if log is not None else (lambda *_: None))


def scene(B=1, V=3, H=28, W=42, seed=0):
    """Random images and cameras: images (B,V,3,H,W), c2w (B,V,4,4), normalised K (B,V,3,3)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(B, V, 3, 3, generator=g, dtype=torch.float64))[0].float()
    R = R * torch.linalg.det(R)[..., None, None].sign()
    c2w = cameras.make_pose(R, torch.randn(B, V, 3, generator=g))
    K = torch.tensor([[0.9, 0, 0.52], [0, 1.2, 0.47], [0, 0, 1]]).expand(B, V, 3, 3).clone()
    return torch.rand(B, V, 3, H, W, generator=g), c2w, K


# ----------------------------------------------------------------------------- layouts and loading

@pytest.mark.parametrize('name,cascade,aliases,d2', [('official-gld-keys-m1.txt', False, False, 6),
                                                     ('official-gld-keys-cascade.txt', True, True, 2),
                                                     ('official-gld-keys-cascade-ddt-old.txt', True, False, 2)])
def test_layout_writer_matches_release_key_lists(name, cascade, aliases, d2):
    """The small fakes use the writer that gives exactly the released keys and shapes at full size."""
    path = NOTES / name
    if not path.exists():
        pytest.skip(f'{path} not found (shared/ beside the repo)')
    keys = {k: tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
            for k, shape in (line.rstrip('\n').split('\t') for line in path.open() if not line.startswith('#'))}
    assert official_model_layout(1536, 768, 2048, 28, d2, cascade, aliases) == keys


def test_load_official_pipeline_and_generate(release):
    root, m1_ema = release
    logs = []
    pipe = load(root, logs.append)
    (net1, meta1), (net0, meta0) = pipe.models[1], pipe.models[0]
    assert pipe.boundary == 1 and isinstance(pipe.official, sample.OfficialConventions)
    assert (meta1['upper_level'], meta0['upper_level'], meta1['level'], meta0['level']) == (None, 1, 1, 0)
    assert net1.cfg.separate_embedders and not net0.cfg.separate_embedders and net0.cfg.upper_dim == C
    assert net1.cfg.double_silu and net0.cfg.double_silu  # item 'double SiLU': set by convert_official
    assert pipe.dec.cfg.imagenet_output  # item 6
    stats0 = torch.load(root / 'model_stats' / 'da3' / 'normalization_stats_level0.pt')
    assert set(meta0['stats'].mean) == {0, 1} and meta0['stats'] is meta1['stats']
    assert torch.equal(meta0['stats'].var[0], stats0['var'].flatten())
    assert torch.equal(net1.blocks[0].attn.qkv.weight, m1_ema['blocks.0.attn.qkv.weight'])  # EMA, not 'model'
    assert any('EMA' in line for line in logs) and any('loading it fully' in line for line in logs)
    images, c2w, K = scene()
    out = pipe.generate(images, c2w, K, n_src=1, steps=2, cfg=1.5, seed=0)
    assert out['images'].shape == images.shape and torch.isfinite(out['images']).all()
    assert [tuple(l.shape) for l in out['levels']] == [(1, 3, 6, C)] * 4
    assert out['geometry']['depth'].shape == (1, 3, 28, 42)


def test_cli_official(release, tmp_path, monkeypatch):
    """python sample.py --official DIR on a dataset scene, with the small fake (encoder and heads patched in)."""
    root, _ = release
    data.write_synth(str(tmp_path / 'data'), 2, 1, frames=6, size=56, seed=0)
    small = functools.partial(sample.load_official_pipeline, encoder_preset='da3-tiny', heads=HEADS)
    monkeypatch.setattr(sample, 'load_official_pipeline', small)
    out = tmp_path / 'out'
    sample.main(['--official', str(root), '--data', str(tmp_path / 'data'), '--views', '3', '--steps', '2',
                 '--out', str(out)])
    assert (out / 'grid.png').exists() and (out / 'metrics.json').exists()


def test_missing_or_wrong_file_errors(release, tmp_path):
    root, _ = release
    broken = tmp_path / 'GLD'
    shutil.copytree(root, broken)
    os.remove(broken / 'da3_cascade.pt')
    with pytest.raises(FileNotFoundError, match=r'no da3_cascade.pt .*SeonghuJeon/GLD'):
        load(broken)
    with pytest.raises(FileNotFoundError, match='no such folder'):
        load(tmp_path / 'nowhere')
    shutil.copy(root / 'mae_decoder.pt', broken / 'da3_cascade.pt')  # a decoder where the cascade belongs
    with pytest.raises(ValueError, match=r'da3_cascade.pt: does not convert'):
        load(broken)


# ----------------------------------------------------------------------------- official vs clean conventions

def test_official_camera_inputs_differ_where_documented():
    """Items 1-3: with translations along one axis (largest |t| component = largest distance) the pose scale agrees,
    so P is equal and only the Plücker grid (offset) and P_inv (K' for K'^-1) differ; otherwise P differs too."""
    _, _, K = scene(V=3)
    c2w = cameras.make_pose(torch.eye(3).expand(1, 3, 3, 3), torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [2.5, 0, 0]]]))
    src = torch.tensor([[True, False, False]])
    off = sample.model_cameras(c2w, K, src, (2, 3), official=True)
    clean = sample.model_cameras(c2w, K, src, (2, 3), official=False)
    torch.testing.assert_close(off['P'], clean['P'])
    assert torch.equal(off['plucker'][:, :, :1], clean['plucker'][:, :, :1])  # the source/target mask
    assert not torch.allclose(off['plucker'][:, :, 1:], clean['plucker'][:, :, 1:], atol=1e-3)
    assert not torch.allclose(off['P_inv'], clean['P_inv'], atol=1e-3)
    torch.testing.assert_close(clean['P_inv'] @ clean['P'], torch.eye(4).expand(1, 3, 4, 4), atol=1e-5, rtol=0)
    _, c2w, K = scene(V=3, seed=1)
    off = sample.model_cameras(c2w, K, src, (2, 3), official=True)
    assert not torch.allclose(off['P'], sample.model_cameras(c2w, K, src, (2, 3))['P'], atol=1e-3)


def test_official_conventions_match_direct_construction():
    """Items 4-5 rebuilt from c2w and pixel K directly: the cascade's K by 504, both models' CFG branch."""
    _, c2w, K = scene(B=2, V=3)
    H, W, hw = 28, 42, (2, 3)
    src = torch.tensor([[True, False, False]] * 2)
    cams = sample.model_cameras(c2w, K, src, hw, official=True)
    uncond = model_lib.drop_cameras(cams, torch.ones(2, dtype=torch.bool))
    rel, _ = cameras.normalize_poses(c2w, ref=-1, by='max_abs')

    def K_prime(Kpix, width, height):  # the official K normalisation: fx/W, fy/H, cx/W - 0.5, cy/H - 0.5
        return sample.prope_K(cameras.K_to_normalized(Kpix, height, width))
    conv = sample.OfficialConventions()
    m1, m1_unc = conv.model_cameras(1, cams, uncond)
    assert m1 is cams and torch.equal(m1_unc['plucker'], uncond['plucker'])
    expected = sample.lift(K_prime(torch.eye(3), W, H)).expand(2, 3, 4, 4)
    assert torch.equal(m1_unc['P'], expected) and torch.equal(m1_unc['P_inv'], expected)
    assert m1_unc['P'][0, 0, 0, 0] == 1 / W and m1_unc['P'][0, 0, 0, 2] == -0.5
    cas, cas_unc = conv.model_cameras(0, cams, uncond)
    K504 = sample.lift(K_prime(cameras.K_to_pixels(K, H, W), 504, 504))  # (B,V,4,4)
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
        clean = model_lib.GLD(replace(net.cfg, official_cameras=False)).eval()
        clean.load_state_dict(net.state_dict())
        clean_models[level] = (clean, meta)
    clean_dec = decoder_lib.RGBDecoder(replace(pipe.dec.cfg, imagenet_output=False)).eval()
    clean_dec.load_state_dict(pipe.dec.state_dict())
    clean = sample.Pipeline(pipe.enc, clean_dec, clean_models, boundary=1, log=lambda *_: None)
    images, c2w, K = scene(seed=2)

    def run(p):
        return p.generate(images, c2w, K, n_src=1, steps=2, cfg=1.5, seed=3)
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
