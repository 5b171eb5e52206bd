"""runlog.py: a training run's log on rank 0: the printed line, log.csv and curves.png; train.py
writes them, off its training path."""

import csv
import math
import os

# the panels of curves.png
CURVES = ('loss', 'val_psnr', 'val_mean_psnr', 'val_mse', 'val_recon_psnr', 'val_absrel')


class Logger:
    """Rank 0: the dense line, log.csv (all columns; a resume keeps the rows up to its step) and
    curves.png."""

    def __init__(self, out, rank, start_step=0):
        self.rank = rank
        self.out = out
        self.path = os.path.join(out, 'log.csv')
        self.rows = [row for row in read_csv(self.path) if row['step'] <= start_step]

    def log(self, row):
        if self.rank != 0:
            return
        self.rows.append(row)
        fields = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()]
        print(' | '.join(fields), flush=True)
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(self.path + '.tmp', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.path + '.tmp', self.path)

    def plot(self):
        """curves.png, drawn with Pillow: a panel per column of CURVES with two points or more."""
        series = {key: curve(self.rows, key) for key in CURVES}
        series = {key: points for key, points in series.items() if len(points) >= 2}
        if self.rank == 0 and series:
            draw_panels(series, os.path.join(self.out, 'curves.png'))


def curve(rows, key):
    """The (step, value) points of one column; the loss only where it is positive (a log10 axis)."""
    points = [(row['step'], row[key]) for row in rows if row.get(key) is not None]
    if key == 'loss':
        points = [(step, value) for step, value in points if value > 0]
    return points


def draw_panels(series, png, W=640, H=240, margin=40):
    """A panel per curve, stacked: the line in its box, a title with its range and last value."""
    from PIL import Image, ImageDraw

    img = Image.new('RGB', (W, H * len(series)), 'white')
    draw = ImageDraw.Draw(img)
    width = W - 2 * margin  # the box of a panel's line
    height = H - 2 * margin
    for i, (key, points) in enumerate(series.items()):
        top = i * H + margin
        bottom = top + height
        steps = [step for step, _ in points]
        values = [value for _, value in points]
        y = [math.log10(v) for v in values] if key == 'loss' else values
        x0 = steps[0]
        x1 = max(steps[-1], x0 + 1)
        y0 = min(y)
        y1 = max(y) + 1e-9
        xs = [margin + (s - x0) / (x1 - x0) * width for s in steps]
        ys = [bottom - (v - y0) / (y1 - y0) * height for v in y]
        draw.line(list(zip(xs, ys)), fill='#1e5ac8', width=2)
        draw.rectangle([margin, top, margin + width, bottom], outline='black')
        title = f'{key} (log10)' if key == 'loss' else key
        low, high, last = min(values), max(values), values[-1]
        summary = f'{low:.4g} .. {high:.4g}, steps {x0}..{steps[-1]}, last {last:.4g}'
        draw.text((margin, top - margin + 8), f'{title}: {summary}', fill='black')
    img.save(png)


def read_csv(path):
    """The rows of a log.csv; [] without one."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [parse_row(row) for row in csv.DictReader(f)]


def parse_row(row):
    """step an int, the other columns floats; an empty cell is a column this row does not have."""
    cells = {k: v for k, v in row.items() if v not in ('', None)}
    return {k: int(v) if k == 'step' else float(v) for k, v in cells.items()}
