"""Face detectors behind one small protocol, chosen by name from the visual extractor's config.

Only OpenCV's Haar cascade ships with a pip package today (`opencv-python<5`; YuNet needs an ONNX file that no
package ships), so "haar" is the one built-in detector. A new detector is a class with `detect(rgb)` plus a
frozen config dataclass, added to `DETECTORS`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from core.config import from_dict, to_dict
from core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """A face box in pixel coordinates of the image it was found in."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return self.w * self.h


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB image."""

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes in a uint8 RGB image [H, W, 3], any order."""
        ...

    def spec(self) -> dict[str, Any]:
        """Every setting that changes which boxes come out."""
        ...


@dataclass(frozen=True)
class HaarConfig:
    """OpenCV `CascadeClassifier.detectMultiScale` settings (defaults as in the `fer` package, smaller min size)."""

    cascade: str = "haarcascade_frontalface_default.xml"  # a file in cv2.data.haarcascades, or a path
    scale_factor: float = 1.1  # image pyramid step; > 1
    min_neighbors: int = 5  # overlapping detections needed to keep a box; higher = fewer false positives
    min_size: int = 30  # pixels; smallest face side searched for
    min_score: float = 0.0  # minimum cascade level weight (OpenCV's confidence proxy); 0 keeps every box
    equalize: bool = False  # histogram-equalise the grey image first (helps dark footage, changes features)
    max_side: int = 0  # pixels; > 0 searches a copy scaled down to this side (faster; min_size is in that copy)

    def __post_init__(self) -> None:
        if self.scale_factor <= 1.0:
            raise ValueError("haar.scale_factor must be greater than 1.0")
        if self.min_neighbors < 0:
            raise ValueError("haar.min_neighbors must be >= 0")
        if self.min_size < 1:
            raise ValueError("haar.min_size must be >= 1 pixel")
        if self.max_side < 0:
            raise ValueError("haar.max_side must be >= 0 (0 = search at full resolution)")


def _cascade_path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        path = Path(cv2.data.haarcascades) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Haar cascade {name!r} not found in {cv2.data.haarcascades}; opencv-python<5 ships the cascades"
        )
    return path


class HaarFaceDetector:
    """OpenCV's Viola-Jones frontal-face cascade; scores are the cascade's level weights."""

    name = "haar"

    def __init__(self, config: HaarConfig | None = None) -> None:
        self.config = config or HaarConfig()
        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError("this OpenCV build has no CascadeClassifier; install opencv-python<5")
        self.path = _cascade_path(self.config.cascade)
        self._cascade = cv2.CascadeClassifier(str(self.path))
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load the Haar cascade {self.path}")

    def detect(self, rgb: np.ndarray) -> list[Box]:
        if rgb.ndim == 3:
            grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        else:
            grey = np.ascontiguousarray(rgb)
        scale = 1.0
        if self.config.max_side and max(grey.shape) > self.config.max_side:
            scale = self.config.max_side / max(grey.shape)
            size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        if self.config.equalize:
            grey = cv2.equalizeHist(grey)
        rects, _levels, weights = self._cascade.detectMultiScale3(
            grey,
            scaleFactor=self.config.scale_factor,
            minNeighbors=self.config.min_neighbors,
            minSize=(self.config.min_size, self.config.min_size),
            outputRejectLevels=True,
        )
        boxes = [
            Box(*(int(round(v / scale)) for v in (x, y, w, h)), score=float(s))
            for (x, y, w, h), s in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))
        ]
        return [b for b in boxes if b.score >= self.config.min_score]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "opencv": cv2.__version__, **to_dict(self.config),
                "cascade": self.path.name}


DETECTORS: dict[str, tuple[type, type]] = {"haar": (HaarFaceDetector, HaarConfig)}


def build_detector(name: str, settings: Mapping[str, Any] | Any | None = None) -> FaceDetector:
    """A detector by registered name; `settings` is its config dataclass or a plain mapping (strict keys)."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown face detector {name!r}; known: {sorted(DETECTORS)}")
    cls, config_cls = DETECTORS[name]
    if settings is None:
        config = config_cls()
    elif isinstance(settings, config_cls):
        config = settings
    elif isinstance(settings, Mapping):
        config = from_dict(config_cls, settings, where=name)
    else:
        raise ConfigError(f"settings for detector {name!r} must be a {config_cls.__name__} or a mapping")
    return cls(config)


def largest(boxes: list[Box]) -> Box | None:
    """The largest box (ties: the higher score), or None."""
    return max(boxes, key=lambda b: (b.area, b.score), default=None)
