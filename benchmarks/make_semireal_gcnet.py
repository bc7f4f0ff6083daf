"""A semi-real IEMOCAP-4 set in the GCNet layout: real dialogues, speakers, labels and transcripts, generated
audio and visual vectors. For running `comp-train --variant faithful` beside the released ComP code (which
reads this layout and infers the dimensions from the files) on the same data.

Input: GCNet's public label pickle `IEMOCAP_features_raw_4way.pkl` (github.com/zeroQiaoba/GCNet,
dataset/IEMOCAP/; 151 dialogues, 5,531 utterances). Output under OUT:

    OUT/IEMOCAP_features_raw_4way.pkl                 (a copy)
    OUT/features/minilm-UTT/<utt>.npy                 text: all-MiniLM-L6-v2 (packaged, no hub), mean over
                                                      non-special tokens, 384-d
    OUT/features/audio-syn-UTT/<utt>.npy              audio: 512-d, generated
    OUT/features/face-syn-UTT/<utt>/compress_{F,M}.npy  visual: 1024-d, generated, one file per speaker;
                                                      --zero-faces of the utterances get an all-zero own face

Generated vectors = class direction (norm --audio-signal / --visual-signal) + a per-dialogue and a per-speaker
offset + noise, then a per-dimension offset and scale, so that they are *not* standardised (as pooled
encoder states are not). Linear probes on fold 5 (train sessions 1-4): audio ~0.53, text ~0.58, visual ~0.40,
all three ~0.63 accuracy.

    python benchmarks/make_semireal_gcnet.py --labels GCNet/dataset/IEMOCAP/IEMOCAP_features_raw_4way.pkl \\
        --out /tmp/semireal/IEMOCAP
    comp-import gcnet --labels /tmp/semireal/IEMOCAP/IEMOCAP_features_raw_4way.pkl \\
        --audio /tmp/semireal/IEMOCAP/features/audio-syn-UTT --text /tmp/semireal/IEMOCAP/features/minilm-UTT \\
        --visual /tmp/semireal/IEMOCAP/features/face-syn-UTT --out semireal.h5
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="GCNet's IEMOCAP_features_raw_4way.pkl")
    p.add_argument("--out", required=True, help="output folder (the dataset root of the GCNet layout)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--audio-signal", type=float, default=2.8, help="norm of the class direction in audio")
    p.add_argument("--visual-signal", type=float, default=2.4, help="norm of the class direction in visual")
    p.add_argument("--zero-faces", type=float, default=0.08, help="fraction of utterances with no face")
    return p.parse_args(argv)


def embed_texts(texts: list[str], batch: int = 64) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from extractors.packaged import load_hf

    tok = load_hf(AutoTokenizer, "packaged:all-minilm-l6-v2", None)
    model = load_hf(AutoModel, "packaged:all-minilm-l6-v2", None).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            enc = tok(texts[s:s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt",
                      return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            keep = (enc["attention_mask"] * (1 - special)).unsqueeze(-1).float()
            h = model(**enc).last_hidden_state
            out.append(((h * keep).sum(1) / keep.sum(1).clamp_min(1)).numpy())
            print(f"\rtext {min(s + batch, len(texts))}/{len(texts)}", end="", flush=True)
    print()
    return np.concatenate(out).astype(np.float32)


def generate(rng: np.random.Generator, labels: np.ndarray, convs: list[str], speakers: list[str], dim: int,
             signal: float, zero_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] raw-scale vectors and the bool [n] rows set to all zeros."""
    n = len(labels)
    direction = rng.standard_normal((int(labels.max()) + 1, dim)) / np.sqrt(dim) * signal
    conv_index = {c: i for i, c in enumerate(sorted(set(convs)))}
    conv_effect = rng.standard_normal((len(conv_index), dim)) * 0.8
    speaker_effect = {s: rng.standard_normal(dim) * 0.5 for s in sorted(set(speakers))}
    offset, scale = rng.standard_normal(dim) * 2.0, np.exp(rng.standard_normal(dim) * 0.7)
    x = np.stack([direction[labels[i]] + conv_effect[conv_index[convs[i]]] + speaker_effect[speakers[i]]
                  for i in range(n)])
    x = (x + rng.standard_normal((n, dim)) * 2.0) * scale + offset
    zero = rng.random(n) < zero_frac
    x[zero] = 0.0
    return x.astype(np.float32), zero


def main(argv: list[str] | None = None) -> int:
    from pipeline.safe_pickle import safe_load

    args = parse_args(argv)
    out = Path(args.out)
    feats = out / "features"
    feats.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.labels, out / Path(args.labels).name)
    vids, video_labels, video_speakers, sentences = safe_load(Path(args.labels))[:4]
    utts, labels, speakers, texts, convs = [], [], [], [], []
    for v in sorted(vids):
        for i, u in enumerate(vids[v]):
            utts.append(u), labels.append(int(video_labels[v][i])), speakers.append(str(video_speakers[v][i]))
            texts.append(str(sentences[v][i])), convs.append(v)
    labels_arr = np.array(labels)
    rng = np.random.default_rng(args.seed)
    text = embed_texts(texts)
    audio, _ = generate(rng, labels_arr, convs, speakers, 512, args.audio_signal, 0.0)
    visual, no_face = generate(rng, labels_arr, convs, speakers, 1024, args.visual_signal, args.zero_faces)
    dirs = {m: feats / name for m, name in (("text", "minilm-UTT"), ("audio", "audio-syn-UTT"),
                                            ("visual", "face-syn-UTT"))}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    n = len(utts)
    for i, u in enumerate(utts):
        np.save(dirs["text"] / f"{u}.npy", text[i])
        np.save(dirs["audio"] / f"{u}.npy", audio[i])
        face = dirs["visual"] / u
        face.mkdir(exist_ok=True)
        other = "M" if speakers[i] == "F" else "F"
        np.save(face / f"compress_{speakers[i]}.npy", visual[i])
        np.save(face / f"compress_{other}.npy", visual[(i * 7919) % n])  # the other speaker: another utterance's
    print(f"{n} utterances in {len(set(convs))} dialogues -> {out}; {int(no_face.sum())} all-zero own faces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
