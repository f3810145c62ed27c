"""DVC stage ``export``: one checkpoint written in each ``export.formats`` format
(GGUF for llama.cpp: f16, then the quantized types), with ``export.json``
(files, sizes, tensor types, fallbacks, the llama.cpp build) beside the files.

The folder appears only when every file is written: a failure (llama.cpp refusing
a file, an unsupported shape) leaves the previous export as it was.

Usage: ``python -m stages.export --variant pruned --model models/pruned
--out models/gguf/pruned``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saap.atomic import atomic_dir, write_json
from saap.export import get_exporter
from saap.params import ExportParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.export")

SCHEMA = "saap.export/v1"


def run(params: ExportParams, variant: str, model_dir: Path, out: Path) -> dict:
    manifest = {"schema": SCHEMA, "variant": variant, "checkpoint": str(model_dir)}
    exporters = {name: get_exporter(name) for name in params.formats}  # names checked
    with atomic_dir(out) as tmp:
        for name, exporter in exporters.items():
            manifest[name] = exporter.export(model_dir, tmp, params)
        write_json(tmp / "export.json", manifest)
    return manifest


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_section(args.params, "export")
    setup(params.threads)
    manifest = run(params, args.variant, args.model, args.out)
    for kind, entry in manifest.get("gguf", {}).get("files", {}).items():
        log.info(
            "%s: %s %.1f MiB, %d tensor(s) fell back",
            args.variant,
            kind,
            entry["bytes"] / 2**20,
            entry["fallback_count"],
        )


if __name__ == "__main__":
    main()
