"""The `faithful` model is the released model: with the released parameters loaded, it reproduces the
released code's outputs (both stages, eval and train mode), both stages' losses and every gradient.

tests/data/comp-official-tiny.npz holds numbers produced by running the authors' released ComP code
(WenjueHE/2026-AAAI-ComP at 28192d3: model.py, loss.py, composed as train_mr.py does) on one tiny seeded case:
IEMOCAP-4-like, hidden 16, depth 4, 2 heads, lambda 0.3, S = 10, input dims 6/5/4, 3 conversations of 7, 4, 9
utterances with about 40 % of the modalities absent. Numbers only, no code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from comp.batch import ComPBatch
from comp.config import ModelConfig
from comp.losses import comp_loss
from comp.model import ComP
from comp.released import load_released, read_released, released_slots
from core.clip import MODALITIES

GOLDEN = Path(__file__).parent / "data" / "comp-official-tiny.npz"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def build(golden: dict[str, np.ndarray], **quirks) -> ComP:
    from comp.config import Quirks

    hidden, depth, heads, seq, n_classes, lbd = golden["config/hidden_depth_heads_seq_nclasses_lbd"]
    cfg = ModelConfig(variant="faithful", hidden=int(hidden), depth=int(depth), heads=int(heads), drop_rate=0.0,
                      attn_drop_rate=0.0, prompt_dim=16, n_prototypes=10, momentum=float(lbd), max_len=int(seq),
                      quirks=Quirks(**quirks))
    dims = dict(zip(MODALITIES, (int(d) for d in golden["input/dims"])))
    model = ComP(cfg, dims, int(n_classes), "classification")
    load_released(model, {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")})
    return model


def golden_batch(golden: dict[str, np.ndarray]) -> ComPBatch:
    """The released inputs: time-major [S,B,a|t|v] features, fmask [S,B,3] -> the project's ComPBatch."""
    x = torch.from_numpy(golden["input/x"]).transpose(0, 1)  # [B,S,15]
    dims = [int(d) for d in golden["input/dims"]]
    bounds = np.cumsum([0] + dims)
    valid = torch.from_numpy(golden["input/umask"]) > 0
    present = (torch.from_numpy(golden["input/fmask"]).transpose(0, 1) > 0) & valid[..., None]
    feats = {m: x[..., bounds[i]:bounds[i + 1]].contiguous() for i, m in enumerate(MODALITIES)}
    return ComPBatch(feats, present, valid, torch.from_numpy(golden["input/label"]))


def run(model: ComP, batch: ComPBatch, stage: int, train: bool):
    """(output, fused hidden [B,S,3D] on real utterances) of one forward pass."""
    model.train(train)
    seen = []
    hook = model.fusion.head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        out = model(batch, stage)
    finally:
        hook.remove()
    return out, seen[0]


def test_every_released_parameter_has_one_home(golden) -> None:
    """The name mapping covers each released parameter once and each project parameter entirely."""
    model = build(golden)
    slots = released_slots(model)
    assert set(slots) == {k[len("param/"):] for k in golden if k.startswith("param/")}
    for name, slot in slots.items():  # round trip: what was loaded reads back unchanged
        got = slot.read(dict(model.named_parameters())[slot.param]).detach().numpy()
        np.testing.assert_array_equal(got, golden[f"param/{name}"])


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_match_the_released_code(golden, stage: int, mode: str) -> None:
    """Fused logits, each modality head and the fused hidden state agree on every real utterance."""
    model = build(golden)
    batch = golden_batch(golden)
    with torch.no_grad():
        out, hidden = run(model, batch, stage, mode == "train")
    valid = batch.valid.numpy()
    ref = f"out{stage}_{mode}"
    np.testing.assert_allclose(out.logits.numpy()[valid], golden[f"{ref}/logits"][valid], **TOL)
    for m, u in zip(MODALITIES, "atv"):
        np.testing.assert_allclose(out.head_logits[m].numpy()[valid], golden[f"{ref}/logits_{u}"][valid], **TOL)
    np.testing.assert_allclose(hidden.numpy(), golden[f"{ref}/hidden"][valid], **TOL)


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_and_every_gradient_match_the_released_code(golden, stage: int) -> None:
    """The stage's training loss and the gradient of every parameter agree; parameters the released code
    leaves without a gradient get none (or an all-zero one) here."""
    model = build(golden)
    batch = golden_batch(golden)
    out, _ = run(model, batch, stage, train=True)
    loss, _ = comp_loss(out, batch, model.cfg, "classification", stage)
    np.testing.assert_allclose(float(loss.detach()), float(golden[f"loss{stage}"]), **TOL)
    loss.backward()
    grads = read_released(model, {n: p.grad for n, p in model.named_parameters()})
    expected = {k[len(f"grad{stage}/"):]: v for k, v in golden.items() if k.startswith(f"grad{stage}/")}
    assert expected, "the golden file holds no gradients for this stage"
    for name, ref in expected.items():
        assert name in grads, f"{name}: the released code has a gradient, the project none"
        np.testing.assert_allclose(grads[name].numpy(), ref, err_msg=name, **TOL)
    for name, g in grads.items():
        if name not in expected:
            assert not g.abs().any(), f"{name}: gradient here, none in the released code"
