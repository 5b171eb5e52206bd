"""pipeline.py: the GLD cascade and its model files (find, load SHA-256 checked, export), for sampling and training.

`Pipeline.generate` (paper Sec. 4, Fig. 2): DA3 on the sources -> M_k generates level k of all views -> M_{k->k-1} ...
level 0 -> frozen DA3 blocks propagate level k deeper -> RGB decoder and DA3's geometry head. Loading refuses a model
of another encoder's latents. Legend: B batch, V views, H W image, h w token grid, C channels, T tokens.
"""

import hashlib
import io
import json
import os
import time

import torch

import cli
import data
import decoder as decoder_lib
import diffusion
import encoder as encoder_lib
import latents
import model as model_lib
import official
import safety
from cli import UserError
from constants import DEFAULT_ENCODER

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'tiny')  # the bundled models
COMMANDS = {
    'encoder': 'python train.py --stage encoder',
    'decoder': 'python train.py --stage decoder',
    'data': 'python data.py synth',
}  # what creates each missing piece (level<k>[_ind]: train_command)


def cascade_upper(level, independent=False, num_levels=4):
    """The level conditioning the model of `level`: 1 for M1->0 (the cascade), else None."""
    return 1 if level == 0 and not independent and num_levels > 1 else None


def model_name(stage, encoder=DEFAULT_ENCODER):
    """A model's run folder and file name: the stage for da3-tiny, '<stage>-<encoder>' on other latents."""
    return stage if encoder == DEFAULT_ENCODER else f'{stage}-{encoder}'


def run_name(level, independent=False, encoder=DEFAULT_ENCODER):
    """model_name of the diffusion model of `level`: level<k>, or level0_ind for the independent M0."""
    return model_name(f'level{level}' + ('_ind' if independent and level == 0 else ''), encoder)


def train_command(name):
    """The command that trains the model `name` (a model_name: a stage, or level<k>[_ind], with -<encoder>)."""
    stage, _, encoder = name.partition('-')
    if stage.startswith('level'):
        level = stage.removeprefix('level').removesuffix('_ind')
        command = f'python train.py --level {level}'
        if stage.endswith('_ind'):
            command += ' --independent'
    else:
        command = COMMANDS[stage]
    if encoder:
        command += f' --encoder {encoder}'
    return command


# ----------------------------------------------------------------------------- checkpoints: find, load, export
def find_checkpoint(name, ckpt_dir=None):
    """The newest ckpt_dir/<name>/ckpt_*.pt, else the export ckpt_dir/<name>.safetensors; no ckpt_dir: weights/tiny."""
    if ckpt_dir:
        folder = os.path.join(ckpt_dir, name)
        export = os.path.join(ckpt_dir, name + '.safetensors')
        checkpoints = list_checkpoints(folder)
        if checkpoints:
            return checkpoints[-1]
        if not os.path.isfile(export):
            raise UserError(
                f'{folder}: no {name} checkpoint (ckpt_*.pt, or the export {export}) under --ckpt-dir '
                f'{ckpt_dir}; create it with: {train_command(name)} --out {folder}'
            )
        return export
    path = os.path.join(WEIGHTS, name + '.safetensors')
    if not os.path.exists(path):
        raise UserError(
            f'{path}: no bundled {name} model (git checkout weights/tiny restores the bundled ones); train '
            f'it with: {train_command(name)} --export weights/mine, then pass --ckpt-dir weights/mine'
        )
    return path


def list_checkpoints(folder):
    """The training checkpoints folder/ckpt_<step>.pt, oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, f) for f in names if f.startswith('ckpt_') and f.endswith('.pt'))


def auto_checkpoint(name):
    """train.py's 'auto' encoder and decoder: the newest runs/<name> checkpoint, else the bundled model."""
    return find_checkpoint(name, 'runs' if list_checkpoints(os.path.join('runs', name)) else None)


def load_checkpoint(path, device='cpu'):
    """-> (meta, state_dict): a checkpoint's EMA weights, or an export's weights + JSON sidecar; prints the SHA-256."""
    if not os.path.isfile(path):
        raise UserError(
            f'{path}: {"a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint"}; '
            'pass a ckpt_*.pt of a run or an exported .safetensors'
        )
    with open(path, 'rb') as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    print(f'{path} (sha256 {digest[:12]})')
    broken = (
        'delete it (an older ckpt_*.pt beside it is used then) or re-create it with the training run that wrote it'
        if not path.endswith('.safetensors')
        else 'restore it with: git checkout weights/tiny'
        if os.path.dirname(os.path.abspath(path)) == WEIGHTS
        else 'export it again with: python train.py ... --export FOLDER'
    )
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load as load_safetensors

            sidecar = path[: -len('.safetensors')] + '.json'
            meta = data.read_json(sidecar, 'sidecar of an export (python train.py --export writes it)')
            if meta.get('sha256') and meta['sha256'] != digest:
                raise UserError(
                    f'{path}: checksum mismatch (file is {digest[:12]}, {sidecar} says {meta["sha256"][:12]}); '
                    f'the file is corrupt or was replaced: {broken}'
                )
            sd = {k: v.float().to(device) for k, v in load_safetensors(raw).items()}
            stats = {k[6:]: v for k, v in sd.items() if k.startswith('stats.')}
            meta.update(stats=stats or None, sha256=digest)
            return meta, {k: v for k, v in sd.items() if not k.startswith('stats.')}
        ck = safety.load_plain(path, io.BytesIO(raw), device)  # pickled objects are refused
        ck['sha256'] = digest
        return ck, ck['ema']
    except UserError:
        raise
    except Exception as e:  # truncated or foreign files: the readers' errors (of several types) name no file
        raise UserError(f'{path}: not a loadable checkpoint ({cli.first_line(e)}); {broken}') from None


def export_weights(kind, net, config, extra, folder, name):
    """EMA weights as fp16 safetensors + a JSON sidecar with the config and a SHA-256, as shipped in weights/tiny;
    the pair replaces the previous one whole (safety.replaced_folder)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    if extra.get('stats'):
        sd.update({'stats.' + k: v.half() for k, v in extra['stats'].items()})
    with safety.lock_folder(folder, '--export'), safety.replaced_folder(folder) as new:
        weights = os.path.join(new, name + '.safetensors')
        save_file(sd, weights)
        meta = {
            'kind': kind,
            'config': config,
            **{k: v for k, v in extra.items() if k != 'stats'},
            'sha256': file_sha256(weights),
        }
        with open(os.path.join(new, name + '.json'), 'w') as f:
            json.dump(meta, f, indent=1)
    path = os.path.join(folder, name + '.safetensors')
    print(f'exported {path} ({os.path.getsize(path) / 1e6:.2f} MB)')
    return path


def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def latents_sha256(meta):  # what identifies an encoder file's latents: its SHA-256, or its --head-only parent's
    return meta.get('latents_sha256') or meta['sha256']


def load_encoder(preset, weights='auto', device='cpu', ckpt_dir=None):
    """A frozen latent encoder. weights: a file, 'none', or 'auto' (da3-tiny: find_checkpoint; others: a run in
    ckpt_dir, else random). enc.source = {'weights', 'sha256' (latents_sha256)}: what checkpoints record of their
    latents."""
    name = model_name('encoder', preset)
    weights = official.hub_weights(weights, preset)  # DA3-BASE, VGGT-1B, ...: from the hub cache
    if weights == 'auto' and (preset == DEFAULT_ENCODER or ckpt_dir and list_checkpoints(os.path.join(ckpt_dir, name))):
        weights = find_checkpoint(name, ckpt_dir)
    if weights in ('auto', 'none', None, ''):
        if weights == 'auto':
            print(f'note: {preset} with random weights (--encoder-weights FILE or a hub name: the official ones)')
        enc, weights, sha = latents.build_encoder(preset), 'none', None
    elif (
        weights.endswith('.pt')
        and 'ckpt_' in os.path.basename(weights)
        or weights.endswith('.safetensors')
        and os.path.exists(weights[: -len('.safetensors')] + '.json')
    ):
        meta, sd = load_checkpoint(weights)
        enc, sha = latents.build_encoder(preset), latents_sha256(meta)
        encoder_lib.load_weights(enc, sd, source=weights)  # its diagnostics: the preset the weights are for
    else:
        enc = latents.build_encoder(preset, weights=weights)
        sha = file_sha256(weights) if os.path.isfile(weights) else None
        print(f'{weights} (sha256 {sha[:12] if sha else "-"})')
    enc.source = {'weights': weights, 'sha256': sha}
    return enc.to(device).freeze()


def load_net(path, device, enc, name, build):
    """build(meta['config']) with the weights of path, in eval mode -> (net, meta); refuses another encoder's model."""
    meta, sd = load_checkpoint(path, device)
    want = (meta.get('encoder') or {}).get('sha256')
    if enc is not None and want and want != enc.source['sha256']:
        raise UserError(
            f'{path}: trained on latents of encoder {meta["encoder"]["weights"]} (sha256 {want[:12]}), but '
            f'the encoder here is {enc.source["weights"]} (sha256 {(enc.source["sha256"] or "none")[:12]}); '
            f'pass the --ckpt-dir whose encoder made it, or retrain it on this one: {train_command(name)}'
        )
    net = build(meta['config']).to(device).eval()
    net.load_state_dict(sd)
    return net, meta


def build_gld(config):
    return model_lib.GLD(model_lib.GLDConfig(**config))


def build_decoder(config):
    return decoder_lib.RGBDecoder(decoder_lib.DecoderConfig(**config))


def load_model(path, device='cpu', enc=None, name='level1'):
    """-> (GLD net in eval mode, meta with 'level', 'upper_level', LatentStats 'stats')."""
    net, meta = load_net(path, device, enc, name, build_gld)
    meta['stats'] = latents.LatentStats.from_state_dict(meta['stats'])
    return net, meta


def load_decoder(path, device='cpu', enc=None):
    """-> the RGB decoder in eval mode."""
    net, _ = load_net(path, device, enc, 'decoder', build_decoder)
    return net


# ----------------------------------------------------------------------------- the cascade
class Pipeline:
    """Frozen DA3 + RGB decoder + the diffusion models {level: (net, meta)}; boundary k = the deepest generated
    level."""

    def __init__(self, enc, dec, models, boundary=1, log=print, official=None, progress=True):
        self.enc, self.dec, self.models, self.boundary, self.log = enc, dec, models, boundary, log
        self.progress, self.official = progress, official  # official: the release's OfficialConventions, or None

    def sample_level(self, level, cond_raw, cams, upper_raw, sampler, steps, cfg_scale, generator):
        """One level of all views by a diffusion.SAMPLERS sampler (CFG over cameras) -> raw (B,V,T,C)."""
        t0, (net, meta) = time.time(), self.models[level]
        stats, up = meta['stats'], meta.get('upper_level')
        inputs = latents.dit_inputs(stats, level, cond_raw, cams, up, upper_raw)
        if self.official is not None:  # the release's per-model camera quirks (cascade K by 504, CFG branch)
            inputs.cams, inputs.uncond_cams = self.official.model_cameras(level, inputs.cams, inputs.uncond_cams)
        B, V, T, C = cond_raw.shape
        if self.official is not None:  # (Euler steps, shift, end time) of the release
            n, a, t_end = self.official.time_schedule(steps, V, C)
        else:  # ours: from t = 1 to 0 with the shift from V*T*C
            n, a, t_end = steps, diffusion.shift_alpha(V * T * C), 0.0
        noise = torch.randn(cond_raw.shape, generator=generator).to(cond_raw.device)
        name = f'M{up}->{level}' if up is not None else f'M{level}'
        bar = cli.progress(desc=f'  {name} Euler steps', total=n, leave=False, disable=not self.progress)
        conditional = inputs.velocity_fn(net)

        def velocity(x_t, t):  # the conditional call: once per Euler step, counted by the progress bar
            v = conditional(x_t, t)
            bar.update()
            return v

        unconditional = inputs.velocity_fn(net, unconditional=True)
        sample = diffusion.SAMPLERS[sampler]
        x = sample(velocity, noise, steps=n, a=a, cfg_scale=cfg_scale, uncond_fn=unconditional, t_end=t_end)
        bar.close()
        done = f'{n} Euler steps' if sampler == 'euler' else f'{sampler} sampler, {n} steps'
        self.log(f'  {name}: {done} (shift {a:.2f}), cfg {cfg_scale}: {time.time() - t0:.2f}s')
        return stats.denormalize(x, level)

    @torch.no_grad()
    def generate(self, images, c2w, K, n_src, sampler='euler', steps=50, cfg_scale=1.5, seed=0, given=None):
        """images (B,V,3,H,W) of which only the n_src sources are read; c2w (B,V,4,4), K (B,V,3,3) normalised; sampler:
        a diffusion.SAMPLERS name ('mean' ignores steps and cfg_scale); given: {level: raw (B,V,T,C)} used instead of
        generating it. -> {'levels', 'images' (B,V,3,H,W), 'geometry'}."""
        B, V, _, H, W = images.shape
        enc, L, hw = self.enc, self.enc.num_levels, (H // self.enc.patch, W // self.enc.patch)
        src_mask = (torch.arange(V, device=images.device) < n_src)[None].expand(B, V)
        cams = latents.model_cameras(c2w, K, src_mask, hw, official=self.official is not None, patch=enc.patch)
        cond, gen = latents.source_condition(enc, images, n_src), torch.Generator().manual_seed(seed)
        levels, given, cls_last = [None] * L, dict(given or {}), None
        for level in range(self.boundary, -1, -1):  # deepest first: M1 before M1->0
            if level in given:
                levels[level] = given[level]
            elif level in self.models:
                up = self.models[level][1].get('upper_level')
                upper_raw = levels[up] if up is not None else None
                levels[level] = self.sample_level(level, cond[level], cams, upper_raw, sampler, steps, cfg_scale, gen)
        t0 = time.time()
        if self.boundary < L - 1 and enc.can_propagate:  # deeper levels: level k through the remaining frozen blocks
            cls = None  # GLD (VGGT): the level's own special tokens, generated with it
            if not enc.special:  # GLD (DA3): token 0 of the first source, broadcast
                cls = enc.first_view_cls(images, self.boundary)
            levels[self.boundary + 1 :], cls_deep = enc.propagate(
                levels[self.boundary], self.boundary, cls, hw, return_cls=True
            )
            cls_last = cls_deep[-1]
            self.log(
                f'  propagate level {self.boundary} -> {self.boundary + 1}..{L - 1} through frozen {enc.cfg.name}: '
                f'{time.time() - t0:.2f}s'
            )
        t0 = time.time()
        keep = torch.tensor([level is not None for level in levels], device=images.device)[None].expand(B, L)
        filled = [level if level is not None else torch.zeros_like(levels[self.boundary]) for level in levels]
        norm = enc.normalize_levels(filled)
        rgb = self.dec(norm, hw, keep=keep if not keep.all() else None).clamp(0, 1)
        geo = enc.geometry(norm, H, W, cls_last=cls_last) if enc.has_geometry else {}
        self.log(
            f'  decode RGB + geometry head: {time.time() - t0:.2f}s'
            if enc.has_geometry
            else f'  decode RGB: {time.time() - t0:.2f}s (no geometry: {enc.cfg.name} has no geometry head)'
        )
        return {'levels': filled, 'images': rgb, 'geometry': geo}


def load_pipeline(
    ckpt_dir=None,
    boundary=1,
    independent=False,
    device='cpu',
    encoder=DEFAULT_ENCODER,
    encoder_weights='auto',
    log=print,
):
    """Encoder, decoder and level{k}..level0 (or the independent level{l}_ind) by name (find_checkpoint)."""
    enc = load_encoder(encoder, encoder_weights, device, ckpt_dir=ckpt_dir)  # None: the bundled weights only
    dec = (
        enc.rgb_decoder()
        if enc.has_rgb_decoder
        else load_decoder(find_checkpoint(model_name('decoder', encoder), ckpt_dir), device, enc)
    )
    if boundary >= enc.num_levels:
        log(f'note: {encoder} has levels 0..{enc.num_levels - 1}: boundary {boundary} -> {enc.num_levels - 1}')
        boundary = enc.num_levels - 1
    names = {level: run_name(level, independent, encoder) for level in range(boundary, -1, -1)}
    models = {level: load_model(find_checkpoint(name, ckpt_dir), device, enc, name) for level, name in names.items()}
    return Pipeline(enc, dec, models, boundary, log)


def load_official_pipeline(source, device='cpu', log=print, stats=None, latent='da3', **kw):
    """The released GLD (DA3) or GLD (VGGT) models of a folder or the hub (official.release_files;
    stats: a folder holding model_stats/) with their conventions (docs/official.md); kw:
    load_models's encoder_preset, heads."""
    files = official.release_files(source, stats, latent)
    enc, dec, models = official.load_models(files, device, latent=latent, log=log, **kw)
    conventions = official.OfficialConventions(**official.OFFICIAL_CONVENTIONS[latent])
    return Pipeline(enc, dec, models, boundary=1, log=log, official=conventions)
