"""Predict emotion for raw clips with a trained ComP checkpoint: the orchestration behind `comp-predict`.

A `Predictor` is built once from a checkpoint and then predicts any number of clips:

1. The checkpoint is opened weights-only (`comp.checkpoint`), so a file carrying pickled code is refused
   before any of it runs.
2. The extractors are rebuilt from the extraction spec stored in the checkpoint (`Extraction.from_spec`),
   so a clip goes through exactly the code and settings its training features went through. A checkpoint
   that cannot be honoured (trained on imported features, which have no spec; a spec naming models or
   packaged weights that are not here; extractor dims that differ from the model's input dims) is refused
   with the reason, before any clip is read.
3. Each clip is its own one-utterance conversation (batch 1, length 1), so its answer never depends on which
   other clips are predicted with it. Features are normalised with the checkpoint's normalizer; an absent
   modality is masked with its present flag (the model never reads a stand-in vector).

`ClipPrediction.to_dict()` is the JSON object `comp-predict` prints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core import __version__
from core.clip import MODALITIES, STAGES
from core.errors import CompError
from core.progress import Progress
from core.records import ClipRecord, spec_hash
from pipeline.inputs import MEDIA_EXTENSIONS, ClipItem, discover_folder, is_media

if TYPE_CHECKING:
    from comp.batch import ComPBatch

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "best.pt"  # what comp-train writes into a run folder
ASR_DIAGNOSTICS = ("asr_no_speech_prob", "asr_avg_logprob", "asr_compression_ratio", "speech_ratio")
FACE_DIAGNOSTICS = ("frames_sampled", "frames_with_face")
# the steps of one clip, in order, as `predict_item(progress=...)` reports them
PREDICT_STEPS = ("decode", *STAGES, "model")

ProgressFn = Progress  # progress(step, done, total): `step` starts, `done` steps are done


class PredictError(CompError, RuntimeError):
    """A checkpoint or an input that prediction cannot use; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- inputs

MODEL_WANTED = "--model wants the run folder comp-train wrote (its --out) or the best.pt in it"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding `best.pt` (directly or in one sub-run folder).

    A feature store or a media file given by mistake is named for what it is, before anything loads it."""
    from comp.checkpoint import file_kind

    path = Path(path)
    if path.is_file():
        if file_kind(path) == "hdf5":
            raise PredictError(f"{path} is a feature store (HDF5), not a model: {MODEL_WANTED}. Train one on it "
                               f"first: comp-train {path} --out runs/mine")
        if is_media(path):
            raise PredictError(f"{path} is a media file, not a model: pass clips as arguments, and {MODEL_WANTED}")
        return path
    if path.is_dir():
        direct = path / CHECKPOINT_NAME
        if direct.is_file():
            return direct
        nested = sorted(path.glob(f"*/{CHECKPOINT_NAME}"))
        if len(nested) == 1:
            return nested[0]
        if nested:
            listed = ", ".join(str(p) for p in nested[:4])
            raise PredictError(f"{path}: holds several checkpoints ({listed}); pass one of them to --model")
        raise PredictError(f"{path}: no {CHECKPOINT_NAME} in this folder; pass the run folder that comp-train "
                           "wrote (--out) or a checkpoint file")
    raise PredictError(f"{path}: no such checkpoint file or run folder")


def collect_clips(inputs: Iterable[str | Path]) -> list[ClipItem]:
    """Media files and folders (searched recursively) as clips; the id is the path as given (file) or
    relative to the folder, and stays unique across inputs."""
    items: list[ClipItem] = []
    seen: set[str] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = discover_folder(path)
            if not found:
                raise PredictError(f"{path}: no media files found (looked for {', '.join(MEDIA_EXTENSIONS)})")
            candidates = [ClipItem(id=str(it.path), path=it.path, source=str(it.path)) for it in found]
        elif path.is_file():
            if not is_media(path):
                log.warning("%s: extension not among %s; trying to decode it anyway", path,
                            ", ".join(MEDIA_EXTENSIONS))
            candidates = [ClipItem(id=str(path), path=path, source=str(path))]
        else:
            raise PredictError(f"{path}: no such file or folder")
        for item in candidates:
            if item.id not in seen:  # the same clip named twice is predicted once
                seen.add(item.id)
                items.append(item)
    if not items:
        raise PredictError("no clips to predict; pass media files or folders")
    return items


# --------------------------------------------------------------------------------------------- output

@dataclass
class ClipPrediction:
    """What comp-predict reports for one clip."""

    clip: str
    prediction: dict[str, Any] | None  # {"label", "probs"} or {"value"}; None when the clip cannot be predicted
    modalities: dict[str, dict[str, Any]]
    transcript: str
    diagnostics: dict[str, dict[str, float | None]]
    model: dict[str, str]
    timings_ms: dict[str, float]
    error: str = ""
    duration_s: float | None = None
    version: str = __version__
    # the face crops the visual extractor found (uint8 RGB [h, w, 3] each), only when asked for with
    # predict_item(keep_faces=True); never part of the JSON
    faces: list[np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clip": self.clip, "prediction": self.prediction, "modalities": self.modalities,
                               "transcript": self.transcript, "duration_s": self.duration_s,
                               "asr": self.diagnostics.get("asr", {}), "face": self.diagnostics.get("face", {}),
                               "model": self.model, "timings_ms": self.timings_ms, "version": self.version}
        if self.error:
            out["error"] = self.error
        return out


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------- predictor

def _check_spec(meta: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's extraction spec, or PredictError saying why there is none to honour."""
    spec = meta.get("extraction_spec")
    if not spec:
        source = meta.get("source") or "an imported feature set"
        raise PredictError(f"{checkpoint}: trained on imported features ({source}), which carry no extraction "
                           "spec, so comp-predict cannot turn a clip into the same features; train on a store "
                           "written by comp-extract to predict from raw clips")
    stored = meta.get("spec_hash")
    if stored and stored != spec_hash(spec):
        raise PredictError(f"{checkpoint}: its extraction spec does not match its spec_hash (the file was "
                           "edited or damaged); retrain or restore the original checkpoint")
    return dict(spec)


class Predictor:
    """A trained model plus the extractors that made its training features; predicts clip after clip."""

    def __init__(self, model: torch.nn.Module, meta: Mapping[str, Any], extraction: Any,
                 normalizer: Any | None, checkpoint: Path, device: torch.device) -> None:
        self.model = model
        self.meta = dict(meta)
        self.extraction = extraction
        self.normalizer = normalizer
        self.checkpoint = checkpoint
        self.device = device
        self.task = str(meta["task"])
        self.label_names = tuple(meta.get("label_names") or ())
        self.input_dims = {str(m): int(d) for m, d in meta["input_dims"].items()}
        self.spec_hash = str(meta.get("spec_hash") or spec_hash(meta["extraction_spec"]))
        # the stage the weights were selected at, so a prediction is the run's own evaluation of the clip
        # (checkpoints written before the stage was recorded: stage 2, the full model)
        self.stage = int(meta.get("stage", 2))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> "Predictor":
        """Load the checkpoint and rebuild its extractors; PredictError (one line) when it cannot be honoured."""
        from comp.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
        from core.devices import resolve_device

        checkpoint = resolve_checkpoint(path)
        try:
            dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        except ValueError as err:
            raise PredictError(str(err)) from None
        try:
            # weights-only read first: refuse an unusable spec before any extractor model is loaded
            _, meta = load_checkpoint(checkpoint, map_location="cpu")
        except CheckpointError as err:
            raise PredictError(f"{_one_line(err)}; {MODEL_WANTED}") from None
        spec = _check_spec(meta, checkpoint)
        normalizer = _build_normalizer(meta, checkpoint)
        extraction = _build_extraction(spec, dev, checkpoint)
        dims = {m: int(info.dim) for m, info in extraction.header_modalities.items()}
        try:
            model, meta = build_model_from_checkpoint(checkpoint, dev, expect_input_dims=dims)
        except CheckpointError as err:
            raise PredictError(_one_line(err)) from None
        log.info("loaded %s (%s, %d outputs) and its extractors on %s", checkpoint, meta["task"],
                 int(meta["n_outputs"]), dev)
        return cls(model, meta, extraction, normalizer, checkpoint, dev)

    # -- prediction -------------------------------------------------------------------------------
    def predict_paths(self, paths: Iterable[str | Path | ClipItem]) -> Iterator[ClipPrediction]:
        """One ClipPrediction per clip, in input order. The models are loaded already; nothing reloads."""
        for p in paths:
            item = p if isinstance(p, ClipItem) else ClipItem(id=str(p), path=Path(p), source=str(p))
            yield self.predict_item(item)

    def predict_item(self, item: ClipItem, *, progress: ProgressFn | None = None,
                     keep_faces: bool = False) -> ClipPrediction:
        """Decode, extract and predict one clip, alone, so that no other clip can change its answer.

        `progress(step, done, total)` is called as each step of PREDICT_STEPS starts (done = steps finished,
        total = len(PREDICT_STEPS)) and once at the end with ("done", total, total). `keep_faces` keeps the
        face crops the visual extractor found in `ClipPrediction.faces` (the JSON is the same either way).
        Not thread-safe: one clip at a time per Predictor (the extractors are wrapped while it runs)."""
        seconds = self.extraction.seconds
        before = {k: seconds.get(k, 0.0) for k in (*STAGES, "decode")}
        faces: list[np.ndarray] | None = [] if keep_faces else None
        with _observed(self.extraction, progress, faces):
            records = list(self.extraction.extract_paths([item]))
        if len(records) != 1:
            raise PredictError(f"{item.path}: extraction returned {len(records)} records for one clip")
        timings = {"decode": (seconds.get("decode", 0.0) - before["decode"]) * 1e3,
                   "extract": sum(seconds.get(k, 0.0) - before[k] for k in STAGES) * 1e3}
        total = len(PREDICT_STEPS)
        if progress is not None and records[0].status == "ok":
            progress("model", total - 1, total)
        result = self.predict_record(records[0], clip=str(item.path), timings_ms=timings)
        result.faces = faces
        if progress is not None:
            progress("done", total, total)
        return result

    def predict_record(self, record: ClipRecord, *, clip: str | None = None,
                       timings_ms: Mapping[str, float] | None = None,
                       logits: torch.Tensor | None = None) -> ClipPrediction:
        """The model's answer for one extracted clip. `logits` [C]: the clip's row of `conversation_logits`
        when it was predicted within a conversation (default: predicted alone)."""
        modalities = self._modality_report(record)
        timings = {k: round(float(v), 2) for k, v in (timings_ms or {}).items()}
        base = dict(clip=clip or record.id, modalities=modalities, transcript=str(record.transcript or ""),
                    diagnostics=_diagnostic_report(record.diagnostics or {}), model=self._model_report(),
                    duration_s=_finite_or_none(record.duration_s))
        if record.status != "ok":
            reason = next((v.reason for v in record.modalities.values() if v.reason), "could not be decoded")
            return ClipPrediction(prediction=None, timings_ms=timings, error=f"not predicted: {reason}", **base)
        if not any(m["present"] for m in modalities.values()):
            return ClipPrediction(prediction=None, timings_ms=timings,
                                  error="not predicted: no modality is present in this clip", **base)
        if logits is None:
            t0 = time.perf_counter()
            logits = self._forward(record)
            timings["model"] = round((time.perf_counter() - t0) * 1e3, 2)
        return ClipPrediction(prediction=self._decode_output(logits), timings_ms=timings, **base)

    def batch_for(self, record: ClipRecord) -> "ComPBatch":
        """The clip as a batch of one conversation of one utterance: normalised features, present flags."""
        return self.batch_for_conversation([record])

    def batch_for_conversation(self, records: Sequence[ClipRecord]) -> "ComPBatch":
        """Extracted clips, in order, as a batch of one conversation of len(records) utterances
        (features [1, L, D] normalised with the checkpoint's normalizer, present [1, L, 3], valid [1, L])."""
        from comp.batch import ComPBatch

        if not records:
            raise PredictError("a conversation needs at least one utterance")
        present = np.array([[[r.modalities[m].features is not None for m in MODALITIES] for r in records]])
        raw = {}
        for m in MODALITIES:
            # an absent row is zeros *and* present=False: the mask, not the value, tells the model it is missing
            rows = [np.zeros(self.input_dims[m], np.float32) if r.modalities[m].features is None
                    else np.asarray(r.modalities[m].features, np.float32).reshape(-1) for r in records]
            raw[m] = np.stack(rows)[None]
        if self.normalizer is not None:
            raw = self.normalizer.transform(raw, present)
        return ComPBatch(features={m: torch.from_numpy(np.ascontiguousarray(raw[m], np.float32)).to(self.device)
                                   for m in MODALITIES},
                         present=torch.from_numpy(present).to(self.device),
                         valid=torch.ones(1, len(records), dtype=torch.bool, device=self.device))

    @torch.inference_mode()
    def logits(self, batch: "ComPBatch") -> torch.Tensor:
        """Fused logits [C] (regression: [1]) of a one-utterance batch, at the checkpoint's stage."""
        return self.conversation_logits(batch)[0]

    @torch.inference_mode()
    def conversation_logits(self, batch: "ComPBatch") -> torch.Tensor:
        """Fused logits [L, C] (regression: [L, 1]) of a batch of one conversation, every utterance attending
        over the others, at the checkpoint's stage."""
        with _single_cpu_thread(self.device):
            return self.model(batch, stage=self.stage).logits[0].float().cpu()

    def _forward(self, record: ClipRecord) -> torch.Tensor:
        return self.logits(self.batch_for(record))

    def _decode_output(self, logits: torch.Tensor) -> dict[str, Any]:
        if self.task == "regression":
            return {"value": float(logits.reshape(-1)[0])}
        probs = torch.softmax(logits.double(), dim=-1).tolist()
        names = self.label_names or tuple(str(i) for i in range(len(probs)))
        best = int(np.argmax(probs))
        return {"label": names[best], "probs": {n: float(p) for n, p in zip(names, probs)}}

    @staticmethod
    def _modality_report(record: ClipRecord) -> dict[str, dict[str, Any]]:
        report = {}
        for m in MODALITIES:
            value = record.modalities[m]
            entry: dict[str, Any] = {"present": value.features is not None}
            if value.features is None:
                entry["reason"] = value.reason
            report[m] = entry
        return report

    def _model_report(self) -> dict[str, str]:
        return {"checkpoint": str(self.checkpoint), "spec_hash": self.spec_hash, "task": self.task}


class _StageProbe:
    """An extractor seen through: reports its stage as it starts, and keeps the face crops it finds."""

    def __init__(self, extractor: Any, stage: str, progress: ProgressFn | None,
                 faces: list[np.ndarray] | None) -> None:
        self._extractor, self._stage, self._progress, self._faces = extractor, stage, progress, faces

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)

    def extract(self, clips: Any) -> Any:
        if self._progress is not None:
            self._progress(self._stage, PREDICT_STEPS.index(self._stage), len(PREDICT_STEPS))
        find = getattr(self._extractor, "_faces", None)
        if self._faces is None or self._stage != "visual" or find is None:
            return self._extractor.extract(clips)

        def keeping(frames: np.ndarray) -> list[np.ndarray]:  # the crops the extractor itself embeds
            crops = find(frames)
            self._faces.extend(np.array(c) for c in crops)  # copies: the frames are freed
            return crops

        self._extractor._faces = keeping  # an instance attribute shadows the method for this call only
        try:
            return self._extractor.extract(clips)
        finally:
            del self._extractor._faces


@contextlib.contextmanager
def _observed(extraction: Any, progress: ProgressFn | None, faces: list[np.ndarray] | None) -> Iterator[None]:
    """The extraction's extractors wrapped in _StageProbe while one clip runs (nothing to wrap: as is)."""
    if progress is None and faces is None:
        yield
        return
    if progress is not None:
        progress("decode", 0, len(PREDICT_STEPS))  # decoding runs first, inside extract_paths
    originals = dict(extraction.extractors)
    extraction.extractors = {s: _StageProbe(e, s, progress, faces) if s in STAGES else e
                             for s, e in originals.items()}
    try:
        yield
    finally:
        extraction.extractors = originals


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the ComP forward on CPU. One utterance is microseconds of work per op, and
    after the extractors have run, waking a second OpenMP thread for each tiny op costs milliseconds
    (measured: 250 ms vs 1 ms per clip on 2 cores)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _diagnostic_report(diags: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    asr = {k.removeprefix("asr_"): _finite_or_none(diags[k]) for k in ASR_DIAGNOSTICS if k in diags}
    face: dict[str, float | None] = {}
    for k in FACE_DIAGNOSTICS:
        if k in diags:
            v = _finite_or_none(diags[k])
            face[k] = int(v) if v is not None else None
    return {"asr": asr, "face": face}


# --------------------------------------------------------------------------------------------- builders

def _build_extraction(spec: Mapping[str, Any], device: torch.device, checkpoint: Path) -> Any:
    from pipeline.extract import Extraction

    try:
        # one clip per batch and no decode threads: every clip is extracted exactly as it would be alone
        return Extraction.from_spec(dict(spec), device, batch_size=1, num_workers=0)
    except Exception as err:  # noqa: BLE001 - every refusal (spec, config, missing weights) is reported alike
        raise PredictError(f"{checkpoint}: cannot rebuild the extractors its features came from: "
                           f"{_one_line(err)}") from None


def _build_normalizer(meta: Mapping[str, Any], checkpoint: Path) -> Any | None:
    data = meta.get("normalizer")
    if not data:
        return None
    from comp.data import Normalizer

    try:
        normalizer = Normalizer.from_dict(data)
    except Exception as err:  # noqa: BLE001
        raise PredictError(f"{checkpoint}: its feature normalizer cannot be read: {_one_line(err)}") from None
    dims = {m: int(d) for m, d in meta["input_dims"].items()}
    wrong = {m: len(normalizer.mean[m]) for m in MODALITIES if len(normalizer.mean[m]) != dims.get(m)}
    if wrong:
        raise PredictError(f"{checkpoint}: its normalizer has dims {wrong}, its model expects {dims}; "
                           "the checkpoint is inconsistent, retrain it")
    return normalizer


def _one_line(err: BaseException) -> str:
    return " ".join((str(err) or type(err).__name__).split())
