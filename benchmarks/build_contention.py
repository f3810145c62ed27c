"""Does a llama.cpp build beside a PyTorch stage cost the stage more than the
build gains? (Whether ``make run`` should start the build in the background and
let the stages before export run meanwhile.)

A bf16 forward + backward of SmolLM2-135M on 4 x 256 tokens (the kind of work
the importance, finetune and evaluate stages do) is timed in rounds that
alternate between the build stopped (SIGSTOP of its process group) and the
build running under a scheduling policy (``nice -n 10``, ``SCHED_IDLE``), order
reversed every other round. Per policy: the step time ratio (running / stopped)
paired by round with a 95% t-interval, and how far the build got per second of
running beside the stage, against the same build alone.

Usage: ``.venv/bin/python benchmarks/build_contention.py [--rounds 4] [--out
docs/bench_build_contention.md]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from saap.comparison import seed_ratio
from saap.model import load_model
from saap.runtime.llamacpp import (
    BASE_OPTIONS,
    TOOLS,
    cpu_flags,
    isa_options,
    project_include,
    unpack_source,
)
from saap.sources import default_cache_dir

POLICIES = {"nice 10": ["nice", "-n", "10"], "SCHED_IDLE": ["chrt", "--idle", "0"]}


def configure(work: Path) -> Path:
    source = unpack_source(default_cache_dir())
    include = work / "include.cmake"
    include.write_text(project_include())
    build = work / "build"
    options = BASE_OPTIONS | isa_options(cpu_flags())
    subprocess.run(
        ["cmake", "-G", "Ninja", "-S", str(source), "-B", str(build)]
        + [f"-D{k}={v}" for k, v in options.items()]
        + [f"-DCMAKE_PROJECT_INCLUDE={include}"],
        check=True,
        capture_output=True,
    )
    return build


def start_build(build: Path, prefix: list[str], log: Path) -> subprocess.Popen:
    subprocess.run(
        ["ninja", "-C", str(build), "-t", "clean"], check=True, capture_output=True
    )
    with log.open("w") as handle:
        return subprocess.Popen(
            [*prefix, "ninja", "-C", str(build), "-j", "2", *TOOLS],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def progress(log: Path) -> int:
    """Build steps done so far (ninja's ``[done/total]``)."""
    steps = re.findall(r"^\[(\d+)/\d+\]", log.read_text(), flags=re.M)
    return int(steps[-1]) if steps else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_model(args.model, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 256))

    def step() -> float:
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()
    work = Path(tempfile.mkdtemp(prefix="saap-contention-"))
    rows = []
    build = configure(work)
    log = work / "build.log"
    # the build alone, its first minute: steps per second
    process = start_build(build, [], log)
    time.sleep(60)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    alone_rate = progress(log) / 60
    try:
        for name, prefix in POLICIES.items():
            process = start_build(build, prefix, log)
            group = os.getpgid(process.pid)
            times = {"stopped": [], "running": []}
            running_s = 0.0
            for round_ in range(args.rounds):
                arms = (
                    ("stopped", "running")
                    if round_ % 2 == 0
                    else ("running", "stopped")
                )
                for arm in arms:
                    os.killpg(
                        group, signal.SIGSTOP if arm == "stopped" else signal.SIGCONT
                    )
                    phase = time.perf_counter()
                    times[arm].append(
                        statistics.median(step() for _ in range(args.steps))
                    )
                    if arm == "running":
                        running_s += time.perf_counter() - phase
            os.killpg(group, signal.SIGKILL)
            process.wait()
            ratio = seed_ratio(times["running"], times["stopped"])
            rows.append(
                (
                    name,
                    statistics.median(times["stopped"]),
                    statistics.median(times["running"]),
                    ratio,
                    progress(log) / running_s / alone_rate,
                )
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# A llama.cpp build beside a PyTorch stage",
        "",
        f"`.venv/bin/python benchmarks/build_contention.py --rounds {args.rounds} "
        f"--steps {args.steps}` ({os.cpu_count()} CPUs). Step: bf16 forward + "
        "backward of SmolLM2-135M on 4 x 256 tokens; phases with the build stopped "
        "and running alternate, order reversed every other round; ratio paired by "
        "round, 95% t-interval. Build speed: ninja steps per second while running "
        "beside the stage, over the same build alone (its first minute).",
        "",
        "| build policy | step, build stopped (s) | step, build running (s) "
        "| step time ratio | build speed beside the stage | sum of the two speeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, stopped, running, ratio, build_speed in rows:
        lines.append(
            f"| {name} | {stopped:.2f} | {running:.2f} | {ratio.value:.2f} "
            f"[{ratio.lower:.2f}, {ratio.upper:.2f}] | {build_speed:.2f} "
            f"| {1 / ratio.value + build_speed:.2f} |"
        )
    lines += [
        "",
        "A sum of speeds under 1 means running the two together does less work "
        "per second than running them one after the other.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
