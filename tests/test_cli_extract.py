"""comp-extract on the command line: help, config resolution, summary output, exit codes for systemic errors."""

import yaml
from fake_extractors import fake_config_dict, make_media

from core.config import from_dict
from pipeline.cli.extract import main
from pipeline.extract_config import ExtractionConfig
from pipeline.store import read_store


def write_config(tmp_path, **overrides):
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(fake_config_dict(**overrides)), encoding="utf-8")
    return str(path)


def test_help_shows_defaults_and_examples(capsys):
    """--help lists every option with its default and ends with examples."""
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--manifest", "--labels-from-folders", "--preset", "--config", "--set", "--device",
                 "--batch-size", "--num-workers", "--overwrite", "--retry-failed", "--log-file", "--print-config"):
        assert flag in out
    assert "(default: auto)" in out and "examples:" in out


def test_print_config_gives_a_loadable_full_config(tmp_path, capsys):
    """--print-config prints YAML with every extractor key resolved; it loads back into ExtractionConfig."""
    assert main(["--config", write_config(tmp_path), "--set", "decode.fps=3", "--batch-size", "5",
                 "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    cfg = from_dict(ExtractionConfig, data)
    assert (cfg.decode.fps, cfg.batch_size, cfg.asr.config) == (3.0, 5, {"fail_on": "", "delay_s": 0.0})


def test_offline_preset_resolves_by_name(capsys):
    """--preset offline loads configs/extract-offline.yaml: packaged Whisper, its encoder, MiniLM, faces."""
    assert main(["--preset", "offline", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["asr"]["name"], data["asr"]["config"]["model"], data["audio"]["name"], data["text"]["config"]
            ["model"], data["visual"]["name"]) == ("whisper", "packaged:whisper-base", "whisper-encoder",
                                                   "packaged:all-minilm-l6-v2", "face")


def test_default_preset_names_the_design_models(capsys):
    """The default preset is Whisper base, wav2vec2 and DeBERTa from the hub, and faces."""
    assert main(["--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["asr"]["config"]["model"], data["audio"]["config"]["model"], data["text"]["config"]["model"]) == (
        "base", "facebook/wav2vec2-base", "microsoft/deberta-large")


def test_run_prints_the_summary_and_writes_the_log(tmp_path, capsys):
    """A run exits 0, prints the summary table with the failures file, and writes the log file."""
    make_media(tmp_path / "in", ["a.mp4", "b.wav"])
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video")
    code = main([str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), "--config", write_config(tmp_path),
                 "--device", "cpu", "-q", "--log-file", str(tmp_path / "run.log")])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 ok, 1 error" in out and "f.h5.failures.csv" in out and "run.log" in out
    assert "skipping broken" in (tmp_path / "run.log").read_text(encoding="utf-8")
    assert len(read_store(tmp_path / "f.h5")) == 3


def test_no_inputs_is_a_clear_error(tmp_path, capsys):
    """An empty input folder exits 2 with one line and no traceback."""
    (tmp_path / "in").mkdir()
    code = main([str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), "--config", write_config(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "comp-extract: error:" in err and "no clips found" in err and "Traceback" not in err


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    """An --out under a file (not a folder) exits 2 before any model loads."""
    make_media(tmp_path / "in", ["a.mp4"])
    (tmp_path / "blocker").write_text("x")
    code = main([str(tmp_path / "in"), "--out", str(tmp_path / "blocker" / "f.h5"),
                 "--config", write_config(tmp_path)])
    assert code == 2 and "cannot write to" in capsys.readouterr().err


def test_spec_mismatch_exits_2_and_suggests_overwrite(tmp_path, capsys):
    """Rerunning into a store with another spec exits 2 with the --overwrite hint; --overwrite then works."""
    make_media(tmp_path / "in", ["a.mp4"])
    args = [str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), "--config", write_config(tmp_path), "-q"]
    assert main(args) == 0
    assert main(args + ["--set", "decode.max_frames=2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--set", "decode.max_frames=2", "--overwrite"]) == 0
    assert read_store(tmp_path / "f.h5").header.extraction_spec["decode"]["max_frames"] == 2


def test_unknown_setting_is_a_clear_error(tmp_path, capsys):
    """--set with a key the config does not have exits 2 naming the key."""
    code = main(["--config", write_config(tmp_path), "--set", "visual.config.nope=1", "--print-config"])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_unknown_extractor_lists_the_known_ones(tmp_path, capsys):
    """A stage naming an unregistered extractor exits 2 and lists that stage's extractors."""
    code = main(["--config", write_config(tmp_path), "--set", "audio.name=wav3vec", "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and "wav3vec" in err and "fake-audio" in err


def test_threads_option_sets_torch_threads_and_says_its_default(tmp_path, capsys):
    """--threads N sets torch's intra-op threads for the run; --help states the default and why."""
    import torch

    from pipeline.cli.extract import default_threads

    try:
        main(["--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    assert "--threads N" in out and f"(here {default_threads()})" in out
    make_media(tmp_path / "in", ["a.wav"])
    before = torch.get_num_threads()
    try:
        assert main([str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), "--config", write_config(tmp_path),
                     "--device", "cpu", "-q", "--threads", "3"]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_no_clip_extracted_exits_1_and_names_skipped_files(tmp_path, capsys):
    """When every clip fails the run exits 1 and says so; files that are not clips are named, with the path
    given once per warning."""
    from demo.media import lfs_pointer

    lfs_pointer(tmp_path / "in" / "clip.mp4")
    (tmp_path / "in" / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "in" / "notes.txt").write_text("not media\n" * 20)
    code = main([str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), "--config", write_config(tmp_path),
                 "--device", "cpu", "-q", "--log-file", str(tmp_path / "run.log")])
    captured = capsys.readouterr()
    assert code == 1 and "not a single clip could be extracted" in captured.err
    assert "not clips  1 not-media (notes.txt), 1 still-image (cover.png)" in captured.out
    data = read_store(tmp_path / "f.h5")
    assert "Git LFS pointer" in data.reason["audio"][0]
    warning = next(line for line in (tmp_path / "run.log").read_text().splitlines() if "skipping clip" in line)
    assert warning.count("clip.mp4") == 1
