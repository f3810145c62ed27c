"""benchmarks/pool_variants.py: runs of disjoint seeds pooled and paired by seed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from saap.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "pool_variants", ROOT / "benchmarks" / "pool_variants.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, rows: dict[str, list[tuple[int, float]]]) -> Path:
    results = {
        "0.2": {
            label: [{"seed": s, "ptb": v, "wiki": v / 2, "kl": v / 100} for s, v in vs]
            for label, vs in rows.items()
        }
    }
    path.write_text(json.dumps({"results": results}))
    return path


def test_pools_disjoint_seeds_and_pairs_over_all(tmp_path):
    pool = _module()
    a = _run(
        tmp_path / "a.json",
        {"ref": [(0, 100.0), (1, 110.0)], "x": [(0, 90.0), (1, 99.0)]},
    )
    b = _run(tmp_path / "b.json", {"ref": [(3, 120.0)], "x": [(3, 108.0)]})
    rows = pool.pooled([a, b], "0.2")
    assert sorted(rows["x"]) == [0, 1, 3]
    lines = pool.report(rows, "ref", ["x"])
    ptb = next(line for line in lines if "| ptb |" in line)
    # every seed's ratio is 0.9: the geometric mean is 0.9 with a zero-width
    # interval, so the variant is better
    assert "| 0,1,3 |" in ptb
    assert "0.900 [0.900, 0.900] | better |" in ptb
    assert math.isclose(
        pool.seed_ratio([90.0, 99.0, 108.0], [100.0, 110.0, 120.0]).value, 0.9
    )


def test_a_seed_in_two_runs_is_refused(tmp_path):
    pool = _module()
    a = _run(tmp_path / "a.json", {"ref": [(0, 100.0), (1, 110.0)]})
    b = _run(tmp_path / "b.json", {"ref": [(1, 120.0)]})
    with pytest.raises(DataError, match=r"seed 1 of 'ref' is also in an earlier file"):
        pool.pooled([a, b], "0.2")


def test_an_unknown_reference_names_the_labels(tmp_path):
    pool = _module()
    a = _run(tmp_path / "a.json", {"ref": [(0, 100.0), (1, 110.0)]})
    with pytest.raises(DataError, match=r"reference 'other' is in none of the files"):
        pool.report(pool.pooled([a], "0.2"), "other", None)
