"""torch.distributed plumbing shared by comp-extract and comp-train: who this process is, start and stop,
small object collectives that fail on every rank together, and a local launcher.

A process belongs to a distributed job when torchrun (or `--nproc`, which does the same on one machine) set
WORLD_SIZE > 1 together with RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them every helper here
is a no-op on a world of one, so the single-process code paths stay exactly as they were.

Failures. A rank that hits an error calls `agree(error)` (or `run_on_main`) at the next synchronisation point
instead of leaving its peers waiting: every rank then raises, the failing one its own error and the others a
`PeerError` that names it. A rank that dies outright (SIGKILL, OOM) closes its sockets, and gloo/NCCL raise on
the survivors at their next collective; the launcher stops the remaining processes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: the CLIs' --help and the launcher stay light
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "COMP_DIST_TIMEOUT_S"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 24 * 3600  # an extraction rank may wait hours for the slowest shard; dead peers fail fast
BACKEND_ENV = "COMP_DIST_BACKEND"  # force gloo or nccl (default: nccl for CUDA training, gloo otherwise)
STOP_GRACE_S = 10.0  # how long the launcher waits after SIGTERM before SIGKILL
POLL_S = 0.2  # launcher's child polling interval


class DistributedError(RuntimeError):
    """The distributed job cannot start or go on; the message says what to change."""


class PeerError(DistributedError):
    """Another rank failed; this rank stops too. The message carries the other rank's error."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as torchrun describes it in the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """A log prefix: "" alone, "[rank r/N] " in a job."""
        return f"[rank {self.rank}/{self.world_size}] " if self.is_distributed else ""


def env_from_os(environ: dict[str, str] | None = None) -> DistEnv:
    """The DistEnv that torchrun's variables describe (a world of one when they are absent)."""
    environ = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" not in environ:
        return DistEnv()
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise DistributedError(f"torchrun variables are not integers ({err}); launch with torchrun or "
                               "--nproc") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DistributedError(f"inconsistent torchrun variables RANK={rank} WORLD_SIZE={world} "
                               f"LOCAL_RANK={local_rank}")
    if world > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise DistributedError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun "
                               "or with --nproc N")
    return DistEnv(rank, world, local_rank, local_world)


def timeout() -> datetime.timedelta:
    seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    return datetime.timedelta(seconds=seconds)


def device_for_rank(spec: str, env: DistEnv, *, share_gpus: bool = True) -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK when `spec` is auto/cuda and GPUs exist, else the CPU.

    An explicit cuda:N is honoured in a world of one; in a job every rank takes its own GPU instead (a job
    where every rank used the same card would be slower than one process). `share_gpus=False` (NCCL
    training) refuses more processes on a machine than it has GPUs.
    """
    import torch

    spec = str(spec).strip().lower()
    if spec in ("auto", "cuda") or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            if spec == "auto":
                return torch.device("cpu")
            raise DistributedError(f"device {spec!r} asked for, but torch sees no CUDA device; use --device cpu")
        count = torch.cuda.device_count()
        if not env.is_distributed:
            return torch.device(spec if spec.startswith("cuda:") else "cuda:0")
        if spec.startswith("cuda:"):
            log.warning("%sdevice %s ignored in a %d-process job: each rank uses its own GPU (cuda:LOCAL_RANK)",
                        env.tag, spec, env.world_size)
        if env.local_rank >= count and not share_gpus:
            raise DistributedError(f"{env.local_world_size} processes on this machine but only {count} GPU(s); "
                                   f"use --nproc {count} (or torchrun --nproc_per_node {count}) or --device cpu")
        return torch.device(f"cuda:{env.local_rank % count}")
    if spec == "cpu":
        return torch.device("cpu")
    raise DistributedError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------- process group

@dataclass(frozen=True)
class Job:
    """An initialised process group: the env, the backend, and a gloo group for Python-object messages."""

    env: DistEnv
    backend: str
    control: Any = None  # gloo ProcessGroup for object collectives (None: the default group is gloo)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device | None = None, backend: str | None = None) -> Iterator[Job]:
    """Initialise torch.distributed for `env` (env:// rendezvous) and tear it down after.

    NCCL when `device` is CUDA (tensor traffic of DDP), gloo otherwise; COMP_DIST_BACKEND forces one. Object
    messages (errors, run records, clip lists) always travel over gloo.
    """
    if not env.is_distributed:
        yield Job(env, "none")
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; install a standard PyTorch wheel")
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if device is not None and device.type == "cuda"
                                                         else "gloo")
    if backend == "nccl":
        if device is None or device.type != "cuda":
            raise DistributedError("the NCCL backend needs a CUDA device per rank; use gloo on CPU")
        torch.cuda.set_device(device)
    already = dist.is_initialized()
    if not already:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout()}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    try:
        control = dist.new_group(backend="gloo", timeout=timeout()) if backend != "gloo" else None
        yield Job(env, backend, control)
    finally:
        if not already and dist.is_initialized():
            with contextlib.suppress(Exception):  # a peer may already be gone; nothing left to tidy
                dist.destroy_process_group()


def all_gather(job: Job, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (pickled; for small messages)."""
    if not job.env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * job.world_size
    dist.all_gather_object(out, obj, group=job.control)
    return out


def broadcast(job: Job, obj: T | None, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not job.env.is_distributed:
        return obj  # type: ignore[return-value]
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=job.control)
    return box[0]  # type: ignore[return-value]


def gather_to_main(job: Job, obj: T) -> list[T] | None:
    """Every rank's `obj` on rank 0 (None elsewhere); for large messages such as model weights."""
    if not job.env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * job.world_size if job.is_main else None
    dist.gather_object(obj, out, dst=0, group=job.control)
    return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if not str(error) else str(error)


def agree(job: Job, error: BaseException | None) -> None:
    """A synchronisation point that fails everywhere if it failed anywhere.

    Every rank passes the error it hit (or None). When any rank failed, the failing ranks re-raise their own
    error and the others raise PeerError naming the first failed rank and its message.
    """
    if not job.env.is_distributed:
        if error is not None:
            raise error
        return
    reports = all_gather(job, None if error is None else (type(error).__name__, _describe(error)))
    if error is not None:
        raise error
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if failed:
        rank, (_, message) = failed[0]
        raise PeerError(f"rank {rank} failed: {message}")


def run_on_main(job: Job, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; an error there is raised on every rank."""
    if not job.env.is_distributed:
        return fn()
    error: BaseException | None = None
    result: Any = None
    if job.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the peers have been told
            error = err
    message = broadcast(job, ("error", type(error).__name__, _describe(error)) if error is not None
                        else ("ok", result))
    if error is not None:
        raise error
    if message[0] == "error":
        raise PeerError(f"rank 0 failed: {message[2]}")
    return message[1]


# --------------------------------------------------------------------------------------------- launching

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
