"""comp-train: arguments, presets, errors (exit 2) and the files it writes."""

from __future__ import annotations

import json

import pytest

from comp.checkpoint import load_checkpoint
from demo.synthetic import make_synthetic_store
from pipeline.cli.train import PRESETS, build_parser, main, resolve_config

FAST = ["--set", "model.hidden=16", "--set", "model.depth=2", "--set", "model.prompt_dim=4",
        "--set", "model.n_prototypes=3", "--batch-size", "8", "--no-baselines"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("cli") / "s.h5", n_conversations=16, utterances=(3, 6),
                                seed=2)


def test_smoke_writes_all_outputs(store, tmp_path):
    """A short run writes best.pt, runs/, metrics.json with summary mean/std, config.yaml, train.log, report."""
    out = tmp_path / "out"
    assert main([str(store), "--out", str(out), "--epochs", "2", "--stage-epochs", "1", "-q", *FAST]) == 0
    for name in ("best.pt", "metrics.json", "config.yaml", "train.log", "report.html"):
        assert (out / name).is_file(), name
    assert list((out / "runs").glob("*.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mean", "std", "n"} <= set(metrics["summary"]["acc"])
    _, meta = load_checkpoint(out / "best.pt")
    assert meta["train_config"]["epochs"] == 2 and meta["label_names"] == metrics["label_names"]


def test_missing_store_exits_2(tmp_path, capsys):
    """A store path that does not exist is a usage error naming the file."""
    assert main([str(tmp_path / "nope.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.h5" in capsys.readouterr().err


def test_invalid_store_exits_2(tmp_path, capsys):
    """A file that is not a feature store is refused with exit status 2."""
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable feature store" in capsys.readouterr().err


def test_unknown_config_key_exits_2(store, tmp_path, capsys):
    """A --set key the config does not have is an error that names it."""
    assert main([str(store), "--out", str(tmp_path / "o"), "--set", "model.hiden=8"]) == 2
    assert "hiden" in capsys.readouterr().err


def test_bad_missing_spec_exits_2(store, tmp_path, capsys):
    """An unparseable --missing value is refused before training."""
    assert main([str(store), "--out", str(tmp_path / "o"), "--missing", "random:0.9"]) == 2
    assert "random:0.9" in capsys.readouterr().err


def test_bad_config_file_exits_2(store, tmp_path, capsys):
    """A YAML config with an unknown key is refused with the key named."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main([str(store), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    """Every named preset resolves to a valid TrainConfig."""
    cfg = resolve_config(build_parser().parse_args(["x.h5", "--out", "o", "--preset", preset]))
    assert cfg.epochs >= cfg.stage_epochs > 0


def test_mosi_preset_has_paper_values():
    """The cmumosi preset carries the README's hyper-parameters (docs/model.md §6.2)."""
    cfg = resolve_config(build_parser().parse_args(["x.h5", "--out", "o", "--preset", "cmumosi"]))
    assert (cfg.batch_size, cfg.epochs, cfg.stage_epochs, cfg.lr, cfg.weight_decay, cfg.seed) == \
        (32, 300, 150, 1e-4, 1e-5, 66)
    m = cfg.model
    assert (m.hidden, m.depth, m.heads, m.drop_rate, m.momentum) == (256, 4, 2, 0.5, 0.3)


def test_flags_override_preset():
    """Short flags win over the preset; --epochs alone keeps the preset's stage-1 share."""
    args = build_parser().parse_args(["x.h5", "--out", "o", "--preset", "iemocap4", "--epochs", "10",
                                      "--variant", "faithful", "--missing", "random:0.3", "--folds", "1,3"])
    cfg = resolve_config(args)
    assert (cfg.epochs, cfg.stage_epochs, cfg.model.variant, cfg.missing, cfg.folds) == \
        (10, 5, "faithful", "random:0.3", "1,3")


def test_help_shows_examples(capsys):
    """--help lists defaults and worked examples."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "comp-train feats.h5" in text and "(default:" in text


def _help_entries(parser) -> dict[str, str]:
    """option -> its help text as --help prints it (joined over wrapped lines)."""
    import re

    text = parser.format_help().split("\n\n")
    entries: dict[str, str] = {}
    current = None
    for line in "\n".join(text).splitlines():
        m = re.match(r"^  (-\S+.*?)(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1).split(",")[0].split()[0]
            entries[current] = m.group(2) or ""
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_true_defaults():
    """--help never claims a default the code does not use, and never says it twice."""
    from comp.config import TrainConfig
    from pipeline.cli.predict import build_parser as predict_parser

    train = _help_entries(build_parser())
    assert "(default: True)" not in train["--baselines"] and "(default: on" in train["--baselines"]
    assert f"else {TrainConfig().model.variant})" in train["--variant"]
    assert f"else {TrainConfig().epochs})" in train["--epochs"] and "else off)" in train["--refit"]
    assert "(default: [])" not in train["--set"]
    predict = _help_entries(predict_parser())
    assert predict["--format"].count("(default: json)") == 1 and predict["--device"].count("(default") == 1
    for entries in (train, predict):
        assert all(text.count("(default") <= 1 for text in entries.values()), entries


def test_terminal_shows_one_line_per_epoch_and_no_bar_left(store, tmp_path, monkeypatch):
    """On a terminal: each epoch's log line stands on its own line above the bar, and no bar is left behind."""
    import io
    import re
    import sys

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("COLUMNS", "100")
    assert main([str(store), "--out", str(tmp_path / "o"), "--epochs", "3", "--stage-epochs", "1", "--seeds", "2",
                 *FAST]) == 0
    raw = tty.getvalue()
    assert "batch" in raw  # a bar was drawn
    screen: list[str] = []
    for line in raw.split("\n"):  # what stays on each line after its carriage returns
        cells: list[str] = []
        for part in line.split("\r"):
            cells[: len(part)] = list(part)
        screen.append("".join(cells).rstrip())
    epochs = [s for s in screen if re.search(r"epoch \d/3 \(stage", s)]
    assert len(epochs) == 6 and all(s.startswith("fold split seed") for s in epochs), epochs
    assert not any("batch/s" in s or "%|" in s for s in screen), [s for s in screen if "%|" in s]
