"""CMU-MOSI, CMU-MOSEI and CH-SIMS in the MMSA layout (github.com/thuiar/MMSA; MMSA-FET's dataset mode).

Layout: `label.csv` with the columns video_id, clip_id, text, label, mode (CH-SIMS adds label_T, label_A,
label_V, the unimodal annotations) and the clips at `Raw/<video_id>/<clip_id>.mp4`.

Each clip becomes a regression row: value = `label` (MOSI/MOSEI sentiment in [-3, 3], CH-SIMS in [-1, 1]; a
`label_T`/`label_A`/`label_V` column instead with `label_column`), conversation = video_id, position = clip_id
(numeric order), id = `<video_id>_<clip_id>` (the MMSA feature ids), split = mode (`valid` → val). The
reference transcript goes to `meta_transcript`. speaker = video_id for MOSI and MOSEI (one speaker per YouTube
monologue); CH-SIMS videos are film and TV scenes whose actors recur, so its rows carry no speaker.

CH-SIMS is Mandarin: Whisper transcribes it (set `asr.config.language=zh`), but the offline preset's text
encoder (all-MiniLM-L6-v2) is English-only. Use a Chinese or multilingual encoder, e.g.
`--set text.config.model=bert-base-chinese` (the encoder CH-SIMS's own baselines use) or
`sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.recipes import ManifestRow, Prepared, PrepareError, Skipped, relpath

DATASETS = {"mosi": (-3.0, 3.0), "mosei": (-3.0, 3.0), "sims": (-1.0, 1.0)}
MODES = {"train": "train", "valid": "val", "val": "val", "dev": "val", "test": "test"}
REQUIRED = ("video_id", "clip_id", "label", "mode")


def _label_file(root: Path) -> Path | None:
    direct = root / "label.csv"
    if direct.is_file():
        return direct
    found = sorted(root.rglob("label.csv"))
    return found[0] if found else None


def _position(clip_id: str, order: int) -> int:
    try:
        return int(clip_id)
    except ValueError:
        return order


def prepare(root: Path, *, dataset: str = "mosi", label_column: str = "label") -> Prepared:
    """Every clip of an MMSA-layout tree (see the module docstring). Raises PrepareError when `label.csv` or
    its required columns are missing; rows whose mp4 is absent or whose label is not a number are skipped."""
    root = Path(root)
    if dataset not in DATASETS:
        raise PrepareError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    labels = _label_file(root)
    if labels is None:
        raise PrepareError(f"{root} has no label.csv (the MMSA layout: label.csv and Raw/<video_id>/<clip_id>.mp4)")
    base = labels.parent
    raw = base / "Raw"
    with open(labels, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        absent = [c for c in (*REQUIRED, label_column) if c not in columns]
        if absent:
            raise PrepareError(f"{labels}: missing column(s) {', '.join(dict.fromkeys(absent))} (found "
                               f"{', '.join(columns)})")
        table = list(reader)
    if not raw.is_dir():
        raise PrepareError(f"{base} has label.csv but no Raw/ folder with the clips (Raw/<video_id>/<clip_id>.mp4)")
    low, high = DATASETS[dataset]
    rows, skipped, out_of_range = [], [], 0
    for order, row in enumerate(table):
        video_id, clip_id = row["video_id"].strip(), row["clip_id"].strip()
        clip = f"{video_id}_{clip_id}"
        mode = MODES.get(row["mode"].strip().lower())
        if mode is None:
            skipped.append(Skipped(clip, f"mode {row['mode']!r} is not train, valid or test"))
            continue
        try:
            value = float(row[label_column])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            skipped.append(Skipped(clip, f"{label_column} {row[label_column]!r} is not a number"))
            continue
        out_of_range += not low <= value <= high
        media = next((p for p in (raw / video_id / f"{clip_id}{ext}" for ext in (".mp4", ".avi", ".mkv"))
                      if p.is_file()), None)
        if media is None:
            skipped.append(Skipped(clip, f"Raw/{video_id}/{clip_id}.mp4 is not in the tree"))
            continue
        rows.append(ManifestRow(path=relpath(media, root), id=clip, value=value, conversation=video_id,
                                position=_position(clip_id, order), speaker="" if dataset == "sims" else video_id,
                                split=mode, meta={"transcript": (row.get("text") or "").strip()}))
    notes = []
    if out_of_range:
        notes.append(f"{out_of_range} {label_column} value(s) outside [{low:g}, {high:g}]: is this {dataset}?")
    if dataset == "sims":
        notes.append("CH-SIMS is Mandarin: extract with asr.config.language=zh and a Chinese or multilingual text "
                     "encoder (e.g. --set text.config.model=bert-base-chinese); the offline MiniLM is English-only")
    return Prepared(dataset, rows, skipped, notes)
