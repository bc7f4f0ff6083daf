"""Jobs and the one worker that runs the models: a bounded queue, so that clients wait their turn (or get a
503 when the queue is full) and the extractors and the model never run concurrently.

A place in the queue is *reserved* before the upload is read, so a full server refuses a client before it
sends a large body, and disk use stays bounded by (queue length + 1) uploads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import CompError
from pipeline.serve.uploads import Upload

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")


class QueueFull(CompError):
    """Every place in the queue is taken; retry later."""


@dataclass
class Outcome:
    """What a job produced: the HTTP status POST /predict answers with, and the JSON body."""

    status: int
    body: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # for the page only (face thumbnails)


@dataclass
class Job:
    """One clip (or recording) on its way through the worker; `events` is what GET /jobs/{id}/events sends."""

    kind: str  # "clip" or "timeline"
    upload: Upload
    info: dict[str, Any]  # the probe of the upload
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    outcome: Outcome | None = None
    created: float = field(default_factory=time.time)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((event, data))

    def events_from(self, start: int) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.events[start:])

    def summary(self) -> dict[str, Any]:
        """The job as GET /jobs/{id} shows it."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": self.state,
                               "filename": self.upload.filename, "duration_s": self.info.get("duration_s")}
        if self.outcome is not None:
            out.update(status=self.outcome.status, result=self.outcome.body, **self.outcome.extra)
        return out


Runner = Callable[[Job], Outcome]


class JobQueue:
    """At most `max_queued` jobs waiting (reserved places count) behind the one running; one worker thread
    runs them in arrival order with `runner`; the last `keep_results` finished jobs stay readable."""

    def __init__(self, runner: Runner, *, max_queued: int, keep_results: int) -> None:
        self.runner = runner
        self.max_queued = max_queued
        self.keep_results = keep_results
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._reserved = 0
        self._running: Job | None = None
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="comp-serve-worker", daemon=True)
        self._thread.start()

    # -- admission --------------------------------------------------------------------------------
    def reserve(self) -> None:
        """Take a place in the queue (before reading an upload); QueueFull when there is none."""
        with self._cond:
            # the running job holds no place; an idle worker takes the next job at once, so it counts as one
            free = self.max_queued + (1 if self._running is None and not self._waiting else 0)
            if self._stopping or len(self._waiting) + self._reserved >= free:
                raise QueueFull()
            self._reserved += 1

    def release(self) -> None:
        """Give back a reserved place that will not become a job (the upload was refused)."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, job: Job) -> None:
        """Turn a reserved place into a queued job."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)
            self._jobs[job.id] = job
            self._waiting.append(job)
            job.emit("state", {"state": "queued", "ahead": len(self._waiting) - 1 + (self._running is not None)})
            self._cond.notify_all()

    # -- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._waiting), "reserved": self._reserved,
                    "running": int(self._running is not None), "max_queued": self.max_queued}

    # -- the worker -------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
            job.state = "running"
            job.emit("state", {"state": "running"})
            try:
                outcome = self.runner(job)
            except Exception as err:  # noqa: BLE001 - the client gets one line; the log keeps the traceback
                log.exception("job %s (%s) failed", job.id, job.upload.filename)
                outcome = Outcome(500, {"error": f"internal error: {type(err).__name__}: {err}"})
            finally:
                job.upload.delete()  # the upload never outlives its job
            job.outcome = outcome
            with self._cond:  # the place is free before anyone can see the job finished and send the next
                self._running = None
                job.state = "done" if outcome.status < 400 else "failed"
                self._forget_old()
            job.emit("done", {"state": job.state, "status": outcome.status})
            job.finished.set()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished.is_set() or j.outcome is not None]
        for job in finished[: max(0, len(finished) - self.keep_results)]:
            self._jobs.pop(job.id, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, drop the waiting ones (deleting their uploads), let the running one finish."""
        with self._cond:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in dropped:
            job.upload.delete()
            job.outcome = Outcome(503, {"error": "the server is shutting down"})
            job.state = "failed"
            job.emit("done", {"state": "failed", "status": 503})
            job.finished.set()
        self._thread.join(timeout)
