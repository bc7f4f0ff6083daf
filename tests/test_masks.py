"""Missing-modality masks: the protocol generator, parsing, fixed conditions, and how masks meet the data."""

import numpy as np
import pytest
import torch

from comp.batch import ComPBatch
from comp.data import Batch, Conversation
from comp.masks import (
    MissingSpec,
    combine,
    condition_mask,
    mask_batch,
    mask_conversations,
    parse_missing,
    random_mask,
    test_mask,
)

# docs/model.md §3.2: MR -> (realised missing rate, fraction of rows with 1 / 2 / 3 modalities), N = 32 * 150
PROTOCOL_TABLE = {
    0.1: (0.097, (0.02, 0.25, 0.73)),
    0.2: (0.200, (0.08, 0.44, 0.48)),
    0.3: (0.301, (0.20, 0.50, 0.30)),
    0.4: (0.402, (0.36, 0.49, 0.15)),
    0.5: (0.503, (0.56, 0.38, 0.06)),
    0.6: (0.605, (0.82, 0.17, 0.01)),
    0.7: (0.667, (1.00, 0.00, 0.00)),
}
N_PROTOCOL = 32 * 150


@pytest.mark.parametrize("mr", sorted(PROTOCOL_TABLE))
def test_random_mask_matches_protocol_table(mr):
    """The realised missing rate and the 1/2/3-modality shares match the protocol's table."""
    rate, shares = PROTOCOL_TABLE[mr]
    m = random_mask(3, N_PROTOCOL, mr, np.random.default_rng(123))
    assert m.shape == (N_PROTOCOL, 3) and m.dtype == bool
    assert abs((1 - m.mean()) - rate) <= 0.01
    counts = m.sum(axis=1)
    for k, share in zip((1, 2, 3), shares):
        # 0.04: the table's MR 0.2 row (0.08/0.44) is ~0.015 off the algorithm's own binomial shares
        # (q^2, 2q(1-q), (1-q)^2 with q = 0.69: 0.10/0.43/0.48), plus sampling noise on 4800 rows
        assert abs(np.mean(counts == k) - share) <= 0.04, (k, np.mean(counts == k), share)


@pytest.mark.parametrize("mr", [0.1, 0.3, 0.5, 0.6, 0.7])
def test_random_mask_keeps_at_least_one_modality(mr):
    """Every row keeps at least one modality, on large and on tiny inputs."""
    rng = np.random.default_rng(0)
    for n in (1, 5, 31, 33, 500):
        m = random_mask(3, n, mr, rng)
        assert m.shape == (n, 3) and m.any(axis=1).all()  # (an empty mask would pass .all() vacuously)


def test_random_mask_with_two_modalities_and_its_limits():
    """Two views work like three (a bimodal store); fewer than two views, or MR 1, are refused."""
    m = random_mask(2, 400, 0.3, np.random.default_rng(2))
    assert m.shape == (400, 2) and m.any(axis=1).all() and abs(1 - m.mean() - 0.3) <= 0.01
    assert (m.sum(axis=1) == 1).any() and (m.sum(axis=1) == 2).any()
    with pytest.raises(ValueError):
        random_mask(1, 10, 0.3, np.random.default_rng(0))
    with pytest.raises(ValueError):
        random_mask(3, 10, 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("mr", [0.5, 0.6, 0.7])  # rates where many utterances keep a single modality
def test_random_mask_lets_every_modality_be_the_one_kept(mr):
    """Every modality is drawn as the preserved (or only) one about equally often: no modality is exempt from
    going missing, and none is never left alone."""
    m = random_mask(3, 3000, mr, np.random.default_rng(5))
    alone = m[m.sum(axis=1) == 1]
    share = np.bincount(alone.argmax(axis=1), minlength=3) / len(alone)
    np.testing.assert_allclose(share, 1 / 3, atol=0.05)
    np.testing.assert_allclose(m.mean(axis=0), m.mean(), atol=0.05)  # each modality missing at the same rate


def test_random_mask_mr07_is_one_hot():
    """MR 0.7 keeps exactly one modality per utterance (realised rate 2/3)."""
    m = random_mask(3, 1000, 0.7, np.random.default_rng(5))
    assert np.all(m.sum(axis=1) == 1)


def test_random_mask_small_n_returns_n_rows():
    """A request below 32 rows is corrected on 32 rows and cut to the n asked for."""
    assert random_mask(3, 7, 0.3, np.random.default_rng(1)).shape == (7, 3)


def test_random_mask_is_deterministic_given_the_generator_seed():
    """The same seed gives the same mask; another seed gives another mask."""
    a = random_mask(3, 300, 0.4, np.random.default_rng(9))
    b = random_mask(3, 300, 0.4, np.random.default_rng(9))
    c = random_mask(3, 300, 0.4, np.random.default_rng(10))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_random_mask_mr0_keeps_everything():
    """MR 0 removes nothing."""
    assert random_mask(3, 50, 0.0, np.random.default_rng(0)).all()


def test_parse_missing_accepts_the_three_forms():
    """natural, random:R and fixed:C[,C] parse into specs with canonical labels."""
    assert parse_missing("natural") == MissingSpec("natural")
    assert parse_missing("random:0.3") == MissingSpec("random", rate=0.3)
    assert parse_missing("random:0.3").label == "random:0.3"
    assert parse_missing("random:0").rate == 0.0 and parse_missing("random:0.7").rate == 0.7  # both ends
    assert parse_missing("fixed:ta").label == "fixed:at"
    assert [s.label for s in parse_missing("fixed:a,tv,atv").runs()] == ["fixed:a", "fixed:tv", "fixed:atv"]
    # one trained model per condition: two conditions split too, one-condition and other specs stay whole
    assert parse_missing("fixed:a,tv").runs() == [MissingSpec("fixed", conditions=("a",)),
                                                  MissingSpec("fixed", conditions=("tv",))]
    for whole in ("fixed:av", "random:0.3", "natural"):
        assert parse_missing(whole).runs() == [parse_missing(whole)]


@pytest.mark.parametrize("bad", ["", "random", "random:0.8", "random:-0.1", "random:x", "fixed:", "fixed:q",
                                 "fixed:aa", "natural:1", "mcar:0.1"])
def test_parse_missing_rejects_other_values(bad):
    """Anything else is a ValueError that shows the accepted forms."""
    with pytest.raises(ValueError, match="random:R"):
        parse_missing(bad)


def test_condition_mask_keeps_the_named_modalities():
    """fixed:av keeps audio and visual for every row, in audio/text/visual column order."""
    m = condition_mask("av", 4)
    assert m.shape == (4, 3) and np.array_equal(m, np.tile([True, False, True], (4, 1)))


def _natural(n, seed=0):
    rng = np.random.default_rng(seed)
    nat = rng.random((n, 3)) < 0.7
    nat[~nat.any(axis=1), 1] = True
    return nat


def test_test_mask_never_resurrects_absent_modalities():
    """A modality the data lacks stays absent whatever the simulated pattern."""
    nat = _natural(400)
    ids = [f"clip{i:04d}" for i in range(400)]
    for spec in (parse_missing("random:0.1"), parse_missing("fixed:atv"), parse_missing("natural")):
        mask, _ = test_mask(spec, ids, nat, seed=3)
        assert not np.any(mask & ~nat)


def test_test_mask_is_identical_across_calls_and_row_orders():
    """The same (seed, clip) gets the same mask whatever the order the clips come in."""
    n = 300
    ids = np.array([f"c{i}" for i in range(n)], dtype=object)
    nat = np.ones((n, 3), dtype=bool)
    spec = parse_missing("random:0.4")
    a, _ = test_mask(spec, ids.tolist(), nat, seed=7)
    b, _ = test_mask(spec, ids.tolist(), nat, seed=7)
    perm = np.random.default_rng(1).permutation(n)
    c, _ = test_mask(spec, ids[perm].tolist(), nat[perm], seed=7)
    assert np.array_equal(a, b)
    assert np.array_equal(a[perm], c)
    d, _ = test_mask(spec, ids.tolist(), nat, seed=8)
    assert not np.array_equal(a, d)


def test_rows_left_with_nothing_are_kept_and_counted():
    """Clips whose only modality is removed stay in with no modality, and are counted."""
    nat = np.tile([False, False, True], (6, 1))  # visual only
    mask, all_absent = test_mask(parse_missing("fixed:at"), [f"x{i}" for i in range(6)], nat, seed=0)
    assert mask.shape == (6, 3) and not mask.any() and all_absent == 6
    assert combine(np.ones((2, 3), bool), np.eye(3, dtype=bool)[:2])[1] == 0


def _conversation(name, n, dim=4):
    feats = {m: np.ones((n, dim), np.float32) for m in ("audio", "text", "visual")}
    return Conversation(id=name, clip_ids=np.array([f"{name}_{i}" for i in range(n)], dtype=object),
                        features=feats, present=np.ones((n, 3), bool), targets=np.zeros(n, np.int64),
                        labelled=np.ones(n, bool))


def test_mask_conversations_same_clip_same_mask_whatever_the_grouping():
    """Test masks depend on the clip, not on which conversations are masked together or in what order."""
    convs = [_conversation(f"d{k}", 20 + k) for k in range(5)]
    spec = parse_missing("random:0.5")
    a, _ = mask_conversations(convs, spec, seed=66)
    b, _ = mask_conversations(convs[::-1], spec, seed=66)
    by_clip_a = {cid: tuple(p) for c in a for cid, p in zip(c.clip_ids, c.present)}
    by_clip_b = {cid: tuple(p) for c in b for cid, p in zip(c.clip_ids, c.present)}
    assert by_clip_a == by_clip_b
    for c in a:  # removed modalities carry zero features
        for i, m in enumerate(("audio", "text", "visual")):
            assert np.all(c.features[m][~c.present[:, i]] == 0)


def _batch(lengths, dim=2):
    b, s = len(lengths), max(lengths)
    valid = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    present = valid[..., None].expand(b, s, 3).clone()
    present[0, :, 2] = False  # the first conversation has no visual at all
    feats = {m: torch.ones(b, s, dim) * valid[..., None] for m in ("audio", "text", "visual")}
    feats["visual"][0] = 0
    cb = ComPBatch(features=feats, present=present, valid=valid, targets=torch.zeros(b, s, dtype=torch.long))
    return Batch(batch=cb, clip_ids=np.full((b, s), None, dtype=object), labelled=valid.clone(),
                 conversation_ids=tuple(str(i) for i in range(b)))


def test_mask_batch_draws_on_real_utterances_and_respects_natural_flags():
    """A training mask touches no padding, resurrects nothing, zeroes removed features, and hits the rate."""
    batch = _batch([400, 250, 600, 90])
    masked, _ = mask_batch(batch, parse_missing("random:0.3"), np.random.default_rng(0))
    p, nat, valid = masked.batch.present, batch.batch.present, batch.batch.valid
    assert not torch.any(p & ~nat)
    assert not torch.any(p[~valid])
    for i, m in enumerate(("audio", "text", "visual")):
        assert torch.all(masked.batch.features[m][~p[..., i]] == 0)
    # on conversations with all three modalities the protocol's rate holds
    full = valid.clone()
    full[0] = False
    assert abs(1 - p[full].float().mean().item() - 0.3) < 0.02


def test_mask_batch_counts_real_utterances_left_with_no_modality_never_padding():
    """The all-absent count (logged and reported per run) is over real utterances only: padding, which has
    no modality by construction, never counts; natural flags alone give the utterances recorded empty."""
    batch = _batch([6, 3, 5])
    batch.batch.present[1, :2] = False  # two real utterances recorded with nothing
    _, natural_count = mask_batch(batch, parse_missing("natural"), np.random.default_rng(0))
    assert natural_count == 2
    masked, count = mask_batch(batch, parse_missing("random:0.7"), np.random.default_rng(0))
    p, valid = masked.batch.present, batch.batch.valid
    assert count == int((valid & ~p.any(dim=-1)).sum()) >= 2
    assert int((~valid & ~p.any(dim=-1)).sum()) > 0  # padding has nothing, and is not counted


def test_mask_batch_redraws_per_batch():
    """Two draws from one Generator give two different training masks."""
    batch = _batch([50, 50])
    rng = np.random.default_rng(1)
    a, _ = mask_batch(batch, parse_missing("random:0.5"), rng)
    b, _ = mask_batch(batch, parse_missing("random:0.5"), rng)
    assert not torch.equal(a.batch.present, b.batch.present)
