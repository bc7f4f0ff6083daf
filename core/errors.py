"""The root of every error comp-mer raises on purpose.

Each package defines its own errors (a `StoreError` for the feature store, a `TrainingError` for training,
...) as subclasses of `CompError`, so a caller can tell an expected failure, whose message says what went
wrong and what to do, from a bug (the CLIs print the former as one line and exit non-zero).
"""

from __future__ import annotations


class CompError(Exception):
    """An expected failure: bad input, settings or files; the message says why and what to do instead."""


class ConfigError(CompError, ValueError):
    """A config value or key that cannot be honoured; the message names the key."""
