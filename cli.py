"""cli.py: what every gld command line shares: UserError and its one-line report, Progress lines, choose_threads."""

import math
import os
import sys
import time
import traceback

import torch


class UserError(Exception):
    """A user's mistake in a file, folder or flag: one line naming what is wrong and the fix. Others are bugs."""


def first_line(e):  # 'Type: the first line of its message' (120 characters at most), for one-line errors
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:120]}'


def run_cli(main, argv=None):
    """main(argv) where a UserError becomes 'error: ...' on stderr, exit status 2 (GLD_DEBUG=1: and its traceback)."""
    choose_threads()
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get('GLD_DEBUG') == '1':
            traceback.print_exc()
        msg = str(e)
        if 'Original Traceback' in msg:  # re-raised from a DataLoader worker: the message is the traceback's last line
            msg = msg.strip().splitlines()[-1].partition(': ')[2]
        print('error: ' + ' '.join(msg.split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)


def choose_threads():
    """One torch thread on a busy CPU when OMP_NUM_THREADS is unset (a shared 2-core machine ran 7-10x slower)."""
    if 'OMP_NUM_THREADS' in os.environ or not hasattr(os, 'getloadavg'):
        return
    cores = os.cpu_count() or 1
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > cores - torch.get_num_threads() + 0.5:
        torch.set_num_threads(1)
        print(
            f'note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {cores} cores): using 1 torch thread '
            '(set OMP_NUM_THREADS to choose)'
        )


class Progress:
    """'M1 Euler 12/50  3.1s, ETA 9.8s': in place on a terminal, else a line every `every` s (0: every step)."""

    def __init__(self, label, total, every=10.0, stream=None):
        self.label, self.total, self.every, self.stream = label, total, every, stream or sys.stdout
        self.done, self.t0, self.last = 0, time.time(), -math.inf
        self.tty = self.stream.isatty() and every > 0

    def step(self, note=''):
        self.done += 1
        now, end = time.time(), self.done >= self.total
        if not (self.tty or end or now - self.last >= self.every):
            return
        self.last, elapsed = now, now - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        line = (
            f'{self.label} {self.done}/{self.total}  {elapsed:.1f}s'
            + ('' if end else f', ETA {eta:.1f}s')
            + (f'  {note}' if note else '')
        )
        self.stream.write(('\r' + line + '\x1b[K' + ('\n' if end else '')) if self.tty else line + '\n')
        self.stream.flush()
