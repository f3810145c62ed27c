"""Helpers every stage entry point shares: logging set-up and params loading."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import torch

from saap.errors import SaapError


def setup(threads: int | None = None) -> None:
    """Configure logging and use every core (both, on the reference machine)."""
    logging.basicConfig(
        level=os.environ.get("SAAP_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(threads or os.cpu_count() or 1)


def guarded(main: Callable[..., None]) -> Callable[..., None]:
    """Print a project error as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        try:
            main(*args, **kwargs)
        except SaapError as exc:
            print(f"error: {exc}", file=sys.stderr)
            # the compress flow reads this to fail with the stage's own message
            if path := os.environ.get("SAAP_STAGE_ERROR_FILE"):
                with open(path, "a") as handle:
                    handle.write(f"{type(exc).__name__}: {exc}\n")
            raise SystemExit(2) from None

    return wrapper
