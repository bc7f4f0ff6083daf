"""Load the label pickles of public feature sets without letting them run code.

A pickle can name any importable callable and have the loader call it (`os.system` included), so a
downloaded `.pkl` is a program, not data. The GCNet / SDR-GNN / MoMKE / ComP label files only hold builtin
containers and scalars, sets, and numpy arrays and scalars, many of them written by Python 2 (hence
`encoding="latin1"`). `safe_load` admits exactly those globals and refuses every other one *before* it is
imported or called, naming it in the error.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

from core.errors import CompError

# (module, name) pairs after Python-2 name translation. Each one only builds plain data.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", n) for n in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex",
                               "str", "bytes", "bytearray", "bool", "slice", "range")]
    + [("collections", "OrderedDict"), ("collections", "defaultdict"),
       ("_codecs", "encode"),  # how protocol-2 pickles spell a bytes object
       ("numpy", "ndarray"), ("numpy", "dtype")]
    # numpy 2 renamed numpy.core to numpy._core; files from either era name one or the other
    + [(f"{core}.{sub}", n) for core in ("numpy.core", "numpy._core")
       for sub, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))]
)


class UnsafePickleError(CompError, pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names was imported or called."""


def _translate(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (`__builtin__.set`, `copy_reg...`) as Python 3 spells them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` only resolves `ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>", encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if _translate(module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}'; label pickles of the public "
                "feature sets only hold lists, dicts, sets, strings, numbers and numpy arrays. "
                "Do not load this file unless you trust where it came from.")
        return super().find_class(module, name)


def safe_loads(data: bytes, *, source: str = "<bytes>", encoding: str = "latin1") -> Any:
    """Unpickle `data` with the restricted unpickler."""
    return RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()


def safe_load(path: str | Path, *, encoding: str = "latin1") -> Any:
    """Unpickle the file at `path`, admitting only plain-data globals (see `ALLOWED_GLOBALS`)."""
    path = Path(path)
    with open(path, "rb") as fh:
        return RestrictedUnpickler(fh, source=str(path), encoding=encoding).load()
