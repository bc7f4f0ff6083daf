"""Packaged offline weights: the CTranslate2 reader, the Whisper conversion, the atomic cache, model references."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors import packaged
from extractors.packaged import ModelUnavailableError, PackagedWhisper

# ----------------------------------------------------------------------- a CTranslate2 writer for tests


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec") -> bytes:
    """A model.bin in CTranslate2's binary format (version 6)."""
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
                 np.dtype(np.int32): 3, np.dtype(np.float16): 4}
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        raw = np.ascontiguousarray(value).tobytes()
        out += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape),
                struct.pack("<B", dtype_ids[value.dtype]), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    return b"".join(out)


def whisper_as_ct2(model: torch.nn.Module) -> bytes:
    """An openai-whisper model written the way CTranslate2's converter lays out a WhisperSpec (float16)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    v: dict[str, np.ndarray] = {}

    def half(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16)

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = half(sd[f"{src}.weight"]), half(sd[f"{src}.bias"])

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = half(sd[f"{src}.weight"]), half(sd[f"{src}.bias"])

    def layer(dst: str, src: str, cross: bool) -> None:
        a = f"{src}.attn"
        norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        zeros = np.zeros_like(sd[f"{a}.query.bias"])
        v[f"{dst}/self_attention/linear_0/weight"] = half(np.concatenate(
            [sd[f"{a}.query.weight"], sd[f"{a}.key.weight"], sd[f"{a}.value.weight"]]))
        v[f"{dst}/self_attention/linear_0/bias"] = half(np.concatenate(
            [sd[f"{a}.query.bias"], zeros, sd[f"{a}.value.bias"]]))
        linear(f"{dst}/self_attention/linear_1", f"{a}.out")
        if cross:
            c = f"{src}.cross_attn"
            norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
            linear(f"{dst}/attention/linear_0", f"{c}.query")
            v[f"{dst}/attention/linear_1/weight"] = half(np.concatenate([sd[f"{c}.key.weight"],
                                                                         sd[f"{c}.value.weight"]]))
            v[f"{dst}/attention/linear_1/bias"] = half(np.concatenate([zeros, sd[f"{c}.value.bias"]]))
            linear(f"{dst}/attention/linear_2", f"{c}.out")
        norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")
        linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")

    dims = model.dims
    v["decoder/num_heads"] = np.array(dims.n_text_head, dtype=np.int16)
    v["decoder/embeddings/weight"] = half(sd["decoder.token_embedding.weight"])
    v["decoder/position_encodings/encodings"] = half(sd["decoder.positional_embedding"])
    for i in range(dims.n_text_layer):
        layer(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/num_heads"] = np.array(dims.n_audio_head, dtype=np.int16)
    v["encoder/position_encodings/encodings"] = half(sd["encoder.positional_embedding"])
    for i in range(dims.n_audio_layer):
        layer(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    return ct2_bytes(v, {"decoder/projection/weight": "decoder/embeddings/weight"})


def tiny_whisper() -> torch.nn.Module:
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=20, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                           n_vocab=100, n_text_ctx=12, n_text_state=16, n_text_head=2, n_text_layer=2)
    model = Whisper(dims).eval()
    with torch.no_grad():  # the decoder's positional embedding is torch.empty: give every tensor values
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def halved(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every weight rounded through float16, as a CTranslate2 fp16 file stores it."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    return model


@pytest.fixture
def fake_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, torch.nn.Module]:
    """A tiny Whisper split over two importable 'packages', registered as packaged model 'whisper-tiny-test'."""
    model = tiny_whisper()
    data = whisper_as_ct2(model)
    site = tmp_path / "site"
    for i, (package, chunk) in enumerate([("fake_part_one", data[:1000]), ("fake_part_two", data[1000:])], 1):
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
        (site / package / "data" / f"model.bin.part{i}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    dims, state = packaged.ct2_whisper_to_openai(packaged.read_ct2(data))
    entry = PackagedWhisper(("fake_part_one", "fake_part_two"), hashlib.sha256(data).hexdigest(),
                            packaged.state_dict_digest(state, dims))
    monkeypatch.setitem(packaged.PACKAGED_WHISPER, "whisper-tiny-test", entry)
    cache = tmp_path / "cache"
    monkeypatch.setenv(packaged.CACHE_ENV, str(cache))
    return "whisper-tiny-test", cache, halved(model)


# ------------------------------------------------------------------------------------------------ tests

def test_read_ct2_variables_and_aliases() -> None:
    """The reader returns every variable with its shape and dtype, and the alias table."""
    data = ct2_bytes({"a/w": np.arange(6, dtype=np.float16).reshape(2, 3), "a/n": np.array(8, dtype=np.int16),
                      "a/b": np.ones(4, dtype=np.float32)}, {"a/alias": "a/w"}, spec="TestSpec")
    model = packaged.read_ct2(data)
    assert model.spec == "TestSpec" and model.revision == 3
    assert model.get("a/alias").dtype == np.float16 and model.get("a/alias").shape == (2, 3)
    assert int(model.get("a/n")) == 8 and model.get("a/b").tolist() == [1.0] * 4


def test_read_ct2_rejects_truncated_file() -> None:
    """A truncated model.bin is an error, not a silently short model."""
    data = ct2_bytes({"a/w": np.ones((4, 4), dtype=np.float16)}, {})
    with pytest.raises(ValueError, match="truncated"):
        packaged.read_ct2(data[:-7])


def test_conversion_reproduces_the_model() -> None:
    """A Whisper written as CTranslate2 and converted back computes the same logits (fp16-rounded weights)."""
    from whisper.model import ModelDimensions, Whisper

    model = tiny_whisper()
    dims, state = packaged.ct2_whisper_to_openai(packaged.read_ct2(whisper_as_ct2(model)))
    converted = Whisper(ModelDimensions(**dims)).eval()
    converted.load_state_dict(state, strict=True)
    reference = halved(model)
    mel, tokens = torch.randn(1, 80, 40), torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(converted(mel, tokens), reference(mel, tokens))
    assert all(t.dtype == torch.float32 for t in state.values())


def test_prepare_writes_a_loadable_checkpoint_once(fake_packages: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call converts into the cache (checkpoint + manifest); later calls reuse it unconverted."""
    import whisper

    name, cache, reference = fake_packages
    path = packaged.whisper_checkpoint(name)
    assert path.parent == cache and path.is_file()
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["file_sha256"] == packaged.file_sha256(path)
    model = whisper.load_model(str(path))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)

    monkeypatch.setattr(packaged, "read_ct2", lambda _: pytest.fail("converted twice"))
    assert packaged.whisper_checkpoint(name, verify=True) == path


def test_interrupted_preparation_leaves_no_checkpoint(fake_packages: tuple,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A preparation killed while writing leaves no checkpoint, temp file or manifest; the next one succeeds."""
    name, cache, _ = fake_packages
    real_save = torch.save

    def dying_save(obj: object, fh: object) -> None:
        fh.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        packaged.whisper_checkpoint(name)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(packaged.torch, "save", real_save)
    assert packaged.whisper_checkpoint(name).is_file()


def test_checkpoint_without_manifest_is_rebuilt(fake_packages: tuple) -> None:
    """A checkpoint whose manifest is missing (killed between the two renames) is not trusted."""
    import whisper

    name, cache, _ = fake_packages
    cache.mkdir(parents=True)
    (cache / f"{name}.pt").write_bytes(b"not a checkpoint")
    path = packaged.whisper_checkpoint(name)
    assert path.read_bytes() != b"not a checkpoint"
    assert path.with_suffix(".json").is_file()  # the manifest, written last, now vouches for it
    whisper.load_model(str(path))  # and it loads


def test_corrupt_parts_are_refused(fake_packages: tuple) -> None:
    """Parts whose joined sha256 differs from the pinned one are refused with both hashes named."""
    name, _, _ = fake_packages
    part = packaged._package_dir("fake_part_two") / "data" / "model.bin.part2"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="sha256.*expected"):
        packaged.whisper_checkpoint(name)


def test_packaged_whisper_base_is_pinned() -> None:
    """The real packaged Whisper base converts (or was converted) to the pinned source and state digests."""
    path = packaged.whisper_checkpoint("whisper-base")
    manifest = packaged.read_manifest(path)
    assert manifest["source_sha256"] == packaged.WHISPER_BASE_CT2_SHA256
    assert manifest["state_sha256"] == packaged.WHISPER_BASE_STATE_SHA256
    assert manifest["dims"]["n_audio_state"] == 512 and manifest["dims"]["n_vocab"] == 51865


def test_minilm_and_fer_paths_without_importing_them() -> None:
    """MiniLM's folder and fer's Keras weights are found without importing fer (hence TensorFlow)."""
    assert (packaged.minilm_path() / "model.safetensors").is_file()
    weights = packaged.mini_xception_weights()
    assert weights.name == "emotion_model.hdf5" and weights.is_file()
    assert "fer" not in sys.modules and "tensorflow" not in sys.modules


def test_resolve_model_references(tmp_path: Path) -> None:
    """packaged:<name> gives its local path, an existing path is made absolute, a hub id is left alone."""
    assert packaged.resolve_model("packaged:all-minilm-l6-v2") == packaged.minilm_path()
    assert packaged.resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert packaged.resolve_model("facebook/wav2vec2-base") == "facebook/wav2vec2-base"
    with pytest.raises(ModelUnavailableError, match="packaged:whisper-base"):
        packaged.resolve_model("packaged:no-such-model")


def test_model_hash_covers_weights_and_tokenizer_not_docs(tmp_path: Path) -> None:
    """A model folder's hash changes with its weights or tokenizer files, not with its README."""
    (tmp_path / "model.safetensors").write_bytes(b"one")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    first = packaged.model_sha256(tmp_path)
    (tmp_path / "README.md").write_text("docs")
    assert packaged.model_sha256(tmp_path) == first
    (tmp_path / "vocab.txt").write_text("a\nc\n")
    second = packaged.model_sha256(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"two")
    assert len({first, second, packaged.model_sha256(tmp_path)}) == 3


def test_packaged_model_identity_does_not_depend_on_the_install_path(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same packaged weights installed in two places (two virtual environments, two machines) pin the
    same spec; a model given by its own path keeps that path, and other weights are told apart."""
    def model_at(folder: Path, weights: bytes) -> Path:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    here, there = model_at(tmp_path / "venv-a", b"w" * 64), model_at(tmp_path / "venv-b", b"w" * 64)
    monkeypatch.setattr(packaged, "minilm_path", lambda: here)
    first = packaged.hf_identity("packaged:all-minilm-l6-v2")
    monkeypatch.setattr(packaged, "minilm_path", lambda: there)
    assert packaged.hf_identity("packaged:all-minilm-l6-v2") == first
    assert first["resolved"] == "packaged:all-minilm-l6-v2"
    other = model_at(tmp_path / "venv-c", b"x" * 64)
    monkeypatch.setattr(packaged, "minilm_path", lambda: other)
    assert packaged.hf_identity("packaged:all-minilm-l6-v2") != first
    assert packaged.hf_identity(str(here))["resolved"] == str(here.resolve())
