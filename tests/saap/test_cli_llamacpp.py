"""`saap run` on a machine without llama.cpp builds it in the background at the
lowest CPU priority (the idle scheduling class), and not at all where built."""

from __future__ import annotations

import os
import stat
import sys

import pytest

pytestmark = pytest.mark.unit


def test_no_background_build_where_llamacpp_is_built(monkeypatch):
    import saap_cli
    from saap.runtime import llamacpp

    monkeypatch.setattr(llamacpp, "is_built", lambda cache=None: True)
    assert saap_cli._build_llamacpp_in_background() is None


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling only")
def test_background_build_runs_in_the_idle_class_and_logs_to_the_cache(
    monkeypatch, tmp_path
):
    import saap_cli
    from saap.runtime import llamacpp

    # a stand-in for `python -m saap.runtime.llamacpp`: records the scheduling
    # policy it was started with
    probe = tmp_path / "python"
    probe.write_text(
        f"#!/bin/sh\n{sys.executable} -c 'import os; print(os.sched_getscheduler(0))'\n"
    )
    probe.chmod(probe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(llamacpp, "is_built", lambda cache=None: False)
    monkeypatch.setattr(llamacpp, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(saap_cli.sys, "executable", str(probe))
    builder = saap_cli._build_llamacpp_in_background()
    assert builder is not None
    saap_cli._finish_background_build(builder)
    assert builder.returncode == 0
    log = (tmp_path / "cache" / "llama.cpp" / "build.log").read_text()
    assert int(log.split()[0]) == os.SCHED_IDLE
