"""runlog.py: a training run's log: what a log line averages over (LogWindow) and, on rank 0,
the printed line, log.csv and curves.png; train.py writes them, off its training path."""

import csv
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

# the panels of curves.png
CURVES = ('loss', 'val_psnr', 'val_mean_psnr', 'val_mse', 'val_recon_psnr', 'val_absrel')


@dataclass
class LogWindow:
    """The steps since the last log line: their summed loss and loss parts, the samples seen (on all
    ranks), the tokens per sample of the last batch, the time since the window opened."""

    loss: torch.Tensor  # a device scalar: the sum needs no host sync per step
    parts: dict = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.time)

    def add_batch(self, batch, patch, world):
        B, V = batch['c2w'].shape[:2]
        H, W = batch['images'].shape[-2:] if 'images' in batch else batch['size']
        self.samples += B * world
        self.tokens = V * (H // patch) * (W // patch)

    def add_step(self, loss, parts):
        self.steps += 1
        self.loss += loss.detach()
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v.detach().float()

    def row(self, step, grad_norm, lr, steps_left, world):
        """The log line: the mean loss and its parts, the loss binned by t, the last step's grad
        norm and lr, the throughput and the time left."""
        if world > 1:  # the mean over the ranks too (one collective, at log steps only)
            dist.all_reduce(self.loss)
            self.loss /= world
        parts = dict(self.parts)
        bins = {}
        if 't_bin_sum' in parts:  # the loss binned by t: bin sums over bin counts of the window
            total = parts.pop('t_bin_sum')
            count = parts.pop('t_bin_count')
            for i in range(len(total)):
                if count[i] > 0:
                    bins[f'loss_t{i}'] = float(total[i] / count[i])
        means = {k: float(v) / self.steps for k, v in parts.items()}
        seconds = time.time() - self.start
        return {
            'step': step,
            'loss': float(self.loss) / self.steps,
            **means,
            **bins,
            'grad_norm': float(grad_norm),
            'lr': lr,
            'samples_s': self.samples / seconds,
            'tokens_s': self.samples * self.tokens / seconds,
            'eta_min': steps_left * seconds / self.steps / 60,
        }


class TrainClock:
    """Minutes spent in training steps, evaluation and checkpoints not counted, carried over a
    --resume: the process's CPU time on a CPU (fair when runs share cores; DataLoader workers not
    counted), wall time on a GPU (the step's host sync makes it the GPU's time)."""

    def __init__(self, device):
        self.read = time.process_time if device.type == 'cpu' else time.perf_counter
        self.minutes = 0.0
        self.started = None

    def start(self):
        if self.started is None:  # a skipped (non-finite) step's time counts with the next one
            self.started = self.read()

    def stop(self):
        self.minutes += (self.read() - self.started) / 60
        self.started = None


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
        with tqdm.external_write_mode():  # the line above train.py's progress bar, on a terminal
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
