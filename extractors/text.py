"""Utterance-level text embeddings (stage "text") from a Hugging Face text encoder.

`hf-text` embeds the ASR transcript with any AutoModel text encoder, by hub id or local folder. The default,
microsoft/deberta-large with the sum of its last 4 hidden layers, is GCNet's protocol (the features ComP's
published numbers use, 1024-d); its GPT-2 BPE tokenizer loads without sentencepiece, which DeBERTa-v3 would
need. The offline preset uses all-MiniLM-L6-v2 ("packaged:all-minilm-l6-v2", 384-d).

The vector is the mean over real, non-special tokens: the attention mask removes padding and the tokenizer's
special-tokens mask removes [CLS]/[SEP]/<s>..., so a text's vector does not depend on what it is batched with.
A missing or blank transcript is never embedded: the text is absent with the ASR's reason.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.clip import ClipInput
from core.errors import ConfigError
from extractors.base import Extractor, ExtractorOutput, register
from extractors.packaged import hf_identity, load_hf
from extractors.pooling import LayerSpec, check_depth, combine_layers, describe_layers, masked_sum, validate_layers

logger = logging.getLogger(__name__)

POOLING = "mean over non-special tokens"


@dataclass(frozen=True)
class HFTextConfig:
    """Settings of the `hf-text` extractor."""

    model: str = "microsoft/deberta-large"  # hub id, local folder, or "packaged:all-minilm-l6-v2" (offline)
    revision: str | None = None  # hub branch, tag or commit
    layers: LayerSpec = "sum-last-4"  # see extractors.pooling
    max_tokens: int = 512  # longer transcripts are truncated (special tokens included)
    batch_size: int = 16  # transcripts per forward pass

    def __post_init__(self) -> None:
        try:
            validate_layers(self.layers)
        except ValueError as err:
            raise ConfigError(f"layers: {err}") from err
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens must be >= 3, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def missing_text_reason(clip: ClipInput) -> str:
    """Why a clip has no text to embed ("" when it has)."""
    if clip.transcript is None:
        return clip.text_reason or "no-transcript: the ASR stage did not run"
    if not clip.transcript.strip():
        return clip.text_reason or "asr-empty"
    return ""


@register
class HFTextEncoder(Extractor):
    """Mean-pooled hidden states of a Hugging Face text encoder over the transcript's tokens."""

    name = "hf-text"
    stage = "text"
    config_cls = HFTextConfig

    def __init__(self, config: HFTextConfig | dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        config = self.config
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = load_hf(AutoTokenizer, config.model, config.revision)
        self.model = load_hf(AutoModel, config.model, config.revision).to(self.device).eval()
        self.n_states = self.model.config.num_hidden_layers + 1
        check_depth(config.layers, self.n_states)
        self._accepts = set(inspect.signature(self.model.forward).parameters)
        self.identity = hf_identity(config.model, config.revision)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "extractor": self.name,
            "encoder": c.model,
            **self.identity,
            "layers": describe_layers(c.layers),
            "pooling": POOLING,
            "max_tokens": c.max_tokens,
            "dim": self.feature_dim,
        }

    def info(self) -> dict[str, str]:
        return {"encoder": self.config.model, "layers": describe_layers(self.config.layers), "pooling": POOLING}

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        outputs: list[ExtractorOutput | None] = [None] * len(clips)
        todo = []
        for i, clip in enumerate(clips):
            reason = missing_text_reason(clip)
            if reason:
                outputs[i] = ExtractorOutput(features=None, reason=reason)
            else:
                todo.append(i)
        todo.sort(key=lambda i: len(clips[i].transcript or ""))  # similar lengths pad less
        size = self.config.batch_size
        for first in range(0, len(todo), size):
            batch = todo[first:first + size]
            pooled, counts = self._embed([clips[i].transcript.strip() for i in batch])
            for i, vec, n in zip(batch, pooled, counts):
                if n == 0:
                    outputs[i] = ExtractorOutput(features=None, reason="text-no-tokens")
                else:
                    outputs[i] = ExtractorOutput(features=(vec / n).to(torch.float32).numpy())
        return outputs  # type: ignore[return-value]

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of the combined hidden states over real non-special tokens, and the token counts."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_tokens,
                             return_special_tokens_mask=True, return_attention_mask=True, return_tensors="pt")
        keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        inputs = {k: v.to(self.device) for k, v in enc.items()
                  if k in self._accepts and k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            out = self.model(**inputs, output_hidden_states=True)
            hidden = combine_layers(out.hidden_states, self.config.layers)
            pooled, counts = masked_sum(hidden, keep.to(self.device))
        return pooled.cpu(), counts.cpu()
