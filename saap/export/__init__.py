"""Exporters: one module per deployment format, registered by name.

An exporter turns a checkpoint folder into files an edge runtime loads, and returns
a manifest (files, sizes, what was written). ``export.formats`` in params.yaml
names the exporters a run uses; the names are this registry's. Adding a format
(ONNX, ExecuTorch, ...) is one module in this package with a class like
``saap.export.gguf.GGUFExporter`` decorated with :func:`register`, plus its test:
every module of the package is imported below, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Protocol

from saap.errors import ExportError
from saap.registry import Registry


class Exporter(Protocol):
    name: str

    def export(self, model_dir: Path, out_dir: Path, params) -> dict:
        """Write ``model_dir`` in this format under ``out_dir``; the manifest."""
        ...


EXPORTERS: Registry[Exporter] = Registry("export format", "saap/export/")


def register(cls):
    """Class decorator: add an exporter to the registry under ``cls.name``."""
    EXPORTERS.add(cls.name, cls())
    return cls


def get_exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise ExportError(
            f"unknown export format {name!r}; known formats: {sorted(EXPORTERS)}"
        )
    return EXPORTERS[name]


# each module registers its exporters when imported
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
