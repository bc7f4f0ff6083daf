"""Training ComP on several processes (torch.distributed): data parallel runs, or fold/seed runs fanned out.

Data parallel (`Parallel.data_parallel`): every rank builds the same model (same seed; DDP also broadcasts
rank 0's weights) and walks the same shuffled batch order. Each global batch of `batch_size` conversations
gets its missingness mask drawn once, identically on every rank (the generators stay in step), and is then
cut into `world_size` contiguous shares, one per rank (`share_rows`); DistributedDataParallel averages the
gradients. So `batch_size` stays the global batch and a run sees the same batches and masks as one process
would; what differs is that each rank's loss is a mean over its own share (DDP averages the means) and that
batch-pooled quantities (the prototypes) are pooled over each rank's share, as BatchNorm is without SyncBN.

* Gradient modulator: its weights depend on sums over the batch, so `SyncedModulator` computes them over the
  whole global batch (errors gathered from every rank) and keeps the modulated gradient identical on every
  rank (the per-instance correction is averaged like the rest of the gradient).
* Prototype EMA bank (clean variant): each rank updates its copy from its own share in forward; after each
  step `sync_buffers` averages the banks over the ranks that have filled them, so the bank follows the mean
  of the ranks' prototypes (DDP's own buffer broadcast would keep rank 0's share only).
* Evaluation runs on the full evaluation set on every rank (no gradient, the same weights, generators in
  step), so every rank selects the same epoch; only rank 0 writes anything.

Fan-out (`Parallel.fan_out`): the (fold, seed) runs are independent; rank r trains runs r, r+N, ... on its
own device, and rank 0 gathers the run records (and the best run's weights) to write the outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from comp.batch import ComPBatch, ComPOutput
from comp.config import ModelConfig
from comp.modulator import GradientModulator, modality_errors
from core.distributed import DistEnv, Job, device_for_rank, process_group

log = logging.getLogger(__name__)

RANK_SEED_STREAM = 7919  # separates each rank's dropout stream: rank r > 0 reseeds with seed + r * this


@dataclass(frozen=True)
class Parallel:
    """This process's part in a multi-process training job."""

    job: Job
    device: torch.device
    fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.job.rank

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def is_main(self) -> bool:
        return self.job.is_main

    @property
    def data_parallel(self) -> bool:
        return self.world_size > 1 and not self.fan_out

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.job.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------ model and batches
    def training_step(self, model: torch.nn.Module, loss_fn: Callable) -> "DataParallelStep":
        """`model` and its loss in DistributedDataParallel; see DataParallelStep."""
        return DataParallelStep(model, loss_fn, self.device)

    def reseed(self, seed: int) -> None:
        """Give each rank its own dropout stream (rank 0 keeps the single-process one)."""
        if self.rank:
            torch.manual_seed(seed + self.rank * RANK_SEED_STREAM)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed + self.rank * RANK_SEED_STREAM)

    def local_batches(self, packed, batch_size: int, order_rng: np.random.Generator, missing,
                      mask_rng: np.random.Generator) -> Iterator:
        """This rank's share of each training batch, masked as the whole batch would be in one process."""
        from comp.data import iterate_batches

        for item in iterate_batches(packed, batch_size, shuffle=True, rng=order_rng):
            item = missing.train_batch(item, mask_rng)
            yield take_conversations(item, share_rows(len(item.conversation_ids), self.rank, self.world_size))

    def modulator(self, model: torch.nn.Module, cfg: ModelConfig, task: str) -> "SyncedModulator":
        return SyncedModulator(model, cfg, task, self)

    # -------------------------------------------------------------------------------------- collectives
    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """In-place all-reduce (sum by default) through the communication device."""
        op = dist.ReduceOp.SUM if op is None else op
        t = tensor.to(self._comm_device)
        dist.all_reduce(t, op=op)
        if t is not tensor:
            tensor.copy_(t.to(tensor.device))
        return tensor

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._all_reduce(tensor)
        return tensor.div_(self.world_size)

    def mean_over_ranks(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean of each number over the ranks (same keys on every rank)."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self._all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather_rows(self, errors: torch.Tensor, rows: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
        """Every rank's errors [M,B_r,S_r] and rows [B_r,S_r], padded (rows False) and stacked along B.

        Returns (errors [M,sum B,S], rows [sum B,S], the index of this rank's block in them).
        """
        sizes = torch.tensor([rows.shape[0], rows.shape[1]], dtype=torch.int64, device=self._comm_device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        b_max = int(max(int(s[0]) for s in all_sizes))
        s_max = int(max(int(s[1]) for s in all_sizes))
        b, s = rows.shape
        e = torch.zeros(errors.shape[0], b_max, s_max, dtype=errors.dtype, device=self._comm_device)
        e[:, :b, :s] = errors
        r = torch.zeros(b_max, s_max, dtype=torch.uint8, device=self._comm_device)
        r[:b, :s] = rows.to(torch.uint8)
        es = [torch.empty_like(e) for _ in range(self.world_size)]
        rs = [torch.empty_like(r) for _ in range(self.world_size)]
        dist.all_gather(es, e)
        dist.all_gather(rs, r)
        g_err = torch.cat(es, dim=1).to(errors.device)
        g_rows = torch.cat(rs, dim=0).to(device=errors.device, dtype=torch.bool)
        start = self.rank * b_max
        return g_err, g_rows, (slice(start, start + b), slice(0, s))

    @torch.no_grad()
    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Average the model's buffers over the ranks (EMA banks: over the ranks that have filled them)."""
        for module in model.modules():
            buffers = dict(module.named_buffers(recurse=False))
            done = set()
            if "bank" in buffers and "bank_filled" in buffers:
                bank, filled = buffers["bank"], buffers["bank_filled"]
                weight = filled.to(bank.dtype)
                total = bank * weight.view(-1, *([1] * (bank.dim() - 1)))
                count = weight.clone()
                self._all_reduce(total)
                self._all_reduce(count)
                mean = total / count.clamp_min(1).view(-1, *([1] * (bank.dim() - 1)))
                bank.copy_(torch.where(count.view(-1, *([1] * (bank.dim() - 1))) > 0, mean, bank))
                filled.copy_(count > 0)
                done = {"bank", "bank_filled"}
            for name, buf in buffers.items():
                if name in done:
                    continue
                if buf.dtype == torch.bool:
                    flag = buf.to(torch.uint8)
                    self._all_reduce(flag, dist.ReduceOp.MAX)
                    buf.copy_(flag.bool())
                elif buf.is_floating_point():
                    self.average_(buf)
                else:  # integer counters: rank 0's
                    t = buf.to(self._comm_device)
                    dist.broadcast(t, src=0)
                    buf.copy_(t.to(buf.device))


class _Opaque:
    """A value DDP does not search for output tensors (it only walks tensors, lists, dicts and dataclasses)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _ForwardLoss(torch.nn.Module):
    """model + loss as one module, returning the loss and, out of DDP's sight, the output and loss parts."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: ComPBatch, stage: int) -> tuple[torch.Tensor, _Opaque]:
        out = self.model(batch, stage)
        loss, parts = self.loss_fn(out, batch, stage)
        return loss, _Opaque((out, parts))


class DataParallelStep:
    """One training forward under DistributedDataParallel: `step(batch, stage) -> (loss, parts, output)`.

    The loss is computed inside the wrapped forward and is the only output DDP sees, so the parameters it
    waits gradients for are exactly those the loss reaches: a stage-1 forward also runs the fusion head
    (its output is not trained), and DDP looking at every output would wait for gradients that never come.
    Parameters no rank's loss reaches keep `grad=None`, as in one process (Adam leaves them alone).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # stage 1 leaves the stage-2 modules without gradients; buffers are synchronised by `sync_buffers`
        kwargs: dict = {"find_unused_parameters": True}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(_ForwardLoss(model, loss_fn), device_ids=ids, **kwargs)

    def train(self) -> None:
        self.ddp.train()

    def __call__(self, batch: ComPBatch, stage: int) -> tuple[torch.Tensor, dict, ComPOutput]:
        loss, box = self.ddp(batch, stage)
        out, parts = box.value
        return loss, parts, out


def share_rows(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s rows of a batch of `n` conversations: a contiguous block (sizes differ by at most one).

    A rank left empty by a short last batch repeats one conversation of it (DDP needs every rank to step),
    as torch's DistributedSampler pads by repetition.
    """
    mine = np.array_split(np.arange(n), world_size)[rank]
    return mine if len(mine) else np.array([rank % n])


def take_conversations(item, rows: np.ndarray):
    """The conversations `rows` of a batch (`comp.data.Batch`), padded to their own longest one.

    Every [B, S, ...] field of the ComPBatch is cut alike, whatever fields it has.
    """
    idx = torch.as_tensor(rows, dtype=torch.long)
    length = max(1, int(item.batch.valid[idx].sum(dim=1).max()))

    def cut(value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {k: v[idx, :length] for k, v in value.items()}
        return value[idx, :length]

    b = item.batch
    batch = dataclasses.replace(b, **{f.name: cut(getattr(b, f.name)) for f in dataclasses.fields(b)})
    return dataclasses.replace(item, batch=batch, clip_ids=item.clip_ids[rows, :length],
                               labelled=cut(item.labelled),
                               conversation_ids=tuple(item.conversation_ids[i] for i in rows))


class SyncedModulator(GradientModulator):
    """The gradient modulator with its batch sums taken over the global batch (every rank's share).

    Weights: every rank's errors are gathered and `instance_weights` runs on the whole batch, so W is what
    one process would compute; each rank keeps its own rows. Clean layout: the base class adds this rank's
    per-instance correction to the (already averaged) gradient, and the sum is then averaged over ranks,
    which is the correction of the whole batch scaled as DDP scales gradients. Per-slot layout: the slot
    means are taken over the whole batch, so every rank scales the same averaged gradient the same way.
    """

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, task: str, parallel: Parallel) -> None:
        super().__init__(model, cfg, task)
        self.parallel = parallel

    def _global(self, out: ComPOutput, batch: ComPBatch) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        errors = modality_errors(out.head_logits, batch.targets, self.task, self.error_kind)
        g_err, g_rows, mine = self.parallel.gather_rows(errors, self.rows(batch))
        return self.weights_from(g_err, g_rows), g_rows, mine

    def weights(self, out: ComPOutput, batch: ComPBatch) -> torch.Tensor:
        w, _, (b, s) = self._global(out, batch)
        return w[:, b, s]

    def apply(self, out: ComPOutput, batch: ComPBatch) -> dict[str, float]:
        param = self.target(out, batch)
        if param is None:
            return {}
        if self.per_slot:
            return self._apply_per_slot(out, batch, param)
        stats = super().apply(out, batch)
        self.parallel.average_(param.grad)  # each rank added the correction of its own rows
        return stats

    def _apply_per_slot(self, out: ComPOutput, batch: ComPBatch, param: torch.nn.Parameter) -> dict[str, float]:
        w, rows, _ = self._global(out, batch)
        self.scale_slots(param, w, rows)  # slot means over the whole batch: the same scaling on every rank
        return {}


@contextlib.contextmanager
def start(device_spec: str, env: DistEnv, *, fan_out: bool = False) -> Iterator[Parallel | None]:
    """Join the training job `env` describes (None in a world of one): NCCL for CUDA data parallel, else gloo."""
    if not env.is_distributed:
        yield None
        return
    device = device_for_rank(device_spec, env, share_gpus=fan_out)
    backend = "nccl" if device.type == "cuda" and not fan_out else "gloo"
    with process_group(env, device, backend) as job:
        if job.is_main:
            log.info("%d processes, %s, backend %s, %s", env.world_size,
                     "fold/seed runs fanned out" if fan_out else "data parallel (DDP)", job.backend, device)
        yield Parallel(job, device, fan_out)
