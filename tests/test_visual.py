"""Faces: the Haar detector, the mini-Xception port and the "face" visual extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data

from core.clip import ClipInput
from core.config import from_dict
from core.errors import ConfigError
from demo.media import face_image, make_clip, no_face_image
from extractors.faces import Box, HaarFaceDetector, build_detector, largest
from extractors.mini_xception import EMOTIONS, FaceExpressionEncoder
from extractors.visual import FaceConfig, FaceExtractor, crop_face
from pipeline.decode import decode_clip


@pytest.fixture(scope="module")
def encoder():
    return FaceExpressionEncoder()


@pytest.fixture(scope="module")
def extractor():
    return FaceExtractor(FaceConfig())


@pytest.fixture(scope="module")
def astronaut_face():
    """The astronaut's face, cropped where OpenCV's cascade finds it on the full 512x512 image."""
    image = skimage.data.astronaut()
    box = largest(HaarFaceDetector().detect(image))
    assert box is not None
    return crop_face(image, box, margin=0.1)


def _clip(frames, clip_id="c", frames_reason=""):
    frames = None if frames is None else np.stack(frames)
    return ClipInput(clip_id, None, "no-audio-stream", frames, frames_reason, 1.0)


def test_mini_xception_says_the_astronaut_is_happy(encoder, astronaut_face):
    """The ported network scores the smiling astronaut "happy" with high probability."""
    probs = encoder.classify([astronaut_face])
    assert probs.shape == (1, 7)
    assert EMOTIONS[int(probs[0].argmax())] == "happy" and probs[0, EMOTIONS.index("happy")] > 0.9
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_mini_xception_not_happy_for_a_neutral_face(encoder):
    """A face that is not smiling (LFW thumbnail 0) does not come out "happy", so the port is not constant."""
    face = (skimage.data.lfw_subset()[0] * 255).astype(np.uint8)
    assert EMOTIONS[int(encoder.classify([face])[0].argmax())] != "happy"


def test_mini_xception_embedding_is_128_d(encoder, astronaut_face):
    """embed gives one finite 128-d vector per face crop; crops of any size and colour are accepted."""
    grey = astronaut_face.mean(axis=2).astype(np.uint8)
    vectors = encoder.embed([astronaut_face, grey[:50, :70]])
    assert vectors.shape == (2, 128) and np.isfinite(vectors).all()


def test_haar_finds_the_astronaut_face():
    """The Haar detector finds exactly one face in the generated face image."""
    boxes = HaarFaceDetector().detect(face_image(size=(160, 120)))
    assert len(boxes) == 1 and boxes[0].w >= 30


@pytest.mark.parametrize("kind", ["coffee", "rocket", "noise"])
def test_haar_finds_no_face_in_scenes(kind):
    """The no-face images contain nothing the detector calls a face."""
    assert HaarFaceDetector().detect(no_face_image(kind, size=(320, 240))) == []


def test_detector_registry_rejects_unknown_names_and_keys():
    """Detectors are built by name with strict settings."""
    assert isinstance(build_detector("haar", {"min_neighbors": 3}), HaarFaceDetector)
    with pytest.raises(ConfigError, match="unknown face detector"):
        build_detector("yolo")
    with pytest.raises(ConfigError, match="min_neighbours"):
        build_detector("haar", {"min_neighbours": 3})


def test_crop_is_clamped_to_the_image():
    """A box at the corner grows by the margin but never past the image border."""
    image = np.zeros((100, 120, 3), np.uint8)
    crop = crop_face(image, Box(0, 0, 40, 40), margin=0.5)
    assert crop.shape == (60, 60, 3)


def test_largest_face_wins():
    """The largest box is the face kept for a frame."""
    assert largest([Box(0, 0, 10, 10), Box(5, 5, 30, 20), Box(50, 50, 12, 12)]) == Box(5, 5, 30, 20)


def test_face_clip_is_present_with_diagnostics(extractor, tmp_path):
    """A decoded clip with a face in every frame gives a 128-d vector and full face counts."""
    clip = decode_clip(make_clip(tmp_path / "face.mp4", audio="silent", duration_s=2.0), "face")
    out = extractor.extract([clip])[0]
    assert out.reason == "" and out.features.shape == (extractor.feature_dim,) == (128,)
    assert out.diagnostics == {"frames_sampled": 4.0, "frames_with_face": 4.0}


def test_clip_embedding_is_the_mean_over_face_frames(extractor, encoder):
    """The clip vector is the mean of the per-frame face embeddings, faceless frames left out."""
    face, scene = face_image(size=(160, 120)), no_face_image(size=(160, 120))
    out = extractor.extract([_clip([face, scene, face])])[0]
    crop = crop_face(face, largest(extractor.detector.detect(face)), 0.2)
    assert out.diagnostics["frames_with_face"] == 2.0
    np.testing.assert_allclose(out.features, encoder.embed([crop])[0], rtol=1e-4, atol=1e-5)


def test_no_face_clip_is_absent(extractor, tmp_path):
    """A clip whose frames show no face is absent with reason no-face."""
    clip = decode_clip(make_clip(tmp_path / "scene.mp4", audio="silent", face=False, duration_s=2.0), "scene")
    out = extractor.extract([clip])[0]
    assert out.features is None and out.reason == "no-face"
    assert out.diagnostics == {"frames_sampled": 4.0, "frames_with_face": 0.0}


def test_too_few_face_frames_is_absent(extractor):
    """A face in 1 of 10 frames is below min_face_ratio=0.3: absent with the count in the reason."""
    frames = [face_image(size=(160, 120))] + [no_face_image(size=(160, 120))] * 9
    out = extractor.extract([_clip(frames)])[0]
    assert out.features is None and out.reason == "too-few-face-frames: 1/10"


def test_min_face_frames_is_an_absolute_floor():
    """min_face_frames=3 makes a clip with faces in 2 of 2 frames absent despite a 100% ratio."""
    ex = FaceExtractor(FaceConfig(min_face_frames=3, min_face_ratio=0.0))
    out = ex.extract([_clip([face_image(size=(160, 120))] * 2)])[0]
    assert out.reason == "too-few-face-frames: 2/2"


def test_clip_without_frames_keeps_the_decoder_reason(extractor, tmp_path):
    """An audio-only file is absent with the decoder's frames reason."""
    clip = decode_clip(make_clip(tmp_path / "voice.wav", audio="noise", duration_s=1.0, video=False), "voice")
    out = extractor.extract([clip])[0]
    assert out.features is None and out.reason == "no-video-stream"


def test_blank_crop_is_never_embedded(monkeypatch):
    """A detection on a flat image is dropped, so an all-black clip is absent, not embedded."""
    ex = FaceExtractor(FaceConfig())
    monkeypatch.setattr(ex.detector, "detect", lambda rgb: [Box(10, 10, 60, 60)])
    calls = []
    monkeypatch.setattr(ex.encoder, "embed", lambda faces: calls.append(len(faces)))
    out = ex.extract([_clip([np.zeros((120, 160, 3), np.uint8)] * 4)])[0]
    assert out.reason == "no-face" and calls == []


def test_one_failing_clip_does_not_stop_the_batch(monkeypatch):
    """A detector error on one clip becomes that clip's reason; the others are extracted."""
    ex = FaceExtractor(FaceConfig())
    real = ex.detector.detect

    def flaky(rgb):
        if rgb[0, 0, 0] == 7:
            raise RuntimeError("boom")
        return real(rgb)

    monkeypatch.setattr(ex.detector, "detect", flaky)
    bad = np.full((120, 160, 3), 7, np.uint8)
    outs = ex.extract([_clip([bad], "bad"), _clip([face_image(size=(160, 120))], "good")])
    assert outs[0].reason.startswith("face-error") and outs[1].reason == ""


def test_batching_across_clips_does_not_change_features():
    """Embedding crops in batches of 1 or all together gives the same clip vectors."""
    face = face_image(size=(160, 120))
    shifted = np.roll(face, 8, axis=1)
    clips = [_clip([face, shifted], "a"), _clip([shifted], "b")]
    one = FaceExtractor(FaceConfig(batch_size=1)).extract(clips)
    many = FaceExtractor(FaceConfig(batch_size=64)).extract(clips)
    for x, y in zip(one, many):
        np.testing.assert_allclose(x.features, y.features, rtol=1e-4, atol=1e-5)


def test_spec_names_detector_encoder_and_weights_hash(extractor):
    """The spec is JSON and pins detector thresholds, encoder, weights hash and pooling."""
    spec = json.loads(json.dumps(extractor.spec()))
    assert spec["detector"]["name"] == "haar" and spec["detector"]["min_neighbors"] == 5
    assert spec["encoder"] == "mini-xception" and len(spec["weights_sha256"]) == 64
    assert spec["presence"] == {"min_face_frames": 1, "min_face_ratio": 0.3}
    assert spec["input_size"] == 64 and spec["pooling"] == "mean over face frames"


def test_config_is_strict_and_nested():
    """FaceConfig comes from plain data, nested detector settings included, and rejects unknown keys."""
    cfg = from_dict(FaceConfig, {"margin": 0.1, "haar": {"min_size": 40}})
    assert cfg.haar.min_size == 40 and cfg.margin == 0.1
    with pytest.raises(ConfigError, match="marign"):
        from_dict(FaceConfig, {"marign": 0.1})


def test_hugging_face_image_encoder_from_a_local_path(tmp_path):
    """Any transformers image model directory works as encoder; its dim and weights hash reach the spec."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    ex = FaceExtractor(FaceConfig(encoder=str(tmp_path)))
    out = ex.extract([_clip([face_image(size=(160, 120))])])[0]
    assert ex.feature_dim == 32 and out.features.shape == (32,)
    spec = json.loads(json.dumps(ex.spec()))
    assert spec["encoder"] == str(tmp_path) and len(spec["weights_sha256"]) == 64


def test_haar_search_on_a_scaled_copy_reports_full_size_boxes():
    """With max_side set, the face is found on a smaller copy and its box maps back to the full image."""
    image = face_image(size=(640, 480))
    full = largest(HaarFaceDetector().detect(image))
    small = largest(build_detector("haar", {"max_side": 320}).detect(image))
    assert full is not None and small is not None
    assert abs(small.x - full.x) < 0.1 * full.w and abs(small.w - full.w) < 0.15 * full.w
