"""cli.py: what every command line of gld shares: the user's-mistake error, one-line reporting, progress lines, threads.

- `UserError`: a mistake in a file, folder or flag, raised where it is found (any module), one line naming the file
  and the fix as a flag or command.
- `run_cli(main)`: the entry points' wrapper (train.py, sample.py, data.py, export.py): a UserError becomes that line on
  stderr and exit status 2, no traceback (GLD_DEBUG=1 shows it); any other exception is a bug and keeps its traceback.
- `Progress`: a loop's progress with ETA, in place on a terminal, plain lines in logs.
- `choose_threads`: one torch thread on a busy CPU (2-core machines ran 7-10x slower with two, same outputs).

The bottom of the import graph: torch and the standard library only.
"""
import math
import os
import sys
import time
import traceback

import torch


class UserError(Exception):
    """A user's mistake in a file, folder or flag, raised where it is found. The message is one line: what is
    wrong, the file, and the fix written as a command-line flag or command. The entry points (run_cli) print it
    on stderr and exit with status 2, without a traceback; any other exception is a bug and keeps its traceback."""


def run_cli(main, argv=None):
    """Run an entry point's main(argv): a UserError becomes one line on stderr ('error: ...') and exit status 2;
    GLD_DEBUG=1 in the environment shows its traceback too. Threads are chosen first (choose_threads)."""
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
    """On a busy CPU (load average above the free cores) with no OMP_NUM_THREADS set, use one torch thread: on a
    shared 2-core machine the default (one per core) ran every command 7-10x slower, with identical outputs."""
    if 'OMP_NUM_THREADS' in os.environ or not hasattr(os, 'getloadavg'):
        return
    cores = os.cpu_count() or 1
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > cores - torch.get_num_threads() + 0.5:
        torch.set_num_threads(1)
        print(f'note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {cores} cores): using 1 torch thread '
              '(set OMP_NUM_THREADS to choose)')


class Progress:
    """Progress of a loop of `total` steps with elapsed time and ETA: one line updated in place (\\r) on a terminal,
    plain lines at most every `every` seconds (and at the end) when stdout is a log file; every=0: a plain line for
    each step everywhere (slow steps with other output between them).

        bar = Progress('M1 Euler', 50)
        for ...: bar.step()   # 'M1 Euler 12/50  3.1s, ETA 9.8s'
    """

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
