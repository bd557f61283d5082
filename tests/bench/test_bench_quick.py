"""The benchmark suite's quick mode, as CI runs it, so the benchmarks never rot.

``python -m bench --quick`` runs for real (a ``coffer up``, real engines, RabbitMQ, wrk) in a
work directory of the test's own; the test checks that every benchmark produced numeric figures
and a ratio to its raw baseline, that the table was printed, and that nothing was left running.
The targets are the benchmark's business: they are printed, never asserted here.

The small tests at the end check the pure parts (statistics, the table, wrk's output) without
starting anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from coffer_harness import kill_all_under, processes_under

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    # ``bench`` is a top-level package of the repository, not an installed one.
    sys.path.insert(0, str(REPO))

from bench.api_load import parse_wrk  # noqa: E402
from bench.harness import BenchError  # noqa: E402
from bench.report import (  # noqa: E402
    BenchmarkResult,
    Check,
    Metric,
    Target,
    percentile,
    render_table,
    summarize,
)

BENCHMARKS = (
    "1-provision",
    "2-concurrent",
    "3-delete",
    "4-api",
    "5-messaging",
    "6-density",
    "7-backup",
)
TIME_BUDGET = 300.0  # benchmark 7 (backups) adds about 80 s on a busy 2-core machine
STATS = ("median", "p95", "min", "max")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Where the benchmark makes its work directory; whatever runs under it is stopped."""
    # Short: engine sockets live several directories below it (unix socket paths <= 107 bytes).
    path = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        kill_all_under(path)
        leftover = processes_under(path)
        shutil.rmtree(path, ignore_errors=True)
        assert not leftover, f"processes left running: {leftover}"


@pytest.mark.slow
@pytest.mark.integration
def test_quick_mode_measures_every_benchmark_against_its_baseline(workdir: Path) -> None:
    output = workdir / "results.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--output",
            str(output),
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIME_BUDGET)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop what it started; the fixture kills any remainder.
        proc.send_signal(signal.SIGTERM)
        stderr = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            stderr = proc.communicate(timeout=60)[1]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stderr = stderr or proc.communicate()[1]
        pytest.fail(
            f"python -m bench --quick took longer than {TIME_BUDGET:.0f} s; its progress:\n"
            + "\n".join(stderr.splitlines()[-30:])
        )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"

    document = json.loads(output.read_text())
    assert document["mode"] == "quick"
    assert document["leftover_processes"] == []
    engines = document["host"]["engines"]
    assert "mariadb" in engines, engines
    assert set(document["benchmarks"]) == set(BENCHMARKS)
    for name in BENCHMARKS:
        bench = document["benchmarks"][name]
        assert bench["error"] is None, f"{name}: {bench['error']}"
        assert bench["metrics"], f"{name} produced no figures"
        for metric in bench["metrics"]:
            where = f"{name} / {metric['name']}"
            for side in ("coffer", "raw"):
                figures = metric[side]
                assert figures["n"] == len(figures["samples"]) >= 1, where
                assert all(_number(v) for v in figures["samples"]), where
                assert all(_number(figures[stat]) for stat in STATS), where
                assert figures["min"] <= figures["median"] <= figures["max"], where
            assert _number(metric["ratio"]), where
            assert metric["ratio"] == pytest.approx(
                metric["coffer"]["median"] / metric["raw"]["median"]
            ), where
            assert metric["raw"]["label"], where
            # In the table: the figure's row and its baseline's row.
            assert metric["name"] in stdout, where
            assert f"{metric['ratio']:.2f}x" in stdout, where

    # Every engine Coffer can run here was provisioned, deleted, weighed and backed up.
    for name in ("1-provision", "2-concurrent", "3-delete", "6-density", "7-backup"):
        measured = " ".join(m["name"] for m in document["benchmarks"][name]["metrics"])
        for manager in engines:
            assert manager in measured, f"{name} did not measure {manager}"
    api = [m["name"] for m in document["benchmarks"]["4-api"]["metrics"]]
    for endpoint in ("GET /instances (page of 20)", "GET /instances/{id}", "GET /flavors"):
        assert any(n.startswith(endpoint) and n.endswith("throughput") for n in api), api
    messaging = " ".join(m["name"] for m in document["benchmarks"]["5-messaging"]["metrics"])
    assert "embedded broker: heartbeats ingested" in messaging
    assert "RabbitMQ: RPC round trip p99" in messaging

    header = next(line for line in stdout.splitlines() if line.startswith("measure"))
    assert header.split() == [
        "measure",
        "unit",
        "n",
        "median",
        "p95",
        "min",
        "max",
        "ratio",
        "target",
    ]
    for name in BENCHMARKS:
        assert f"[{name}]" in stdout


# -- the pure parts -------------------------------------------------------------------------------


def test_summary_statistics_use_nearest_rank() -> None:
    samples = [float(v) for v in range(1, 21)]  # 1..20
    assert summarize(samples) == {"median": 10.5, "p95": 19.0, "min": 1.0, "max": 20.0}
    assert percentile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_and_targets() -> None:
    target = Target("p50 <= 1.0x raw", (Check("median", "<=", 1.0, relative=True),))
    slower = Metric("b", "slower", "s", [2.0, 2.0, 4.0], "raw", [1.0, 1.0, 1.0], target=target)
    faster = Metric("b", "faster", "s", [0.5], "raw", [1.0], target=target)
    assert slower.ratio() == pytest.approx(2.0)
    assert slower.target_met() is False
    assert faster.target_met() is True
    absolute = Target(">= 2,000/s", (Check("median", ">=", 2000.0),))
    rate = Metric("b", "rate", "msg/s", [2500.0], "raw", [5000.0], "higher", target=absolute)
    assert rate.ratio() == pytest.approx(0.5)
    assert rate.target_met() is True
    table = render_table([BenchmarkResult("9-x", "X", metrics=[slower, rate])])
    assert "2.00x" in table and "(MISSED)" in table and "(met)" in table
    assert "raw: raw" in table


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:9/v1.0/p/flavors
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.54ms    2.10ms  40.00ms   90.00%
    Req/Sec     3.05k   100.00     3.20k    80.00%
  Latency Distribution
     50%  850.00us
     75%   11.00ms
     90%   12.00ms
     99%    1.20s
  6100 requests in 2.00s, 9.80MB read
Requests/sec:   3049.50
Transfer/sec:      4.90MB
"""


def test_wrk_output_is_read_and_failures_are_not_hidden() -> None:
    run = parse_wrk(WRK_OUTPUT)
    assert run.requests_per_second == pytest.approx(3049.5)
    assert run.p50_ms == pytest.approx(0.85)
    assert run.p99_ms == pytest.approx(1200.0)
    assert run.requests == 6100
    with pytest.raises(BenchError, match="responses were errors"):
        parse_wrk(
            WRK_OUTPUT.replace("Requests/sec", "  Non-2xx or 3xx responses: 12\nRequests/sec")
        )
    with pytest.raises(BenchError, match="could not read"):
        parse_wrk("wrk: connection refused")
