"""DVC stage ``calibration``: seeded token windows for importance estimation.

Usage: ``python -m stages.calibration --model models/base --text data/text
--out data/calibration``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transformers import AutoTokenizer

from saap.atomic import atomic_dir
from saap.calibration import make_calibration, save_calibration
from saap.errors import SourceError
from saap.params import CalibrationParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.calibration")


def run(
    params: CalibrationParams, model_dir: Path, text_dir: Path, out_dir: Path
) -> dict:
    if not (model_dir / "tokenizer_config.json").is_file():
        raise SourceError(f"{model_dir} has no tokenizer; run the assets stage first")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tensors, meta = make_calibration(tokenizer, text_dir, params)
    with atomic_dir(out_dir) as tmp:
        save_calibration(tensors, meta, tmp)
    return meta


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--out", type=Path, default=Path("data/calibration"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "calibration")
    meta = run(params, args.model, args.text, args.out)
    log.info(
        "calibration: %d + %d windows of %d tokens from %s",
        meta["num_samples"],
        meta["holdout_samples"],
        meta["seq_len"],
        meta["corpus"],
    )


if __name__ == "__main__":
    main()
