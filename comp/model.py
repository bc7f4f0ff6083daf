"""The ComP network (docs/model.md §4): encoders, prompt generation, knowledge propagation, coordinator.

One code path serves both variants; every place where the released code and the paper part ways is a switch
in `cfg.resolved` (docs/model.md §9). Modality streams are stacked on a leading axis [3,B,L,D] in
`MODALITY_ORDER` and every modality-specific layer runs them as one batched matmul.

Streams are packed to real utterances [3,N,D]; only attention sees the padded grid (`Layout`). The faithful
variant's fixed-length padding (max_len slots for the time-axis prototype MLP) is one shared pad row per batch
where every slot sees the same values (eval mode, no dropout), and one row per slot in training with dropout,
where the released code draws a dropout mask for each slot.

Stage 1 trains the per-modality encoders, attention blocks and heads; stage 2 adds prompts, knowledge
propagation and the coordinator. `ComPOutput.aux` carries what `comp.losses` and `comp.modulator` need.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from comp.attention import Layout, Mlp, ModalityLinear, ModalityMlp
from comp.batch import ComPBatch, ComPOutput
from comp.config import ModelConfig
from comp.coordinator import Coordinator, FusionHead, concat_modalities
from comp.prompts import InstancePrototypes, PromptGenerator, TimeAxisPrototypes
from comp.propagation import KnowledgePropagation, cross_prompts
from core.clip import MODALITIES as MODALITY_ORDER

log = logging.getLogger(__name__)

TASKS = ("classification", "regression")
N_MOD = len(MODALITY_ORDER)


class ComP(nn.Module):
    """Cross-modal Prompting for incomplete multimodal emotion recognition (He, Zhu, Zhang, AAAI-26)."""

    def __init__(self, cfg: ModelConfig, input_dims: Mapping[str, int], n_outputs: int, task: str) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        missing = [u for u in MODALITY_ORDER if u not in input_dims]
        if missing:
            raise ValueError(f"input_dims lacks {missing}; give the feature dimension of every modality")
        if task == "regression" and n_outputs != 1:
            raise ValueError(f"regression predicts one value per utterance; got n_outputs={n_outputs}")
        if task == "classification" and n_outputs < 2:
            raise ValueError(f"classification needs n_outputs >= 2 classes, got {n_outputs}")
        self.cfg, self.task, self.n_outputs = cfg, task, n_outputs
        self.input_dims = {u: int(input_dims[u]) for u in MODALITY_ORDER}
        self.quirks = q = cfg.resolved
        dim, p, c, drop = cfg.hidden, cfg.prompt_dim, cfg.n_prototypes, cfg.drop_rate
        half = cfg.depth // 2

        self.in_proj = nn.ModuleDict({u: nn.Linear(self.input_dims[u], dim) for u in MODALITY_ORDER})
        self.in_drop = nn.Dropout(drop)
        self.shared_enc = ModalityMlp(N_MOD, dim, dim, dim, drop)
        self.private_enc = ModalityMlp(N_MOD, dim, dim, dim, drop) if q.disentangle else None
        dec_in = 2 * dim if q.disentangle else dim
        self.decoders = nn.ModuleDict({
            u: Mlp(dec_in, dim, dim if q.projected_reconstruction else self.input_dims[u], drop)
            for u in MODALITY_ORDER})

        # kp1.block / kp2.block are the released block1 / block2: stage 1 uses them without prompts
        self.kp1 = KnowledgePropagation(N_MOD, dim, p, cfg.heads, half, drop, cfg.attn_drop_rate, True)
        self.kp2 = KnowledgePropagation(N_MOD, dim, p, cfg.heads, half, drop, cfg.attn_drop_rate,
                                        back_projection=q.unused_params)  # released prop_proj_rev_u_2: unused
        self.heads = ModalityLinear(N_MOD, dim, n_outputs)

        self.prototypes: TimeAxisPrototypes | InstancePrototypes
        if q.batch_prototypes:
            self.prototypes = TimeAxisPrototypes(N_MOD, cfg.max_len, c, drop)
        else:
            self.prototypes = InstancePrototypes(N_MOD, dim, c, drop, cfg.prototype_ema)
        self.pg1 = PromptGenerator(N_MOD, dim, p, drop, q.outer_prompt_mlp)
        self.pg2 = PromptGenerator(N_MOD, dim, p, drop, q.outer_prompt_mlp)
        # released PromptFormer_2.proj_n: built, never called (parameter-count parity only)
        self.unused_proj_n = ModalityMlp(N_MOD, cfg.max_len, c, c, drop) if q.unused_params else None

        self.coordinator = Coordinator(N_MOD, dim, drop)
        self.fusion = FusionHead(N_MOD * dim, n_outputs, drop)
        log.debug("ComP %s (%s, %d outputs): %d parameters", cfg.variant, task, n_outputs,
                  sum(p.numel() for p in self.parameters()))

    # ------------------------------------------------------------------ helpers

    def _check_length(self, length: int) -> None:
        if self.quirks.batch_prototypes and length > self.cfg.max_len:
            raise ValueError(f"a conversation has {length} utterances but model.max_len is {self.cfg.max_len}; "
                             "the faithful time-axis prototype MLP has a fixed size: raise model.max_len "
                             "(and retrain) or split long conversations")

    def _encode(self, batch: ComPBatch, present: torch.Tensor, pad_rows: int) -> torch.Tensor:
        """Projected inputs [3,N+pad_rows,D] of the real utterances; absent rows are zeroed first (eq. 1).

        `pad_rows` all-zero rows are appended for the released code's fixed-length padding slots: one row
        standing for all of them where they are identical (eval mode, or no dropout), else one per slot so
        that each slot gets its own dropout draw, as in the released code.
        """
        outs = []
        for i, u in enumerate(MODALITY_ORDER):
            x = batch.features[u][batch.valid] * present[:, i : i + 1].to(batch.features[u].dtype)
            if pad_rows:
                x = F.pad(x, (0, 0, 0, pad_rows))
            outs.append(self.in_drop(self.in_proj[u](x)))
        return torch.stack(outs)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: ComPBatch, stage: int) -> ComPOutput:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        batch.check(self.input_dims)
        q = self.quirks
        b, length = batch.shape
        self._check_length(length)
        valid = batch.valid
        present = batch.present & valid[..., None]  # [B,L,3]
        layout = Layout.from_valid(valid, present.permute(2, 0, 1))
        present_rows = present[valid].t()  # [3,N]
        n_rows = int(layout.index.numel())

        fixed_len = q.batch_prototypes  # the released code pads every conversation to max_len slots
        n_slots = b * self.cfg.max_len - n_rows  # padding slots of the released fixed-length grid
        # one shared pad row is exact unless dropout draws differ per slot (training with dropout)
        per_slot = fixed_len and self.training and self.cfg.drop_rate > 0
        pad_rows = (n_slots if per_slot else 1) if fixed_len else 0
        proj = self._encode(batch, present[valid], pad_rows=pad_rows)
        shared = self.shared_enc(proj)
        private = self.private_enc(proj) if self.private_enc is not None else None
        z = shared[:, :n_rows]
        aux: dict[str, torch.Tensor] = {}

        # Row weights for the terms the released code averages over fixed-length slots: the pad row stands for
        # all B*max_len - N padding slots; "real" weights keep real utterances only.
        real = proj.new_ones(proj.shape[1])
        slots = real.clone()
        if fixed_len:
            real[n_rows:] = 0.0
            if pad_rows == 1:
                slots[-1] = float(n_slots)
        if private is not None:
            aux.update(shared=shared, private=private, dis_real=real, dis_rows=slots)
        if stage == 2 or q.stage1_reconstruction:
            self._reconstruct(aux, batch, present_rows, proj, shared, private, slots)

        if stage == 1:
            return self._stage1(z, private, layout, aux)
        return self._stage2(shared, z, present_rows, layout, aux)

    def _reconstruct(self, aux: dict[str, torch.Tensor], batch: ComPBatch, present_rows: torch.Tensor,
                     proj: torch.Tensor, shared: torch.Tensor, private: torch.Tensor | None,
                     slots: torch.Tensor) -> None:
        """Decoder outputs, targets and row weights for L_rec (paper eq. 2 L_enc; docs/model.md §5.2)."""
        source = shared if private is None else torch.cat((shared, private), dim=-1)
        if self.quirks.projected_reconstruction:
            aux["rec"] = torch.stack([self.decoders[u](source[i]) for i, u in enumerate(MODALITY_ORDER)])
            aux["rec_target"] = proj
            aux["rec_weight"] = slots[None].expand(N_MOD, -1)
            return
        n_rows = present_rows.shape[1]
        for i, u in enumerate(MODALITY_ORDER):
            aux[f"rec_{u}"] = self.decoders[u](source[i, :n_rows])
            aux[f"rec_target_{u}"] = batch.features[u][batch.valid].detach()
        aux["rec_weight"] = present_rows.to(proj.dtype)

    def _stage1(self, z: torch.Tensor, private: torch.Tensor | None, layout: Layout,
                aux: dict[str, torch.Tensor]) -> ComPOutput:
        n_rows = z.shape[1]
        x, lay = z, layout
        if private is not None:  # private branch runs through the same blocks, batched with the shared one
            priv = private[:, :n_rows]
            if self.quirks.private_a_for_all:  # §9.9: the released code feeds private_a to every modality
                priv = priv[:1].expand(N_MOD, -1, -1)
            x, lay = torch.cat((z, priv), dim=1), layout.doubled()
        x = self.kp2.block(self.kp1.block(x, lay), lay)
        heads = self.heads(x)
        if private is not None:
            aux["private_logits"] = heads[:, n_rows:]
        x, heads = x[:, :n_rows], heads[:, :n_rows]
        # fused head on the per-modality streams with absent modalities zeroed (not trained in stage 1)
        present_rows = layout.pack(layout.key_mask[..., None])  # [3,N,1]
        logits = self.fusion(concat_modalities(x * present_rows.to(x.dtype)))
        return ComPOutput(logits=self._unpack(logits, layout), head_logits=self._split_heads(heads, layout),
                          weights=None, aux=aux)

    def _stage2(self, shared: torch.Tensor, z: torch.Tensor, present_rows: torch.Tensor, layout: Layout,
                aux: dict[str, torch.Tensor]) -> ComPOutput:
        q = self.quirks
        prompt_mask = present_rows if q.prompt_mask else None
        if isinstance(self.prototypes, TimeAxisPrototypes):
            protos = self.prototypes(self._time_grid(shared, layout), None if not q.prompt_mask else
                                     self._slot_mask(layout))  # [3,B*c,D]: pooled over the batch (§9.4)
        else:
            member = present_rows if q.prompt_mask else torch.ones_like(present_rows)
            protos, assign_logits = self.prototypes(z, member)  # [3,c,D]
            if assign_logits is not None and assign_logits.requires_grad:
                assign_logits.retain_grad()  # the modulator rescales per-instance rows of this gradient
                aux["assign_logits"] = assign_logits
                aux["assign_input"] = z.detach()

        prompts1 = self.pg1(z, protos, prompt_mask)  # [3,N,p]
        zbar, back = self.kp1(z, cross_prompts(prompts1), layout)
        prompts2 = self.pg2(zbar, protos, prompt_mask)  # same prototypes, frozen across KP blocks
        lam = self.cfg.momentum
        mixed = lam * back + (1 - lam) * cross_prompts(prompts2)  # eq. 9
        x, _ = self.kp2(zbar, mixed, layout, project_back=False)
        heads = self.heads(x)
        if not q.fuse_absent:
            x = x * present_rows[..., None].to(x.dtype)
        fused, weights = self.coordinator(x)
        logits = self.fusion(fused)
        return ComPOutput(logits=self._unpack(logits, layout), head_logits=self._split_heads(heads, layout),
                          weights=self._unpack(weights, layout), aux=aux)

    def _time_grid(self, shared: torch.Tensor, layout: Layout) -> torch.Tensor:
        """[3,B,max_len,D] as the released code sees it: real rows in place, the pad row everywhere else."""
        n_rows = layout.index.numel()
        s = self.cfg.max_len
        b, length = layout.batch, layout.length
        pos = (layout.index // length) * s + layout.index % length  # flat positions on the max_len grid
        real = shared.new_zeros(N_MOD, b * s, shared.shape[-1]).index_copy(1, pos, shared[:, :n_rows])
        is_real = torch.zeros(b * s, dtype=torch.bool, device=shared.device)
        is_real[pos] = True
        pads = shared[:, n_rows:]  # one row for every slot, or one per slot in slot order
        if pads.shape[1] == 1:
            grid = torch.where(is_real[None, :, None], real, pads)
        else:
            grid = real.index_copy(1, (~is_real).nonzero().squeeze(1), pads)
        return grid.view(N_MOD, b, s, -1)

    def _slot_mask(self, layout: Layout) -> torch.Tensor:
        return F.pad(layout.key_mask, (0, self.cfg.max_len - layout.length))

    @staticmethod
    def _unpack(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
        """[N,C] packed -> [B,L,C], zeros on padding."""
        return layout.pad(rows[None])[0]

    @staticmethod
    def _split_heads(heads: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        grid = layout.pad(heads)  # [3,B,L,C]
        return {u: grid[i] for i, u in enumerate(MODALITY_ORDER)}
