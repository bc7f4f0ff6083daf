"""Shared test settings: one CPU thread per test process and no model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A tiny run trained on generated clips with the real offline preset, built once per session and shared
    (read-only) by the prediction and serving tests: see tests/trained_model.py."""
    from trained_model import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("trained"))
