"""cli.py: what every gld command line shares: UserError and its one-line report (run_cli), Progress lines, and
choose_threads. The bottom of the import graph: torch and the standard library only."""
import math
import os
import sys
import time
import traceback

import torch


class UserError(Exception):
    """A user's mistake in a file, folder or flag, raised where it is found: one line naming what is wrong, the file,
    and the fix as a flag or command. Any other exception is a bug and keeps its traceback."""


def first_line(e):
    """'Type: the first line of its message' of an exception (120 characters at most), for one-line errors."""
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:120]}'


def run_cli(main, argv=None):
    """Run an entry point's main(argv): a UserError becomes 'error: ...' on stderr and exit status 2 (GLD_DEBUG=1 also
    prints its traceback)."""
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
    """One torch thread on a busy CPU (load above the free cores) when OMP_NUM_THREADS is unset: on a shared 2-core
    machine the default ran every command 7-10x slower, with identical outputs."""
    if 'OMP_NUM_THREADS' in os.environ or not hasattr(os, 'getloadavg'):
        return
    cores = os.cpu_count() or 1
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > cores - torch.get_num_threads() + 0.5:
        torch.set_num_threads(1)
        print(f'note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {cores} cores): using 1 torch thread '
              '(set OMP_NUM_THREADS to choose)')


class Progress:
    """'M1 Euler 12/50  3.1s, ETA 9.8s' for a loop of `total` steps: updated in place on a terminal, a plain line at
    most every `every` seconds (and at the end) in a log file; every=0: a plain line per step everywhere."""

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
        line = f'{self.label} {self.done}/{self.total}  {elapsed:.1f}s' + ('' if end else f', ETA {eta:.1f}s') + \
            (f'  {note}' if note else '')
        self.stream.write(('\r' + line + '\x1b[K' + ('\n' if end else '')) if self.tty else line + '\n')
        self.stream.flush()
