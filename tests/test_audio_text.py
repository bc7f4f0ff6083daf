"""hf-audio and hf-text on tiny randomly initialised models saved to a folder, plus the packaged MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.clip import SAMPLE_RATE, ClipInput
from extractors import base
from extractors.audio import HFAudioEncoder, chunk_bounds
from extractors.packaged import ModelUnavailableError, minilm_path
from extractors.pooling import combine_layers, parse_layers
from extractors.text import HFTextEncoder


def make_clip(audio: np.ndarray | None, audio_reason: str = "", transcript: str | None = None,
              text_reason: str = "", clip_id: str = "c") -> ClipInput:
    duration = 0.0 if audio is None else len(audio) / SAMPLE_RATE
    return ClipInput(clip_id, audio, audio_reason, None, "no-video-stream", duration,
                     transcript=transcript, text_reason=text_reason)


def voiced(seconds: float, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A buzzy harmonic tone with a little noise: speech-like enough for an encoder, cheap to make."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    rng = np.random.default_rng(seed)
    return (0.1 * wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def save_tiny_wav2vec2(folder: Path, layer_norm: bool) -> Path:
    """A 2-layer, 32-wide Wav2Vec2Model and its feature extractor, saved like a hub model."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 4, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm,
    )
    Wav2Vec2Model(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=layer_norm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def group_norm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v_group"), layer_norm=False)


@pytest.fixture(scope="module")
def layer_norm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v_layer"), layer_norm=True)


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer DeBERTa-v2 with relative attention, using MiniLM's (BERT WordPiece) tokenizer files."""
    from transformers import DebertaV2Config, DebertaV2Model

    folder = tmp_path_factory.mktemp("deberta")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                             position_buckets=16, pos_att_type=["p2c", "c2p"], type_vocab_size=0)
    DebertaV2Model(config).eval().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- audio

def test_hf_audio_dim_is_the_hidden_size(group_norm_dir: Path) -> None:
    """A wav2vec2 model loaded by path yields one vector of its hidden size per clip."""
    ex = base.build("hf-audio", {"model": str(group_norm_dir)})
    out = ex.extract([make_clip(voiced(1.0))])
    assert ex.feature_dim == 32 and out[0].features.shape == (32,) and out[0].features.dtype == np.float32


@pytest.mark.parametrize("model_dir", ["group_norm_dir", "layer_norm_dir"])
def test_hf_audio_padding_never_pooled(model_dir: str, request: pytest.FixtureRequest) -> None:
    """A clip gives the same vector alone and batched with a longer clip (group-norm and masked models)."""
    ex = HFAudioEncoder({"model": str(request.getfixturevalue(model_dir))})
    short, long = voiced(0.7, seed=1), voiced(1.9, f0=200.0, seed=2)
    alone = ex.extract([make_clip(short)])[0].features
    batched = ex.extract([make_clip(long), make_clip(short)])[1].features
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-5)


def test_hf_audio_masked_model_is_really_batched(layer_norm_dir: Path) -> None:
    """A model whose extractor returns an attention mask runs clips of unequal length in one padded batch."""
    ex = HFAudioEncoder({"model": str(layer_norm_dir)})
    shapes = []
    ex.model.register_forward_pre_hook(lambda _m, args, kwargs: shapes.append(tuple(args[0].shape)),
                                       with_kwargs=True)
    ex.extract([make_clip(voiced(0.7)), make_clip(voiced(1.9))])
    assert shapes == [(2, int(1.9 * SAMPLE_RATE))]


def test_hf_audio_long_audio_is_chunked(group_norm_dir: Path) -> None:
    """Audio longer than chunk_s is run in chunks and the vector is the frame-weighted mean over them."""
    ex = HFAudioEncoder({"model": str(group_norm_dir), "chunk_s": 1.0, "min_chunk_s": 0.3})
    lengths = []
    ex.model.register_forward_pre_hook(lambda _m, args: lengths.append(tuple(args[0].shape)))
    audio = voiced(2.5)
    vector = ex.extract([make_clip(audio)])[0].features
    seen = sorted(lengths)

    values = ex.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
    total, frames = 0.0, 0
    for start, end in chunk_bounds(len(values), SAMPLE_RATE, int(0.3 * SAMPLE_RATE)):
        with torch.no_grad():
            hidden = ex.model(torch.from_numpy(values[start:end])[None]).last_hidden_state[0]
        total, frames = total + hidden.sum(0).double(), frames + hidden.shape[0]
    assert seen == [(1, 8000), (2, 16000)]  # the two full chunks share a batch
    np.testing.assert_allclose(vector, (total / frames).numpy(), atol=1e-5, rtol=1e-5)


def test_chunk_bounds_merge_a_short_tail() -> None:
    """A tail shorter than min_chunk joins the previous chunk; the chunks cover the audio exactly."""
    assert chunk_bounds(25, 10, 6) == [(0, 10), (10, 25)]
    assert chunk_bounds(27, 10, 6) == [(0, 10), (10, 20), (20, 27)]


def test_hf_audio_sum_last_layers(group_norm_dir: Path) -> None:
    """layers='sum-last-2' is the frame mean of the sum of the last two hidden states."""
    ex = HFAudioEncoder({"model": str(group_norm_dir), "layers": "sum-last-2"})
    audio = voiced(1.0)
    vector = ex.extract([make_clip(audio)])[0].features
    values = ex.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]
    with torch.no_grad():
        hs = ex.model(values, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(vector, (hs[-1] + hs[-2])[0].mean(0).numpy(), atol=1e-5, rtol=1e-5)


def test_hf_audio_missing_and_silent_reasons(group_norm_dir: Path) -> None:
    """No audio keeps the decoder's reason; digital silence is 'silent'; neither is embedded."""
    ex = HFAudioEncoder({"model": str(group_norm_dir)})
    out = ex.extract([make_clip(None, "no-audio-stream"), make_clip(np.zeros(16000, np.float32))])
    assert [(o.features, o.reason) for o in out] == [(None, "no-audio-stream"), (None, "silent")]


def test_layer_spec_parsing() -> None:
    """Layer specs select hidden states counted like output_hidden_states (index 0 = embeddings)."""
    assert parse_layers("last", 7) == ([6], "sum")
    assert parse_layers("sum-last-4", 7) == ([3, 4, 5, 6], "sum")
    assert parse_layers("mean-all", 3) == ([0, 1, 2], "mean")
    assert parse_layers((0, -1), 7) == ([0, 6], "sum")
    with pytest.raises(ValueError, match="hidden states"):
        parse_layers("sum-last-9", 7)


def test_bad_layer_spec_is_a_config_error() -> None:
    """A malformed layer spec is rejected when the config is built, naming the key."""
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="layers"):
        HFAudioEncoder({"model": "unused", "layers": "middle"})


# ---------------------------------------------------------------------------------------------- text

def test_hf_text_excludes_special_tokens(deberta_dir: Path) -> None:
    """The vector is the mean of the chosen hidden states over the text's tokens, [CLS]/[SEP] left out."""
    ex = HFTextEncoder({"model": str(deberta_dir), "layers": "sum-last-2"})
    text = "i am really happy today"
    vector = ex.extract([make_clip(None, transcript=text)])[0].features
    enc = ex.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hs = ex.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      output_hidden_states=True).hidden_states
    summed = (hs[-1] + hs[-2])[0]
    np.testing.assert_allclose(vector, summed[1:-1].mean(0).numpy(), atol=1e-5, rtol=1e-5)
    assert not np.allclose(vector, summed.mean(0).numpy(), atol=1e-4)


def test_hf_text_batch_invariant(deberta_dir: Path) -> None:
    """A transcript gives the same vector alone and batched with a longer one (padding never pooled)."""
    ex = HFTextEncoder({"model": str(deberta_dir), "layers": "sum-last-2"})
    short = make_clip(None, transcript="fine thanks")
    long = make_clip(None, transcript="well that was the strangest conversation i have had all week honestly")
    alone = ex.extract([short])[0].features
    batched = ex.extract([long, short])[1].features
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-5)


def test_hf_text_truncates_to_max_tokens(deberta_dir: Path) -> None:
    """A transcript longer than max_tokens is embedded from its first max_tokens tokens."""
    ex = HFTextEncoder({"model": str(deberta_dir), "layers": "last", "max_tokens": 6})
    full = ex.extract([make_clip(None, transcript="one two three four five six seven eight")])[0].features
    head = ex.extract([make_clip(None, transcript="one two three four")])[0].features
    np.testing.assert_allclose(full, head, atol=1e-5, rtol=1e-5)


def test_hf_text_never_embeds_missing_text(deberta_dir: Path) -> None:
    """Blank or missing transcripts are absent with the ASR's reason and never reach the model."""
    ex = HFTextEncoder({"model": str(deberta_dir), "layers": "last"})
    calls = []
    ex.model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = ex.extract([
        make_clip(None, transcript="", text_reason="silent"),
        make_clip(None, transcript="  ", text_reason="asr-empty"),
        make_clip(None, transcript=None, text_reason="no-audio: no-audio-stream"),
        make_clip(None, transcript=None),
    ])
    assert [o.features for o in out] == [None] * 4 and calls == []
    assert [o.reason for o in out][:3] == ["silent", "asr-empty", "no-audio: no-audio-stream"]
    assert out[3].reason.startswith("no-transcript")


def test_packaged_minilm_embeds_meaning() -> None:
    """The packaged all-MiniLM-L6-v2 gives 384-d vectors that put paraphrases closer than unrelated text."""
    ex = base.build("hf-text", {"model": "packaged:all-minilm-l6-v2", "layers": "last"})
    texts = ["I am so happy today", "Today I feel very glad", "The invoice is attached to this email"]
    vecs = [o.features for o in ex.extract([make_clip(None, transcript=t) for t in texts])]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert ex.feature_dim == 384 and vecs[0].shape == (384,)
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    assert ex.spec()["model_sha256"] and ex.spec()["layers"] == "last"


def test_unreachable_hub_model_is_one_clear_error() -> None:
    """A hub id that is neither cached nor reachable raises ModelUnavailableError naming it and the way out."""
    with pytest.raises(ModelUnavailableError, match=r"no-such-org/no-such-model.*--preset offline"):
        HFTextEncoder({"model": "no-such-org/no-such-model"})
    with pytest.raises(ModelUnavailableError, match="no-such-org/no-such-speech-model"):
        HFAudioEncoder({"model": "no-such-org/no-such-speech-model"})


def test_layers_beyond_the_model_depth_is_a_config_error(deberta_dir: Path) -> None:
    """Asking a 2-layer model for its last 4 layers fails at build time with the key named."""
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="layers.*3 hidden states"):
        HFTextEncoder({"model": str(deberta_dir), "layers": "sum-last-4"})


def test_combine_layers_mean() -> None:
    """'mean-last-2' averages the selected states."""
    states = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(combine_layers(states, "mean-last-2"), (states[1] + states[2]) / 2)
