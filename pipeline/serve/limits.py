"""The limits comp-serve enforces, as one strict config (unknown keys and nonsense values are refused)."""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts. Sizes in bytes, durations in seconds."""

    max_upload_bytes: int = 200 * MB  # an upload larger than this is cut off while it streams in (413)
    max_duration_s: float = 600.0  # POST /predict and single-clip jobs: longer clips are refused (413)
    max_timeline_duration_s: float = 3 * 3600.0  # ?timeline=1: a recording may be this long
    max_queued: int = 4  # jobs waiting for the worker (the running one not counted); more: 503
    retry_after_s: int = 10  # the Retry-After a 503 sends
    keep_results: int = 32  # finished jobs kept for GET /jobs/{id}; the oldest are forgotten first
    max_faces: int = 8  # face crops a job result carries (evenly spaced over the ones found)
    face_px: int = 96  # side of a face thumbnail, in pixels

    def __post_init__(self) -> None:
        positive = {"max_upload_bytes": self.max_upload_bytes, "max_duration_s": self.max_duration_s,
                    "max_timeline_duration_s": self.max_timeline_duration_s, "retry_after_s": self.retry_after_s,
                    "keep_results": self.keep_results, "face_px": self.face_px}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be > 0")
        if self.max_queued < 0 or self.max_faces < 0:
            raise ValueError("max_queued and max_faces must be >= 0")
