"""Emotion over time: a long recording -> utterances -> one conversation -> a prediction per utterance.

1. `speech.find_speech`: the recording's speech (silero-vad) and Whisper's timestamped segments, found by
   the checkpoint's own ASR extractor, one block of audio at a time.
2. `segment.cut_utterances`: utterances that follow the speech (`TimelineOptions`). A recording without
   usable audio, or with no speech at all, is cut every max_utterance_s instead, so that the face is still
   followed (the JSON's `segmentation.why` says so).
3. Each utterance is a time segment of the file (`ClipItem.start_s/end_s`), decoded by seeking and
   extracted by the checkpoint's extraction exactly like a training clip (`Extraction.extract_batches`),
   with as much recording around its speech as the checkpoint's training clips had (`segment.margin_for`).
4. `context.plan_context`: with a checkpoint trained on multi-utterance conversations, the utterances are
   predicted as one conversation (`Predictor.conversation_logits`, windows of at most max_len); otherwise
   each alone, as `comp-predict` predicts a clip.

An utterance that cannot be predicted (undecodable, or no modality present) stays in the list with its
`error`, and is left out of the conversation the others are predicted in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core import __version__
from core.progress import Progress, no_progress
from core.records import ClipRecord
from pipeline.decode import DecodeError
from pipeline.inputs import ClipItem
from pipeline.predict import ClipPrediction, PredictError
from pipeline.timeline.context import ContextPlan, plan_context, sliding_windows, window_owner
from pipeline.timeline.options import TimelineOptions
from pipeline.timeline.segment import Utterance, cut_utterances, fixed_utterances, margin_for, widen
from pipeline.timeline.speech import SpeechMap, find_speech

if TYPE_CHECKING:
    from pipeline.predict import Predictor

log = logging.getLogger(__name__)

STAGES = ("decode", "asr", "utterances", "model")  # the stages progress(stage, done, total) reports


class TimelineError(PredictError):
    """A recording that cannot be followed at all (it cannot be opened or decoded); the message says why."""


def predict_timeline(predictor: "Predictor", path: str | Path, *, options: TimelineOptions | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """The emotion of each utterance of one recording, as the JSON-able object `comp-predict --timeline` prints:

    {"clip", "duration_s", "context": {"used", "why", "max_len", "windows"},
     "segmentation": {"from", "why", "speech_s", "asr_segments", "margin_s", "margin_why" (cut by speech)},
     "utterances": [{"start", "end", "transcript", "modalities", "prediction", "error" (only when not
                     predicted)}],
     "model", "timings_s", "real_time_factor", "version"}

    `start`/`end` are seconds of the recording; `modalities` and `prediction` have comp-predict's shapes.
    `progress(stage, done, total)`: "decode" (0/1, 1/1), "asr" (seconds of audio transcribed / duration in
    seconds, total 0 when the file does not say), "utterances" (extracted / count), "model" (windows done /
    windows). Raises TimelineError when the recording cannot be opened or decoded at all.
    """
    options = options or TimelineOptions()
    path = Path(path)
    report = progress or no_progress
    t_start = time.perf_counter()
    if not path.is_file():
        raise TimelineError(f"{path}: no such file")
    try:
        speech = find_speech(predictor.extraction, path, options, progress=report)
    except DecodeError as err:
        raise TimelineError(f"cannot decode {path}: {err}") from None
    t_asr = time.perf_counter()
    utterances, segmentation = _utterances(speech, options)
    margin, why = margin_for(predictor.meta, options)
    if segmentation["from"] == "fixed":  # pieces that touch: nothing around them to add
        windows = [(u.start_s, u.end_s) for u in utterances]
    else:
        windows = widen(utterances, margin, options.pad_s, speech.duration_s)
        segmentation.update(margin_s=margin, margin_why=why)
    records = _extract(predictor, path, utterances, windows, report)
    t_extract = time.perf_counter()
    plan = plan_context(predictor.meta, predictor.checkpoint)
    predictions, windows = _predict(predictor, records, plan, report)
    t_end = time.perf_counter()
    rows = [_row(u, p) for u, p in zip(utterances, predictions)]
    total = t_end - t_start
    return {
        "clip": str(path), "duration_s": round(speech.duration_s, 3),
        "context": {"used": plan.used, "why": plan.why, "max_len": plan.max_len, "windows": windows},
        "segmentation": segmentation, "utterances": rows, "model": predictor._model_report(),
        "timings_s": {"speech": round(t_asr - t_start, 3), "utterances": round(t_extract - t_asr, 3),
                      "model": round(t_end - t_extract, 3), "total": round(total, 3)},
        "real_time_factor": round(total / speech.duration_s, 4) if speech.duration_s > 0 else None,
        "version": __version__,
    }


def _utterances(speech: SpeechMap, options: TimelineOptions) -> tuple[list[Utterance], dict[str, Any]]:
    speech_s = round(sum(b - a for a, b in speech.speech), 3)
    info: dict[str, Any] = {"from": "speech", "speech_s": speech_s, "asr_segments": len(speech.asr_segments)}
    if speech.asr_fallbacks:
        info["asr_failed"] = speech.asr_fallbacks
    if speech.audio_reason:
        why = f"no audio to follow ({speech.audio_reason})"
    elif not speech.speech and not speech.asr_segments:
        why = "no speech found"
    else:
        utterances = cut_utterances(speech.speech, speech.asr_segments, speech.envelope, speech.duration_s, options)
        info["why"] = (f"speech (silero-vad, and Whisper's segments where the detector heard none), pauses of "
                       f"at least {options.min_silence_s:g} s between utterances, at most "
                       f"{options.max_utterance_s:g} s each")
        return utterances, info
    if speech.duration_s <= 0:
        raise TimelineError(f"{why}, and the file does not say how long it is")
    info.update({"from": "fixed", "why": f"{why}: cut every {options.max_utterance_s:g} s so that the "
                                        "other modalities are still followed"})
    return fixed_utterances(speech.duration_s, options.max_utterance_s), info


def _extract(predictor: "Predictor", path: Path, utterances: list[Utterance], windows: list[tuple[float, float]],
             report: Progress) -> list[ClipRecord]:
    """Each utterance extracted as a time segment of the file (its window: the utterance and its margin), in
    time order."""
    conversation = str(path)
    items = [ClipItem(id=f"{path.name}@{u.start_s:.2f}-{u.end_s:.2f}", path=path, source=str(path),
                      conversation=conversation, position=i, start_s=a, end_s=b)
             for i, (u, (a, b)) in enumerate(zip(utterances, windows))]
    report("utterances", 0, len(items))
    found: dict[str, ClipRecord] = {}

    def hook(_task: str, done: int, total: int, detail: str = "") -> None:
        report("utterances", done, total)

    for batch in predictor.extraction.extract_batches(items, progress=hook):
        for record in batch:
            found[record.id] = record
    missing = [it.id for it in items if it.id not in found]
    if missing:
        raise TimelineError(f"{path}: the extraction returned no record for {len(missing)} utterance(s)")
    return [found[it.id] for it in items]


def _predictable(record: ClipRecord) -> bool:
    return record.status == "ok" and any(v.features is not None for v in record.modalities.values())


def _predict(predictor: "Predictor", records: list[ClipRecord], plan: ContextPlan,
             report: Progress) -> tuple[list[ClipPrediction], int]:
    """A ClipPrediction per record, and the number of conversation windows the model ran on."""
    ok = [i for i, r in enumerate(records) if _predictable(r)]
    logits: dict[int, torch.Tensor] = {}
    windows: list[tuple[int, int]] = []
    if plan.used and ok:
        windows = sliding_windows(len(ok), plan.max_len)
        owner = window_owner(windows, len(ok))
        report("model", 0, len(windows))
        for w, (a, b) in enumerate(windows):
            out = predictor.conversation_logits(predictor.batch_for_conversation([records[ok[j]] for j in range(a, b)]))
            for j in range(a, b):
                if owner[j] == w:
                    logits[ok[j]] = out[j - a]
            report("model", w + 1, len(windows))
    else:
        report("model", 0, 1)
    predictions = [predictor.predict_record(r, logits=logits.get(i)) for i, r in enumerate(records)]
    report("model", max(1, len(windows)), max(1, len(windows)))
    return predictions, len(windows)


def _row(utterance: Utterance, prediction: ClipPrediction) -> dict[str, Any]:
    row: dict[str, Any] = {"start": utterance.start_s, "end": utterance.end_s, "transcript": prediction.transcript,
                           "modalities": prediction.modalities, "prediction": prediction.prediction}
    if prediction.error:
        row["error"] = prediction.error
    return row


def options_from(data: Mapping[str, Any] | TimelineOptions | None) -> TimelineOptions:
    """TimelineOptions from plain data (unknown keys are a ConfigError), an instance, or None (defaults)."""
    if data is None:
        return TimelineOptions()
    if isinstance(data, TimelineOptions):
        return data
    return TimelineOptions.from_mapping(data)
