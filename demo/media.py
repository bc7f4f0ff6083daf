"""Synthetic media for tests, the demo and benchmarks: speech from espeak-ng, faces from scikit-image, muxed
into real files by PyAV. Nothing is downloaded.

    clip = make_clip(tmp / "hello.mp4", text="Hello there", face=True)      # speech + a smiling face
    make_clip(tmp / "quiet.mp4", audio="silent", face=False)                 # silence + a scene with no face
    make_clip(tmp / "voice.wav", text="Audio only", video=False)             # no video stream
    write_tracks(tmp / "two.mp4", audio=[AudioTrack(silence(2), default=False), AudioTrack(speech)])
    write_tracks(tmp / "phone.mp4", video=[VideoTrack(face, rotation=90)])  # stored sideways, shown upright

Images: `skimage.data.astronaut()` (public domain; Eileen Collins, smiling) and the Labeled Faces in the Wild
thumbnails of `skimage.data.lfw_subset()`. scikit-image is needed only here.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

from core.clip import SAMPLE_RATE
from pipeline.decode import resample_audio

log = logging.getLogger(__name__)

DEFAULT_SIZE = (160, 120)  # (width, height) pixels: small, so generated clips decode fast
DEFAULT_FPS = 10
DEFAULT_TEXT = "Hello, this is a short test clip."
AUDIO_ONLY_CODECS = {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".m4a": "aac", ".mp4": "aac"}
VIDEO_CONTAINERS = {".mp4", ".mkv", ".mov"}
# Astronaut face box found by OpenCV's frontal-face cascade on the 512x512 image: x, y, w, h.
_ASTRONAUT_FACE = (177, 66, 95, 95)


# --------------------------------------------------------------------------- audio


def speak(text: str, *, voice: str = "en", pitch: int = 50, speed: int = 160, amplitude: int = 100) -> np.ndarray:
    """Synthesise `text` with espeak-ng; mono float32 at 16 kHz. pitch 0-99, speed in words/minute, amplitude 0-200."""
    if not text.strip():
        raise ValueError("speak() needs non-empty text")
    with tempfile.TemporaryDirectory(prefix="comp-speak-") as tmp:
        wav = Path(tmp) / "speech.wav"
        argv = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-a", str(amplitude),
                "-w", str(wav), "--", text]
        try:
            subprocess.run(argv, check=True, capture_output=True)
        except FileNotFoundError as err:
            raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)") from err
        except subprocess.CalledProcessError as err:
            stderr = err.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"espeak-ng failed (exit {err.returncode}): {stderr}") from err
        return read_wav(wav)


def read_wav(path: str | Path) -> np.ndarray:
    """A PCM wav file (8/16/32-bit, any channels) -> mono float32 at 16 kHz, with the stdlib `wave` module."""
    with wave.open(str(path), "rb") as fh:
        rate, channels, width = fh.getframerate(), fh.getnchannels(), fh.getsampwidth()
        raw = fh.readframes(fh.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
    else:
        raise ValueError(f"{path}: {8 * width}-bit wav is not supported")
    samples = samples.reshape(-1, channels).mean(axis=1)
    return resample_audio(samples, rate, SAMPLE_RATE)


def silence(duration_s: float) -> np.ndarray:
    """Digital silence at 16 kHz."""
    return np.zeros(int(round(duration_s * SAMPLE_RATE)), np.float32)


def noise(duration_s: float, *, level: float = 0.1, seed: int = 0) -> np.ndarray:
    """White noise at 16 kHz with standard deviation `level`."""
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * SAMPLE_RATE))
    return np.clip(rng.normal(0.0, level, n), -1.0, 1.0).astype(np.float32)


NOISE_KINDS = ("white", "pink", "brown", "hum-50", "hum-60", "fan", "room-tone", "keyboard", "rain", "music-chords",
               "music-melody", "music-drums", "clicks-and-hum")


def _shaped_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    out = np.fft.irfft(spectrum / freqs ** (exponent / 2.0), n)
    return out / (np.sqrt(np.mean(out ** 2)) + 1e-12)


def _tone(freq: float, t: np.ndarray, harmonics: int = 4) -> np.ndarray:
    return sum(np.sin(2 * np.pi * freq * (k + 1) * t) / (k + 1) for k in range(harmonics))


def noise_variant(kind: str, duration_s: float = 4.0, *, level_db: float = -30.0, seed: int = 0) -> np.ndarray:
    """A sound with no speech in it, float32 at 16 kHz with RMS `level_db` dBFS: what recordings hold besides
    voices. kinds (NOISE_KINDS): white/pink/brown noise, mains hum (50/60 Hz and harmonics), a fan, room tone
    (quiet low-passed noise with a slow swell), keyboard typing (clicks at random intervals), rain (noise with
    drops), music (piano-like chords, a melody, a drum pattern), clicks over hum."""
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind in ("pink", "brown"):
        x = _shaped_noise(n, rng, 1.0 if kind == "pink" else 2.0)
    elif kind in ("hum-50", "hum-60"):
        x = _tone(50.0 if kind == "hum-50" else 60.0, t, harmonics=6) + 0.05 * rng.standard_normal(n)
    elif kind == "fan":
        x = _shaped_noise(n, rng, 1.5) + 0.5 * _tone(120.0, t, 3)
    elif kind == "room-tone":
        x = _shaped_noise(n, rng, 1.8) * (1.0 + 0.3 * np.sin(2 * np.pi * 0.2 * t))
    elif kind in ("keyboard", "clicks-and-hum"):
        x = 0.01 * rng.standard_normal(n)
        for start in np.cumsum(rng.uniform(0.08, 0.35, int(duration_s / 0.08))):
            i = int(start * SAMPLE_RATE)
            if i >= n:
                break
            m = min(n - i, int(0.015 * SAMPLE_RATE))
            x[i:i + m] += rng.standard_normal(m) * np.exp(-np.arange(m) / (0.002 * SAMPLE_RATE))
        if kind == "clicks-and-hum":
            x += 0.3 * _tone(50.0, t, 6)
    elif kind == "rain":
        x = _shaped_noise(n, rng, 0.5)
        for i in rng.integers(0, n, int(40 * duration_s)):
            m = min(n - i, 160)
            x[i:i + m] += 4.0 * rng.standard_normal(m) * np.exp(-np.arange(m) / 30.0)
    elif kind in ("music-chords", "music-melody"):
        notes = [261.6, 329.6, 392.0, 440.0, 349.2, 293.7, 523.3, 196.0]
        beat = 0.5 if kind == "music-melody" else 1.0
        x = np.zeros(n)
        for k, start in enumerate(np.arange(0.0, duration_s, beat)):
            i, m = int(start * SAMPLE_RATE), int(beat * SAMPLE_RATE)
            seg = t[: min(m, n - i)]
            env = np.exp(-seg * 3.0)
            chord = [notes[k % len(notes)]] if kind == "music-melody" else \
                [notes[k % len(notes)], notes[(k + 2) % len(notes)] * 1.0, notes[(k + 4) % len(notes)] / 2]
            x[i:i + len(seg)] += env * sum(_tone(f, seg, 5) for f in chord)
    elif kind == "music-drums":
        x = np.zeros(n)
        for k, start in enumerate(np.arange(0.0, duration_s, 0.25)):
            i = int(start * SAMPLE_RATE)
            m = min(n - i, int(0.2 * SAMPLE_RATE))
            seg = np.arange(m) / SAMPLE_RATE
            if k % 4 == 0:  # kick
                x[i:i + m] += np.sin(2 * np.pi * 60 * seg * np.exp(-seg * 8)) * np.exp(-seg * 15)
            elif k % 4 == 2:  # snare
                x[i:i + m] += rng.standard_normal(m) * np.exp(-seg * 25)
            else:  # hi-hat
                x[i:i + m] += 0.3 * np.diff(rng.standard_normal(m + 1)) * np.exp(-seg * 60)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")
    x = x / (np.sqrt(np.mean(x ** 2)) + 1e-12) * 10 ** (level_db / 20.0)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- images


def _fit(image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Crop `image` around `box` (or its centre) to the aspect of `size`, then scale to `size` (w, h)."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    h, w = image.shape[:2]
    out_w, out_h = size
    aspect = out_w / out_h
    if box is None:
        cx, cy, span_h = w / 2, h / 2, min(h, w / aspect)
    else:
        bx, by, bw, bh = box
        cx, cy = bx + bw / 2, by + bh / 2
        span_h = min(h, w / aspect, 2.0 * bh)  # face about half the frame height: large enough for any detector
    span_w = span_h * aspect
    x0 = int(round(min(max(cx - span_w / 2, 0), w - span_w)))
    y0 = int(round(min(max(cy - span_h / 2, 0), h - span_h)))
    crop = image[y0 : y0 + int(span_h), x0 : x0 + int(span_w)]
    interp = cv2.INTER_AREA if crop.shape[0] > out_h else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (out_w, out_h), interpolation=interp))


def face_image(kind: str = "astronaut", size: tuple[int, int] = DEFAULT_SIZE, *, index: int = 0) -> np.ndarray:
    """A real face, uint8 RGB [h, w, 3] with `size` = (w, h).

    kind "astronaut": scikit-image's astronaut (smiling), framed head-and-shoulders.
    kind "lfw": thumbnail `index` of scikit-image's LFW subset (grey 25x25, upscaled), on a grey backdrop.
    """
    import skimage.data

    if kind == "astronaut":
        return _fit(skimage.data.astronaut(), size, _ASTRONAUT_FACE)
    if kind == "lfw":
        faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
        if not 0 <= index < len(faces):
            raise ValueError(f"lfw index must be in [0, {len(faces)})")
        face = (faces[index] * 255).round().astype(np.uint8)
        side = int(min(size) * 0.8)
        canvas = np.full((size[1], size[0]), int(np.median(face)), np.uint8)
        x0, y0 = (size[0] - side) // 2, (size[1] - side) // 2
        canvas[y0 : y0 + side, x0 : x0 + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
        return np.stack([canvas] * 3, axis=-1)
    raise ValueError(f"unknown face image {kind!r}; choose 'astronaut' or 'lfw'")


def no_face_image(kind: str = "coffee", size: tuple[int, int] = DEFAULT_SIZE, *, seed: int = 0) -> np.ndarray:
    """A scene with no face, uint8 RGB: scikit-image's "coffee" or "rocket" photo, or "noise" (seeded)."""
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    import skimage.data

    if kind not in ("coffee", "rocket"):
        raise ValueError(f"unknown no-face image {kind!r}; choose 'coffee', 'rocket' or 'noise'")
    return _fit(getattr(skimage.data, kind)(), size)


# --------------------------------------------------------------------------- files


def _even(n: int) -> int:
    return max(2, n - n % 2)


def _as_frames(frames: np.ndarray | Sequence[np.ndarray], n_frames: int | None) -> list[np.ndarray]:
    """One image (repeated), an array [T, H, W, 3] or a list of images -> a list of RGB uint8 frames."""
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = [frames] * (n_frames or 1)
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("no frames given")
    out = []
    for f in frames:
        if f.ndim == 2:
            f = np.stack([f] * 3, axis=-1)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"frames must be uint8 RGB [H, W, 3], got {f.dtype} {f.shape}")
        out.append(f)
    if any(f.shape != out[0].shape for f in out):
        raise ValueError("all frames must have the same size")
    return out


def _audio_frames(audio: np.ndarray, sample_rate: int, chunk: int) -> list[av.AudioFrame]:
    pcm = np.clip(audio, -1.0, 1.0).astype(np.float32)
    frames = []
    for start in range(0, len(pcm), chunk):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + chunk], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        frames.append(frame)
    return frames


def write_clip(
    path: str | Path,
    *,
    audio: np.ndarray | None,
    frames: np.ndarray | Sequence[np.ndarray] | None,
    fps: int = DEFAULT_FPS,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float | None = None,
) -> Path:
    """Write a media file with PyAV: h264 (yuv420p) + AAC in mp4/mkv/mov, or audio only (wav/flac/mp3/m4a).

    `audio` is mono float32 at `sample_rate` (None: no audio stream). `frames` is one RGB image shown for the
    whole clip, or an array [T, H, W, 3] / a list written as given at `fps` (None: audio-only file).
    `duration_s` pads the audio with silence and cuts whatever is longer; by default the clip lasts as long
    as the audio, or the frames, or 1 s.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if audio is None and frames is None:
        raise ValueError("write_clip needs audio, frames or both")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if duration_s is None:
        if audio is not None:
            duration_s = len(audio) / sample_rate
        elif isinstance(frames, np.ndarray) and frames.ndim == 3:
            duration_s = 1.0
        else:
            duration_s = len(frames) / fps  # type: ignore[arg-type]
    if duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    if audio is not None:
        n = int(round(duration_s * sample_rate))
        audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
    path.parent.mkdir(parents=True, exist_ok=True)

    if frames is None:
        codec = AUDIO_ONLY_CODECS.get(suffix)
        if codec is None:
            raise ValueError(f"audio-only files must end in one of {sorted(AUDIO_ONLY_CODECS)}, not {suffix!r}")
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=sample_rate, layout="mono")
            for frame in _audio_frames(audio, sample_rate, 8192):  # type: ignore[arg-type]
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return path

    if suffix not in VIDEO_CONTAINERS:
        raise ValueError(f"video files must end in one of {sorted(VIDEO_CONTAINERS)}, not {suffix!r}")
    n_frames = max(1, int(round(duration_s * fps)))
    images = _as_frames(frames, n_frames)[:n_frames]
    height, width = _even(images[0].shape[0]), _even(images[0].shape[1])  # yuv420p needs even sizes
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "stillimage", "crf": "23"}
        astream = container.add_stream("aac", rate=sample_rate, layout="mono") if audio is not None else None
        # One audio chunk per video frame, muxed in time order, so the file is interleaved like a real one.
        chunks = _audio_frames(audio, sample_rate, -(-sample_rate // fps)) if astream is not None else []
        for i in range(max(len(images), len(chunks))):
            if i < len(images):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(images[i][:height, :width]), format="rgb24")
                frame.pts = i
                container.mux(video.encode(frame))
            if i < len(chunks):
                container.mux(astream.encode(chunks[i]))  # type: ignore[union-attr]
        container.mux(video.encode(None))
        if astream is not None:
            container.mux(astream.encode(None))
    return path


class _WriteOnly:
    """A sink that cannot seek: what a muxer writing to a network or a browser's recorder sees."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data: bytes) -> int:
        return self._fh.write(data)


def write_streamed_webm(path: str | Path, *, audio: np.ndarray, image: np.ndarray, fps: int = DEFAULT_FPS,
                        sample_rate: int = SAMPLE_RATE) -> Path:
    """A WebM as a browser's MediaRecorder writes it: VP8 + Opus muxed to a sink that cannot seek back, so
    neither the header nor any stream states a duration (only the packets' times tell how long it is).
    `audio` is mono float32 at `sample_rate` and sets the length; `image` (RGB) is shown throughout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    n_frames = max(1, int(round(len(audio) / sample_rate * fps)))
    height, width = _even(image.shape[0]), _even(image.shape[1])
    picture = np.ascontiguousarray(image[:height, :width])
    with open(path, "wb") as fh, av.open(_WriteOnly(fh), mode="w", format="webm") as container:
        video = container.add_stream("libvpx", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("libopus", rate=sample_rate, layout="mono")
        chunks = _audio_frames(audio, sample_rate, -(-sample_rate // fps))
        for i in range(max(n_frames, len(chunks))):
            if i < n_frames:
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = i
                container.mux(video.encode(frame))
            if i < len(chunks):
                container.mux(sound.encode(chunks[i]))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))
    return path


AudioKind = Literal["speech", "silent", "noise"]


def make_clip(
    path: str | Path,
    *,
    text: str | None = None,
    audio: AudioKind | None = "speech",
    face: bool = True,
    video: bool = True,
    duration_s: float | None = None,
    image: np.ndarray | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    fps: int = DEFAULT_FPS,
    pitch: int = 50,
    speed: int = 160,
    amplitude: int = 100,
    voice: str = "en",
    seed: int = 0,
) -> Path:
    """A small test clip: speech/silence/noise/no audio stream, with a face, a faceless scene or no video.

    `text` implies speech (default text when audio="speech" and none is given). Speech clips last the speech
    plus 0.3 s unless `duration_s` says otherwise; others last 2 s. `image` replaces the generated picture.
    `video=False` writes an audio-only file (use a .wav/.flac/.m4a path).
    """
    if audio is None and not video:
        raise ValueError("a clip needs audio or video")
    if text is not None and audio not in ("speech", None):
        raise ValueError(f"text given but audio={audio!r}; use audio='speech'")
    samples: np.ndarray | None = None
    if audio == "speech":
        samples = speak(text or DEFAULT_TEXT, voice=voice, pitch=pitch, speed=speed, amplitude=amplitude)
        duration_s = duration_s or len(samples) / SAMPLE_RATE + 0.3
    duration_s = duration_s or 2.0
    if audio == "silent":
        samples = silence(duration_s)
    elif audio == "noise":
        samples = noise(duration_s, seed=seed)
    elif audio is not None and audio != "speech":
        raise ValueError(f"audio must be 'speech', 'silent', 'noise' or None, not {audio!r}")
    picture = None
    if video:
        picture = image if image is not None else (face_image(size=size) if face else no_face_image(size=size))
    return write_clip(path, audio=samples, frames=picture, fps=fps, duration_s=duration_s)


# --------------------------------------------------------------------------- conversations

SPEECH_LEVEL = 0.01  # a sample above this (full scale 1.0) is speech when a turn's true span is measured


@dataclass(frozen=True)
class Turn:
    """One utterance of a generated conversation: espeak-ng speech, the picture shown from its start until
    the next turn (None: `face_image()`), and the pause that follows it (seconds)."""

    text: str
    image: np.ndarray | None = None
    pause_s: float = 1.0
    voice: str = "en"
    pitch: int = 50
    speed: int = 160
    amplitude: int = 100


def speech_span(samples: np.ndarray, level: float = SPEECH_LEVEL) -> tuple[float, float]:
    """(first, last) second where |samples| exceeds `level`: where espeak-ng's speech is inside its output."""
    loud = np.flatnonzero(np.abs(samples) > level)
    if loud.size == 0:
        return 0.0, 0.0
    return loud[0] / SAMPLE_RATE, (loud[-1] + 1) / SAMPLE_RATE


def write_conversation(path: str | Path, turns: Sequence[Turn], *, lead_s: float = 0.5, fps: int = DEFAULT_FPS,
                       audio: bool = True, size: tuple[int, int] = DEFAULT_SIZE) -> list[tuple[float, float]]:
    """A recording of `turns` one after the other (h264 + AAC mp4; `audio=False`: video only), written as it
    is generated, so that an hour needs no more memory than one turn. Starts with `lead_s` of silence.
    Returns each turn's true speech span (start, end) in seconds of the file (`speech_span` of its espeak
    output). Speech for the same text and delivery is synthesised once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spoken: dict[tuple, np.ndarray] = {}
    default_face = face_image(size=size)
    spans: list[tuple[float, float]] = []
    chunk = SAMPLE_RATE // fps  # audio samples per video frame
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        first = turns[0].image if turns and turns[0].image is not None else default_face
        height, width = _even(first.shape[0]), _even(first.shape[1])
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "stillimage", "crf": "23"}
        astream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if audio else None
        n_frames = n_samples = 0
        pending = np.zeros(0, np.float32)  # audio not yet muxed (less than one chunk)

        def emit(samples: np.ndarray, image: np.ndarray) -> None:
            nonlocal n_frames, n_samples, pending
            pending = np.concatenate([pending, samples])
            picture = np.ascontiguousarray(image[:height, :width])
            while len(pending) >= chunk:
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = n_frames
                container.mux(video.encode(frame))
                n_frames += 1
                if astream is not None:
                    (audio_frame,) = _audio_frames(pending[:chunk], SAMPLE_RATE, chunk)
                    audio_frame.pts = n_samples
                    container.mux(astream.encode(audio_frame))
                n_samples += chunk
                pending = pending[chunk:]

        emit(silence(lead_s), first)
        t = len(silence(lead_s)) / SAMPLE_RATE
        for turn in turns:
            key = (turn.text, turn.voice, turn.pitch, turn.speed, turn.amplitude)
            if key not in spoken:
                spoken[key] = speak(turn.text, voice=turn.voice, pitch=turn.pitch, speed=turn.speed,
                                    amplitude=turn.amplitude)
            samples = spoken[key]
            a, b = speech_span(samples)
            spans.append((t + a, t + b))
            emit(np.concatenate([samples, silence(turn.pause_s)]),
                 turn.image if turn.image is not None else default_face)
            t += len(samples) / SAMPLE_RATE + len(silence(turn.pause_s)) / SAMPLE_RATE
        container.mux(video.encode(None))
        if astream is not None:
            container.mux(astream.encode(None))
    return spans


# --------------------------------------------------------------------------- several tracks


def stored_for_display(image: np.ndarray, rotation: int = 0, hflip: bool = False, vflip: bool = False) -> np.ndarray:
    """The frame to store so that a player shows `image` under `VideoStream.set_display_rotation(rotation,
    hflip, vflip)` (PyAV: rotate counter-clockwise by `rotation` degrees, then mirror)."""
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90 degrees")
    out = image[:, ::-1] if hflip else image
    out = out[::-1] if vflip else out
    return np.ascontiguousarray(np.rot90(out, k=-(rotation // 90)))  # undo the counter-clockwise turn


@dataclass
class VideoTrack:
    """One video stream for `write_tracks`: frames as for `write_clip`, shown as `rotation`/flips say.

    With `upright=True` the frames are what a player must show: they are stored turned back
    (`stored_for_display`) and the display matrix turns them upright again. `default` sets or clears the
    default disposition (None: the muxer decides). `codec` "png"/"mjpeg" writes single pictures.
    """

    frames: np.ndarray | Sequence[np.ndarray]
    fps: int = DEFAULT_FPS
    n_frames: int | None = None  # copies of a single image; default: fps * the file's duration
    rotation: int = 0
    hflip: bool = False
    vflip: bool = False
    upright: bool = True
    default: bool | None = None
    codec: str = "libx264"


@dataclass
class AudioTrack:
    """One audio stream for `write_tracks`: float32 samples [n] (mono) or [C, n], at `sample_rate`."""

    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    default: bool | None = None
    dispositions: tuple[str, ...] = ()  # more FFmpeg disposition names, e.g. ("comment",)
    codec: str = "aac"


_LAYOUTS = {1: "mono", 2: "stereo"}


def _disposition(default: bool | None, names: Sequence[str] = ()) -> av.stream.Disposition | None:
    if default is None and not names:
        return None
    value = av.stream.Disposition(0)
    for name in (*names, *(["default"] if default else [])):
        value |= getattr(av.stream.Disposition, name)
    return value


def write_tracks(path: str | Path, *, video: Sequence[VideoTrack] = (), audio: Sequence[AudioTrack] = (),
                 attachments: Sequence[tuple[str, str, bytes]] = ()) -> Path:
    """A file with several streams in the given order (video streams first): what phones, editors and
    rippers write. `attachments` are (name, mimetype, data) (Matroska: an image attachment is cover art)."""
    path = Path(path)
    if not video and not audio:
        raise ValueError("write_tracks needs a video or an audio track")
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = max([t.samples.shape[-1] / t.sample_rate for t in audio] or [1.0])
    with av.open(str(path), mode="w") as container:
        for name, mimetype, data in attachments:
            container.add_attachment(name, mimetype, data)
        plans: list[tuple[av.stream.Stream, list[av.frame.Frame]]] = []
        for track in video:
            n = track.n_frames or max(1, int(round(duration * track.fps)))
            images = _as_frames(track.frames, n)[:n]
            if track.upright:
                images = [stored_for_display(im, track.rotation, track.hflip, track.vflip) for im in images]
            height, width = _even(images[0].shape[0]), _even(images[0].shape[1])
            stream = container.add_stream(track.codec, rate=track.fps)
            pix_fmt = {"png": "rgb24", "mjpeg": "yuvj420p"}.get(track.codec, "yuv420p")
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            if track.rotation or track.hflip or track.vflip:
                stream.set_display_rotation(track.rotation, hflip=track.hflip, vflip=track.vflip)
            disposition = _disposition(track.default)
            if disposition is not None:
                stream.disposition = disposition
            frames = []
            for i, image in enumerate(images):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
                frame = frame.reformat(format=pix_fmt) if pix_fmt != "rgb24" else frame
                frame.pts = i
                frames.append(frame)
            plans.append((stream, frames))
        for track in audio:
            samples = np.asarray(track.samples, np.float32)
            samples = samples[None] if samples.ndim == 1 else samples
            layout = _LAYOUTS.get(samples.shape[0], f"{samples.shape[0]}c")
            stream = container.add_stream(track.codec, rate=track.sample_rate, layout=layout)
            disposition = _disposition(track.default, track.dispositions)
            if disposition is not None:
                stream.disposition = disposition
            frames = []
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                block = np.clip(samples[:, start:start + chunk], -1.0, 1.0)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
                frame.sample_rate, frame.pts = track.sample_rate, start
                frame.time_base = Fraction(1, track.sample_rate)
                frames.append(frame)
            plans.append((stream, frames))
        for stream, frames in plans:  # one stream after the other: the muxer interleaves by time itself
            for frame in frames:
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path


def lfs_pointer(path: str | Path, size: int = 1_234_567) -> Path:
    """A Git LFS pointer file where a clone without `git lfs pull` leaves the media."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                    f"size {size}\n")
    return path


def corrupt_file(path: str | Path, *, keep_bytes: int = 64, seed: int = 0) -> Path:
    """Keep the first `keep_bytes` of `path` (a valid header) and replace the rest with random bytes.

    When `path` does not exist a small clip is written first, so the result always starts like real media.
    """
    path = Path(path)
    if not path.exists():
        make_clip(path, audio="noise", face=False, duration_s=1.0)
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 256, max(len(data) - keep_bytes, 1024), dtype=np.uint8).tobytes()
    path.write_bytes(data[:keep_bytes] + garbage)
    return path


def corrupt_packets(path: str | Path, stream: Literal["audio", "video"] = "audio", *, start: float = 0.5,
                    count: int = 5, seed: int = 0) -> Path:
    """Overwrite `count` packets of one stream, from `start` (fraction of its packets) on, with random bytes.

    The container stays intact, so the file opens and the other stream decodes; this stream fails mid-way.
    """
    path = Path(path)
    with av.open(str(path)) as container:
        streams = container.streams.audio if stream == "audio" else container.streams.video
        if not streams:
            raise ValueError(f"{path} has no {stream} stream")
        packets = [(p.pos, p.size) for p in container.demux(streams[0]) if p.size and p.pos is not None]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    first = int(len(packets) * start)
    for pos, size in packets[first : first + count]:
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def truncate_file(path: str | Path, *, fraction: float = 0.5) -> Path:
    """Cut `path` to `fraction` of its size (a download that stopped half-way)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
