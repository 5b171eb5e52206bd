"""Draws docs/trajectories.png, the README's picture of sample.py's --traj presets: `python docs/make_trajectories.py`.

Each panel is export.draw_topdown of cameras.preset_trajectory (the code sample.py runs) for two sources that look at
one point (an orbit-like capture) or one source: the sources blue, the targets orange, the first target ringed.
"""
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cameras  # noqa: E402
import export  # noqa: E402


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'trajectories.png')):
    centre, up = torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, -1.0, 0.0])
    eyes = torch.tensor([[-1.2, 0.0, 0.3], [1.2, 0.0, 0.3]])
    two = cameras.look_at(eyes, centre.expand(2, 3), up)
    K = torch.tensor([[0.8, 0, 0.5], [0, 0.8, 0.5], [0, 0, 1]]).expand(2, 3, 3)
    panels = [('interp (2 sources)', two, 'interp', None), ('orbit (2 sources)', two, 'orbit', None),
              ('orbit --arc 360', two, 'orbit', 360.0), ('orbit (1 source)', two[:1], 'orbit', None),
              ('spiral (1 source)', two[:1], 'spiral', None), ('forward (1 source)', two[:1], 'forward', None)]
    sheet = Image.new('RGB', (3 * 256, 2 * 256), 'white')
    for i, (title, src, traj, arc) in enumerate(panels):
        c2w, _ = cameras.preset_trajectory(src, K[:len(src)], traj, 12, arc)
        export.draw_topdown(path + f'.{i}.png', src, c2w, title=title)
        with Image.open(path + f'.{i}.png') as tile:
            sheet.paste(tile, (256 * (i % 3), 256 * (i // 3)))
        os.remove(path + f'.{i}.png')
    sheet.save(path)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
