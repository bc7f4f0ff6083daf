"""Synthetic feature stores: partial per-modality signal, conversation context, missingness, folds, sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from core.clip import MODALITIES
from demo.synthetic import (
    IEMOCAP_SESSIONS,
    MISSING_REASONS,
    make_iemocap_sized_store,
    make_synthetic_store,
    modality_groups,
)
from pipeline.store import read_store

NO_MISSING = {"audio": 0.0, "text": 0.0, "visual": 0.0}


def _fused(data):
    return np.hstack([data.features[m] for m in MODALITIES])


def _lr_accuracy(x, data) -> float:
    """Logistic regression trained on fold 1, scored on fold 2 (conversation-disjoint)."""
    train, test = data.fold == 1, data.fold == 2
    model = LogisticRegression(max_iter=1000).fit(x[train], data.label[train])
    return model.score(x[test], data.label[test])


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "clean.h5"
    return read_store(make_synthetic_store(path, n_conversations=150, utterances=(4, 8),
                                           natural_missing=NO_MISSING, folds=2, seed=3))


def test_fusion_beats_every_single_modality(clean_store):
    """Fused LR accuracy is far above each single-modality LR, and all are well above chance."""
    single = {m: _lr_accuracy(clean_store.features[m], clean_store) for m in MODALITIES}
    fused = _lr_accuracy(_fused(clean_store), clean_store)
    chance = 1 / len(clean_store.header.label_names)
    assert fused > max(single.values()) + 0.25, (fused, single)
    assert min(single.values()) > chance + 0.1, single
    assert fused > 0.8


def test_any_two_modalities_resolve_what_one_cannot():
    """Each modality merges the 4 classes in pairs, and any two modalities together tell all 4 apart."""
    groups = modality_groups(4, np.random.default_rng(0))
    for g in groups:
        assert sorted(Counter(g.tolist()).values()) == [2, 2]
    for i in range(3):
        for j in range(i + 1, 3):
            assert len({(groups[i, k], groups[j, k]) for k in range(4)}) == 4


def test_conversation_context_helps_when_offset(tmp_path):
    """With conversation_offset, LR on [x, conversation mean of x] beats LR on x alone."""
    data = read_store(make_synthetic_store(tmp_path / "conv.h5", n_conversations=150, utterances=(4, 10),
                                           natural_missing=NO_MISSING, conversation_offset=2.0, folds=2, seed=1))
    x = _fused(data)
    _, conv = np.unique(data.conversation, return_inverse=True)
    sums = np.zeros((conv.max() + 1, x.shape[1]))
    np.add.at(sums, conv, x)
    context = (sums / np.bincount(conv)[:, None])[conv]
    alone, with_context = _lr_accuracy(x, data), _lr_accuracy(np.hstack([x, context]), data)
    assert with_context > alone + 0.05, (alone, with_context)


def test_regression_values_in_range_and_fusion_helps(tmp_path):
    """Regression targets lie in [-3, 3] and fused linear R^2 beats each single modality's."""
    data = read_store(make_synthetic_store(tmp_path / "reg.h5", task="regression", n_conversations=120,
                                           utterances=(4, 8), natural_missing=NO_MISSING, folds=2, seed=2))
    assert data.header.task == "regression" and data.header.label_names == ()
    assert data.value.min() >= -3.0 and data.value.max() <= 3.0 and np.isfinite(data.value).all()
    assert set(data.label.tolist()) == {""}
    train, test = data.fold == 1, data.fold == 2

    def r2(x):
        return LinearRegression().fit(x[train], data.value[train]).score(x[test], data.value[test])

    single = max(r2(data.features[m]) for m in MODALITIES)
    assert r2(_fused(data)) > single + 0.2


def test_same_seed_same_store_other_seed_differs(tmp_path):
    """The seed fixes every column; another seed changes them."""
    a = read_store(make_synthetic_store(tmp_path / "a.h5", seed=7))
    b = read_store(make_synthetic_store(tmp_path / "b.h5", seed=7))
    c = read_store(make_synthetic_store(tmp_path / "c.h5", seed=8))
    for col in ("ids", "conversation", "position", "speaker", "label", "fold", "split"):
        assert getattr(a, col).tolist() == getattr(b, col).tolist()
    for m in MODALITIES:
        np.testing.assert_array_equal(a.features[m], b.features[m])
        assert a.reason[m].tolist() == b.reason[m].tolist()
    assert len(a) != len(c) or not np.array_equal(a.features["audio"], c.features["audio"])


def test_shapes_dims_and_conversation_lengths(tmp_path):
    """Rows, dims, positions and conversation lengths follow the arguments."""
    dims = {"audio": 5, "text": 7, "visual": 3}
    data = read_store(make_synthetic_store(tmp_path / "s.h5", n_conversations=12, utterances=(2, 5), dims=dims,
                                           n_classes=6, seed=4))
    assert {m: data.features[m].shape[1] for m in MODALITIES} == dims
    assert {m: data.header.modalities[m].dim for m in MODALITIES} == dims
    lengths = Counter(data.conversation.tolist())
    assert len(lengths) == 12 and all(2 <= n <= 5 for n in lengths.values())
    for conv, n in lengths.items():
        assert sorted(data.position[data.conversation == conv].tolist()) == list(range(n))
    assert set(data.label.tolist()) <= set(data.header.label_names) and len(data.header.label_names) == 6


def test_natural_missingness_is_explicit_and_never_total(tmp_path):
    """Absent modalities have zero vectors and an extractor-style reason, and no utterance loses all three."""
    rates = {"audio": 0.6, "text": 0.6, "visual": 0.6}
    data = read_store(make_synthetic_store(tmp_path / "m.h5", n_conversations=100, natural_missing=rates, seed=5))
    present = np.stack([data.present[m] for m in MODALITIES], axis=1)
    assert present.any(axis=1).all()
    for m in MODALITIES:
        absent = ~data.present[m]
        assert 0.4 < absent.mean() < 0.65
        assert not data.features[m][absent].any()
        assert set(data.reason[m][absent].tolist()) <= set(MISSING_REASONS[m])
        assert set(data.reason[m][~absent].tolist()) == {""}


def test_folds_balanced_by_conversation(tmp_path):
    """folds=K puts each conversation in one of folds 1..K, fold sizes differing by at most one."""
    data = read_store(make_synthetic_store(tmp_path / "f.h5", n_conversations=23, folds=5, seed=6))
    conv_fold = {c: set(data.fold[data.conversation == c].tolist()) for c in set(data.conversation.tolist())}
    assert all(len(f) == 1 for f in conv_fold.values())
    per_fold = Counter(next(iter(f)) for f in conv_fold.values())
    assert set(per_fold) == {1, 2, 3, 4, 5} and max(per_fold.values()) - min(per_fold.values()) <= 1


def test_splits_by_conversation(tmp_path):
    """splits=True gives every conversation one of train/val/test, all three used."""
    data = read_store(make_synthetic_store(tmp_path / "t.h5", n_conversations=20, splits=True, seed=6))
    conv_split = {c: set(data.split[data.conversation == c].tolist()) for c in set(data.conversation.tolist())}
    assert all(len(s) == 1 for s in conv_split.values())
    assert Counter(next(iter(s)) for s in conv_split.values()) == {"train": 14, "val": 2, "test": 4}
    assert set(data.fold.tolist()) == {0}


def test_iemocap_sized_store_counts(tmp_path):
    """The IEMOCAP-sized store has 151 conversations, 5,531 utterances, its sessions, max 110, 512/1024/1024."""
    data = read_store(make_iemocap_sized_store(tmp_path / "iemo.h5", seed=0))
    assert len(data) == 5531 and len(set(data.conversation.tolist())) == 151
    assert max(Counter(data.conversation.tolist()).values()) == 110
    for s, (n_conv, n_utt) in enumerate(IEMOCAP_SESSIONS, start=1):
        in_fold = data.fold == s
        assert in_fold.sum() == n_utt and len(set(data.conversation[in_fold].tolist())) == n_conv
    assert {m: data.features[m].shape[1] for m in MODALITIES} == {"audio": 512, "text": 1024, "visual": 1024}
    assert data.header.label_names == ("happy", "sad", "neutral", "angry")


def test_bad_arguments_rejected(tmp_path):
    """Unknown modality keys and impossible ranges are errors that name the argument."""
    with pytest.raises(ValueError, match="dims"):
        make_synthetic_store(tmp_path / "x.h5", dims={"audio": 4, "text": 4})
    with pytest.raises(ValueError, match="utterances"):
        make_synthetic_store(tmp_path / "x.h5", utterances=(5, 2))
    with pytest.raises(ValueError, match="natural_missing"):
        make_synthetic_store(tmp_path / "x.h5", natural_missing={"audio": 1.0, "text": 0.0, "visual": 0.0})
