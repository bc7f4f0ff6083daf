"""Word error rate and speed of the Whisper ASR settings on real speech: RAVDESS.

RAVDESS speech (Livingstone & Russo 2018, https://zenodo.org/record/1188976, CC BY-NC-SA 4.0): 1,440 wav
files of 24 actors, `Actor_XX/03-01-EE-II-SS-RR-AA.wav`, where SS is the statement: 01 "Kids are talking by
the door", 02 "Dogs are sitting by the door". So every clip's words are known and the word error rate
(WER: substitutions + deletions + insertions over the reference words) is measurable.

    python benchmarks/asr_accuracy.py /path/to/RavdessDataSet --clips 120 --threads 1

Each setting (greedy, greedy + temperature fallback, beam search + fallback) transcribes the same clips, a
stride through the sorted file list, with the offline preset's Whisper base. Prints, per setting: WER,
clips whose transcript is exactly the statement, clips with no text, ASR seconds and real-time factor.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STATEMENTS = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}
FALLBACK = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # whisper.transcribe's temperatures
SETTINGS = {
    "greedy": {"beam_size": None, "temperatures": [0.0]},
    "greedy+fallback": {"beam_size": None, "temperatures": FALLBACK, "best_of": 5},
    "beam5": {"beam_size": 5, "temperatures": [0.0]},
    "beam5+fallback": {"beam_size": 5, "temperatures": FALLBACK, "best_of": 5},
}


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the RavdessDataSet folder (Actor_01 ... Actor_24)")
    parser.add_argument("--clips", type=int, default=120, help="clips to transcribe (a stride through all)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=8, help="clips per ASR call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from extractors.asr import WhisperASR
    from pipeline.decode import decode_clip

    files = sorted(args.root.glob("Actor_*/03-01-*.wav"))
    if not files:
        sys.exit(f"{args.root}: no RAVDESS speech files (Actor_XX/03-01-*.wav)")
    files = files[:: max(1, len(files) // args.clips)][: args.clips]
    clips = [decode_clip(f, f.stem) for f in files]
    media_s = sum(c.duration_s for c in clips)
    print(f"{len(clips)} clips, {media_s:.0f} s of speech, {args.threads} thread(s)")
    print(f"{'setting':<18} {'WER':>6} {'exact':>7} {'no text':>8} {'ASR s':>7} {'RTF':>6}")
    for name in args.settings:
        asr = WhisperASR({"model": "packaged:whisper-base", "language": None, **SETTINGS[name]})
        errors = ref_words = exact = empty = 0
        t0 = time.perf_counter()
        for start in range(0, len(clips), args.batch):
            batch = clips[start:start + args.batch]
            for clip in batch:
                clip.shared.clear()
                clip.transcript, clip.text_reason = None, ""
            for clip, out in zip(batch, asr.extract(batch)):
                ref = words(STATEMENTS[clip.clip_id.split("-")[4]])
                hyp = words(out.transcript or "")
                errors += edit_distance(ref, hyp)
                ref_words += len(ref)
                exact += hyp == ref
                empty += not hyp
        seconds = time.perf_counter() - t0
        print(f"{name:<18} {errors / ref_words:>6.3f} {exact:>4}/{len(clips):<3}{empty:>7} {seconds:>7.1f} "
              f"{seconds / media_s:>6.3f}", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
