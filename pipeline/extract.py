"""The extraction run: clips -> decode -> asr -> audio -> text -> visual -> one store row per clip.

`Extraction` holds the loaded extractors (models are loaded once) and turns clips into `ClipRecord`s;
comp-extract (`run_extraction`) and comp-predict run the same code. Decoding runs in a thread pool ahead of
the models (PyAV releases the GIL while it decodes); the models run in the calling thread on batches of
clips of similar duration; one writer (the caller) journals every batch and commits every `commit_every`
clips through `StoreWriter`, so a run killed at any moment is finished by rerunning the same command.

A clip never stops the run: a decode failure or an extractor exception makes that clip's row
`status="error"` with every modality absent and the reason recorded ("decode-error: ...",
"extractor-error: <stage>: ..."); the traceback goes to the debug log.

The extraction spec stored in the file (and in checkpoints) is::

    {"schema_version": 1, "rules": {"decode": <pipeline.decode.RULES_VERSION>},
     "decode": {...DecodeConfig...}, "plugins": [...],
     "asr"|"audio"|"text"|"visual": {"name": <registered name>, "config": {...resolved extractor config...},
                                      "spec": <extractor.spec()>, with "rules": <version> where it has rules}}

`Extraction.from_spec` rebuilds the extractors from it and refuses when the rebuilt spec hashes differently.
A store or checkpoint made under other decoding or ASR rules (`rules_mismatch`) is refused with "re-extract":
its features are not what this version would compute, and mixing them would be silent.

Distributed runs (`run_sharded_extraction`, under torchrun or `comp-extract --nproc N`): every rank extracts a
stable share of the clips on its own device into its own part store (`<out>.parts/rank-<r>-of-<N>.h5`, the
same StoreWriter and header), and rank 0 upserts the parts into the one store once every rank is done.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import logging
import math
import shutil
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import devices
from core.atomic import atomic_open
from core.clip import MODALITIES, STAGES, ClipInput
from core.config import from_dict, to_dict
from core.distributed import DistributedError, Job, agree, all_gather, run_on_main
from core.errors import CompError, ConfigError
from core.progress import Progress
from core.records import ClipRecord, ModalityInfo, ModalityValue, StoreData, StoreError, StoreHeader, spec_hash
from extractors.base import Extractor, ExtractorOutput
from pipeline.decode import RULES_VERSION as DECODE_RULES
from pipeline.decode import DecodeConfig, DecodeError, decode_clip
from pipeline.extract_config import ExtractionConfig, StageConfig, extractor_class, extractor_config, import_plugins
from pipeline.inputs import ClipItem, InputError, check_unique_ids, infer_task
from pipeline.store import SCHEMA_VERSION, StoreWriter, read_header, read_store

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 300  # ffmpeg and exception texts can be long; a reason is a short code plus detail
BUFFER_BATCHES = 2  # decoded clips held back (in batches) so that a batch groups clips of similar duration
FAILURES_SUFFIX = ".failures.csv"  # clips that failed (status error): nothing of them is in the store
MISSING_SUFFIX = ".missing.csv"  # modalities absent from clips that were extracted, with the reason
PARTS_SUFFIX = ".parts"  # <store>.parts/rank-<r>-of-<N>.h5: the per-rank stores of a distributed run
MERGE_ROWS = 1024  # rows per journal chunk when parts are folded into the store


class ExtractionError(CompError, RuntimeError):
    """A systemic failure: a model that cannot be loaded, or a stored spec that cannot be honoured."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`core.devices.resolve_device`, failing as an ExtractionError (a systemic failure of the run)."""
    try:
        return devices.resolve_device(device)
    except ValueError as err:
        raise ExtractionError(str(err)) from None


def spec_rules(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The rule versions an extraction spec was made under: decoding, and each stage that declares some."""
    rules = {"decode": (spec.get("rules") or {}).get("decode")}
    for stage in STAGES:
        stage_spec = (spec.get(stage) or {}).get("spec") or {}
        if "rules" in stage_spec:
            rules[stage] = stage_spec["rules"]
    return rules


def rules_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """"" when both specs follow the same decoding/ASR rules, else a sentence that says to re-extract."""
    old, new = spec_rules(stored), spec_rules(current)
    differ = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    if not differ:
        return ""
    versions = ", ".join(f"{k} rules {old.get(k) or 'unversioned'} (here {new.get(k) or 'unversioned'})"
                         for k in differ)
    return (f"its features were extracted under older rules ({versions}): this comp-mer decodes and "
            "transcribes differently, so they must not be mixed with new ones; re-extract")


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


@dataclass
class _Decoded:
    item: ClipItem
    clip: ClipInput | None
    error: str  # "" when decoded
    seconds: float = 0.0  # decoding time of this clip


def _unlocated(spec: Any) -> Any:
    """The spec without the install paths of models pinned by their content hash ("resolved" beside
    "model_sha256"): stores and checkpoints written before packaged models were recorded by name, or on another
    machine, name the same weights by a different path."""
    if isinstance(spec, Mapping):
        pinned = "model_sha256" in spec
        return {k: _unlocated(v) for k, v in spec.items() if not (pinned and k == "resolved")}
    if isinstance(spec, (list, tuple)):
        return [_unlocated(v) for v in spec]
    return spec


class Extraction:
    """Loaded extractors for all four stages plus the decode settings: clips in, store rows out."""

    def __init__(self, cfg: ExtractionConfig, extractors: Mapping[str, Extractor],
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.extractors = dict(extractors)
        self.device = torch.device(device)
        self.spec: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "rules": {"decode": DECODE_RULES},
            "decode": to_dict(cfg.decode),
            "plugins": list(cfg.plugins),
            **{s: {"name": cfg.stage(s).name, "config": to_dict(self.extractors[s].config),
                   "spec": self.extractors[s].spec()} for s in STAGES},
        }
        self.spec_hash = spec_hash(self.spec)
        self.header_modalities: dict[str, ModalityInfo] = {}
        for m in MODALITIES:
            ext = self.extractors[m]
            info = ext.info()
            self.header_modalities[m] = ModalityInfo(dim=int(ext.feature_dim), encoder=info.get("encoder", ""),
                                                     layers=info.get("layers", ""),
                                                     pooling=info.get("pooling", ""))
        self.seconds: dict[str, float] = defaultdict(float)  # time per stage, accumulated over calls
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: ExtractionConfig, device: torch.device | str = "cpu") -> "Extraction":
        """Load every stage's extractor (models load here, once)."""
        device = resolve_device(device)
        import_plugins(cfg.plugins)
        extractors = {}
        for stage in STAGES:
            sc = cfg.stage(stage)
            extractor_cls = extractor_class(stage, sc.name)  # ConfigError on an unknown name
            ecfg = extractor_config(stage, sc)  # ConfigError on a bad key or value
            t0 = time.perf_counter()
            try:
                extractors[stage] = extractor_cls(ecfg, device)
            except (ConfigError, ExtractionError):
                raise
            except Exception as err:
                log.debug("loading %s extractor %r failed", stage, sc.name, exc_info=True)
                raise ExtractionError(f"cannot load the {stage} extractor {sc.name!r}: "
                                      f"{type(err).__name__}: {err}") from err
            log.info("loaded %s extractor %s in %.1f s", stage, sc.name, time.perf_counter() - t0)
        return cls(cfg, extractors, device)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str = "cpu", *,
                  batch_size: int = 8, num_workers: int = 2) -> "Extraction":
        """Rebuild the extractors a stored extraction spec describes; refuse if they would differ."""
        if spec.get("schema_version") != SCHEMA_VERSION:
            raise ExtractionError(f"the extraction spec has schema_version {spec.get('schema_version')!r}; "
                                  f"this comp-mer honours {SCHEMA_VERSION}")
        try:
            import_plugins(spec.get("plugins", []))
            cfg = ExtractionConfig(
                decode=from_dict(DecodeConfig, spec["decode"], "decode"),
                **{s: StageConfig(spec[s]["name"], dict(spec[s]["config"])) for s in STAGES},
                batch_size=batch_size, num_workers=num_workers, plugins=tuple(spec.get("plugins", [])),
            )
            for s in STAGES:
                extractor_config(s, cfg.stage(s))
        except (ConfigError, KeyError, TypeError) as err:
            raise ExtractionError(f"the stored extraction spec cannot be honoured: {err}") from err
        extraction = cls.from_config(cfg, device)
        outdated = rules_mismatch(spec, extraction.spec)
        if outdated:
            raise ExtractionError(f"{outdated} the clips (comp-extract) and retrain")
        if extraction.spec_hash != spec_hash(spec) and _unlocated(spec) != _unlocated(extraction.spec):
            differ = [k for k in sorted(set(spec) | set(extraction.spec)) if spec.get(k) != extraction.spec.get(k)]
            details = "; ".join(f"{k}: stored {spec.get(k)!r} vs here {extraction.spec.get(k)!r}"
                                for k in differ)
            raise ExtractionError("the extractors available here do not reproduce the stored extraction spec "
                                  f"(different {', '.join(differ)}): {_short(details)}")
        return extraction

    # ----------------------------------------------------------------------------------- running
    def extract_paths(self, items: Sequence[ClipItem], progress: Progress | None = None
                      ) -> Iterator[ClipRecord]:
        """One record per clip (order: grouped by size for batching, not input order)."""
        for records in self.extract_batches(items, progress):
            yield from records

    def extract_batches(self, items: Sequence[ClipItem], progress: Progress | None = None
                        ) -> Iterator[list[ClipRecord]]:
        """Records batch by batch; `progress("clips", done, total)` after each batch."""
        total, done = len(items), 0
        for batch in self._batches(items):
            records = self.run_batch(batch)
            done += len(records)
            yield records
            if progress is not None:
                progress("clips", done, total)

    def run_batch(self, batch: Sequence[_Decoded]) -> list[ClipRecord]:
        """Run the four stages on a batch of decoded clips (decode failures pass through as errors)."""
        errors: dict[int, str] = {i: d.error for i, d in enumerate(batch) if d.clip is None}
        outputs: dict[str, dict[int, ExtractorOutput]] = {s: {} for s in STAGES}
        for stage in STAGES:
            live = [i for i in range(len(batch)) if i not in errors]
            if not live:
                break
            results = self._run_stage(stage, [batch[i] for i in live])
            for i, result in zip(live, results):
                if isinstance(result, str):
                    errors[i] = result
                    continue
                outputs[stage][i] = result
                if stage == "asr":
                    _apply_asr(batch[i].clip, result)
        records = []
        for i, d in enumerate(batch):
            if i in errors:
                records.append(_error_record(d.item, errors[i], d.clip))
            else:
                records.append(self._record(d, {s: outputs[s][i] for s in STAGES}))
        for d in batch:  # free decoded media and cached encoder states as soon as the batch is done
            if d.clip is not None:
                d.clip.shared.clear()
        return records

    def _run_stage(self, stage: str, batch: Sequence[_Decoded]) -> list[ExtractorOutput | str]:
        """Outputs of one stage, or an error reason per clip. A failing batch is retried clip by clip."""
        extractor = self.extractors[stage]
        clips = [d.clip for d in batch]
        t0 = time.perf_counter()
        try:
            outputs = extractor.extract(clips)
            if len(outputs) != len(clips):
                raise RuntimeError(f"returned {len(outputs)} outputs for {len(clips)} clips")
        except Exception as err:
            if len(batch) > 1:
                log.warning("%s extractor failed on a batch of %d clips (%s: %s); retrying clip by clip",
                            stage, len(batch), type(err).__name__, _short(str(err)))
                self.seconds[stage] += time.perf_counter() - t0
                return [r for d in batch for r in self._run_stage(stage, [d])]
            log.warning("skipping %s: %s extractor failed: %s: %s", batch[0].item.id, stage,
                        type(err).__name__, _short(str(err)))
            log.debug("traceback for %s (%s):\n%s", batch[0].item.id, stage, traceback.format_exc())
            self.seconds[stage] += time.perf_counter() - t0
            return [f"extractor-error: {stage}: {_short(f'{type(err).__name__}: {err}')}"]
        self.seconds[stage] += time.perf_counter() - t0
        return [self._checked(stage, d.item.id, out) for d, out in zip(batch, outputs)]

    def _checked(self, stage: str, clip_id: str, out: ExtractorOutput) -> ExtractorOutput | str:
        """The output, or an error reason when it breaks the contract (wrong dim, NaN, no reason)."""
        if stage == "asr":
            return out
        if out.features is None:
            if not out.reason:
                return f"extractor-error: {stage}: absent without a reason"
            return out
        vec = np.asarray(out.features, dtype=np.float32).reshape(-1)
        dim = self.extractors[stage].feature_dim
        if vec.shape[0] != dim:
            return f"extractor-error: {stage}: vector of dim {vec.shape[0]}, expected {dim}"
        if not np.all(np.isfinite(vec)):
            log.warning("skipping %s: %s extractor produced non-finite values", clip_id, stage)
            return f"extractor-error: {stage}: non-finite values"
        return ExtractorOutput(features=vec, reason="", diagnostics=out.diagnostics, transcript=out.transcript)

    def _record(self, d: _Decoded, outputs: Mapping[str, ExtractorOutput]) -> ClipRecord:
        clip, item = d.clip, d.item
        assert clip is not None
        diagnostics: dict[str, float] = {}
        for stage in STAGES:
            for key, value in outputs[stage].diagnostics.items():
                try:
                    diagnostics[key] = float(value)
                except (TypeError, ValueError):
                    log.debug("%s: diagnostic %s=%r is not a number; dropped", item.id, key, value)
        if clip.frames is not None:
            diagnostics.setdefault("frames_sampled", float(len(clip.frames)))
        diagnostics["decode_ms"] = d.seconds * 1e3
        return ClipRecord(
            id=item.id, source=item.source, conversation=item.conversation, position=item.position,
            speaker=item.speaker, label=item.label, value=item.value, split=item.split, fold=item.fold,
            duration_s=float(clip.duration_s), transcript=clip.transcript or "", status="ok",
            modalities={m: ModalityValue(outputs[m].features, "" if outputs[m].features is not None
                                         else _short(outputs[m].reason)) for m in MODALITIES},
            diagnostics=diagnostics,
        )

    # ----------------------------------------------------------------------------------- decoding
    def _decode(self, item: ClipItem) -> _Decoded:
        """Decode one clip; never raises (a failure becomes the clip's error reason)."""
        t0 = time.perf_counter()
        try:
            clip = decode_clip(item.path, item.id, self.cfg.decode, start_s=item.start_s, end_s=item.end_s,
                               audio_path=item.audio_path, crop=item.crop)
            result = _Decoded(item, clip, "")
        except Exception as err:  # DecodeError, and anything a broken file makes the decoder raise
            text = str(err) if isinstance(err, DecodeError) else f"{type(err).__name__}: {err}"
            log.warning("skipping %s: cannot decode %s: %s", item.id, item.path, _short(text))
            if not isinstance(err, DecodeError):
                log.debug("traceback for %s (decode):\n%s", item.id, traceback.format_exc())
            result = _Decoded(item, None, f"decode-error: {_short(text)}")
        result.seconds = time.perf_counter() - t0
        with self._lock:  # decoding threads add up their time here
            self.seconds["decode"] += result.seconds
        return result

    def _decoded(self, items: Sequence[ClipItem]) -> Iterator[_Decoded]:
        """Decoded clips in `items` order; with workers, up to a window of clips is decoded ahead."""
        workers = self.cfg.num_workers
        if workers == 0:
            for item in items:
                yield self._decode(item)
            return
        ahead = workers + self.cfg.batch_size * BUFFER_BATCHES
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        try:
            pending: list[Future] = []
            queue = iter(items)
            for item in queue:
                pending.append(pool.submit(self._decode, item))
                if len(pending) >= ahead:
                    break
            while pending:
                future = pending.pop(0)
                t0 = time.perf_counter()
                decoded = future.result()
                self.seconds["decode-wait"] += time.perf_counter() - t0
                nxt = next(queue, None)
                if nxt is not None:
                    pending.append(pool.submit(self._decode, nxt))
                yield decoded
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, items: Sequence[ClipItem]) -> Iterator[list[_Decoded]]:
        """Batches of similar duration: files go in by size, and a small buffer is sorted by duration."""
        ordered = sorted(items, key=_file_size)
        size = self.cfg.batch_size
        buffer: list[_Decoded] = []
        failed: list[_Decoded] = []
        for decoded in self._decoded(ordered):
            if decoded.clip is None:
                failed.append(decoded)  # nothing to batch: emitted with the next batch
                if len(failed) >= size:
                    yield failed
                    failed = []
                continue
            buffer.append(decoded)
            if len(buffer) >= size * BUFFER_BATCHES:
                buffer.sort(key=lambda d: d.clip.duration_s)
                yield failed + buffer[:size]
                failed, buffer = [], buffer[size:]
        buffer.sort(key=lambda d: d.clip.duration_s)
        for start in range(0, len(buffer), size):
            yield failed + buffer[start:start + size]
            failed = []
        if failed:
            yield failed


def _file_size(item: ClipItem) -> int:
    try:
        return item.path.stat().st_size
    except OSError:
        return 0


def _apply_asr(clip: ClipInput, out: ExtractorOutput) -> None:
    """Make the ASR result visible to the later stages (if the extractor did not set it itself)."""
    if clip.transcript is None:
        clip.transcript = out.transcript if out.transcript is not None else ""
    if not clip.text_reason and out.reason:
        clip.text_reason = out.reason
    if not clip.transcript.strip() and not clip.text_reason:
        clip.text_reason = "asr-empty"


def _error_record(item: ClipItem, reason: str, clip: ClipInput | None) -> ClipRecord:
    duration = float(clip.duration_s) if clip is not None else math.nan
    return ClipRecord(
        id=item.id, source=item.source, conversation=item.conversation, position=item.position,
        speaker=item.speaker, label=item.label, value=item.value, split=item.split, fold=item.fold,
        duration_s=duration, transcript="", status="error",
        modalities={m: ModalityValue(None, reason) for m in MODALITIES},
    )


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class ExtractionSummary:
    """What a run did and what the store now holds for its inputs."""

    store: Path
    clips: int  # clips in the inputs
    processed: int  # extracted by this run
    skipped: int  # already in the store or its journal
    ok: int
    error: int
    present: dict[str, int]
    missing: dict[str, dict[str, int]]  # modality -> reason code -> clips (over the inputs, errors included)
    wall_s: float
    media_s: float  # duration of the clips processed by this run
    stage_s: dict[str, float] = field(default_factory=dict)
    failures_path: Path | None = None
    missing_path: Path | None = None
    skipped_files: str = ""  # files of the input folder that are not clips, by kind (`Inputs.skipped_summary`)

    @property
    def clips_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def real_time_factor(self) -> float:
        return self.wall_s / self.media_s if self.media_s > 0 else math.nan

    def table(self) -> str:
        """The end-of-run summary as a plain-text table."""
        lines = [f"store      {self.store}",
                 f"clips      {self.clips} in the inputs: {self.ok} ok, {self.error} error"
                 f"  (this run: {self.processed} extracted, {self.skipped} already done)"]
        lines.append(f"{'modality':<10} {'present':>8} {'missing':>8}  reasons")
        for m in MODALITIES:
            reasons = self.missing.get(m, {})
            detail = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"{m:<10} {self.present.get(m, 0):>8} {sum(reasons.values()):>8}  {detail or '-'}")
        speed = f"{self.clips_per_s:.2f} clips/s" if self.processed else "nothing to do"
        rtf = f", real-time factor {self.real_time_factor:.2f}" if self.processed and self.media_s > 0 else ""
        lines.append(f"time       {self.wall_s:.1f} s, {speed}{rtf}")
        if self.processed and self.stage_s:
            order = ("decode", "decode-wait", *STAGES, "write")
            parts = [f"{k} {self.stage_s[k]:.1f} s" for k in order if self.stage_s.get(k, 0.0) > 0]
            lines.append(f"stages     {', '.join(parts)}  (decode runs in threads, beside the models)")
        if self.failures_path is not None:
            lines.append(f"failures   {self.failures_path}  ({self.error} clip{'s' if self.error != 1 else ''} "
                         "that could not be extracted)")
        if self.missing_path is not None:
            lines.append(f"missing    {self.missing_path}  (absent modalities of extracted clips, with reasons)")
        if self.skipped_files:
            lines.append(f"not clips  {self.skipped_files}")
        return "\n".join(lines)


def failures_path_for(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + FAILURES_SUFFIX)


def missing_path_for(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + MISSING_SUFFIX)


def check_writable(out_path: str | Path) -> None:
    """Fail early (before models load) when the store's folder cannot be written."""
    out = Path(out_path)
    if out.exists() and out.is_dir():
        raise StoreError(f"{out} is a folder; --out needs a file name such as feats.h5")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.{uuid.uuid4().hex}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StoreError(f"cannot write to {out.parent}: {err.strerror or err}") from err


def check_rules(out_path: str | Path, spec: Mapping[str, Any]) -> None:
    """StoreError when the store at `out_path` was extracted under other decoding/ASR rules than `spec`."""
    out_path = Path(out_path)
    if not out_path.is_file():
        return
    try:
        stored = read_header(out_path).extraction_spec
    except Exception:  # noqa: BLE001 - an unreadable store is StoreWriter's to report
        return
    outdated = rules_mismatch(stored, spec) if stored is not None else ""
    if outdated:
        raise StoreError(f"{out_path}: {outdated} into a new file, or pass --overwrite to redo this one")


def run_extraction(items: Sequence[ClipItem], out_path: str | Path, cfg: ExtractionConfig, *,
                   device: torch.device | str = "cpu", overwrite: bool = False, retry_failed: bool = False,
                   progress: Progress | None = None, task: str | None = None,
                   extraction: Extraction | None = None) -> ExtractionSummary:
    """Extract `items` into the store at `out_path`, resuming whatever an earlier run of the same spec left.

    Raises InputError (no or duplicate clips), StoreError (unwritable output, a store of another spec),
    ExtractionError / ConfigError (a model or setting that cannot be used). Per-clip failures never raise.
    """
    t_start = time.perf_counter()
    items = list(items)
    if not items:
        raise InputError("no clips to extract")
    check_unique_ids(items)
    task, label_names = infer_task(items, task)
    out_path = Path(out_path)
    check_writable(out_path)
    if extraction is None:
        extraction = Extraction.from_config(cfg, device)
    header = StoreHeader(task=task, label_names=label_names, modalities=extraction.header_modalities,
                         extraction_spec=extraction.spec)
    if not overwrite:
        check_rules(out_path, extraction.spec)
    if overwrite:
        shutil.rmtree(parts_dir_for(out_path), ignore_errors=True)
    writer = StoreWriter(out_path, header, overwrite=overwrite)
    # rows a killed run journaled (or a killed distributed run left in its parts) become part of the store now
    recovered = writer.commit() + merge_parts(writer)
    if recovered:
        log.info("recovered %d rows journaled by an interrupted run", recovered)
    known = writer.known_status()
    todo = [it for it in items if it.id not in known or (retry_failed and known[it.id] == "error")]
    skipped = len(items) - len(todo)
    if skipped:
        log.info("%d of %d clips already in %s; extracting %d", skipped, len(items), out_path, len(todo))
    seconds_before = dict(extraction.seconds)
    media_s = _extract_into(writer, extraction, todo, cfg.commit_every, progress)
    summary = _summarize(out_path, items, processed=len(todo), skipped=skipped,
                         wall_s=time.perf_counter() - t_start, media_s=media_s,
                         stage_s={k: v - seconds_before.get(k, 0.0) for k, v in extraction.seconds.items()})
    log.info("done: %d ok, %d error; %s", summary.ok, summary.error,
             f"failures in {summary.failures_path}" if summary.failures_path else "no failures")
    return summary


def _extract_into(writer: StoreWriter, extraction: Extraction, todo: Sequence[ClipItem], commit_every: int,
                  progress: Progress | None) -> float:
    """Extract `todo` through `writer` (journal every batch, commit every `commit_every` clips, commit at the
    end, also on Ctrl-C); returns the media duration processed."""
    media_s = 0.0
    since_commit = 0
    done = 0
    if progress is not None:
        progress("clips", 0, len(todo))
    try:
        for records in extraction.extract_batches(todo):
            t0 = time.perf_counter()
            writer.add(records)
            since_commit += len(records)
            if since_commit >= commit_every:
                writer.commit()
                since_commit = 0
            extraction.seconds["write"] += time.perf_counter() - t0
            media_s += sum(r.duration_s for r in records if math.isfinite(r.duration_s))
            done += len(records)
            if progress is not None:
                progress("clips", done, len(todo))
    finally:
        t0 = time.perf_counter()
        writer.close()  # commits what is journaled, also on Ctrl-C
        extraction.seconds["write"] += time.perf_counter() - t0
    return media_s


def _reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


def _summarize(store: Path, items: Sequence[ClipItem], *, processed: int, skipped: int, wall_s: float,
               media_s: float, stage_s: dict[str, float]) -> ExtractionSummary:
    data = read_store(store, include_pending_warning=False)
    wanted = {it.id for it in items}
    rows = np.array([i for i, clip_id in enumerate(data.ids) if clip_id in wanted], dtype=np.int64)
    data = data.subset(rows)
    present = {m: int(data.present[m].sum()) for m in MODALITIES}
    missing = {m: dict(Counter(_reason_code(r) for r, p in zip(data.reason[m], data.present[m]) if not p))
               for m in MODALITIES}
    failures, absent = write_failures(failures_path_for(store), data), write_missing(missing_path_for(store), data)
    return ExtractionSummary(store=store, clips=len(items), processed=processed, skipped=skipped,
                             ok=int((data.status == "ok").sum()), error=int((data.status == "error").sum()),
                             present=present, missing=missing, wall_s=wall_s, media_s=media_s,
                             stage_s=stage_s, failures_path=failures, missing_path=absent)


def write_failures(path: Path, data: Any) -> Path | None:
    """`<store>.failures.csv`: one line per clip that failed (status error): id, source, reason.
    None (and no file) when every clip was extracted."""
    rows = []
    for i, clip_id in enumerate(data.ids):
        if data.status[i] == "error":
            reason = next((str(data.reason[m][i]) for m in MODALITIES if data.reason[m][i]), "error")
            rows.append((clip_id, data.source[i], reason))
    return _write_csv(path, ("id", "source", "reason"), rows)


def write_missing(path: Path, data: Any) -> Path | None:
    """`<store>.missing.csv`: one line per absent modality of a clip that was extracted (status ok): id, source,
    modality, reason. Not failures: the clip is in the store with its other modalities. None when none."""
    rows = [(clip_id, data.source[i], m, data.reason[m][i])
            for i, clip_id in enumerate(data.ids) if data.status[i] == "ok"
            for m in MODALITIES if not data.present[m][i]]
    return _write_csv(path, ("id", "source", "modality", "reason"), rows)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path | None:
    """Replace `path` atomically with `rows` under `header`; no rows: remove it and return None."""
    if not rows:
        path.unlink(missing_ok=True)
        return None
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


# ----------------------------------------------------------------------------------- the distributed run

def parts_dir_for(store: str | Path) -> Path:
    """`<store>.parts/`: where the ranks of a distributed run write their parts."""
    store = Path(store)
    return store.with_name(store.name + PARTS_SUFFIX)


def part_path(store: str | Path, rank: int, world_size: int) -> Path:
    return parts_dir_for(store) / f"rank-{rank}-of-{world_size}.h5"


def shard_items(items: Sequence[ClipItem], world_size: int) -> list[list[ClipItem]]:
    """Split the clips among `world_size` ranks, the same way for the same inputs on every rerun.

    Largest file first, each to the rank with the fewest bytes so far (ties: the lower rank), which evens
    out the work when clip lengths differ; each share is in id order. The split depends on the input list
    only (not on what is already done), so a rerun gives every rank the share its part file was for.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = {it.id: _file_size(it) for it in items}
    loads = [(0, r) for r in range(world_size)]  # heap of (bytes, rank)
    heapq.heapify(loads)
    shares: list[list[ClipItem]] = [[] for _ in range(world_size)]
    for it in sorted(items, key=lambda it: (-sizes[it.id], it.id)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(it)
        heapq.heappush(loads, (load + max(1, sizes[it.id]), rank))
    return [sorted(share, key=lambda it: it.id) for share in shares]


def records_from_store(data: StoreData) -> Iterator[ClipRecord]:
    """The rows of a loaded store as records (what StoreWriter.add takes); NaN diagnostics were not measured."""
    for i, clip_id in enumerate(data.ids):
        yield ClipRecord(
            id=str(clip_id), source=str(data.source[i]), conversation=str(data.conversation[i]),
            position=int(data.position[i]), speaker=str(data.speaker[i]), label=str(data.label[i]),
            value=float(data.value[i]), split=str(data.split[i]), fold=int(data.fold[i]),
            duration_s=float(data.duration_s[i]), transcript=str(data.transcript[i]), status=str(data.status[i]),
            modalities={m: ModalityValue(data.features[m][i] if data.present[m][i] else None,
                                         "" if data.present[m][i] else str(data.reason[m][i]))
                        for m in MODALITIES},
            diagnostics={k: float(v[i]) for k, v in data.diagnostics.items() if math.isfinite(float(v[i]))})


def merge_parts(writer: StoreWriter) -> int:
    """Fold every part next to the writer's store (any rank count) into it, commit, then delete the parts.

    Rows are upserted by clip id, so merging a part twice (a crash between the commit and the deletion)
    changes nothing. A part's own uncommitted journal is committed first. Returns the rows merged.
    """
    folder = parts_dir_for(writer.path)
    if not folder.is_dir():
        return 0
    merged = 0
    for part in sorted(folder.glob("rank-*-of-*.h5")):
        part_writer = StoreWriter(part, writer.header)  # refuses a part written with another spec
        part_writer.commit()
        data = read_store(part, include_pending_warning=False)
        for start in range(0, len(data), MERGE_ROWS):
            rows = np.arange(start, min(start + MERGE_ROWS, len(data)))
            writer.add(list(records_from_store(data.subset(rows))))
        merged += len(data)
        log.debug("merged %d rows of %s", len(data), part)
    writer.commit()  # durable before the parts go
    shutil.rmtree(folder, ignore_errors=True)
    return merged


def _ids_digest(items: Sequence[ClipItem]) -> str:
    return hashlib.sha256("\n".join(sorted(it.id for it in items)).encode("utf-8")).hexdigest()


def _agree_on_call(job: Job, fn: Any) -> Any:
    """fn() on every rank; if it raised on any rank, every rank raises (see core.distributed.agree)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised by agree on this rank
        error = err
    agree(job, error)
    return result


def run_sharded_extraction(items: Sequence[ClipItem], out_path: str | Path, cfg: ExtractionConfig, job: Job, *,
                           device: torch.device | str = "cpu", overwrite: bool = False,
                           retry_failed: bool = False, progress: Progress | None = None,
                           task: str | None = None, extraction: Extraction | None = None) -> ExtractionSummary:
    """One rank's share of a distributed extraction; call it on every rank of `job` with the same clips.

    1. rank 0 opens the store (creating or checking it; `overwrite` clears it and any parts), commits a
       killed run's journal and folds leftover parts (of any rank count) into it;
    2. each rank extracts its share (`shard_items`) minus the clips already in the store into
       `<out>.parts/rank-<r>-of-<N>.h5` through its own StoreWriter (crash-safe, resumable);
    3. after every rank has finished (the `agree` barrier), rank 0 upserts the parts into the store and
       deletes them. Every rank returns the summary of the whole run.

    A rank killed at any moment loses nothing: its part's committed rows and journal are folded in by the
    next run's step 1, and the clips are never extracted twice into the store (rows are keyed by id).
    """
    t_start = time.perf_counter()
    items = list(items)
    out_path = Path(out_path)
    env = job.env

    def check_inputs() -> tuple[str, tuple[str, ...]]:
        if not items:
            raise InputError("no clips to extract")
        check_unique_ids(items)
        result = infer_task(items, task)
        if env.is_main:
            check_writable(out_path)
        return result

    task_, label_names = _agree_on_call(job, check_inputs)
    if len(set(all_gather(job, _ids_digest(items)))) > 1:
        raise DistributedError("the ranks were given different clip lists; give every rank the same INPUT "
                               "(and manifest), on a file system they all see")
    if extraction is None:
        extraction = _agree_on_call(job, lambda: Extraction.from_config(cfg, device))
    if len(set(all_gather(job, extraction.spec_hash))) > 1:
        raise ExtractionError("the ranks built different extraction specs (different settings or package "
                              "versions on the machines); features from them must not be mixed")
    header = StoreHeader(task=task_, label_names=label_names, modalities=extraction.header_modalities,
                         extraction_spec=extraction.spec)

    def prepare() -> tuple[int, dict[str, str]]:
        if not overwrite:
            check_rules(out_path, extraction.spec)
        if overwrite:
            shutil.rmtree(parts_dir_for(out_path), ignore_errors=True)
        writer = StoreWriter(out_path, header, overwrite=overwrite)
        recovered = writer.commit() + merge_parts(writer)
        known = writer.known_status()
        writer.close()
        return recovered, known

    recovered, known = run_on_main(job, prepare)
    if recovered and env.is_main:
        log.info("recovered %d rows an interrupted run had extracted", recovered)
    share = shard_items(items, env.world_size)[env.rank]
    todo = [it for it in share if it.id not in known or (retry_failed and known[it.id] == "error")]
    log.info("%s%d of %d clips are this rank's share; %d to extract on %s", env.tag, len(share), len(items),
             len(todo), extraction.device)
    seconds_before = dict(extraction.seconds)

    def extract_share() -> float:
        writer = StoreWriter(part_path(out_path, env.rank, env.world_size), header)
        return _extract_into(writer, extraction, todo, cfg.commit_every, progress)

    media_s = _agree_on_call(job, extract_share)  # also the barrier: every part is complete after it
    stage_s = {k: v - seconds_before.get(k, 0.0) for k, v in extraction.seconds.items()}
    reports = all_gather(job, (len(todo), media_s, stage_s))

    def finish() -> ExtractionSummary:
        writer = StoreWriter(out_path, header)
        merged = merge_parts(writer)
        writer.close()
        log.info("merged %d rows from %d rank(s) into %s", merged, env.world_size, out_path)
        processed = sum(r[0] for r in reports)
        total_stage: dict[str, float] = defaultdict(float)
        for _, _, seconds in reports:
            for k, v in seconds.items():
                total_stage[k] += v
        return _summarize(out_path, items, processed=processed, skipped=len(items) - processed,
                          wall_s=time.perf_counter() - t_start, media_s=sum(r[1] for r in reports),
                          stage_s=dict(total_stage))

    return run_on_main(job, finish)
