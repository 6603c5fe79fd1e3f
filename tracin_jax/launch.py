"""``tracin-jax launch -n N -- STAGE ...``: N local JAX processes of one stage on one machine.

In the spirit of torchrun's ``--nproc-per-node``: the launcher picks a free coordinator port on
127.0.0.1, starts N copies of ``tracin-jax STAGE ...`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (each joins the cluster through
:func:`tracin_jax.distributed.initialize`), and gives each process its own resources:

- on CPU, a contiguous share of the cores this launcher may use
  (:func:`~tracin_jax.distributed.local_cpu_share`, applied with ``os.sched_setaffinity``
  before the process starts, so its XLA thread pool is sized to its share);
- on GPU (``--devices gpu``, or ``auto`` when ``nvidia-smi`` lists GPUs), its own GPU through
  ``CUDA_VISIBLE_DEVICES`` (round-robin when N exceeds the GPUs).

Every line a process prints is forwarded prefixed by its rank (``[1] ...``); only process 0
prints progress and results. When a process exits with a non-zero status the launcher stops the
others at once (SIGTERM, then SIGKILL) and exits with that status, ending with that process's
last error line. Ctrl-C stops them all (exit 130); a rerun resumes as a single-process run does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from tracin_jax.distributed import (ADDRESS, COUNT, PEER_STOPPED, RANK, forward_lines,
                                    local_cpu_share, stop_processes)
from tracin_jax.errors import InputError

STAGES = ("train", "influence", "evaluate", "explain")
GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def visible_gpus() -> list[str]:
    """GPU ids this launcher may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else the GPUs
    ``nvidia-smi -L`` lists (none when it is absent)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def process_env(rank: int, n: int, address: str, gpus: Sequence[str]) -> dict:
    """The environment of process ``rank``."""
    env = dict(os.environ)
    env.update({ADDRESS: address, COUNT: str(n), RANK: str(rank), "PYTHONUNBUFFERED": "1"})
    env.pop("TRACIN_JAX_SUPERVISED", None)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
    else:
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _first_cause(procs: list[subprocess.Popen], failed: tuple[int, int], last: dict,
                 window_s: float = 1.0) -> tuple[int, int]:
    """The failure to report: when one process dies, its peers soon fail too ("another process
    of the cluster stopped"); within ``window_s`` of the first failure seen, the first failure
    that is not such a consequence."""
    time.sleep(window_s)
    failures = [failed] + [(r, p.returncode) for r, p in enumerate(procs)
                           if r != failed[0] and p.poll() not in (None, 0)]
    for rank, code in failures:
        if PEER_STOPPED not in last.get(rank, ""):
            return rank, code
    return failed


def check_command(n: int, command: Sequence[str], devices: str) -> None:
    if n < 1:
        raise InputError(f"-n {n}: the number of processes must be at least 1")
    if devices not in ("auto", "cpu", "gpu"):
        raise InputError(f"--devices {devices!r} is not one of auto, cpu, gpu")
    if not command:
        raise InputError("launch needs a stage after --, e.g. tracin-jax launch -n 2 -- "
                         "influence --workdir W --out O")
    if command[0] not in STAGES:
        raise InputError(f"launch runs one of {', '.join(STAGES)}, not {command[0]!r}")


def launch(command: Sequence[str], n: int, *, devices: str = "auto") -> int:
    """Runs ``tracin-jax COMMAND`` in ``n`` local processes; returns the exit status (0 when all
    succeeded, else the first failure's)."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    check_command(n, command, devices)
    gpus = visible_gpus() if devices in ("auto", "gpu") else []
    if devices == "gpu" and not gpus:
        raise InputError("--devices gpu: no GPU is visible (nvidia-smi lists none and "
                         "CUDA_VISIBLE_DEVICES is empty)")
    address = f"127.0.0.1:{free_port()}"
    cpus = sorted(os.sched_getaffinity(0))
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    last: dict[int, str] = {}
    for rank in range(n):
        share = local_cpu_share(rank, n, cpus) if not gpus else cpus
        p = subprocess.Popen(
            [sys.executable, "-m", "tracin_jax.cli", *command], env=process_env(rank, n, address, gpus),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=(lambda s=tuple(share): os.sched_setaffinity(0, s)))
        procs.append(p)
        for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=forward_lines, args=(stream, rank, rank, last, sink), daemon=True)
            t.start()
            threads.append(t)
    failed: tuple[int, int] | None = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0):
                    failed = (rank, code)
                    break
            time.sleep(0.1)
        if failed is None:
            for rank, p in enumerate(procs):
                if p.returncode != 0:
                    failed = (rank, p.returncode)
                    break
    except KeyboardInterrupt:
        stop_processes(procs, GRACE_S)
        for t in threads:
            t.join(timeout=2)
        print("tracin-jax launch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if failed is not None:
        failed = _first_cause(procs, failed, last)
        stop_processes(procs, GRACE_S)
    for t in threads:
        t.join(timeout=5)
    if failed is None:
        return 0
    rank, code = failed
    status = f"signal {-code}" if code < 0 else f"status {code}"
    others = f"; stopped the other {n - 1}" if n > 1 else ""
    reason = last.get(rank, "no message").removeprefix("tracin-jax: error: ")
    print(f"tracin-jax: error: process {rank} of {n} exited with {status}{others}: {reason}",
          file=sys.stderr, flush=True)
    return code if code > 0 else 1
