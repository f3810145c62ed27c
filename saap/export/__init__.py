"""Exporters: one module per deployment format, registered by name.

An exporter turns a checkpoint folder into files an edge runtime loads, and returns
a manifest (files, sizes, what was written). ``export.formats`` in params.yaml
names the exporters a run uses; the names are this registry's. Adding a format
(ONNX, ExecuTorch, ...) is one module with a class like :class:`GGUFExporter`
decorated with :func:`register`, imported below, plus its test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from saap.errors import ExportError


class Exporter(Protocol):
    name: str

    def export(self, model_dir: Path, out_dir: Path, params) -> dict:
        """Write ``model_dir`` in this format under ``out_dir``; the manifest."""
        ...


EXPORTERS: dict[str, Exporter] = {}


def register(cls):
    """Class decorator: add an exporter to the registry under ``cls.name``."""
    EXPORTERS[cls.name] = cls()
    return cls


def get_exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise ExportError(
            f"unknown export format {name!r}; known formats: {sorted(EXPORTERS)}"
        )
    return EXPORTERS[name]


from saap.export import gguf as _gguf  # noqa: E402,F401  (registers "gguf")
