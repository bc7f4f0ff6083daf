"""`--nproc N`: run a command as an N-process job on this machine, as `torchrun --standalone` would.

The CLIs relaunch themselves with this; each child finds its place in the job in the environment
(`core.distributed.env_from_os`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from core.distributed import DistributedError, env_from_os

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long the launcher waits after SIGTERM before SIGKILL
POLL_S = 0.2  # launcher's child polling interval


def free_port() -> int:
    """A TCP port that was free a moment ago (the rendezvous of a one-machine job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (what a relaunched child must not see again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def child_environment(rank: int, nproc: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """What torchrun --standalone --nproc_per_node `nproc` would give local rank `rank`."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="comp-mer-local")
    # N processes each using every core oversubscribe the CPU (torchrun sets 1); share the cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # children import what this process can (editable checkouts, plugin folders put on sys.path)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def launch_local(module: str, argv: Sequence[str], nproc: int) -> int:
    """Run `python -m module argv` as an `nproc`-process job on this machine (torchrun --standalone's way).

    Returns 0 when every rank exits 0; otherwise the first failing rank's status (128 + signal for a rank
    killed by a signal), after stopping the others. Ctrl-C reaches the ranks, which save what they finished.
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be >= 1, got {nproc}")
    if env_from_os().is_distributed:
        raise DistributedError("--nproc inside a torchrun job: use one or the other")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], env=child_environment(r, nproc, port))
             for r in range(nproc)]
    log.info("launched %d processes of %s (rendezvous 127.0.0.1:%d)", nproc, module, port)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                log.error("rank %d exited with status %s; stopping the other ranks", rank, code)
                _stop(procs)
                return 128 - code if code < 0 else code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C already reached them; a programmatic one may not have
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _wait(procs, STOP_GRACE_S * 3)  # time to commit what they finished
        _stop(procs)
        return 130


def _wait(procs: Sequence[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the live processes, SIGKILL the ones still alive after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    _wait(procs, grace_s)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
