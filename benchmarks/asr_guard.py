"""Does the ASR guard keep speech and only speech? Generated non-speech sounds against speech controls.

    python benchmarks/asr_guard.py [--ravdess /path/to/RavdessDataSet] [--threads 1]

Non-speech: every kind of `demo.media.noise_variant` (white/pink/brown noise, 50/60 Hz hum, a fan, room
tone, keyboard typing, rain, clicks over hum, piano-like chords, a melody, drums) at -55, -35 and -15 dBFS,
two seeds each. Speech controls: espeak-ng sentences at -20 and -64 dBFS and mixed with pink noise at 10 and
0 dB SNR, and, with --ravdess, RAVDESS's 16 quietest recordings (soft calm/sad speech at -60 to -64 dBFS).

For each clip it prints the VAD's speech seconds and highest speech probability (silero-vad, clip scaled to a
fixed peak), and what the offline preset's Whisper ASR made of it: the transcript or the reason for none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ravdess", type=Path, help="RavdessDataSet folder: add its 16 quietest clips")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from core.clip import SAMPLE_RATE, ClipInput
    from demo.media import NOISE_KINDS, noise_variant, speak
    from extractors import vad
    from extractors.asr import WhisperASR
    from pipeline.decode import decode_audio

    def level(x: np.ndarray, db: float) -> np.ndarray:
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2)) * 10 ** (db / 20)).astype(np.float32)

    cases: list[tuple[str, str, np.ndarray]] = []
    for kind in NOISE_KINDS:
        for db in (-55.0, -35.0, -15.0):
            for seed in (0, 1):
                cases.append(("no speech", f"{kind} {db:.0f} dBFS #{seed}", noise_variant(kind, 4.0, level_db=db,
                                                                                        seed=seed)))
    sentence = speak("The weather was bright and sunny this morning.")
    for db in (-20.0, -64.0):
        cases.append(("speech", f"espeak {db:.0f} dBFS", level(sentence, db)))
    for snr in (10.0, 0.0):
        noisy = level(sentence, -26.0) + noise_variant("pink", len(sentence) / SAMPLE_RATE, level_db=-26.0 - snr)
        cases.append(("speech", f"espeak + pink noise {snr:.0f} dB SNR", noisy.astype(np.float32)))
    if args.ravdess:
        files = sorted(args.ravdess.glob("Actor_*/03-01-*.wav"))
        quiet = sorted(files, key=lambda f: vad.rms_db(decode_audio(f)))[:16]
        cases += [("speech", f"RAVDESS {f.stem} {vad.rms_db(decode_audio(f)):.0f} dBFS", decode_audio(f))
                  for f in quiet]

    asr = WhisperASR({"model": "packaged:whisper-base"})
    clips = [ClipInput(name, audio, "", None, "no-video-stream", len(audio) / SAMPLE_RATE)
             for _, name, audio in cases]
    outputs = []
    for start in range(0, len(clips), 8):
        outputs += asr.extract(clips[start:start + 8])
    print(f"{'truth':<10} {'clip':<44} {'VAD s':>6} {'max p':>6}  result")
    wrong = 0
    for (truth, name, audio), out in zip(cases, outputs):
        probs = vad.speech_probabilities(audio)
        speech_s = vad.speech_seconds(vad.speech_segments(audio))
        got = f"text: {out.transcript[:50]!r}" if out.transcript else out.reason
        wrong += (truth == "speech") != bool(out.transcript)
        print(f"{truth:<10} {name:<44} {speech_s:>6.2f} {float(probs.max(initial=0)):>6.2f}  {got}")
    print(f"{len(cases)} clips, {wrong} wrong (text on non-speech, or no text on speech)")


if __name__ == "__main__":
    main()
