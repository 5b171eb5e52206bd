"""tools/seen.py: where does GLD beat reprojection? Its error on the target pixels a source saw and on the rest.

"Seen" pixels are those the reprojection baseline covers (metrics.reprojection lands a source point there, with DA3's
depth on the sources); the rest are the holes it fills with the mean colour. For the protocol's N=2 (the ends of each
8-view test scene) it prints the fraction seen and, on each part, the PSNR of GLD's targets and of reprojection's,
pooled over all the scenes' pixels (one MSE per part, so not the mean of per-image PSNRs the tables report).

    python tools/seen.py                              # the bundled models on the synthetic test scenes
    python tools/seen.py --data data_synth_s1          # another split; --ckpt-dir for other models
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import metrics  # noqa: E402
import pipeline  # noqa: E402


def pooled_psnr(pred, truth, mask):
    """PSNR (dB) over the pixels where mask (broadcast to truth's shape) is true, one MSE over all of them."""
    mask = mask.expand_as(truth)
    error = (pred.clamp(0, 1) - truth).pow(2)
    return float(-10 * torch.log10(error[mask].mean()))


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default='data_synth', help='dataset folder with a test split')
    p.add_argument('--ckpt-dir', default=None, help='models (default: the bundled weights/tiny)')
    args = p.parse_args()
    pipe = pipeline.load_pipeline(args.ckpt_dir, 1, False, torch.device('cpu'), 'da3-tiny', 'auto')
    dataset = data.SceneDataset(args.data, split='test', num_views=8, eval=True, seed=0)
    truths, gld, warped, seen = [], [], [], []
    for i in range(len(dataset)):
        scene = data.split_views(data.collate_one(dataset[i]), 2, mode='ends')
        images, c2w, K = scene['images'], scene['c2w'], scene['K']
        # the bundled default, the posterior mean, seeded as sample.py --eval seeds it
        out = pipe.generate(images, c2w, K, 2, sampler='mean', steps=1, cfg_scale=1.0, seed=i)
        _, mean_colour = metrics.baselines(images, c2w, 2)
        reprojected, covered = metrics.reprojection(pipe.enc, images, c2w, K, 2, mean_colour)
        truths.append(images[:, 2:])
        gld.append(out['images'][:, 2:])
        warped.append(reprojected)
        seen.append(covered[:, :, None])  # (B,M,1,H,W)
    truth, gld, warped, seen = (torch.cat(x) for x in (truths, gld, warped, seen))
    print(f'{args.data}: {len(dataset)} scenes, {float(seen.float().mean()):.1%} of the target pixels seen')
    for part, mask in (('seen', seen), ('unseen', ~seen)):
        ours = pooled_psnr(gld, truth, mask)
        theirs = pooled_psnr(warped, truth, mask)
        print(f'{part:>6}: GLD {ours:.2f} dB, reprojection {theirs:.2f} dB')


if __name__ == '__main__':
    main()
