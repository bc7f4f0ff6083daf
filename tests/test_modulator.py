"""Gradient modulator: W on hand-computed errors, and that it changes exactly the intended gradient."""

from __future__ import annotations

import pytest
import torch

from comp.batch import ComPBatch
from comp.config import ModelConfig, Quirks
from comp.losses import comp_loss
from comp.model import ComP
from comp.modulator import GradientModulator, instance_weights, modality_errors

DIMS = {"audio": 6, "text": 5, "visual": 4}


def test_instance_weights_hand_case() -> None:
    """W^u_i = mean over v != u of (sum_j D_j - D_i) / sum_j D_j with D = E^u - E^v (eq. 10)."""
    errors = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]])  # [3,B=1,S=3]
    rows = torch.ones(1, 3, dtype=torch.bool)
    w = instance_weights(errors, rows, guard=True, clip=None)
    # audio: vs text D=(1,2,3), sum 6 -> (5/6, 4/6, 3/6); vs visual D=(0,1,2), sum 3 -> (1, 2/3, 1/3)
    expected_audio = 0.5 * (torch.tensor([5 / 6, 4 / 6, 3 / 6]) + torch.tensor([1.0, 2 / 3, 1 / 3]))
    # text: vs audio D=(-1,-2,-3) -> same ratios as audio-text; vs visual D=(-1,-1,-1), sum -3 -> 2/3 each
    expected_text = 0.5 * (torch.tensor([5 / 6, 4 / 6, 3 / 6]) + torch.full((3,), 2 / 3))
    assert torch.allclose(w[0, 0], expected_audio)
    assert torch.allclose(w[1, 0], expected_text)


def test_instance_weights_guard_clip_and_rows() -> None:
    """Clean guard: sum of differences ~0 gives W = 1; W is clipped; rows outside the mask get W = 1."""
    errors = torch.tensor([[[1.0, -1.0, 5.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    rows = torch.tensor([[True, True, False]])
    w = instance_weights(errors, rows, guard=True, clip=(0.0, 2.0))
    assert torch.equal(w[0, 0], torch.ones(3))  # audio: sum D = 1 - 1 = 0 over the masked rows
    raw = instance_weights(errors, rows, guard=False, clip=None)
    assert raw[0, 0, 0].abs() > 1e6  # the released arithmetic explodes there
    w2 = instance_weights(torch.tensor([[[3.0, -1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]),
                          torch.ones(1, 2, dtype=torch.bool), guard=True, clip=(0.0, 2.0))
    assert w2[0, 0].tolist() == [0.0, 1.5]  # (2-3)/2 = -0.5 clipped to 0; (2+1)/2 = 1.5


def test_modality_errors_kinds() -> None:
    """true_class_prob: |1 - softmax_y|; class_index: |logit_y - y| (released); regression |pred - y|."""
    logits = {"audio": torch.tensor([[[0.0, 0.0]]]), "text": torch.tensor([[[2.0, 0.0]]]),
              "visual": torch.tensor([[[0.0, 3.0]]])}
    y = torch.tensor([[1]])
    prob = modality_errors(logits, y, "classification", "true_class_prob")[:, 0, 0]
    e = torch.exp(torch.tensor(1.0))
    assert torch.allclose(prob, torch.stack([torch.tensor(0.5), 1 - 1 / (1 + e ** 2), 1 / (1 + e ** 3)]))
    index = modality_errors(logits, y, "classification", "class_index")[:, 0, 0]
    assert torch.allclose(index, torch.tensor([1.0, 1.0, 2.0]))
    reg = modality_errors({u: v[..., :1] for u, v in logits.items()}, torch.tensor([[0.5]]), "regression", "")
    assert torch.allclose(reg[:, 0, 0], torch.tensor([0.5, 1.5, 0.5]))


def _setup(variant: str, **quirks) -> tuple[ComP, ComPBatch, GradientModulator]:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, hidden=16, depth=2, heads=2, drop_rate=0.0, prompt_dim=4, n_prototypes=3,
                      max_len=8, quirks=Quirks(**quirks))
    model = ComP(cfg, DIMS, 3, "classification")
    gen = torch.Generator().manual_seed(1)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    present = (torch.rand(2, 6, 3, generator=gen) > 0.25) & valid[..., None]
    present[..., 2] |= valid
    feats = {u: torch.randn(2, 6, d, generator=gen) * present[..., i:i + 1] for i, (u, d) in enumerate(DIMS.items())}
    batch = ComPBatch(feats, present, valid, torch.randint(0, 3, (2, 6), generator=gen))
    return model, batch, GradientModulator(model, cfg, "classification")


def _grads(model: ComP) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_clean_modulator_scales_instance_rows_of_the_assignment_only() -> None:
    """Clean: only the assignment weight's gradient changes, and it equals backpropagating with each
    instance's assignment-logit gradient scaled by its W."""
    model, batch, gm = _setup("clean")
    model.train()
    out = model(batch, 2)
    loss, _ = comp_loss(out, batch, model.cfg, "classification", 2)
    loss.backward()
    before = _grads(model)
    w = gm.weights(out, batch)[:, batch.valid]  # [3,N]
    assert not torch.allclose(w, torch.ones_like(w))
    stats = gm.apply(out, batch)
    after = _grads(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"prototypes.assign.weight"}
    assert set(stats) >= {"gm_w_mean_audio", "gm_w_min_text", "gm_w_max_visual"}

    model.zero_grad(set_to_none=True)
    out2 = model(batch, 2)  # no dropout: the same forward
    out2.aux["assign_logits"].register_hook(lambda g: g * w[..., None])
    comp_loss(out2, batch, model.cfg, "classification", 2)[0].backward()
    assert torch.allclose(after["prototypes.assign.weight"], model.prototypes.assign.weight.grad, atol=1e-6)


def test_faithful_modulator_scales_time_slot_columns_when_switched_on() -> None:
    """Faithful + gradient_modulator: fc1 of the time-axis prototype MLP is scaled per slot by the batch mean
    of W over valid utterances (slots without one keep 1); nothing else changes."""
    model, batch, gm = _setup("faithful", gradient_modulator=True)
    model.train()
    out = model(batch, 2)
    comp_loss(out, batch, model.cfg, "classification", 2)[0].backward()
    before = _grads(model)
    w = gm.weights(out, batch)  # [3,B,S]
    r = batch.valid.float()
    slot = torch.ones(3, 8)
    slot[:, :6] = (w * r).sum(1) / r.sum(0)
    gm.apply(out, batch)
    after = _grads(model)
    name = "prototypes.proj_n.fc1.weight"
    assert {n for n in before if not torch.equal(before[n], after[n])} == {name}
    assert torch.allclose(after[name], before[name] * slot[..., None], atol=1e-7)


@pytest.mark.parametrize("variant,stage", [("faithful", 2), ("clean", 1)])
def test_modulator_is_a_no_op_when_off_or_in_stage_1(variant: str, stage: int) -> None:
    """Faithful's default (the released name mismatch) and stage 1 leave every gradient as it was."""
    model, batch, gm = _setup(variant)
    model.train()
    out = model(batch, stage)
    comp_loss(out, batch, model.cfg, "classification", stage)[0].backward()
    before = _grads(model)
    assert gm.apply(out, batch) == {}
    after = _grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
