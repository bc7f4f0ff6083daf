"""ComP objectives (docs/model.md §5): task, uni-modal, reconstruction, disentanglement, anti-label.

| stage | loss |
|---|---|
| 1 | sum_u L_task(Y_u) [+ sum_u L_anti + L_dis if disentangle] [+ L_rec if stage1_reconstruction] |
| 2 | L_task(Y') + k * sum_u L_task(Y_u) + L_rec [+ L_dis if disentangle]; k = 2 if double_unimodal_loss |

Every task term averages over real (valid) utterances, including those whose modality is missing, as released.
The parts returned sum to the total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comp.batch import ComPBatch, ComPOutput
from comp.config import ModelConfig
from core.clip import MODALITIES

ANTI_LABEL_SCALE = 1.5  # regression anti-label target: clamp(1.5 * N(0, 1), -3, 3), the sentiment range
SENTIMENT_RANGE = 3.0


def _count(rows: torch.Tensor) -> torch.Tensor:
    return rows.sum().clamp_min(1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean CE over rows: logits [...,C], targets [...] long, rows bool [...]."""
    safe = torch.where(rows, targets.long(), 0)  # padding may hold any id, even an ignore index
    ce = F.cross_entropy(logits.float().flatten(0, -2), safe.flatten(), reduction="none")
    return (ce * rows.flatten()).sum() / _count(rows)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean squared error over rows (pred and target of equal shape [...], rows bool [...])."""
    err = torch.where(rows, pred.float() - target.float(), 0.0) ** 2  # padding may hold NaN
    return err.sum() / _count(rows)


def task_loss(logits: torch.Tensor, batch: ComPBatch, task: str) -> torch.Tensor:
    """CE (eq. 16) or MSE (eq. 17) of [B,S,C] predictions on the batch's labelled real utterances."""
    if batch.targets is None:
        raise ValueError("the batch has no targets; losses need batch.targets")
    if task == "classification":
        return masked_cross_entropy(logits, batch.targets, batch.scored)
    return masked_mse(logits[..., 0], batch.targets, batch.scored)


def abs_cosine(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean |cos(x_r, y_r)| over rows (x, y [R, D], weight [R])."""
    cos = F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8).abs()
    return (cos * weight).sum() / weight.sum().clamp_min(1e-12)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Element-wise JSD of probabilities p, q [R, D], summed over each row's elements, weighted mean over rows.

    As in DrFuse (which the released code cites): 0.5 * sum [p log(p/m) + q log(q/m)], m = (p + q) / 2.
    """
    p, q = p.float().clamp_min(1e-12), q.float().clamp_min(1e-12)
    m = 0.5 * (p + q)
    per_elem = 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log()))
    return (per_elem.sum(-1) * weight).sum() / weight.sum().clamp_min(1e-12)


def disentangle_loss(aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """Undocumented released-code term (§9.8): private streams orthogonal to each other and to the shared one
    (|cos| over real utterances) and shared streams alike (JSD over every slot the released code had, its
    fixed-length padding included, divided by B*max_len)."""
    shared, private = aux["shared"], aux["private"]  # [3,R,D]
    real, rows = aux["dis_real"], aux["dis_rows"]  # [R]
    sig = torch.sigmoid(shared.float())
    total = shared.new_zeros((), dtype=torch.float32)
    n = len(MODALITIES)
    for i in range(n):
        for j in range(i + 1, n):
            total = total + abs_cosine(private[i], private[j], real) + abs_cosine(private[i], shared[i], real) \
                + abs_cosine(private[j], shared[j], real) + jensen_shannon(sig[i], sig[j], rows)
    return total


def anti_label_loss(private_logits: torch.Tensor, batch: ComPBatch, task: str) -> torch.Tensor:
    """Push each private branch away from the label (§5.2): CE on 1 - logits, or MSE to random sentiment.

    private_logits [3,N,C] are packed over the batch's valid utterances."""
    targets = batch.targets[batch.valid]
    rows = batch.scored[batch.valid]  # unlabelled utterances have no label to push away from
    total = private_logits.new_zeros((), dtype=torch.float32)
    for i in range(private_logits.shape[0]):
        if task == "classification":
            total = total + masked_cross_entropy(1 - private_logits[i], targets, rows)
        else:
            noise = (ANTI_LABEL_SCALE * torch.randn(targets.shape, device=targets.device)).clamp(
                -SENTIMENT_RANGE, SENTIMENT_RANGE)
            total = total + masked_mse(private_logits[i, :, 0], noise, rows)
    return total


def reconstruction_loss(aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_rec. Released: MSE of the projected embedding over every entry of every slot (padding included).
    Clean: per modality, squared error on present utterances divided by the targets' mean square
    (scale-free across feature extractors), averaged over the modalities with any present utterance."""
    weight = aux["rec_weight"]  # [3,R]
    if "rec" in aux:
        err = ((aux["rec"].float() - aux["rec_target"].float()) ** 2).mean(-1)
        return (err * weight).sum() / weight.sum().clamp_min(1e-12)
    terms = []
    for i, u in enumerate(MODALITIES):
        w = weight[i]
        if not bool((w > 0).any()):
            continue
        pred, target = aux[f"rec_{u}"].float(), aux[f"rec_target_{u}"].float()
        num = (((pred - target) ** 2).sum(-1) * w).sum()
        den = ((target ** 2).sum(-1) * w).sum().clamp_min(1e-8)
        terms.append(num / den)
    if not terms:
        return weight.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


def comp_loss(out: ComPOutput, batch: ComPBatch, cfg: ModelConfig, task: str,
              stage: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss for `stage` and its named parts (which sum to the total)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    q = cfg.resolved
    parts: dict[str, torch.Tensor] = {}
    unimodal = sum(task_loss(out.head_logits[u], batch, task) for u in MODALITIES)
    if stage == 1:
        parts["unimodal"] = unimodal
        if q.disentangle:
            parts["anti"] = anti_label_loss(out.aux["private_logits"], batch, task)
            parts["dis"] = disentangle_loss(out.aux)
        if q.stage1_reconstruction:
            parts["rec"] = reconstruction_loss(out.aux)
    else:
        parts["task"] = task_loss(out.logits, batch, task)
        parts["unimodal"] = (2.0 if q.double_unimodal_loss else 1.0) * unimodal
        parts["rec"] = reconstruction_loss(out.aux)
        if q.disentangle:
            parts["dis"] = disentangle_loss(out.aux)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
