"""ComP model: shapes, masking, batch (in)dependence, stage switch, parameter parity, a tiny learning check."""

from __future__ import annotations

import pytest
import torch

from comp.attention import Layout, MaskedSelfAttention
from comp.batch import ComPBatch
from comp.config import ModelConfig, Quirks
from comp.losses import comp_loss
from comp.model import ComP
from core.clip import MODALITIES

DIMS = {"audio": 6, "text": 5, "visual": 4}


def tiny_cfg(variant: str, drop: float = 0.0, **quirks) -> ModelConfig:
    return ModelConfig(variant=variant, hidden=16, depth=2, heads=2, drop_rate=drop, prompt_dim=4,
                       n_prototypes=3, max_len=12, quirks=Quirks(**quirks))


def make_batch(lengths: list[int], task: str = "classification", seed: int = 0, n_classes: int = 4) -> ComPBatch:
    gen = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(lengths)
    valid = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    present = (torch.rand(b, length, 3, generator=gen) > 0.3) & valid[..., None]
    present[..., 1] |= valid & ~present.any(-1)  # every real utterance keeps at least one modality
    feats = {u: torch.randn(b, length, d, generator=gen) * present[..., i:i + 1]
             for i, (u, d) in enumerate(DIMS.items())}
    if task == "classification":
        targets = torch.randint(0, n_classes, (b, length), generator=gen)
    else:
        targets = torch.randn(b, length, generator=gen)
    return ComPBatch(feats, present, valid, targets)


def pad_batch(batch: ComPBatch, length: int) -> ComPBatch:
    """The same conversations with extra padding (garbage targets on it) up to `length`."""
    extra = length - batch.valid.shape[1]
    pad = lambda t, v=0: torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra), value=v)
    return ComPBatch({u: pad(f) for u, f in batch.features.items()}, pad(batch.present, False),
                     pad(batch.valid, False), pad(batch.targets, 99))


def select(batch: ComPBatch, i: int, length: int | None = None) -> ComPBatch:
    """Conversation i alone, trimmed to `length` (default: its own length)."""
    n = length or int(batch.valid[i].sum())
    return ComPBatch({u: f[i:i + 1, :n] for u, f in batch.features.items()}, batch.present[i:i + 1, :n],
                     batch.valid[i:i + 1, :n], batch.targets[i:i + 1, :n])


def build(variant: str, task: str = "classification", seed: int = 0, **kw) -> ComP:
    torch.manual_seed(seed)
    return ComP(tiny_cfg(variant, **kw), DIMS, 4 if task == "classification" else 1, task)


@pytest.mark.parametrize("variant", ["clean", "faithful"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("stage", [1, 2])
def test_output_shapes(variant: str, task: str, stage: int) -> None:
    """Fused and per-modality predictions are [B,S,C]; coordinator weights [B,S,3] only in stage 2."""
    model = build(variant, task)
    batch = make_batch([5, 3, 7], task)
    out = model(batch, stage)
    c = 4 if task == "classification" else 1
    assert out.logits.shape == (3, 7, c)
    assert set(out.head_logits) == set(MODALITIES)
    assert all(h.shape == (3, 7, c) for h in out.head_logits.values())
    if stage == 1:
        assert out.weights is None
    else:
        assert out.weights.shape == (3, 7, 3)
        assert torch.allclose(out.weights[batch.valid].sum(-1), torch.ones(int(batch.valid.sum())))
    loss, parts = comp_loss(out, batch, model.cfg, task, stage)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("variant", ["clean", "faithful"])
def test_single_utterance_conversation(variant: str) -> None:
    """A one-utterance conversation runs in both stages and both modes with finite outputs and gradients."""
    model = build(variant)
    batch = make_batch([1])
    for train in (True, False):
        model.train(train)
        for stage in (1, 2):
            out = model(batch, stage)
            assert out.logits.shape == (1, 1, 4) and torch.isfinite(out.logits).all()
    model.train()
    loss, _ = comp_loss(model(batch, 2), batch, model.cfg, "classification", 2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _warm_bank(model: ComP) -> None:
    model.train()
    with torch.no_grad():
        model(make_batch([6, 4, 8], seed=5), 2)
    model.eval()


def test_clean_eval_is_batch_independent() -> None:
    """Clean, eval mode: a conversation gets the same logits alone as in a batch of different lengths."""
    model = build("clean")
    _warm_bank(model)
    batch = make_batch([4, 9, 2, 6], seed=1)
    with torch.no_grad():
        together = model(batch, 2).logits
        alone = model(select(batch, 0), 2).logits
    assert torch.allclose(together[0, :4], alone[0], atol=1e-5)


def test_faithful_depends_on_batch() -> None:
    """Faithful, eval mode: prototypes pooled over the batch make the same conversation's logits differ."""
    model = build("faithful")
    model.eval()
    batch = make_batch([4, 9, 2, 6], seed=1)
    with torch.no_grad():
        together = model(batch, 2).logits
        alone = model(select(batch, 0), 2).logits
    assert (together[0, :4] - alone[0]).abs().max() > 1e-4


@pytest.mark.parametrize("train", [False, True])
def test_clean_padding_invariance(train: bool) -> None:
    """Clean: extra padding changes no real utterance's output (train mode without dropout, and eval)."""
    model = build("clean")
    _warm_bank(model)
    model.train(train)
    batch = make_batch([5, 3], seed=2)
    padded = pad_batch(batch, 11)
    with torch.no_grad():
        a, b = model(batch, 2), model(padded, 2)
    assert torch.allclose(a.logits, b.logits[:, :5], atol=1e-5)
    for u in MODALITIES:
        assert torch.allclose(a.head_logits[u], b.head_logits[u][:, :5], atol=1e-5)


def test_faithful_rejects_conversation_longer_than_max_len() -> None:
    """Faithful: a conversation longer than max_len is a clear error naming max_len."""
    model = build("faithful")
    with pytest.raises(ValueError, match="max_len"):
        model(make_batch([13]), 2)


def test_faithful_pad_row_equals_explicit_padding() -> None:
    """Faithful, eval: the time-axis grid built from one pad row equals encoding the zero-padded input."""
    model = build("faithful")
    model.eval()
    batch = make_batch([5, 3], seed=3)
    with torch.no_grad():
        present = batch.present & batch.valid[..., None]
        proj = model._encode(batch, present[batch.valid], pad_rows=1)
        layout = Layout.from_valid(batch.valid, present.permute(2, 0, 1))
        grid = model._time_grid(model.shared_enc(proj), layout)
        explicit = []
        for i, u in enumerate(MODALITIES):
            x = torch.nn.functional.pad(batch.features[u] * present[..., i:i + 1], (0, 0, 0, 12 - 5))
            explicit.append(model.in_proj[u](x))
        expected = model.shared_enc(torch.stack(explicit))
    assert torch.allclose(grid, expected, atol=1e-6)


def test_faithful_padding_slots_draw_their_own_dropout_in_training() -> None:
    """Faithful, training with dropout: each fixed-length padding slot gets its own dropout draw, as in the
    released code (so the time-axis prototypes see max_len - L different padding vectors, not one)."""
    model = build("faithful", drop=0.5)
    model.train()
    batch = make_batch([5, 3], seed=3)
    grids = []
    hook = model.prototypes.register_forward_hook(lambda mod, inp, out: grids.append(inp[0]))
    try:
        with torch.no_grad():
            model(batch, 2)
    finally:
        hook.remove()
    pads = grids[0][:, 1, 3:]  # [3, max_len - 3, D]: conversation 1's padding slots
    assert pads.shape[1] == 12 - 3
    assert not torch.allclose(pads[:, 0], pads[:, 1])
    # with every dropout probability at 0 the per-slot rows are identical: the same outputs and losses as the
    # one-row path of eval mode
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for stage in (1, 2):
        with torch.no_grad():
            slots = model(batch, stage)
            loss_slots, _ = comp_loss(slots, batch, model.cfg, "classification", stage)
            model.eval()
            one = model(batch, stage)
            loss_one, _ = comp_loss(one, batch, model.cfg, "classification", stage)
            model.train()
        assert torch.allclose(slots.logits, one.logits, atol=1e-5)
        assert loss_slots.item() == pytest.approx(loss_one.item(), rel=1e-5)


def test_attention_ignores_masked_keys_and_zeroes_keyless_queries() -> None:
    """Masked keys do not influence any query; a conversation with no valid key yields o = 0, no NaN."""
    torch.manual_seed(0)
    attn = MaskedSelfAttention(1, 8, 2, 0.0, 0.0)
    valid = torch.ones(2, 4, dtype=torch.bool)
    keys = torch.tensor([[[True, False, True, False], [False, False, False, False]]])
    layout = Layout.from_valid(valid, keys)
    x = torch.randn(1, 8, 8, requires_grad=True)
    out = attn(x, layout)
    x2 = x.detach().clone()
    x2[0, [1, 3]] += 5.0  # masked keys of conversation 0 (their own query rows change, others must not)
    out2 = attn(x2, layout)
    assert torch.allclose(out[0, [0, 2]], out2[0, [0, 2]], atol=1e-6)
    assert torch.allclose(out[0, 4:], attn.mlp(torch.zeros(1, 4, 8))[0], atol=1e-6)  # o = 0 -> Mlp(0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def _grad_modules(model: ComP, stage: int) -> set[str]:
    model.zero_grad(set_to_none=True)
    batch = make_batch([5, 3], seed=4)
    loss, _ = comp_loss(model(batch, stage), batch, model.cfg, "classification", stage)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("variant", ["clean", "faithful"])
def test_stage_switch_gradients(variant: str) -> None:
    """Stage 1 trains encoders, blocks and heads only; prompts, KP projections and the coordinator join in
    stage 2 (faithful's never-used modules get no gradient in either stage)."""
    model = build(variant, drop=0.1)
    stage1, stage2 = _grad_modules(model, 1), _grad_modules(model, 2)
    stage2_only = ("prototypes.", "pg1.", "pg2.", "kp1.in_proj.", "kp1.out_proj.", "kp2.in_proj.",
                   "coordinator.", "fusion.")
    assert not any(n.startswith(stage2_only) for n in stage1)
    assert any(n.startswith("kp1.block.") for n in stage1) and any(n.startswith("heads") for n in stage1)
    assert all(any(n.startswith(p) for n in stage2) for p in stage2_only)
    unused = {n for n, _ in model.named_parameters() if n.startswith(("unused_proj_n.", "kp2.out_proj."))}
    assert not unused & (stage1 | stage2)
    if variant == "faithful":
        assert unused and not any(n.startswith("decoders.") for n in stage1)
        assert any(n.startswith("private_enc.") for n in stage1)
    else:
        assert not unused and any(n.startswith("decoders.") for n in stage1)
        assert stage2 == {n for n, _ in model.named_parameters()}


def test_faithful_parameter_count_matches_released_code() -> None:
    """Faithful, D=256, depth 4, 2 heads, IEMOCAP-4 dims: 8,122,347 parameters, as the released model."""
    cfg = ModelConfig(variant="faithful", hidden=256, depth=4, heads=2, max_len=150)
    model = ComP(cfg, {"audio": 512, "text": 1024, "visual": 1024}, 4, "classification")
    assert sum(p.numel() for p in model.parameters()) == 8_122_347


def _signal_batch(gen: torch.Generator, task: str, n_conv: int = 6, length: int = 6) -> ComPBatch:
    """Every present modality carries its utterance's label in a fixed random direction, plus noise."""
    batch = make_batch([length] * n_conv, task, seed=int(torch.randint(0, 10_000, (1,), generator=gen)))
    if task == "classification":
        code = torch.nn.functional.one_hot(batch.targets, 4).float()
    else:
        code = batch.targets[..., None].expand(-1, -1, 4)
    for i, (u, d) in enumerate(DIMS.items()):
        direction = torch.randn(4, d, generator=torch.Generator().manual_seed(i))
        batch.features[u] = (batch.features[u] * 0.3 + 2.0 * code @ direction) * batch.present[..., i:i + 1]
    return batch


@pytest.mark.learning
@pytest.mark.parametrize("variant,task", [("clean", "classification"), ("faithful", "classification"),
                                          ("clean", "regression")])
def test_tiny_model_learns_label_encoded_in_features(variant: str, task: str) -> None:
    """A few dozen Adam steps fit a label written into the features (accuracy/MSE far from chance)."""
    from comp.modulator import GradientModulator

    model = build(variant, task, drop=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gm = GradientModulator(model, model.cfg, task)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for stage, steps in ((1, 20), (2, 50)):
        for _ in range(steps):
            batch = _signal_batch(gen, task)
            model.train()
            out = model(batch, stage)
            loss, _ = comp_loss(out, batch, model.cfg, task, stage)
            first = first if first is not None else float(loss.detach())
            last = float(loss.detach())
            opt.zero_grad()
            loss.backward()
            gm.apply(out, batch)
            opt.step()
    assert last < first
    model.eval()
    test = _signal_batch(torch.Generator().manual_seed(99), task, n_conv=8)
    with torch.no_grad():
        out = model(test, 2)
    if task == "classification":
        acc = (out.logits.argmax(-1) == test.targets)[test.valid].float().mean()
        assert acc > 0.6  # chance is 0.25
    else:
        mse = ((out.logits[..., 0] - test.targets) ** 2)[test.valid].mean()
        assert mse < 0.3 * test.targets[test.valid].var()


FLIPPABLE = ["gradient_modulator", "prompt_mask", "batch_prototypes", "outer_prompt_mlp", "stage1_reconstruction",
             "disentangle", "private_a_for_all", "double_unimodal_loss", "fuse_absent", "unused_params",
             "projected_reconstruction"]


@pytest.mark.parametrize("variant", ["clean", "faithful"])
@pytest.mark.parametrize("flag", FLIPPABLE)
def test_every_single_quirk_flip_trains(variant: str, flag: str) -> None:
    """Each §9 switch flipped alone from either variant gives a model whose two stages run and backpropagate."""
    from comp.modulator import GradientModulator

    default = getattr(ModelConfig(variant=variant).resolved, flag)
    model = build(variant, drop=0.1, **{flag: not default})
    gm = GradientModulator(model, model.cfg, "classification")
    batch = make_batch([4, 2], seed=6)
    for stage in (1, 2):
        model.zero_grad(set_to_none=True)
        out = model(batch, stage)
        loss, _ = comp_loss(out, batch, model.cfg, "classification", stage)
        loss.backward()
        gm.apply(out, batch)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------- masking by presence

def _drop_utterance(batch: ComPBatch, conv: int, pos: int) -> ComPBatch:
    """Conversation `conv` alone with utterance `pos` removed (later ones move up)."""
    n = int(batch.valid[conv].sum())
    keep = [i for i in range(n) if i != pos]
    return ComPBatch({u: f[conv:conv + 1, keep] for u, f in batch.features.items()}, batch.present[conv:conv + 1, keep],
                     batch.valid[conv:conv + 1, keep], batch.targets[conv:conv + 1, keep])


@pytest.mark.parametrize("variant", ["clean", "faithful"])
def test_an_absent_modality_is_not_attended_to(variant: str) -> None:
    """Stage 1 (attention only): an utterance whose audio is absent takes no part in the others' audio stream,
    so removing it from the conversation leaves every other utterance's audio head unchanged, while removing a
    present one changes them (the absent row is a zero input, but its key would still be a learned vector)."""
    model = build(variant)
    model.eval()
    batch = select(make_batch([6], seed=11), 0)
    batch.present[0, :, 0] = True
    batch.present[0, 2, 0] = False
    batch.features["audio"][0, 2] = 0.0
    with torch.no_grad():
        full = model(batch, 1).head_logits["audio"][0]
        without_absent = model(_drop_utterance(batch, 0, 2), 1).head_logits["audio"][0]
        without_present = model(_drop_utterance(batch, 0, 3), 1).head_logits["audio"][0]
    others = [0, 1, 3, 4, 5]
    assert torch.allclose(full[others], without_absent, atol=1e-5)
    assert (full[[0, 1, 2, 4, 5]] - without_present).abs().max() > 1e-4


def test_clean_utterance_with_nothing_present_leaves_the_others_alone() -> None:
    """Clean stage 2, eval: appending an utterance with every modality absent changes no other prediction."""
    model = build("clean")
    _warm_bank(model)
    batch = select(make_batch([5], seed=12), 0)
    longer = pad_batch(batch, 6)
    longer.valid[0, 5] = True
    longer.targets[0, 5] = 0
    with torch.no_grad():
        a, b = model(batch, 2), model(longer, 2)
    assert torch.allclose(a.logits[0], b.logits[0, :5], atol=1e-5)


def _prompts(model: ComP, batch: ComPBatch, stage: int = 2) -> list[torch.Tensor]:
    """The outputs [3,N,p] of both prompt-generation blocks in one forward pass."""
    seen: list[torch.Tensor] = []
    hooks = [pg.register_forward_hook(lambda mod, inp, out: seen.append(out)) for pg in (model.pg1, model.pg2)]
    try:
        with torch.no_grad():
            model(batch, stage)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_clean_prompts_of_absent_modalities_are_zero() -> None:
    """Clean (prompt_mask): an absent modality sends no prompt to the others, in both PG blocks and both modes;
    present modalities do send one."""
    model = build("clean")
    _warm_bank(model)
    batch = make_batch([6, 4, 7], seed=13)
    present = (batch.present & batch.valid[..., None])[batch.valid].t()  # [3,N] packed like the prompts
    assert (~present).any() and present.any()
    for train in (False, True):
        model.train(train)
        for prompts in _prompts(model, batch):
            assert torch.all(prompts[~present] == 0)
            assert prompts[present].abs().sum(-1).min() > 0


def test_clean_prototypes_learn_from_present_instances_only() -> None:
    """Clean, training: a conversation whose audio is absent throughout does not move the audio prototype bank
    (its absent rows are all the same zero-input vector and must not become prototypes), while it does move
    the text bank, where it is present."""
    def bank_after(batch: ComPBatch) -> torch.Tensor:
        model = build("clean")
        model.train()
        with torch.no_grad():
            model(batch, 2)
        return model.prototypes.bank.clone()

    base = make_batch([5, 6], seed=14)
    extra = make_batch([5, 6, 4], seed=14)
    extra.present[2, :, 0] = False
    extra.present[2, :4, 1] = True
    extra.features["audio"][2] = 0.0
    for u in MODALITIES:
        extra.features[u][:2], extra.present[:2] = base.features[u][:, :6], base.present[:, :6]
    a, b = bank_after(base), bank_after(extra)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_variant_defaults_follow_the_documented_table() -> None:
    """The switch values of both variants as docs/model.md §9 lists them."""
    faithful, clean = ModelConfig(variant="faithful").resolved, ModelConfig(variant="clean").resolved
    assert faithful.fuse_absent and clean.fuse_absent
    assert (faithful.prompt_mask, clean.prompt_mask) == (False, True)
    assert (faithful.raw_features, faithful.zero_vectors_present, faithful.fp32) == (True, True, True)
    assert (clean.raw_features, clean.zero_vectors_present, clean.fp32) == (False, False, False)


def test_clean_prototypes_pool_each_prototype_over_the_instances() -> None:
    """Clean prototypes: each prototype is a convex combination of the present instances (softmax over
    instances), so identical instances v give every prototype exactly v before the mixing layer."""
    from comp.prompts import InstancePrototypes

    torch.manual_seed(0)
    protos = InstancePrototypes(1, 4, 3, drop=0.0, ema=0.5)
    with torch.no_grad():
        protos.mix.weight.copy_(torch.eye(3)[None])
        protos.mix.bias.zero_()
    v = torch.tensor([0.5, -1.0, 2.0, 0.25])
    z = v.expand(1, 7, 4).clone()
    member = torch.ones(1, 7, dtype=torch.bool)
    member[0, 5:] = False
    out, logits = protos.train()(z, member)
    assert logits.shape == (1, 7, 3)
    assert torch.allclose(out[0], torch.nn.functional.gelu(v).expand(3, 4), atol=1e-6)


def test_clean_prompt_has_the_outer_mlp_and_trains_it() -> None:
    """Clean (outer_prompt_mlp, paper eq. 8): both PG blocks end in MLP_p, which gets gradients in stage 2;
    faithful has none."""
    clean, faithful = build("clean"), build("faithful")
    assert not any(".proj_out." in n for n, _ in faithful.named_parameters())
    trained = _grad_modules(clean, 2)
    for pg in ("pg1", "pg2"):
        assert any(n.startswith(f"{pg}.proj_out.") for n in trained)
