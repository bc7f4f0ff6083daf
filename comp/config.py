"""Model and training configs. Frozen dataclasses that round-trip to YAML via `core.config`.

`variant` picks a whole family of behaviours; each behaviour where the released ComP code differs from the
paper (docs/model.md §9) is a named switch in `Quirks`, so an ablation is one flag. A switch left at None
takes the variant's value (`Quirks.resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

Variant = Literal["clean", "faithful"]


@dataclass(frozen=True)
class Quirks:
    """Each quirk of the released code (docs/model.md §9). None = the variant's default."""

    gradient_modulator: bool | None = None  # §9.1: the modulator (eqs. 10-11) acts on the prototype MLP
    modulator_error: Literal["class_index", "true_class_prob"] | None = None  # §9.2: E for classification
    prompt_mask: bool | None = None  # §9.3: absent/padded utterances masked out of prototypes and prompts
    batch_prototypes: bool | None = None  # §9.4-5: prototypes from a time-axis MLP, pooled over the batch
    outer_prompt_mlp: bool | None = None  # §9.6: the paper's outer MLP_p around the prompt (eq. 8)
    stage1_reconstruction: bool | None = None  # §9.7: L_rec already in stage 1 (paper eq. 2)
    disentangle: bool | None = None  # §9.8: private encoder, anti-label head, |cos| + JSD losses
    private_a_for_all: bool | None = None  # §9.9: stage-1 private branch feeds private_a for every modality
    double_unimodal_loss: bool | None = None  # §9.10: uni-modal losses counted twice in stage 2
    test_selection: bool | None = None  # §9.12: pick the epoch on the test set, redraw test masks per batch
    fuse_absent: bool | None = None  # §9.14: stage-2 fusion uses KP outputs of absent modalities
    unused_params: bool | None = None  # §9.16: build the never-used modules (parameter count parity)
    # §5.2: L_rec rebuilds the undetached projected embedding over every slot (missing and padded ones too);
    # off: rebuild the input features of present utterances only, scale-free (relative MSE)
    projected_reconstruction: bool | None = None
    # The data path around the model (§9.17-9.19): what reaches the network, and in which precision
    raw_features: bool | None = None  # §9.17: features fed as stored, no per-dimension standardisation
    zero_vectors_present: bool | None = None  # §9.18: all-zero source vectors fed as present (zero) inputs
    fp32: bool | None = None  # §9.19: full precision on CUDA too (no bf16/fp16 autocast)
    nonzero_mae_corr: bool | None = None  # §9.20: regression MAE/Corr on the y != 0 utterances only

    FAITHFUL = dict(gradient_modulator=False, modulator_error="class_index", prompt_mask=False,
                    batch_prototypes=True, outer_prompt_mlp=False, stage1_reconstruction=False,
                    disentangle=True, private_a_for_all=True, double_unimodal_loss=True, test_selection=True,
                    fuse_absent=True, unused_params=True, projected_reconstruction=True,
                    raw_features=True, zero_vectors_present=True, fp32=True, nonzero_mae_corr=True)
    CLEAN = dict(gradient_modulator=True, modulator_error="true_class_prob", prompt_mask=True,
                 batch_prototypes=False, outer_prompt_mlp=True, stage1_reconstruction=True,
                 disentangle=False, private_a_for_all=False, double_unimodal_loss=False, test_selection=False,
                 fuse_absent=True, unused_params=False, projected_reconstruction=False,
                 raw_features=False, zero_vectors_present=False, fp32=False, nonzero_mae_corr=False)

    def resolve(self, variant: str) -> "Quirks":
        """All switches set: explicit values win, the rest come from the variant."""
        base = self.FAITHFUL if variant == "faithful" else self.CLEAN
        return replace(self, **{f.name: base[f.name] for f in fields(self) if getattr(self, f.name) is None})


@dataclass(frozen=True)
class ModelConfig:
    """ComP hyper-parameters (docs/model.md §4, §6.2)."""

    variant: Variant = "clean"
    hidden: int = 256  # D
    depth: int = 4  # masked self-attention layers per modality: 2 KP blocks x depth/2
    heads: int = 2
    drop_rate: float = 0.5
    attn_drop_rate: float = 0.0
    prompt_dim: int = 16  # p
    n_prototypes: int = 10  # c
    momentum: float = 0.3  # lambda of eq. 9
    max_len: int = 150  # S: faithful pads every conversation to this length (time-axis prototype MLP)
    prototype_ema: float = 0.99  # clean: decay of the prototype bank kept in the model for inference
    modulator_max: float = 2.0  # clean: per-instance modulator weights are clipped to [0, modulator_max]
    quirks: Quirks = field(default_factory=Quirks)

    def __post_init__(self) -> None:
        if self.variant not in ("clean", "faithful"):
            raise ValueError(f"variant must be clean or faithful, got {self.variant!r}")
        if self.depth < 2 or self.depth % 2:
            raise ValueError("depth must be an even number >= 2 (two knowledge-propagation blocks)")
        if self.hidden % self.heads:
            raise ValueError("hidden must be divisible by heads")
        if not 0.0 <= self.prototype_ema < 1.0:
            raise ValueError("prototype_ema must be in [0, 1)")
        if self.modulator_max <= 0:
            raise ValueError("modulator_max must be > 0")

    @property
    def resolved(self) -> Quirks:
        return self.quirks.resolve(self.variant)


PLANS = ("auto", "folds", "split", "random")
VAL_BY = ("auto", "speaker", "conversation")


@dataclass(frozen=True)
class TrainConfig:
    """How comp-train trains and evaluates (the protocol of docs/model.md §3, §6)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 100
    stage_epochs: int = 50  # stage 1 (uni-modal) epochs; stage 2 runs for the rest
    batch_size: int = 16  # conversations per batch
    lr: float = 1e-4
    weight_decay: float = 1e-5
    seed: int = 66  # base seed; seed i of a multi-seed run is seed + i
    seeds: int = 1
    missing: str = "natural"  # natural | random:R | fixed:a,t,v,at,av,tv,atv
    folds: str = "all"  # which held-out folds to run: all | 1,3,5
    plan: str = "auto"  # auto (folds, else the store's split, else random) | folds | split | random
    val_by: str = "auto"  # how validation is held out of training: auto | speaker | conversation (comp.data)
    val_fraction: float = 0.15  # of training conversations held out for selection when the store has no val
    test_fraction: float = 0.2  # of conversations, only when the store has neither splits nor folds
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on CPU, and where model.quirks.fp32 is on)
    amp_dtype: Literal["bf16", "fp16"] = "bf16"  # fp16 adds a GradScaler; bf16 needs none
    deterministic: bool = True  # deterministic kernels (bit-identical reruns on CPU); TF32 off on CUDA
    selection_metric: str = ""  # metric that picks the epoch; "" = the task's primary metric (comp.metrics)
    save_run_checkpoints: bool = True  # one checkpoint per fold/seed under runs/ besides best.pt
    baselines: bool = True  # fit the simple baselines on the same splits and masks
    num_threads: int = 0  # torch CPU threads, 0 = torch's default
    refit: bool = False  # also retrain the saved run on train+val for its selected epochs -> refit.pt

    def __post_init__(self) -> None:
        if not 0 <= self.stage_epochs <= self.epochs:
            raise ValueError("stage_epochs must be between 0 and epochs")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {', '.join(PLANS)}, got {self.plan!r}")
        if self.val_by not in VAL_BY:
            raise ValueError(f"val_by must be one of {', '.join(VAL_BY)}, got {self.val_by!r}")
