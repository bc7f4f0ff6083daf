"""Every exception the project defines derives from one root, `core.errors.CompError`, and each is defined once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import Counter

from core.errors import CompError

PACKAGES = ("core", "extractors", "comp", "pipeline", "demo")


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [package] + [importlib.import_module(m.name)
                               for m in pkgutil.walk_packages(package.__path__, prefix=f"{name}.")]
        for module in modules:
            found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                      if issubclass(cls, BaseException) and cls.__module__ == module.__name__]
    return list(dict.fromkeys(found))


def test_every_project_exception_is_a_comp_error():
    classes = project_exceptions()
    assert len(classes) >= 15  # the scan found the modules (store, config, training, CLI, ... errors)
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, CompError)]
    assert not strays, f"not derived from core.errors.CompError: {strays}"


def test_each_exception_is_defined_once():
    names = Counter(c.__name__ for c in project_exceptions())
    assert [n for n, k in names.items() if k > 1] == []
