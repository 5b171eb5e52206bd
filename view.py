"""view.py: a sample.py output folder in the browser, with viser (as VGGT's and SEVA's demos show
theirs).

`python view.py OUT` (or `python sample.py ... --view`) serves on localhost the fused points of
points.ply and every camera of transforms.json as a frustum holding its image (sources blue,
generated targets orange), in the exported world. viser is optional: `pip install viser`. Shape
legend: V views, H W image, N points.
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

import cli
import data
import export


def read_outputs(folder):
    """folder's transforms.json and points.ply -> {'c2w' (V,4,4) OpenCV, 'K' (V,3,3) normalised,
    'names', 'images' [(H,W,3) uint8], 'xyz' (N,3), 'rgb' (N,3) uint8}."""
    transforms = os.path.join(folder, 'transforms.json')
    ply = os.path.join(folder, 'points.ply')
    if not (os.path.isfile(transforms) and os.path.isfile(ply)):
        fix = f'write them with: python sample.py --out {folder} (--export with ply and nerfstudio)'
        raise cli.UserError(f'{folder}: no transforms.json and points.ply to show; {fix}')
    import trimesh  # reads the PLY

    cams = data.read_transforms(transforms)
    cloud = trimesh.load(ply)
    images = []
    for f in cams['files']:
        with Image.open(os.path.join(folder, f)) as im:
            images.append(np.asarray(im.convert('RGB')))
    return {
        'c2w': cams['c2w'].double(),
        'K': cams['K'].double(),
        'names': [os.path.splitext(os.path.basename(f))[0] for f in cams['files']],
        'images': images,
        'xyz': np.asarray(cloud.vertices, dtype=np.float32),
        'rgb': np.asarray(cloud.colors)[:, :3],
    }


def import_viser():
    """viser, optional: absent, one line says how to install it."""
    try:
        import viser
        import viser.transforms
    except ImportError:
        raise cli.UserError('the browser view needs viser: pip install viser') from None
    return viser


def serve(folder, port=8080, host='127.0.0.1'):
    """Serve folder's scene (read_outputs) with viser on http://host:port (the next free port if
    taken) -> the server; its points are '/points', its cameras '/cameras/<image name>'."""
    viser = import_viser()
    scene = read_outputs(folder)
    c2w = scene['c2w']
    centres = c2w[:, :3, 3]
    # the points' spread about the first camera sets the sizes: points, frustums, the start view
    distance = float(np.median(np.linalg.norm(scene['xyz'] - centres[0].numpy(), axis=-1)))
    server = viser.ViserServer(host=host, port=port, verbose=False)
    up = -c2w[0, :3, 1]  # OpenCV: the first source's -y
    server.scene.set_up_direction(up.numpy())
    server.scene.add_point_cloud('/points', scene['xyz'], scene['rgb'], point_size=0.004 * distance)
    for v, name in enumerate(scene['names']):
        H, W = scene['images'][v].shape[:2]
        fy = float(scene['K'][v, 1, 1]) * H  # pixels
        rgb = export.SOURCE_RGB if name.startswith('source') else export.TARGET_RGB
        server.scene.add_camera_frustum(
            f'/cameras/{name}',
            fov=2 * np.arctan(H / (2 * fy)),
            aspect=W / H,
            scale=0.06 * distance,
            color=rgb,
            image=scene['images'][v],
            wxyz=viser.transforms.SO3.from_matrix(c2w[v, :3, :3].numpy()).wxyz,
            position=centres[v].numpy(),
        )
    # the start view: behind and above the first source, at the points' centre
    forward = c2w[0, :3, 2]
    server.initial_camera.position = (centres[0] - distance * forward + 0.5 * distance * up).numpy()
    server.initial_camera.look_at = torch.from_numpy(scene['xyz']).double().median(0).values.numpy()
    server.initial_camera.up = up.numpy()
    return server


def show(folder, port=8080):
    """serve(folder) until Ctrl-C."""
    server = serve(folder, port)
    print(f'showing {folder}/ at http://127.0.0.1:{server.get_port()} (Ctrl-C to stop)', flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description='show a sample.py output folder in the browser (viser)')
    p.add_argument('folder', nargs='?', default='out/sample', help="sample.py's --out")
    p.add_argument('--port', type=int, default=8080, help='localhost port (the next free one if taken)')
    args = p.parse_args(argv)
    show(args.folder, args.port)


if __name__ == '__main__':
    cli.run_cli(main)
