"""cli.py: what every gld command line shares: UserError and its one-line report, progress bars,
choose_threads."""

import os
import sys
import traceback

import torch
from tqdm import tqdm


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


def progress(iterable=None, desc='', total=None, every=10.0, **kw):
    """tqdm's bar on a terminal; elsewhere (a log file) its status as plain lines: every `every` s
    from then on, and at the end, of a loop longer than `every` s (0: every step). kw: tqdm's
    (leave, initial, unit, disable, ...)."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kw)
    lines = LogLines(sys.stderr)
    # a line once `every` seconds have passed, then at most one every `every` seconds
    timing = {'delay': every, 'mininterval': every, 'miniters': 1}
    return tqdm(iterable, desc=desc, total=total, file=lines, **timing, **kw)


class LogLines:
    """A stream for tqdm off a terminal: each new status of a bar becomes a line of its own (no
    carriage returns)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ''

    def write(self, text):
        line = text.replace('\x1b[A', '').strip()  # tqdm's cursor-up code (nested bars) and its \r
        count = line.split(' [')[0]  # 'desc: 50%|#####     | 1/2', without the times and rate
        if count and count != self.last:  # close() repeats the last count
            self.stream.write(line + '\n')
            self.last = count

    def flush(self):
        self.stream.flush()
