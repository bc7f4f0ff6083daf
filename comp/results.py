"""What training and the baselines produce, as typed records: one per epoch, one per run, one per baseline.

Training (comp.train), the baselines (comp.baselines), the report (pipeline.report) and metrics.json share
these. `to_dict()` gives the JSON form written to metrics.json (field order is the file's key order, so do
not reorder fields); `from_dict()` reads it back. Scores are {metric: value} as comp.metrics.score returns
them; a summary is {metric: {"mean", "std", "n"}} as comp.metrics.summarize returns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Scores = dict[str, float]  # metric -> value
HeadScores = dict[str, Scores]  # modality -> scores of that modality's own prediction head
Summary = dict[str, dict[str, float]]  # metric -> {"mean", "std", "n"}


@dataclass
class EpochRecord:
    """One training epoch of one run, scored under one missingness condition."""

    epoch: int  # 1-based
    stage: int  # 1: private/shared encoders and heads only; 2: the whole model (docs/model.md §6)
    train_loss: float  # mean over the epoch's batches
    train_parts: dict[str, float]  # the loss's named terms, mean over batches
    val: Scores  # selection data (val; the test set under the paper protocol); {} without any
    val_heads: HeadScores
    coordinator: dict[str, float] | None  # mean coordinator weight per modality; None before stage 2
    seconds: float  # training time of the epoch
    eval_seconds: float  # its evaluation time
    val_loss: float | None  # fused prediction's loss on the selection data (ties between epochs)
    selectable: bool  # clean: stage-2 epochs only (the fused head is untrained in stage 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunRecord:
    """One fold x seed under one missingness condition: the selected epoch, its scores, the whole history."""

    fold: str
    seed: int
    run: str  # "fold<fold>-seed<seed>", also its checkpoint's name under runs/
    condition: str  # "natural", "random:0.3", "fixed:at", "pooled" (several fixed conditions together)
    best_epoch: int  # 1-based, the selected epoch
    selected_stage: int
    selected_on: str  # comp.selection.SELECTED_ON_*
    selection_metric: str
    val: Scores  # at the selected epoch ({} under the paper protocol)
    val_loss: float | None
    history: list[EpochRecord]
    test: Scores  # with the selected weights
    test_heads: HeadScores
    confusion: list[list[int]] | None  # [true, predicted] counts on test (classification)
    splits: dict[str, dict[str, Any]]  # "train"/"val"/"test" -> comp.selection.split_sizes
    label_names: list[str]
    task: str
    variant: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record as metrics.json holds it."""
        values = dict(data)
        values["history"] = [EpochRecord(**h) for h in data.get("history", [])]
        return cls(**values)


@dataclass
class BaselineRun:
    """One baseline fitted on one fold x seed, scored under one condition."""

    fold: str
    seed: int
    condition: str
    C: float  # inverse regularisation strength chosen on validation data
    selected_on: str
    val_score: float | None
    test: Scores
    confusion: list[list[int]] | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BaselineResult:
    """One baseline over the whole protocol (comp.baselines.BASELINES names and describes them)."""

    description: str
    seconds: float  # fitting time, all runs together
    summary: Summary  # main condition, as ComP's summary
    summary_by_condition: dict[str, Summary] = field(default_factory=dict)
    runs: list[BaselineRun] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineResult:
        values = dict(data)
        values["runs"] = [BaselineRun(**r) for r in data.get("runs", [])]
        return cls(**values)
