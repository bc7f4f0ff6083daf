"""ComP losses: each part on a hand-computed tiny case, and how the parts compose per stage and variant."""

from __future__ import annotations

import math

import pytest
import torch

from comp.batch import ComPBatch
from comp.config import ModelConfig, Quirks
from comp.losses import (
    abs_cosine,
    anti_label_loss,
    comp_loss,
    jensen_shannon,
    masked_cross_entropy,
    masked_mse,
    reconstruction_loss,
    task_loss,
)
from comp.model import ComP
from core.clip import MODALITIES

DIMS = {"audio": 6, "text": 5, "visual": 4}


def test_masked_cross_entropy_ignores_padding() -> None:
    """CE is averaged over valid utterances only; padded targets may hold any value."""
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])
    targets = torch.tensor([[0, 0, 77]])
    valid = torch.tensor([[True, True, False]])
    expected = (-math.log(math.e ** 2 / (math.e ** 2 + 1)) - math.log(1 / (1 + math.e))) / 2
    assert masked_cross_entropy(logits, targets, valid).item() == pytest.approx(expected, rel=1e-6)


def test_regression_task_loss_is_mse_on_valid_rows() -> None:
    """Regression: mean squared error over valid utterances; NaN on padding does not leak."""
    batch = ComPBatch({}, torch.zeros(1, 3, 3, dtype=torch.bool), torch.tensor([[True, True, False]]),
                      torch.tensor([[1.0, -2.0, float("nan")]]))
    pred = torch.tensor([[[0.0], [0.0], [3.0]]])
    assert task_loss(pred, batch, "regression").item() == pytest.approx((1 + 4) / 2)
    assert masked_mse(pred[..., 0], batch.targets, batch.valid).item() == pytest.approx(2.5)
    pred = torch.tensor([[[3.0], [1.0], [3.0]]])  # errors 2 and 3 (a sum instead of a difference: 4 and -1)
    assert task_loss(pred, batch, "regression").item() == pytest.approx((4 + 9) / 2)


def test_abs_cosine_is_weighted_mean_of_absolute_cosines() -> None:
    """|cos| of orthogonal rows is 0, of opposite rows 1; weights pick the rows."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [4.0, -3.0]])
    assert abs_cosine(x, y, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(0.5)
    assert abs_cosine(x, y, torch.tensor([0.0, 3.0, 1.0])).item() == pytest.approx(0.75)


def test_jensen_shannon_hand_case() -> None:
    """JSD(p, q) = 0.5 * sum [p log(p/m) + q log(q/m)] per row; zero for equal inputs."""
    p = torch.tensor([[0.9, 0.5]])
    q = torch.tensor([[0.1, 0.5]])
    m = 0.5
    expected = 0.5 * (0.9 * math.log(0.9 / m) + 0.1 * math.log(0.1 / m))
    assert jensen_shannon(p, q, torch.ones(1)).item() == pytest.approx(expected, rel=1e-6)
    assert jensen_shannon(p, p, torch.ones(1)).item() == pytest.approx(0.0, abs=1e-7)


def test_projected_reconstruction_is_weighted_entry_mean() -> None:
    """Released L_rec: mean squared error of every entry, the pad row counting once per padding slot."""
    rec = torch.zeros(3, 2, 2)
    target = torch.zeros(3, 2, 2)
    target[:, 0] = 1.0  # real row: error 1 per entry
    target[:, 1] = 2.0  # pad row: error 4 per entry, standing for 3 slots
    aux = {"rec": rec, "rec_target": target, "rec_weight": torch.tensor([1.0, 3.0]).expand(3, -1)}
    assert reconstruction_loss(aux).item() == pytest.approx((1 + 3 * 4) / 4)


def test_clean_reconstruction_is_relative_mse_over_present_rows() -> None:
    """Clean L_rec: per modality |err|^2 / |target|^2 over present rows, averaged over modalities present."""
    aux = {"rec_weight": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])}
    aux["rec_audio"] = torch.tensor([[1.0, 0.0], [9.0, 9.0]])
    aux["rec_target_audio"] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    aux["rec_text"], aux["rec_target_text"] = torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [1.0]])
    aux["rec_visual"], aux["rec_target_visual"] = torch.ones(2, 1), torch.zeros(2, 1)
    assert reconstruction_loss(aux).item() == pytest.approx((1 / 4 + 2 / 2) / 2)
    # a modality absent everywhere before the others is skipped, not the end of the sum; small targets
    # (|target|^2 well below 1) are divided by their own size
    aux["rec_weight"] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    aux["rec_text"], aux["rec_target_text"] = torch.tensor([[0.0], [0.0]]), torch.tensor([[0.1], [0.1]])
    aux["rec_visual"], aux["rec_target_visual"] = torch.tensor([[0.3], [0.0]]), torch.tensor([[0.1], [5.0]])
    assert reconstruction_loss(aux).item() == pytest.approx((1.0 + 4.0) / 2)
    aux["rec_weight"] = torch.zeros(3, 2)  # nothing present: no reconstruction term
    assert reconstruction_loss(aux).item() == 0.0 and reconstruction_loss(aux).dtype == torch.float32


def test_anti_label_is_cross_entropy_on_negated_logits() -> None:
    """Anti-label loss = sum over modalities of CE(1 - private logits, y) on valid utterances."""
    priv = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 2.0]]])  # [3,N=1,C=2]
    batch = ComPBatch({}, torch.zeros(1, 2, 3, dtype=torch.bool), torch.tensor([[True, False]]),
                      torch.tensor([[0, 1]]))
    ce = lambda a, b: -math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
    expected = ce(0.0, 1.0) + ce(1.0, 1.0) + ce(1.0, -1.0)
    assert anti_label_loss(priv, batch, "classification").item() == pytest.approx(expected, rel=1e-6)


def _model_and_batch(variant: str) -> tuple[ComP, ComPBatch]:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, hidden=16, depth=2, heads=2, drop_rate=0.0, prompt_dim=4, n_prototypes=3,
                      max_len=8)
    model = ComP(cfg, DIMS, 3, "classification")
    gen = torch.Generator().manual_seed(1)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    present = torch.ones(2, 5, 3, dtype=torch.bool) & valid[..., None]
    present[0, 1, 0] = False
    feats = {u: torch.randn(2, 5, d, generator=gen) * present[..., i:i + 1] for i, (u, d) in enumerate(DIMS.items())}
    return model, ComPBatch(feats, present, valid, torch.randint(0, 3, (2, 5), generator=gen))


@pytest.mark.parametrize("variant", ["clean", "faithful"])
@pytest.mark.parametrize("stage", [1, 2])
def test_parts_sum_to_total_and_follow_the_variant(variant: str, stage: int) -> None:
    """Stage 1: uni-modal (+anti, dis in faithful; +rec in clean); stage 2: task + k*uni-modal + rec (+dis),
    k = 2 in faithful; the named parts add up to the total."""
    model, batch = _model_and_batch(variant)
    out = model(batch, stage)
    total, parts = comp_loss(out, batch, model.cfg, "classification", stage)
    assert float(total.detach()) == pytest.approx(sum(parts.values()), rel=1e-6)
    expected = {("clean", 1): {"unimodal", "rec"}, ("faithful", 1): {"unimodal", "anti", "dis"},
                ("clean", 2): {"task", "unimodal", "rec"}, ("faithful", 2): {"task", "unimodal", "rec", "dis"}}
    assert set(parts) == expected[(variant, stage)]
    uni = sum(float(task_loss(out.head_logits[u], batch, "classification").detach()) for u in MODALITIES)
    k = 2.0 if (variant == "faithful" and stage == 2) else 1.0
    assert parts["unimodal"] == pytest.approx(k * uni, rel=1e-6)
    if stage == 2:
        assert parts["task"] == pytest.approx(float(task_loss(out.logits, batch, "classification").detach()),
                                              rel=1e-6)


def test_quirk_switch_adds_stage1_reconstruction_to_faithful() -> None:
    """One flag is one ablation: faithful with stage1_reconstruction=True gains an L_rec part in stage 1."""
    model, batch = _model_and_batch("faithful")
    cfg = ModelConfig(**{**model.cfg.__dict__, "quirks": Quirks(stage1_reconstruction=True)})
    flagged = ComP(cfg, DIMS, 3, "classification")
    _, parts = comp_loss(flagged(batch, 1), batch, cfg, "classification", 1)
    assert "rec" in parts and parts["rec"] > 0


def test_faithful_slot_weights_cover_fixed_length_padding() -> None:
    """Faithful: L_rec and JSD average over B*max_len slots (the pad row weighs B*max_len - N), |cos| over
    real utterances only."""
    model, batch = _model_and_batch("faithful")
    out = model(batch, 2)
    n_real = int(batch.valid.sum())
    assert out.aux["dis_rows"].sum().item() == 2 * 8 and out.aux["dis_real"].sum().item() == n_real
    assert torch.equal(out.aux["rec_weight"][0], out.aux["dis_rows"])


@pytest.mark.parametrize("variant", ["clean", "faithful"])
def test_unlabelled_utterances_take_no_part_in_the_loss(variant: str) -> None:
    """Changing the target of an utterance marked unlabelled leaves every loss part unchanged."""
    model, batch = _model_and_batch(variant)
    model.eval()
    labelled = batch.valid.clone()
    labelled[0, 0] = False
    batch.labelled = labelled
    out = model(batch, stage=2)
    total_a, _ = comp_loss(out, batch, model.cfg, "classification", 2)
    batch.targets = batch.targets.clone()
    batch.targets[0, 0] = (batch.targets[0, 0] + 1) % 3
    total_b, _ = comp_loss(out, batch, model.cfg, "classification", 2)
    assert torch.allclose(total_a, total_b)
    batch.labelled = None  # the same change counts once the utterance is labelled
    total_c, _ = comp_loss(out, batch, model.cfg, "classification", 2)
    assert not torch.allclose(total_a, total_c)


def test_disentangling_separates_shared_from_private_not_only_private_pairs() -> None:
    """L_dis = sum over modality pairs of |cos(p_i, p_j)| + |cos(p_i, s_i)| + |cos(p_j, s_j)| + JSD(σ(s_i), σ(s_j)).
    Private codes orthogonal to each other but equal to their shared codes cost 2 per pair besides the JSD."""
    from comp.losses import disentangle_loss

    eye = torch.eye(4)[:3]  # p_a = e1, p_t = e2, p_v = e3 (one row each)
    private = eye[:, None, :].clone()  # [3,R=1,D=4]
    shared = private.clone()
    ones = torch.ones(1)
    aux = dict(shared=shared, private=private, dis_real=ones, dis_rows=ones)
    sig = torch.sigmoid(shared)
    jsd = sum(jensen_shannon(sig[i], sig[j], ones) for i in range(3) for j in range(i + 1, 3))
    assert disentangle_loss(aux).item() == pytest.approx(3 * 2 + jsd.item(), rel=1e-6)
    aux["shared"] = torch.roll(private, 1, dims=-1) + 0.0  # shared orthogonal to private: only the JSD is left
    sig = torch.sigmoid(aux["shared"])
    jsd = sum(jensen_shannon(sig[i], sig[j], ones) for i in range(3) for j in range(i + 1, 3))
    assert disentangle_loss(aux).item() == pytest.approx(jsd.item(), rel=1e-6)


def test_regression_anti_label_targets_random_sentiment() -> None:
    """Regression anti-label loss: MSE to fresh noise clamp(1.5 N(0,1), -3, 3) per call. With private outputs 0
    it is sum over 3 modalities of E[noise^2] ~ 3 * 1.96, and two calls differ."""
    n = 4000
    batch = ComPBatch({}, torch.ones(1, n, 3, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool),
                      torch.zeros(1, n))
    priv = torch.zeros(3, n, 1)
    torch.manual_seed(0)
    z = torch.randn(400_000)
    expected = 3 * float(((1.5 * z).clamp(-3, 3) ** 2).mean())
    first, second = anti_label_loss(priv, batch, "regression").item(), anti_label_loss(priv, batch, "regression").item()
    assert first == pytest.approx(expected, rel=0.05) and second == pytest.approx(expected, rel=0.05)
    assert first != second
    # one utterance, one modality: the loss is that draw's noise^2, never beyond the sentiment range (3^2),
    # and the 1.5-sigma draws reach the clamp (|N(0,1)| > 2 in ~4.6 % of draws)
    one = ComPBatch({}, torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1))
    draws = torch.tensor([anti_label_loss(torch.zeros(1, 1, 1), one, "regression").item() for _ in range(400)])
    assert draws.max().item() == pytest.approx(9.0)
    assert (draws >= 9.0 - 1e-6).sum() >= 5
