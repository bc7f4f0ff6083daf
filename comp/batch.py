"""The tensors one ComP step consumes (`ComPBatch`) and produces (`ComPOutput`).

A batch holds whole conversations padded to the batch's longest one; `valid` marks real utterances and
`present` which modalities each real utterance has (after any simulated masking), in `MODALITY_ORDER`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.clip import MODALITIES as MODALITY_ORDER


@dataclass
class ComPBatch:
    features: dict[str, torch.Tensor]  # "audio"/"text"/"visual" -> float [B,S,D_u]; rows are zero where absent
    present: torch.Tensor  # bool [B,S,3] in MODALITY_ORDER (after simulated masking); False on padding
    valid: torch.Tensor  # bool [B,S]; False on padding
    targets: torch.Tensor | None = None  # long [B,S] class ids or float [B,S] regression; ignored where ~valid
    labelled: torch.Tensor | None = None  # bool [B,S]: utterances whose target counts; None = every valid one

    @property
    def scored(self) -> torch.Tensor:
        """bool [B,S]: real utterances that have a label, the only ones losses and the modulator look at.
        Unlabelled utterances still take part as conversation context."""
        return self.valid if self.labelled is None else self.valid & self.labelled

    def to(self, device: torch.device | str) -> "ComPBatch":
        """The same batch on `device`."""
        return ComPBatch(
            features={k: v.to(device) for k, v in self.features.items()},
            present=self.present.to(device),
            valid=self.valid.to(device),
            targets=None if self.targets is None else self.targets.to(device),
            labelled=None if self.labelled is None else self.labelled.to(device),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(conversations, padded length)."""
        return int(self.valid.shape[0]), int(self.valid.shape[1])

    def check(self, input_dims: dict[str, int] | None = None) -> None:
        """Raise ValueError naming the first field whose shape or dtype breaks the contract."""
        if self.valid.dim() != 2 or self.valid.dtype != torch.bool:
            raise ValueError(f"batch.valid must be bool [B,S], got {self.valid.dtype} {tuple(self.valid.shape)}")
        b, s = self.shape
        if self.present.shape != (b, s, len(MODALITY_ORDER)) or self.present.dtype != torch.bool:
            raise ValueError(f"batch.present must be bool [B,S,3] = [{b},{s},3], got "
                             f"{self.present.dtype} {tuple(self.present.shape)}")
        for name in MODALITY_ORDER:
            if name not in self.features:
                raise ValueError(f"batch.features lacks {name!r}; give a zero tensor and present=False instead")
            feat = self.features[name]
            if feat.dim() != 3 or feat.shape[:2] != (b, s):
                raise ValueError(f"batch.features[{name!r}] must be [B,S,D] = [{b},{s},D], got {tuple(feat.shape)}")
            if input_dims is not None and feat.shape[2] != input_dims[name]:
                raise ValueError(f"batch.features[{name!r}] has dim {feat.shape[2]} but the model was built for "
                                 f"{input_dims[name]}")
        if self.targets is not None and self.targets.shape != (b, s):
            raise ValueError(f"batch.targets must be [B,S] = [{b},{s}], got {tuple(self.targets.shape)}")
        if self.labelled is not None and (self.labelled.shape != (b, s) or self.labelled.dtype != torch.bool):
            raise ValueError(f"batch.labelled must be bool [B,S] = [{b},{s}], got "
                             f"{self.labelled.dtype} {tuple(self.labelled.shape)}")


@dataclass
class ComPOutput:
    logits: torch.Tensor  # fused prediction [B,S,C] (regression: C=1)
    head_logits: dict[str, torch.Tensor]  # per-modality predictions [B,S,C]
    weights: torch.Tensor | None  # coordinator weights [B,S,3] in stage 2, None in stage 1
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # what the losses and the modulator need
