"""safety.py: nothing lost, nothing run, on a shared cluster and a shared disk.

One process at a time per output folder (lock_folder); files and output sets that appear whole or
not at all (write_file, replaced_folder); torch.load that runs no code (load_plain); under torchrun,
signals that all ranks agree on at a step boundary (Preemption) and a failed rank that stops the
others within a second (watch_ranks, stop_other_ranks).
"""

import contextlib
import ctypes
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, first_line

LOCK = '.gld.lock'  # in an output folder while a process writes it: 'PID HOST'
HOST = socket.gethostname()
# numpy's RNG state in checkpoints written before it became a list: arrays of numbers, data only
MULTIARRAY = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
LEGACY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, MULTIARRAY._reconstruct]
LEGACY_GLOBALS.append((MULTIARRAY._reconstruct, 'numpy.core.multiarray._reconstruct'))  # numpy 1


# ------------------------------------------------------------------ one process per folder
def alive(pid):  # whether process pid of this host runs (another user's included)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path):
    """A lock's holder -> (pid, host); (None, HOST) if its writer died before filling it."""
    with open(path) as f:
        pid, _, host = f.read().partition(' ')
    if not pid.isdigit():
        return None, HOST
    return int(pid), host.strip()


def take_lock(path):  # -> False if a lock is there
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        f.write(f'{os.getpid()} {HOST}')
    return True


@contextlib.contextmanager
def lock_folder(folder, flag='--out'):
    """Hold folder (created) for this process. Another live holder stops this one with one line; the
    lock of a process gone from this host is taken over with a notice; a folder this process holds
    already is entered again."""
    restore_interrupted_swap(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    if not take_lock(path):
        pid, host = read_lock(path)
        if (pid, host) == (os.getpid(), HOST):
            yield
            return
        if host != HOST or pid is not None and alive(pid):
            raise UserError(
                f'{folder}: in use by process {pid} on {host} (its lock {path}); wait for it to '
                f'end or pass another {flag}; if that process is gone, delete {path}'
            )
        print(f'note: {folder}: process {pid} of its lock is gone (killed?): taking it over')
        os.remove(path)
        if not take_lock(path):
            raise UserError(f'{folder}: another process took it just now; pass another {flag}')
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ------------------------------------------------------------------ files and folders appear whole
def fsync(path):  # a file's or a folder's contents on the disk, not only in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, write):
    """write(tmp) fills a temporary sibling, which replaces path in one rename after an fsync: path
    is the old file or the whole new one, even after a power cut. A failed write removes its
    temporary; a killed one's is removed by the next write of path."""
    tmp = f'{path}.tmp-{HOST}-{os.getpid()}'
    prefix = os.path.basename(f'{path}.tmp-{HOST}-')
    folder = os.path.dirname(path) or '.'
    for name in os.listdir(folder):
        pid = name[len(prefix) :]
        if name.startswith(prefix) and pid.isdigit() and not alive(int(pid)):
            os.remove(os.path.join(folder, name))
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync(folder)


def files_under(folder):  # its files and symbolic links, relative to it
    out = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files + links]
    return out


def exchange(a, b):
    """Swap paths a and b in one step (Linux renameat2 RENAME_EXCHANGE) -> False if it cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
    at_cwd = -100
    rename_exchange = 2
    if renameat2 is None:
        return False
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def siblings(folder, kind):  # folder's temporaries: 'new' (being written), 'old' (swapped out)
    parent, name = os.path.split(folder)
    names = sorted(os.listdir(parent))
    return [os.path.join(parent, f) for f in names if f.startswith(f'.{name}.{kind}-')]


def restore_interrupted_swap(folder):
    """A death between the two renames of swap left folder missing, its old version beside it: put
    it back."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    if not os.path.exists(folder) and os.path.isdir(parent) and siblings(folder, 'old'):
        os.rename(siblings(folder, 'old')[0], folder)
        print(f'note: {folder}: restored the version an interrupted run was replacing')


@contextlib.contextmanager
def replaced_folder(folder, dropped=None):
    """A new version of folder's files that appears whole or not at all (hold folder's lock): yields
    an empty temporary sibling to write the new files into. When the block ends without an error,
    folder's other files (but those of dropped(folder), relative paths) are hard-linked beside them
    and the two folders are exchanged in one step; the old version is then removed."""
    given = folder  # as the user wrote it, for dropped's notes
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    new = os.path.join(parent, f'.{name}.new-{os.getpid()}')
    for stale in siblings(folder, 'new') + siblings(folder, 'old'):  # killed runs': the lock says
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(new)
    try:
        yield new
        for rel in files_under(new):  # on the disk before they replace anything
            fsync(os.path.join(new, rel))
        drop = set(dropped(given) if dropped and os.path.isdir(folder) else [])
        if not os.path.isdir(folder):
            os.rename(new, folder)
        elif os.path.commonpath([os.getcwd(), folder]) == folder:
            print(f'note: {folder} holds the working folder: its files are replaced one by one')
            move_files(new, folder, drop)
        else:
            link_files(folder, new, drop)
            fsync(new)
            swap(new, folder)
        fsync(parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # after a swap it holds the old version


def link_files(src, dst, skip):
    """Hard links in dst to src's files that dst lacks, but skip (copies without hard links)."""
    for rel in files_under(src):
        target = os.path.join(dst, rel)
        if rel in skip or os.path.lexists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(os.path.join(src, rel), target, follow_symlinks=False)
        except OSError:
            shutil.copy2(os.path.join(src, rel), target, follow_symlinks=False)


def swap(new, folder):
    """folder <- new, new <- the old version: one step, else two renames (NFS); a death between them
    leaves the old version at .NAME.old-PID, which the next lock_folder puts back."""
    if exchange(new, folder):
        return
    parent, name = os.path.split(folder)
    old = os.path.join(parent, f'.{name}.old-{os.getpid()}')
    os.rename(folder, old)
    os.rename(new, folder)
    os.rename(old, new)


def move_files(new, folder, drop):  # where folder holds the working folder, which a swap would move
    for rel in drop:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, rel))
    for rel in files_under(new):
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(new, rel), target)


# ------------------------------------------------------------------ loading without running code
def load_plain(path, source=None, device='cpu', allowed=()):
    """torch.load(source or path) that runs no code (weights_only): tensors, numbers, strings,
    containers and the classes allowed. A file that pickles anything else is refused with one line
    naming it and the classes: unpickling them could run any program."""
    try:
        with torch.serialization.safe_globals([*LEGACY_GLOBALS, *allowed]):
            return torch.load(source or path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        classes = sorted(set(re.findall(r'GLOBAL ([\w.]+)', str(e))))
        if not classes:  # garbage: the reader's complaint, not torch's advice to load it unsafely
            detail = str(e).partition('WeightsUnpickler error:')[2].strip().split('\n')[0]
            raise pickle.UnpicklingError(detail or 'unreadable') from None
    raise UserError(
        f'{path}: pickles Python objects ({", ".join(classes)}) that could run code when loaded; '
        'refused: load only files that train.py wrote or that hold tensors and plain values'
    )


# ------------------------------------------------------------------ signals and failed ranks
def rng_state(rng):
    """Every random stream of this process as plain data: torch's, numpy's, Python's, CUDA's, rng."""
    name, keys, *position = np.random.get_state()  # the keys: a uint32 array, as a tensor
    return {
        'torch': torch.get_rng_state(),
        'numpy': [name, torch.from_numpy(keys.astype(np.int64)), *position],
        'python': random.getstate(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'gen': rng.get_state(),
    }


def set_rng_state(state, rng):
    torch.set_rng_state(state['torch'])
    name, keys, *position = state['numpy']
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *position))
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    rng.set_state(state['gen'])


class Preemption:
    """SIGINT, SIGTERM and SIGUSR1 (SLURM's) ask for a checkpoint after the step in flight; ranks
    agree on it in stop_signal, one all_reduce of a number per step, so that all stop at one step.
    In one process a second Ctrl-C stops at once; under torchrun repeats are ignored (torchrun
    forwards the signal it gets to the ranks, which got it themselves)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world, device):
        self.world = world
        self.received = 0  # the first signal's number
        self.flag = torch.zeros((), device=device)
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = self.received or signum
        if signum == signal.SIGINT and self.world == 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop_signal(self):
        """The signal all ranks stop for after this step (the largest any rank got), 0: none."""
        if self.world == 1:
            return self.received
        self.flag.fill_(self.received)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        return int(self.flag)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


ABORT_KEY = 'gld_failed'  # in the process group's store: the first failed rank's one line


def watch_ranks(rank, done):
    """A thread that ends this process within a second once another rank failed: waiting in a
    collective for a failed rank lasts forever (NCCL) or until a socket times out."""
    store = dist.distributed_c10d._get_default_store()

    def watch():
        while not done.wait(0.5):
            try:
                failed = store.check([ABORT_KEY])
            except RuntimeError:  # the store went with its holder (torchrun, or rank 0): no key
                return  # to wait for; a rank waiting for a dead one fails in its collective
            if failed and not done.is_set():
                stop_this_rank(rank, store)

    threading.Thread(target=watch, daemon=True).start()


def stop_this_rank(rank, store):
    reason = 'another rank ended (its message is above)'
    with contextlib.suppress(RuntimeError):
        reason = store.get(ABORT_KEY).decode()
    print(f'error: rank {rank} stopped: {reason}', file=sys.stderr, flush=True)
    os._exit(2)


def stop_other_ranks(rank, error):
    """A failed rank: its one line into the store, for the others' watch_ranks; a rank failing
    because another failed first stops with that one's line instead."""
    store = dist.distributed_c10d._get_default_store()
    try:
        if store.check([ABORT_KEY]):
            stop_this_rank(rank, store)
        message = str(error) if isinstance(error, UserError) else first_line(error)
        store.set(ABORT_KEY, f'rank {rank} failed: {" ".join(message.split())}')
    except RuntimeError:  # the store went with the rank that held it, which failed first
        stop_this_rank(rank, store)
    time.sleep(1)  # the others read it before this process (which may hold the store) ends
