"""The comp-serve HTTP application (FastAPI): routes, the job runner, and the page.

    GET  /                  the page (static/index.html; plain HTML/JS/CSS served from the package, no network)
    GET  /health            {"status": "ok", queue load}
    GET  /model             labels, extraction spec, presets, what the checkpoint was trained on, the limits
    POST /predict           multipart field `file` -> the comp-predict JSON (?timeline=1: the timeline JSON);
                            waits for the result
    POST /jobs              the same upload -> 202 {"id", "events", "result"}; the page uses this
    GET  /jobs/{id}         the job: state, and once finished its status, result and face thumbnails
    GET  /jobs/{id}/events  server-sent events: "state" (queued/running), "progress" {step, done, total}, "done"

Every refusal is a JSON body {"error": "..."} with a 4xx status (503 + Retry-After when the queue is full);
an unexpected failure is a 500 with one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import __version__
from pipeline.inputs import ClipItem
from pipeline.serve.jobs import Job, JobQueue, Outcome, QueueFull
from pipeline.serve.limits import ServeLimits
from pipeline.serve.media_checks import check_clip
from pipeline.serve.uploads import FIELD, UploadError, UploadFolder, receive_upload

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# the page loads nothing from elsewhere: scripts, styles and images come from this server (faces: data: URIs)
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
SSE_POLL_S = 0.1
SSE_KEEPALIVE_S = 15.0

TimelineFn = Callable[..., dict]


def default_timeline() -> TimelineFn | None:
    """pipeline.timeline.predict_timeline when this installation has it."""
    try:
        from pipeline.timeline import predict_timeline
    except ImportError:
        return None
    return predict_timeline


def _timeline_error() -> type[Exception]:
    """The error predict_timeline raises for a recording it cannot use (its message is the reason)."""
    try:
        from pipeline.timeline import TimelineError
    except ImportError:
        return ValueError
    return TimelineError


def face_thumbnails(faces: list[np.ndarray] | None, limits: ServeLimits) -> list[str]:
    """Up to `limits.max_faces` crops, evenly spaced over the clip, as face_px x face_px JPEG data URIs."""
    import cv2

    if not faces or limits.max_faces == 0:
        return []
    picks = np.unique(np.linspace(0, len(faces) - 1, min(len(faces), limits.max_faces)).round().astype(int))
    out = []
    for i in picks:
        crop = np.ascontiguousarray(faces[i])
        small = cv2.resize(crop, (limits.face_px, limits.face_px), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            out.append("data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii"))
    return out


def _scrub(value: Any, secret: str, shown: str) -> Any:
    """`value` with every mention of the upload's private path replaced by the client's file name."""
    if isinstance(value, str):
        return value.replace(secret, shown)
    if isinstance(value, dict):
        return {k: _scrub(v, secret, shown) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secret, shown) for v in value]
    return value


def make_runner(predictor: Any, limits: ServeLimits, timeline: TimelineFn | None) -> Callable[[Job], Outcome]:
    """What the worker does with a job: the one prediction code path (Predictor.predict_item, or the
    timeline over the same Predictor), with progress forwarded to the job's events."""

    def run(job: Job) -> Outcome:
        def progress(step: str, done: int, total: int) -> None:
            job.emit("progress", {"step": str(step), "done": int(done), "total": int(total)})

        path, name = job.upload.path, job.upload.filename
        if job.kind == "timeline":
            assert timeline is not None
            try:
                body = timeline(predictor, path, options=None, progress=progress)
            except _timeline_error() as err:  # the recording cannot be used: the reason, as a 4xx
                return Outcome(422, {"error": str(err).replace(str(path), name)})
            body = _scrub(body, str(path), name)
            body["clip"] = name
            return Outcome(200, body)
        item = ClipItem(id=name, path=path, source=name)
        pred = predictor.predict_item(item, progress=progress, keep_faces=True)
        body = _scrub(pred.to_dict(), str(path), name)
        body["clip"] = name
        status = 200 if pred.prediction is not None else 422  # the body says why ("error")
        return Outcome(status, body, {"faces": face_thumbnails(pred.faces, limits),
                                      "faces_found": len(pred.faces or [])})

    return run


def model_info(predictor: Any, limits: ServeLimits, timeline: bool) -> dict[str, Any]:
    """GET /model: what the checkpoint predicts, from what, and what it was trained on."""
    from pipeline.presets import available_presets

    meta = predictor.meta
    return {
        "task": predictor.task, "labels": list(predictor.label_names), "stage": predictor.stage,
        "checkpoint": str(predictor.checkpoint), "spec_hash": predictor.spec_hash,
        "modalities": meta.get("modalities", {}), "input_dims": predictor.input_dims,
        "extraction_spec": meta.get("extraction_spec"),
        # source: the dataset an imported feature set came from; None for a store comp-extract wrote
        "trained_on": {"features": meta.get("source") or "extracted from clips by comp-extract",
                       "source": meta.get("source"), "conversations": meta.get("conversations"),
                       "clips": meta.get("clips"),
                       "metrics": meta.get("metrics"), "created_with": meta.get("created_with")},
        "train_config": meta.get("train_config"),
        "presets": {"extract": available_presets("extract"), "train": available_presets("train")},
        "limits": asdict(limits), "timeline": timeline, "version": __version__,
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(predictor: Any, limits: ServeLimits | None = None, *, upload_parent: str | Path | None = None,
               timeline: TimelineFn | None | bool = True) -> FastAPI:
    """The application around a loaded `predictor` (pipeline.predict.Predictor, loaded once by the caller).

    `upload_parent`: where the private upload folder is made (default: the system temp folder).
    `timeline`: True = pipeline.timeline when installed, None/False = no timeline, or the function to use.
    The worker thread starts here and stops, deleting the upload folder, when the app shuts down.
    """
    limits = limits or ServeLimits()
    timeline_fn = default_timeline() if timeline is True else (timeline or None)
    folder = UploadFolder(upload_parent)
    queue = JobQueue(make_runner(predictor, limits, timeline_fn), max_queued=limits.max_queued,
                     keep_results=limits.keep_results)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(queue.stop)
            folder.remove()

    app = FastAPI(title="comp-serve", version=__version__, lifespan=lifespan,
                  description="Emotion from a clip with a trained ComP checkpoint")
    app.state.queue, app.state.folder, app.state.limits, app.state.predictor = queue, folder, limits, predictor

    @app.exception_handler(UploadError)
    async def _refused(_: Request, err: UploadError) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = ["/".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", "")) for e in err.errors()]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    async def admit(request: Request, timeline_wanted: bool) -> Job:
        if timeline_wanted and timeline_fn is None:
            raise UploadError(501, "this installation has no timeline (pipeline.timeline is not installed)")
        try:
            queue.reserve()
        except QueueFull:
            load = queue.load()
            raise UploadError(503, f"busy: {load['queued'] + load['reserved']} clip(s) waiting behind the one "
                                   f"running (the queue holds {limits.max_queued}); retry in "
                                   f"{limits.retry_after_s} s", {"Retry-After": str(limits.retry_after_s)}) from None
        try:
            upload = await receive_upload(request.headers.get("content-type"), request.headers.get("content-length"),
                                          request.stream(), folder, max_bytes=limits.max_upload_bytes)
            try:
                max_s, flag = ((limits.max_timeline_duration_s, "--max-timeline-duration") if timeline_wanted
                               else (limits.max_duration_s, "--max-duration"))
                info = await run_in_threadpool(check_clip, upload.path, upload.filename, max_duration_s=max_s,
                                               limit_flag=flag)
            except BaseException:
                upload.delete()
                raise
        except BaseException:
            queue.release()
            raise
        job = Job(kind="timeline" if timeline_wanted else "clip", upload=upload, info=info)
        queue.submit(job)
        log.info("job %s: %s (%.1f s, %d bytes) queued", job.id, upload.filename, info["duration_s"], upload.size)
        return job

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **queue.load()}

    @app.get("/model")
    async def model() -> JSONResponse:
        return JSONResponse(json.loads(json.dumps(model_info(predictor, limits, timeline_fn is not None),
                                                  default=str)))

    @app.post("/predict", summary=f"Predict one clip (multipart field {FIELD!r})")
    async def predict(request: Request, timeline: bool = False) -> JSONResponse:
        job = await admit(request, timeline)
        await run_in_threadpool(job.finished.wait)
        assert job.outcome is not None
        return JSONResponse(job.outcome.body, status_code=job.outcome.status)

    @app.post("/jobs", status_code=202, summary=f"Queue one clip (multipart field {FIELD!r})")
    async def submit(request: Request, timeline: bool = False) -> JSONResponse:
        job = await admit(request, timeline)
        return JSONResponse({"id": job.id, "state": job.state, "filename": job.upload.filename,
                             "events": f"/jobs/{job.id}/events", "result": f"/jobs/{job.id}"}, status_code=202)

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise UploadError(404, f"no job {job_id!r} (finished jobs are forgotten after "
                                   f"{limits.keep_results} newer ones)")
        return job

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        return find(job_id).summary()

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = find(job_id)

        async def stream() -> AsyncIterator[str]:
            sent, quiet_since = 0, time.monotonic()
            while True:
                new = job.events_from(sent)
                for event, data in new:
                    yield f"event: {event}\ndata: {json.dumps(data)}\n\n"
                sent += len(new)
                if new:
                    quiet_since = time.monotonic()
                if job.finished.is_set() and not job.events_from(sent):
                    return
                if await request.is_disconnected():
                    return
                if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
