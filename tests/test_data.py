"""Conversations from the store, evaluation plans for the three store kinds, normalisation, batching."""

import math

import numpy as np
import pytest
import torch

from comp.config import TrainConfig
from comp.data import DataError, Normalizer, build_conversations, iterate_batches, pack, plan_folds
from comp.masks import mask_conversations, mask_packed, parse_missing
from core.records import ClipRecord, ModalityInfo, ModalityValue, StoreHeader
from pipeline.store import read_store, write_store

DIMS = {"audio": 3, "text": 4, "visual": 2}
LABELS = ("neu", "hap", "sad")


def make_store(tmp_path, conversations, *, fold=None, split=None, task="classification", absent=None,
               unlabelled=(), seed=0, speaker=None, label_of=None, in_order=False):
    """A store with `conversations` = {name: n utterances}; fold/split map name -> value; absent maps a clip
    id to the modalities it lacks; positions are written in reverse so that ordering is tested, unless
    `in_order`."""
    rng = np.random.default_rng(seed)
    header = StoreHeader(task=task, label_names=LABELS if task == "classification" else (),
                         modalities={m: ModalityInfo(d) for m, d in DIMS.items()}, source="test")
    records = []
    for name, n in conversations.items():
        for pos in (range(n) if in_order else reversed(range(n))):
            cid = f"{name}_{pos:03d}"
            lacks = (absent or {}).get(cid, ())
            mods = {m: (ModalityValue(None, "no-face") if m in lacks else
                        ModalityValue(rng.normal(size=d).astype(np.float32) + pos))
                    for m, d in DIMS.items()}
            lab = "" if cid in unlabelled else (label_of or {}).get(name, LABELS[pos % 3])
            val = math.nan if cid in unlabelled else float(pos % 5 - 2)
            records.append(ClipRecord(id=cid, modalities=mods, conversation=name, position=pos,
                                      label=lab if task == "classification" else "",
                                      value=val if task == "regression" else math.nan,
                                      fold=(fold or {}).get(name, 0), split=(split or {}).get(name, ""),
                                      speaker=(speaker or {}).get(name, "")))
    path = tmp_path / "feats.h5"
    write_store(path, header, records, overwrite=True)
    return read_store(path)


def test_conversations_are_grouped_and_ordered_by_position(tmp_path):
    """Rows group by conversation and follow `position`, with labels as class indices."""
    data = make_store(tmp_path, {"d1": 4, "d2": 2})
    convs = build_conversations(data)
    assert [c.id for c in convs] == ["d1", "d2"]
    assert convs[0].clip_ids.tolist() == ["d1_000", "d1_001", "d1_002", "d1_003"]
    assert convs[0].targets.tolist() == [0, 1, 2, 0]  # LABELS[pos % 3]
    assert convs[0].present.shape == (4, 3) and convs[0].features["text"].shape == (4, 4)


def test_unlabelled_rows_stay_in_their_conversation_but_are_not_scored(tmp_path):
    """An unlabelled clip keeps its place (context) and has labelled=False."""
    data = make_store(tmp_path, {"d1": 3}, unlabelled={"d1_001"})
    c = build_conversations(data)[0]
    assert c.clip_ids.tolist() == ["d1_000", "d1_001", "d1_002"]
    assert c.labelled.tolist() == [True, False, True]


def test_regression_targets_and_missing_values(tmp_path):
    """Regression targets are float values; NaN values become unlabelled rows with target 0."""
    data = make_store(tmp_path, {"d1": 3}, task="regression", unlabelled={"d1_002"})
    c = build_conversations(data)[0]
    assert c.targets.dtype == np.float32 and c.targets.tolist() == [-2.0, -1.0, 0.0]
    assert c.labelled.tolist() == [True, True, False]


def _all_ids(plan):
    return set(plan.train) | set(plan.val) | set(plan.test)


def test_fold_store_gives_leave_one_fold_out_with_val_outside_the_test_fold(tmp_path):
    """Five sessions give five plans; val comes from the training folds and never overlaps test."""
    convs = {f"s{f}_d{k}": 3 for f in range(1, 6) for k in range(4)}
    fold = {name: int(name[1]) for name in convs}
    data = make_store(tmp_path, convs, fold=fold)
    plans = plan_folds(data, TrainConfig(val_fraction=0.25))
    assert [p.name for p in plans] == ["1", "2", "3", "4", "5"]
    for p in plans:
        assert set(p.test) == {n for n in convs if fold[n] == int(p.name)}
        assert p.val and not set(p.val) & set(p.test) and not set(p.val) & set(p.train)
        assert all(fold[n] != int(p.name) for n in p.val)
        assert _all_ids(p) == set(convs)


def test_fold_selection_and_unknown_folds(tmp_path):
    """folds='1,3' runs those two; a fold the store lacks is a clear error."""
    convs = {f"s{f}_d{k}": 2 for f in range(1, 4) for k in range(3)}
    data = make_store(tmp_path, convs, fold={n: int(n[1]) for n in convs})
    assert [p.name for p in plan_folds(data, TrainConfig(folds="1,3"))] == ["1", "3"]
    with pytest.raises(DataError, match="folds"):
        plan_folds(data, TrainConfig(folds="7"))


def _speakers_of(names, speaker):
    return {speaker[n] for n in names}


def _actor_store(tmp_path, *, shared_speakers=False, split=None):
    """Four folds of three actors, two one-clip conversations per actor (RAVDESS-like). With
    `shared_speakers`, actor names repeat across folds (the evaluation is then not speaker-independent)."""
    convs, fold, speaker = {}, {}, {}
    for f in range(1, 5):
        for a in range(3):
            for k in range(2):
                name = f"f{f}_a{a}_c{k}"
                convs[name], fold[name] = 1, f
                speaker[name] = f"actor{a}" if shared_speakers else f"actor{f}{a}"
    split_map = {n: split(fold[n]) for n in convs} if split else None
    return convs, fold, speaker, make_store(tmp_path, convs, fold=fold, speaker=speaker, split=split_map)


def test_validation_is_held_out_by_speaker_when_test_speakers_are_unseen(tmp_path):
    """Speaker-independent folds: validation speakers speak in neither training nor test."""
    convs, fold, speaker, data = _actor_store(tmp_path)
    for p in plan_folds(data, TrainConfig(val_fraction=0.2)):
        val_s, train_s, test_s = (_speakers_of(x, speaker) for x in (p.val, p.train, p.test))
        assert val_s and not val_s & train_s and not val_s & test_s and not train_s & test_s
        # whole speakers: every conversation of a validation actor is in val
        assert set(p.val) == {n for n in convs if speaker[n] in val_s}


def test_shared_speakers_fall_back_to_conversations_and_speaker_insists(tmp_path):
    """When test speakers also train, auto holds out conversations; val_by=speaker refuses with the reason."""
    convs, fold, speaker, data = _actor_store(tmp_path, shared_speakers=True)
    plans = plan_folds(data, TrainConfig(val_fraction=0.2, seed=3))
    assert all(p.val for p in plans)
    assert any(_speakers_of(p.val, speaker) & _speakers_of(p.train, speaker) for p in plans)
    with pytest.raises(DataError, match="share speakers with the test"):
        plan_folds(data, TrainConfig(val_by="speaker"))


def test_plan_picks_split_or_folds_from_one_store(tmp_path):
    """A store with both folds and a split: auto and plan=folds run the folds, plan=split the split, and the
    split's missing val is held out by actor."""
    convs, fold, speaker, data = _actor_store(tmp_path, split=lambda f: "test" if f == 4 else "train")
    assert [p.name for p in plan_folds(data, TrainConfig())] == ["1", "2", "3", "4"]
    plan, = plan_folds(data, TrainConfig(plan="split", val_fraction=0.2))
    assert plan.name == "split" and set(plan.test) == {n for n in convs if fold[n] == 4}
    assert not _speakers_of(plan.val, speaker) & _speakers_of(plan.train, speaker)
    with pytest.raises(DataError, match="plan=folds"):
        plan_folds(make_store(tmp_path, {"d1": 2, "d2": 2}), TrainConfig(plan="folds"))
    with pytest.raises(ValueError, match="plan must be"):
        TrainConfig(plan="kfold")


def test_random_split_by_speaker_keeps_three_parts_apart(tmp_path):
    """val_by=speaker on a store without split or fold: train, val and test speakers are disjoint."""
    convs = {f"a{a}_c{k}": 1 for a in range(10) for k in range(3)}
    speaker = {n: n.split("_")[0] for n in convs}
    plan, = plan_folds(make_store(tmp_path, convs, speaker=speaker), TrainConfig(val_by="speaker"))
    parts = [_speakers_of(x, speaker) for x in (plan.train, plan.val, plan.test)]
    assert all(parts) and not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]


def test_split_store_uses_its_splits_and_holds_val_out_of_train_when_absent(tmp_path):
    """A store split is used as is; without val rows, val is a seeded part of train."""
    convs = {f"d{k}": 2 for k in range(10)}
    split = {n: ("test" if k < 2 else "val" if k < 4 else "train") for k, n in enumerate(convs)}
    plan, = plan_folds(make_store(tmp_path, convs, split=split), TrainConfig())
    assert set(plan.test) == {"d0", "d1"} and set(plan.val) == {"d2", "d3"} and plan.name == "split"
    split2 = {n: ("test" if k < 2 else "train") for k, n in enumerate(convs)}
    plan2, = plan_folds(make_store(tmp_path, convs, split=split2), TrainConfig(val_fraction=0.25))
    assert set(plan2.test) == {"d0", "d1"} and len(plan2.val) == 2
    assert not set(plan2.val) & set(plan2.train) and not set(plan2.val) & set(plan2.test)
    assert _all_ids(plan2) == set(convs)


def test_store_without_splits_or_folds_splits_five_conversations(tmp_path):
    """Five conversations give non-empty, disjoint train/val/test, the same for the same seed."""
    data = make_store(tmp_path, {f"d{k}": 2 for k in range(5)})
    plan, = plan_folds(data, TrainConfig())
    assert plan.train and plan.val and plan.test
    assert len(_all_ids(plan)) == len(plan.train) + len(plan.val) + len(plan.test) == 5
    assert plan_folds(data, TrainConfig()) == [plan]


def test_too_few_conversations_is_explained(tmp_path):
    """Two conversations cannot make train/val/test: the error says how many are needed."""
    data = make_store(tmp_path, {"d0": 3, "d1": 3})
    with pytest.raises(DataError, match="at least 3 labelled conversations"):
        plan_folds(data, TrainConfig())


def test_paper_protocol_uses_test_as_val(tmp_path):
    """The faithful view has no validation set: val is the test set and the store's val is unused."""
    convs = {f"d{k}": 2 for k in range(6)}
    split = {n: ("test" if k < 2 else "val" if k < 3 else "train") for k, n in enumerate(convs)}
    plan, = plan_folds(make_store(tmp_path, convs, split=split), TrainConfig(), paper_protocol=True)
    assert plan.val_is_test and plan.val == plan.test and "d2" not in plan.train


def test_normalizer_uses_present_training_rows_only_and_round_trips(tmp_path):
    """Absent rows neither shift the statistics nor stop being zero; to_dict/from_dict keeps the numbers."""
    absent = {f"d0_{i:03d}": ("audio",) for i in range(3)}
    convs = build_conversations(make_store(tmp_path, {"d0": 6, "d1": 4}, absent=absent))
    norm = Normalizer.fit(convs)
    rows = np.concatenate([c.features["audio"][c.present[:, 0]] for c in convs])
    assert np.allclose(norm.mean["audio"], rows.mean(axis=0), atol=1e-5)
    out = norm.apply(convs)
    assert np.all(out[0].features["audio"][:3] == 0)
    present_rows = np.concatenate([c.features["audio"][c.present[:, 0]] for c in out])
    assert np.allclose(present_rows.mean(axis=0), 0, atol=1e-5)
    again = Normalizer.from_dict(norm.to_dict())
    assert all(np.array_equal(again.std[m], norm.std[m]) for m in DIMS)


def test_batches_pad_to_the_longest_conversation_in_the_batch(tmp_path):
    """Shapes follow the batch's longest conversation; padding is invalid, absent, zero, with no clip id."""
    data = make_store(tmp_path, {"a": 2, "b": 5, "c": 3}, absent={"b_001": ("text",)})
    convs = build_conversations(data)
    batches = list(iterate_batches(pack(convs), batch_size=2, shuffle=False))
    assert [b.batch.valid.shape for b in batches] == [torch.Size([2, 5]), torch.Size([1, 3])]
    first = batches[0]
    assert first.batch.features["text"].shape == (2, 5, 4) and first.batch.features["text"].dtype == torch.float32
    assert first.batch.present.shape == (2, 5, 3) and first.batch.targets.dtype == torch.long
    assert first.batch.valid[0].tolist() == [True, True, False, False, False]
    assert first.clip_ids[0].tolist() == ["a_000", "a_001", None, None, None]
    assert not first.batch.present[0, 2:].any() and torch.all(first.batch.features["audio"][0, 2:] == 0)
    assert torch.all(first.batch.targets[0, 2:] == 0) and not first.labelled[0, 2:].any()
    assert first.batch.present[1, 1].tolist() == [True, False, True]  # b_001 has no text
    assert np.array_equal(first.batch.features["audio"][1].numpy(), convs[1].features["audio"])
    first.batch.check(DIMS)


def test_shuffled_batches_cover_every_conversation_once(tmp_path):
    """A shuffled epoch yields each conversation exactly once, in a seeded order."""
    convs = build_conversations(make_store(tmp_path, {f"d{k}": 1 + k % 3 for k in range(9)}))
    order = [c for b in iterate_batches(convs, 4, True, np.random.default_rng(0)) for c in b.conversation_ids]
    again = [c for b in iterate_batches(convs, 4, True, np.random.default_rng(0)) for c in b.conversation_ids]
    assert sorted(order) == sorted(c.id for c in convs) and order == again


def test_random_split_keeps_every_class_in_every_part(tmp_path):
    """Three labels x five one-clip conversations: validation and test each hold one clip of every class,
    for every seed (an unstratified split leaves a class out of a 3-clip part most of the time)."""
    convs = {f"{lab}{k}": 1 for lab in LABELS for k in range(5)}
    data = make_store(tmp_path, convs, label_of={name: name[:-1] for name in convs})
    label_of = dict(zip(data.conversation.astype(str), data.label.astype(str)))
    for seed in range(20):
        plan, = plan_folds(data, TrainConfig(seed=seed, val_fraction=0.2, test_fraction=0.2))
        for part in (plan.val, plan.test):
            assert sorted(label_of[c] for c in part) == sorted(LABELS)
        assert sorted(label_of[c] for c in plan.train) == sorted(LABELS * 3)


# ------------------------------------------------------------------------------------ features held once

def _batches_equal(a, b) -> None:
    """Two batch streams carry bitwise the same tensors and clip ids."""
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for m in DIMS:
            assert x.batch.features[m].dtype == y.batch.features[m].dtype == torch.float32
            assert torch.equal(x.batch.features[m], y.batch.features[m]), m
        for name in ("present", "valid", "targets", "labelled"):
            assert torch.equal(getattr(x.batch, name), getattr(y.batch, name)), name
        assert x.clip_ids.tolist() == y.clip_ids.tolist() and x.conversation_ids == y.conversation_ids


@pytest.mark.parametrize("in_order", [True, False])
def test_conversations_are_read_only_views_of_one_array_per_modality(tmp_path, in_order):
    """Every conversation's features view one float32 array per modality (zeros where absent); a store
    already in conversation order lends its own arrays, so nothing is copied at all."""
    data = make_store(tmp_path, {"d1": 4, "d2": 3, "d3": 2}, absent={"d2_001": ("text",)}, in_order=in_order)
    convs = build_conversations(data)
    for m in DIMS:
        base = convs[0].features[m].base
        assert base is not None and base.dtype == np.float32 and base.shape == (9, DIMS[m])
        assert all(c.features[m].base is base for c in convs)
        assert not any(c.features[m].flags.writeable for c in convs)
        assert np.shares_memory(base, data.features[m]) == in_order
    assert np.all(convs[1].features["text"][1] == 0) and not convs[1].present[1, 1]
    with pytest.raises(ValueError):
        convs[0].features["audio"][0, 0] = 1.0


def test_read_store_gives_float32_with_zeros_where_absent(tmp_path):
    """Whatever a writer left in an absent row, the store is read as float32 with zeros there."""
    import h5py

    data = make_store(tmp_path, {"d1": 3}, absent={"d1_001": ("audio",)})
    row = int(np.flatnonzero(data.ids == "d1_001")[0])
    with h5py.File(tmp_path / "feats.h5", "r+") as f:
        f["modalities/audio/features"][row] = 7.0
    again = read_store(tmp_path / "feats.h5")
    assert again.features["audio"].dtype == np.float32
    assert np.all(again.features["audio"][row] == 0) and not again.present["audio"][row]
    assert np.array_equal(again.features["text"], data.features["text"])


@pytest.mark.parametrize("in_order", [True, False])
def test_packing_with_a_normaliser_indexes_the_features_and_gives_the_copied_batches(tmp_path, in_order):
    """pack(convs, normaliser) holds no copy of the features, standardises each batch on the fly, and gives
    bitwise the batches of packing standardised copies (the way they were made before); the shared array
    is left as it was."""
    absent = {"b_001": ("text",), "a_000": ("audio", "visual"), "c_002": ("audio",)}
    data = make_store(tmp_path, {"a": 2, "b": 5, "c": 3, "d": 4}, absent=absent, in_order=in_order)
    convs = build_conversations(data)
    norm = Normalizer.fit(convs[:3])
    before = {m: convs[0].features[m].base.copy() for m in DIMS}
    packed = pack(convs, norm)
    for m in DIMS:
        assert packed.features[m] is convs[0].features[m].base
    for shuffle in (False, True):
        rng = (np.random.default_rng(5), np.random.default_rng(5))
        _batches_equal(iterate_batches(packed, 3, shuffle, rng[0]),
                       iterate_batches(pack(norm.apply(convs)), 3, shuffle, rng[1]))
    sub = [convs[3], convs[1]]  # any subset and order of the conversations still indexes the same array
    _batches_equal(iterate_batches(pack(sub, norm), 2, False), iterate_batches(norm.apply(sub), 2, False))
    assert pack(sub).features["text"] is convs[0].features["text"].base
    for m in DIMS:
        assert np.array_equal(convs[0].features[m].base, before[m])
    ident = Normalizer.identity(DIMS)
    _batches_equal(iterate_batches(pack(convs, ident), 4, False), iterate_batches(convs, 4, False))


def test_masked_packed_sets_equal_masked_conversations(tmp_path):
    """The fixed test masks as presence flags (mask_packed) give bitwise the batches of masking copies of
    the conversations (mask_conversations), removed features zeroed."""
    absent = {"b_001": ("text",), "a_000": ("audio",), "c_002": ("audio", "text", "visual")}
    convs = build_conversations(make_store(tmp_path, {"a": 2, "b": 5, "c": 3}, absent=absent))
    norm = Normalizer.fit(convs)
    packed = pack(convs, norm)
    for cond in parse_missing("fixed:a,t,av,atv").runs() + [parse_missing("random:0.5")]:
        masked, absent_count = mask_packed(packed, cond, seed=3)
        copies, expected = mask_conversations(norm.apply(convs), cond, seed=3)
        assert absent_count == expected
        assert masked.features["audio"] is packed.features["audio"]
        _batches_equal(iterate_batches(masked, 2, False), iterate_batches(copies, 2, False))
    # natural: nothing is masked, and the utterance recorded with no modality at all is counted
    masked, absent_count = mask_packed(packed, parse_missing("natural"), seed=3)
    assert masked is packed and absent_count == mask_conversations(convs, parse_missing("natural"), seed=3)[1] == 1
