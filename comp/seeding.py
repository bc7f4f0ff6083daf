"""Seeds and the reproducibility guard for training.

One seed drives python, numpy and torch; missingness masks draw from their own `numpy.random.Generator`
(derived from the same seed) so that changing, say, the number of dropout calls never changes which
modalities a test utterance loses. On CPU the guard switches torch to deterministic algorithms, so two runs
with the same seed give bit-identical metrics. On CUDA it also turns TF32 off: TF32 matmuls round inputs to
10 mantissa bits, which makes results depend on the card and hides real precision problems; AMP (bf16/fp16)
is the deliberate way to trade precision for speed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

MASK_STREAM = 0x6D61736B  # "mask": salt that separates the mask generator from the global seed
TEST_MASK_STREAM = 0x74657374  # "test": fixed per-clip test masks, independent of the training seed's draws


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def mask_rng(seed: int, stream: int = MASK_STREAM) -> np.random.Generator:
    """A generator for missingness masks, separate from the global RNGs that dropout and shuffling use."""
    return np.random.default_rng([seed, stream])


@contextlib.contextmanager
def deterministic(device: torch.device | str) -> Iterator[None]:
    """Deterministic kernels for the duration of a run; the previous global settings are restored after.

    CPU: `torch.use_deterministic_algorithms(True)` (errors on an op without a deterministic kernel rather than
    silently differing). CUDA: the same request in warn-only mode (some fused kernels have no deterministic
    version; speed matters more there) plus TF32 off.
    """
    device = torch.device(device)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    prev_bench = torch.backends.cudnn.benchmark
    try:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
        else:
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
        torch.backends.cudnn.benchmark = prev_bench
