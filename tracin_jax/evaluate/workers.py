"""Sharing the retrainings of ``evaluate`` out over processes: unit claims and worker processes.

A *unit* is one model file to train: ``ground_truth/<key>/units/m<m>_r<r>.npz`` or
``ground_truth/leave_out/<hash>.npz``. Units are written atomically when they finish, and a unit
whose file exists is never trained again.

Claims (:func:`try_claim`). Before training a unit, a process takes an exclusive, non-blocking
``fcntl.flock`` on ``<unit>.claim`` (next to the unit's file) and holds it for the whole
training; the claim file holds its owner (``pid N on HOST``) and is removed once the unit's file
is written. A unit whose claim is held by another live process is skipped for now and tried
again later. The kernel releases a lock when its holder dies, even by SIGKILL, so the claim of
a killed process is free: the next process that tries it takes it over (and says so in one line
on stderr). Two processes therefore never train the same unit, on one machine or on several
sharing a file system with working ``flock`` (local disks, NFSv4, Lustre mounted with
``-o flock``).

A job array (or GNU parallel) shares one evaluation's models out without a coordinator: every
task runs the same command with ``--worker`` (which, on a task with several cores, starts its own
worker processes as below), then one run with ``--score-only`` scores::

    sbatch --array=0-31 --wrap "tracin-jax evaluate --workdir W --influence I --out O --worker"
    tracin-jax evaluate --workdir W --influence I --out O --score-only

Worker processes (:func:`run_workers`): ``tracin-jax evaluate ... --workers N`` (N > 1) starts N
copies of the same command with ``--worker --workers 1`` (each claims and trains units, writes no
evaluation output, and exits 0 once every unit is done), waits for them, and then scores in its
own process. On CPU each worker is pinned to its own share of the cores
(:func:`tracin_jax.distributed.local_cpu_share`) with one XLA thread
(``--xla_cpu_multi_thread_eigen=false``): single-threaded processes side by side use the cores
better than one multi-threaded process for these small training steps. The workers are quiet
(``TRACIN_JAX_QUIET=1``, standard output discarded); the parent shows one progress bar counting
finished unit files and forwards the workers' standard error prefixed ``[worker i]``. When a
worker exits with a non-zero status, the parent stops the others (SIGTERM, then SIGKILL) and
fails with that worker's last line: exit status 2 for an input error (:class:`InputError`),
else :class:`WorkerFailed`.

Numbers: XLA on CPU sizes its thread pool to the cores a process may use and splits some
reductions over it, so float rounding depends on that number of cores, and over many training
steps rounding differences grow into visibly different models (as on another machine). A model
depends on the number of cores of the process that trains it, not on which process that is:
workers pinned to one core each give bit for bit the models of one process pinned to one core.
For a ground truth reproducible bit for bit, train all its models with the same number of cores
per process (each unit file records it, ``cpus``, beside the ``worker`` that trained it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from tracin_jax.distributed import forward_lines, stop_processes
from tracin_jax.errors import InputError

CLAIM_SUFFIX = ".claim"
POLL_S = 0.5  # how often a waiting process looks at the unit files again
GRACE_S = 5.0  # SIGTERM -> SIGKILL when stopping workers
SINGLE_THREAD_XLA = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def claim_path(result: str | os.PathLike) -> Path:
    """The claim file of the unit whose result file is ``result``."""
    result = Path(result)
    return result.with_name(result.name + CLAIM_SUFFIX)


def owner() -> str:
    """What a claim file says about its holder."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class Claim:
    """An exclusive claim on one unit, held until :meth:`release` (idempotent)."""

    def __init__(self, result: Path, path: Path, fd: int):
        self.result, self.path, self._fd = result, path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Removes the claim file (if it is still this claim's) and drops the lock."""
        if self._fd is None:
            return
        try:
            here, mine = os.stat(self.path), os.fstat(self._fd)
            if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_claim(result: str | os.PathLike, log: Callable[[str], None] = _stderr) -> Claim | None:
    """Claims the unit whose file is ``result``: a :class:`Claim`, or None when the unit is not
    this process's to train (its file exists, or a live process holds its claim).

    Never blocks. A claim file that exists but is locked by nobody was left by a process that
    died: it is taken over, with one line to ``log``.
    """
    result = Path(result)
    if result.exists():
        return None
    path = claim_path(result)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{path}: cannot create the claim file ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None  # a live process holds it
        raise InputError(f"{path}: the file system refuses file locks ({e.strerror}); put the "
                         "workdir on a file system with flock support") from None
    try:
        # A holder removes its claim file on release: the lock taken may be on a file that is
        # no longer the one at `path` (then another process may already hold the new one).
        here, mine = os.stat(path), os.fstat(fd)
        if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)
            return None
    except FileNotFoundError:
        os.close(fd)
        return None
    claim = Claim(result, path, fd)
    if result.exists():  # finished meanwhile (or its holder died between writing and release)
        claim.release()
        return None
    previous = os.pread(fd, 512, 0).decode(errors="replace").strip()
    if previous:
        log(f"{result.name}: taking over the stale claim of {previous} (no live holder)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{owner()}\n".encode(), 0)
    return claim


# -- worker processes -------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process failed other than by bad input (a crash, a signal); one line."""


def usable_cpus() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_env(on_cpu: bool) -> dict:
    """The environment of a worker: quiet, unbuffered, outside any JAX cluster, this package
    importable, and on CPU one XLA thread (flags added to the caller's ``XLA_FLAGS``)."""
    from tracin_jax.distributed import ADDRESS, COUNT, RANK

    env = dict(os.environ)
    # A worker is a process on its own: it never joins a JAX cluster its parent's environment
    # describes (the variables tracin_jax.distributed.detected_cluster looks at).
    for name in (ADDRESS, COUNT, RANK, "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)
    env.update({"TRACIN_JAX_QUIET": "1", "PYTHONUNBUFFERED": "1"})
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if on_cpu:
        flags = env.get("XLA_FLAGS", "").split()
        for flag in SINGLE_THREAD_XLA:
            if flag.split("=")[0] not in " ".join(flags):
                flags.append(flag)
        env["XLA_FLAGS"] = " ".join(flags)
    else:  # several processes on one accelerator: none may take most of its memory up front
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def _pin(pid: int, cpus: Sequence[int]) -> None:
    """Pins a just-started process to ``cpus``. Done from the parent as soon as Popen returns
    (after the child's exec, while its interpreter is still starting, long before JAX starts a
    thread), so every thread of the child inherits the mask and XLA sizes its thread pool to it.
    A ``preexec_fn`` instead would run Python code in a fork of this multi-threaded process."""
    try:
        os.sched_setaffinity(pid, cpus)
    except (OSError, AttributeError):
        pass  # the process already ended (its status tells why), or no affinity on this OS


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def run_workers(command: Sequence[str], n: int, results: Sequence[Path], *, on_cpu: bool = True,
                progress: bool = True, desc: str = "retraining", poll_s: float = POLL_S) -> None:
    """Runs ``n`` copies of ``command`` (an argv) until all exit, showing one bar over
    ``results`` (the unit files they write).

    Worker ``i`` gets :func:`worker_env` and, on CPU, the cores
    ``local_cpu_share(i, n)``. Returns when every worker exited 0. Otherwise stops the others
    and raises :class:`InputError` (the failed worker exited 2) or :class:`WorkerFailed`, one
    line ending with the worker's last line of standard error.
    """
    from tracin_jax.distributed import local_cpu_share
    from tracin_jax.progress import tqdm

    results = [Path(r) for r in results]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    env = worker_env(on_cpu)
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    last: dict[int, str] = {}

    def done() -> int:
        return sum(1 for r in results if r.exists())

    bar = tqdm(total=len(results), initial=done(), desc=f"{desc} ({n} workers)", unit="model",
               disable=not progress, dynamic_ncols=True)
    failed: tuple[int, int] | None = None
    try:
        for i in range(n):
            share = tuple(local_cpu_share(i, n, cpus)) if (on_cpu and cpus) else None
            p = subprocess.Popen(
                list(command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True, bufsize=1)
            procs.append(p)
            if share:
                _pin(p.pid, share)
            t = threading.Thread(target=forward_lines, args=(p.stderr, f"worker {i}", i, last, sys.stderr),
                                 daemon=True)
            t.start()
            threads.append(t)
        while failed is None:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
            bar.update(done() - bar.n)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(poll_s)
    except BaseException:  # KeyboardInterrupt included: no worker outlives the parent
        stop_processes(procs, GRACE_S)
        bar.close()
        raise
    if failed is not None:
        stop_processes(procs, GRACE_S)
    for t in threads:
        t.join(timeout=5)
    bar.update(done() - bar.n)
    bar.close()
    if failed is None:
        return
    i, code = failed
    reason = last.get(i, "no message").removeprefix("tracin-jax: error: ")
    others = f"; stopped the other {n - 1}" if n > 1 else ""
    if code == 2:
        raise InputError(f"worker {i} of {n}: {reason}")
    raise WorkerFailed(f"worker {i} of {n} exited with {_describe(code)}{others}: {reason}")
