"""torch.distributed plumbing shared by comp-extract and comp-train: who this process is, start and stop, and
small object collectives that fail on every rank together (the local launcher is `pipeline.cli.launch`).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from core.errors import CompError

if TYPE_CHECKING:  # torch is imported where it is used: the CLIs' --help and the launcher stay light
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "COMP_DIST_TIMEOUT_S"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 24 * 3600  # an extraction rank may wait hours for the slowest shard; dead peers fail fast
BACKEND_ENV = "COMP_DIST_BACKEND"  # force gloo or nccl (default: nccl for CUDA training, gloo otherwise)


class DistributedError(CompError, RuntimeError):
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
