"""The ``saap`` command: run single stages, the pipeline, and check params."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from saap.errors import SaapError

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)

STAGES = {
    "assets": "fetch pinned packages; write models/base and data/{eval,text,instruct}",
    "calibration": "seeded calibration token windows (data/calibration)",
    "importance": "score every prunable group with every estimator",
    "ranking": "fuse scores, rank layers, allocate ratios: artifacts/plan/plan.json",
    "prune": "replay the plan on the base model: models/pruned",
}


def _stage_command(name: str, help_text: str) -> None:
    @app.command(
        name,
        help=f"Stage {name}: {help_text}. Options go to `python -m stages.{name}`.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(ctx: typer.Context) -> None:
        module = importlib.import_module(f"stages.{name}")
        try:
            module.main(list(ctx.args))
        except SaapError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


for _name, _help in STAGES.items():
    _stage_command(_name, _help)


@app.command("check-params")
def check_params(
    path: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Validate every section of params.yaml and print it resolved."""
    from saap.params import SECTIONS, parse_section, read_params_file

    raw = read_params_file(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        typer.echo(
            f"error: unknown section(s) {unknown}; known: {sorted(SECTIONS)}", err=True
        )
        raise typer.Exit(2)
    try:
        for name in raw:
            typer.echo(f"{name}: {parse_section(name, raw[name]).model_dump()}")
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def repro(
    stage: str = typer.Argument(
        None, help="Stage to bring up to date (all by default)"
    ),
) -> None:
    """Bring the DVC pipeline up to date (``dvc repro``): DVC decides what is stale."""
    command = [sys.executable, "-m", "dvc", "repro"] + ([stage] if stage else [])
    raise typer.Exit(subprocess.call(command))


@app.command()
def run() -> None:
    """Run the whole pipeline on the embedded default (``dvc repro``)."""
    repro(None)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
