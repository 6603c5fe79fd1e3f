"""Joining a JAX cluster: several processes, each with its own devices, one program.

Every stage of the command line calls :func:`initialize` before any other use of JAX. It joins a
cluster when one is asked for:

- the standard variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what ``tracin-jax launch`` sets, see
  :mod:`tracin_jax.launch`);
- or a cluster that ``jax.distributed.initialize()`` detects by itself: a SLURM step with more
  than one task (``SLURM_STEP_NUM_TASKS``), an Open MPI job (``OMPI_COMM_WORLD_SIZE``).

Otherwise it does nothing and the stage runs as one process. On CPU the processes exchange
data through the gloo collectives.

What goes wrong at start-up is one line (:class:`~tracin_jax.errors.InputError`), after a short
wait rather than JAX's 300 s: a coordinator that does not answer within
``TRACIN_JAX_COORDINATOR_TIMEOUT`` seconds (default 30), a process id outside
``[0, JAX_NUM_PROCESSES)``, a malformed address, a coordinator port already taken, processes
that disagree on the count or share an id.

Two processes given the same id, or disagreeing on the process count, make JAX's coordination
service end every process from a C++ thread (an abort with a stack trace), where Python cannot
catch it. So a stage started in a cluster runs under :func:`supervise`: a small parent process
without JAX that runs the stage as its child, passes its output through, keeps XLA's C++ log
lines out of it, and turns such an abort into one line naming the cause (exit 2). Processes
that did join then compare their view of the count (:func:`_check_agreement`).

After a successful start, every process other than 0 is quiet: its progress bars are off
(``TRACIN_JAX_QUIET=1``) and its standard output goes nowhere; warnings and errors still reach
standard error. An error in one process ends that process at once with its one-line message
(:func:`abort`): it never waits at JAX's shutdown barrier. Its peers notice the missing process
within the heartbeat timeout (``TRACIN_JAX_HEARTBEAT_TIMEOUT``, default 20 s); under
``tracin-jax launch`` (or ``srun --kill-on-bad-exit=1``) they are stopped at once.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from typing import Any

from tracin_jax.errors import InputError

ADDRESS, COUNT, RANK = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
QUIET = "TRACIN_JAX_QUIET"
DEFAULT_TIMEOUT_S = 30
DEFAULT_HEARTBEAT_S = 20

_state: dict[str, Any] = {"initialized": False}


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise InputError(f"{name}={raw!r} must be at least 1")
    return value


def detected_cluster() -> str | None:
    """``"env"`` (the JAX_* variables), ``"slurm"``, ``"mpi"`` or None (one process)."""
    if os.environ.get(ADDRESS):
        return "env"
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1) > 1 \
            and "SLURM_PROCID" in os.environ:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{ADDRESS}={address!r} is not host:port (e.g. 127.0.0.1:12345)")
    return host.strip("[]"), int(port)


def env_settings() -> tuple[str, int, int]:
    """(address, process count, process id) from the JAX_* variables, checked."""
    address = os.environ[ADDRESS].strip()
    _parse_address(address)
    raw_n, raw_i = os.environ.get(COUNT), os.environ.get(RANK)
    if raw_n is None or raw_i is None:
        raise InputError(f"{ADDRESS} is set but {COUNT if raw_n is None else RANK} is not: set "
                         f"all three of {ADDRESS}, {COUNT}, {RANK}")
    try:
        n, i = int(raw_n), int(raw_i)
    except ValueError:
        raise InputError(f"{COUNT}={raw_n!r} / {RANK}={raw_i!r}: not integers") from None
    if n < 1:
        raise InputError(f"{COUNT}={n} must be at least 1")
    if not 0 <= i < n:
        raise InputError(f"{RANK}={i} is outside [0, {n}) for {COUNT}={n}")
    return address, n, i


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to ``address`` succeeds; one-line InputError after
    ``timeout_s`` seconds."""
    host, port = _parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                detail = e.strerror or type(e).__name__
                raise InputError(f"{ADDRESS}={address}: no coordinator answered within "
                                 f"{timeout_s:g} s ({detail}); start process 0 first, or check "
                                 "the address and the firewall") from None
            time.sleep(0.25)


def _check_port_free(address: str) -> None:
    host, port = _parse_address(address)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host in ("localhost",) else host, port))
        except OSError as e:
            if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise InputError(f"{ADDRESS}={address}: the port is already in use (another "
                                 "coordinator, or process 0 started twice)") from None
            # Another host's address: jax binds on all interfaces, nothing to check here.


def _describe_failure(error: BaseException, address: str, n: int, i: int) -> str:
    text = " ".join(str(error).split())
    low = text.lower()
    if "duplicate" in low or "already registered" in low or "restarted" in low:
        why = f"another process already joined as {RANK}={i} (two processes given the same id?)"
    elif "deadline" in low or "timed out" in low or "timeout" in low:
        why = (f"not every one of the {n} processes joined in time ({COUNT} differs between "
               "processes, or one of them did not start)")
    elif "invalid" in low and "task" in low:
        why = f"the coordinator does not expect process {i} ({COUNT} differs between processes?)"
    else:
        why = text[:200]
    return f"joining the JAX cluster at {address} as process {i} of {n} failed: {why}"


def initialize() -> dict:
    """Joins the JAX cluster the environment asks for (see the module docstring); idempotent.

    Must run before any other use of JAX in the process. Returns {"processes", "process_id",
    "cluster"}; ``cluster`` None means one process.
    """
    if _state["initialized"]:
        return _state["info"]
    import jax

    kind = detected_cluster()
    info = {"processes": 1, "process_id": 0, "cluster": None}
    if kind is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        timeout = _int_env("TRACIN_JAX_COORDINATOR_TIMEOUT", DEFAULT_TIMEOUT_S)
        heartbeat = _int_env("TRACIN_JAX_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_S)
        kwargs = dict(initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat,
                      shutdown_timeout_seconds=max(timeout, 60))
        if kind == "env":
            address, n, i = env_settings()
            if i == 0:
                _check_port_free(address)
            else:
                wait_for_coordinator(address, timeout)
            kwargs.update(coordinator_address=address, num_processes=n, process_id=i)
        else:
            address, n, i = "(detected)", 0, 0
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # jax raises RuntimeError/XlaRuntimeError/ValueError here
            raise InputError(_describe_failure(e, address, n, i)) from None
        info = {"processes": jax.process_count(), "process_id": jax.process_index(),
                "cluster": kind}
        if kind == "env":
            _check_agreement(n, i, timeout)
        if info["process_id"] != 0:
            os.environ[QUIET] = "1"
            sys.stdout = open(os.devnull, "w")
    _state.update(initialized=True, info=info)
    return info


def _check_agreement(n: int, i: int, timeout_s: int) -> None:
    """Every process publishes the count it was given; one that differs from process 0's ends
    with a one-line error."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        return
    client.key_value_set(f"tracin_jax/count/{i}", str(n))
    first = client.blocking_key_value_get("tracin_jax/count/0", timeout_s * 1000)
    if int(first) != n:
        raise InputError(f"{COUNT}={n} in process {i}, but process 0 was given {first}: every "
                         "process must be started with the same count")


SUPERVISED = "TRACIN_JAX_SUPERVISED"
PEER_STOPPED = "another process of the cluster stopped"  # a consequence, not a cause
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
_STATUS = re.compile(r"absl::Status: (.*)$")
_FATAL = re.compile(r"^F\d{4} [^]]*\] (.*)$")


_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
               "failed to send rpc", "unavailable:", "deadline_exceeded", "socket closed")


def peer_failure(error: BaseException) -> str | None:
    """The one-line message for an error that only says another process is gone (a collective
    whose peer closed its connection), else None."""
    text = " ".join(str(error).split())
    low = text.lower()
    if any(sign in low for sign in _PEER_SIGNS):
        return f"{PEER_STOPPED} ({text[:160]})"
    return None


def needs_supervisor() -> bool:
    """True in a process that should run its stage under :func:`supervise`."""
    return detected_cluster() is not None and os.environ.get(SUPERVISED) != "1"


def _summary(lines: list[str]) -> str | None:
    """The cause of a C++ abort, from XLA's fatal log lines."""
    found = [m.group(1).strip() for m in map(_STATUS.search, lines) if m]
    if not found:
        found = [m.group(1).strip() for m in map(_FATAL.search, lines) if m]
    if not found:
        return None
    reason = found[0]
    low = reason.lower()
    if "incarnation" in low or "already registered" in low or "duplicate" in low:
        return f"two processes were given the same {RANK} ({reason})"
    if "unexpected task" in low or "invalid_argument" in low:
        return f"{COUNT} differs between the processes, or a {RANK} is outside it ({reason})"
    if "another task died" in low or "heartbeat" in low or "unavailable" in low:
        return f"{PEER_STOPPED} ({reason})"
    return reason


def supervise(argv: list[str]) -> int:
    """Runs ``tracin-jax ARGV`` as a child process (see the module docstring) and returns its
    exit status; an abort of the child in the JAX runtime becomes one line and status 2."""
    import signal
    import subprocess

    env = dict(os.environ, **{SUPERVISED: "1", "PYTHONUNBUFFERED": "1"})
    child = subprocess.Popen([sys.executable, "-m", "tracin_jax.cli", *argv], env=env,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: child.send_signal(s))
    runtime: list[str] = []
    told = False  # the child printed its own one-line error
    for line in iter(child.stderr.readline, ""):
        text = line.rstrip("\n")
        if _LOG_LINE.match(text) or text.startswith(("    @ ", "*** Check failure", "RPC: /",
                                                      "Additional GRPC error", ":UNKNOWN:")):
            runtime.append(text)
            continue
        told = told or line.startswith("tracin-jax: error:")
        sys.stderr.write(line)
        sys.stderr.flush()
    code = child.wait()
    if told and code != 0:
        return 2 if code in (2, -6, 134) else code if code > 0 else 1
    if code < 0 and code != -6:  # killed from outside (SIGKILL, the OOM killer, ...)
        print(f"tracin-jax: error: process {os.environ.get(RANK, '?')} was killed by signal "
              f"{-code}; rerun the same command to resume", file=sys.stderr, flush=True)
        return 128 - code
    if code < 0 or code == 134:
        reason = _summary(runtime) or f"it ended by signal {-code if code < 0 else 6}"
        rank = os.environ.get(RANK, "?")
        print(f"tracin-jax: error: process {rank}: the JAX cluster at "
              f"{os.environ.get(ADDRESS, '(detected)')} failed: {reason}", file=sys.stderr,
              flush=True)
        return 2 if code in (-6, 134) else 1
    return code


def is_main_process() -> bool:
    """True in process 0, or when there is one process (never imports JAX by itself)."""
    return not _state["initialized"] or _state["info"]["process_id"] == 0


def is_multiprocess() -> bool:
    return bool(_state["initialized"] and _state["info"]["processes"] > 1)


def finish(timeout_s: float = 7 * 24 * 3600.0) -> None:
    """The end of a successful stage: waits until every process has finished its part (process
    0 may work on after the others, e.g. writing a report), so JAX's shutdown barrier, which has
    a short timeout, is reached by all at once. No-op with one process."""
    if not is_multiprocess():
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is not None:
        client.wait_at_barrier("tracin_jax_stage_end", int(timeout_s * 1000))


def abort(code: int, message: str | None = None) -> None:
    """Prints ``message`` on stderr; with several processes, ends this process now with
    ``code`` (a normal exit would wait at JAX's shutdown barrier for peers that will never
    arrive; their heartbeat or the launcher stops them). With one process it returns, and the
    caller returns ``code``."""
    if message:
        print(message, file=sys.stderr, flush=True)
    if is_multiprocess():
        sys.stderr.flush()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)


def local_cpu_share(rank: int, count: int, cpus: list[int] | None = None) -> list[int]:
    """The CPUs process ``rank`` of ``count`` on this machine is pinned to: a contiguous, near
    equal share of ``cpus`` (default: those this process may run on). Every process gets at
    least one CPU; with more processes than CPUs they share round-robin."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if count >= len(cpus):
        return [cpus[rank % len(cpus)]]
    base, extra = divmod(len(cpus), count)
    start = rank * base + min(rank, extra)
    return cpus[start:start + base + (1 if rank < extra else 0)]


def forward_lines(stream, prefix: str, key: Any, last: dict, sink) -> None:
    """Copies ``stream`` line by line to ``sink``, each line prefixed ``[prefix] ``, blank lines
    dropped; ``last[key]`` keeps the last line (the one a failure is reported with)."""
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        last[key] = line.strip()
        sink.write(f"[{prefix}] {line}\n")
        sink.flush()
    stream.close()


def stop_processes(procs, grace_s: float = 5.0) -> None:
    """SIGTERM to every process still running, then SIGKILL to those alive after ``grace_s``."""
    import signal
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
