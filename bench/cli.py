"""``python -m bench``: run the benchmarks, print the table, write the JSON.

Full mode (the default) takes several minutes and gives the figures quoted in
``docs/benchmarks.md``; ``--quick`` uses small counts and finishes in about a minute, so CI can
run it on every change and the benchmarks never rot. Progress goes to stderr, the table to
stdout, and the same figures as JSON to ``bench/results/<timestamp>.json`` (or ``--output``).
The exit status is 0 when every selected benchmark produced its figures, 1 when any failed
(the others still run and are reported), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    REPO,
    BenchError,
    CofferApi,
    CofferProcess,
    Workspace,
    running_coffer,
)
from bench.report import BenchmarkResult, render_table, write_json

LOG = logging.getLogger("bench")

BENCHMARKS = ("provision", "concurrent", "delete", "api", "messaging", "density", "backup")
TITLES = {
    "provision": ("1-provision", "Provision latency: POST until the user logs in"),
    "concurrent": ("2-concurrent", "Concurrent creates until all log-ins succeed"),
    "delete": ("3-delete", "Delete latency: until the address is free and the directory gone"),
    "api": ("4-api", "API under load"),
    "messaging": ("5-messaging", "Control-plane messaging: sealed vs raw kombu"),
    "density": ("6-density", "Density: what an idle instance costs"),
    "backup": ("7-backup", "Backup and restore throughput vs the raw tools, file storage"),
}


@dataclass(frozen=True)
class Counts:
    """How much each benchmark does in one mode."""

    provision_runs: int
    concurrent_width: int
    concurrent_rounds: int
    api_connections: int
    api_duration: float
    api_runs: int
    api_recorded: int
    heartbeats: int
    rpc_calls: int
    messaging_runs: int
    idle_agents: int
    idle_window: float
    idle_windows: int
    idle_settle: float
    extrapolate_fit: bool
    #: MB of data per engine that benchmark 7 backs up and restores.
    backup_dataset_mb: int = 8


QUICK = Counts(
    provision_runs=2,
    concurrent_width=2,
    concurrent_rounds=1,
    api_connections=32,
    api_duration=1,
    api_runs=1,
    api_recorded=1000,
    heartbeats=500,
    rpc_calls=200,
    messaging_runs=1,
    idle_agents=3,
    idle_window=5,
    idle_windows=1,
    idle_settle=3,
    extrapolate_fit=False,
)
FULL = Counts(
    provision_runs=10,
    concurrent_width=10,
    concurrent_rounds=2,
    api_connections=32,
    api_duration=5,
    api_runs=3,
    api_recorded=1000,
    heartbeats=3000,
    rpc_calls=1000,
    messaging_runs=3,
    idle_agents=100,
    idle_window=30,
    idle_windows=3,
    idle_settle=20,
    extrapolate_fit=True,
    backup_dataset_mb=1100,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Coffer's benchmarks, each against its raw baseline measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts (about a minute); what CI runs"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}; "
        "'delete' also runs 'provision', whose instances it deletes",
    )
    parser.add_argument(
        "--engines",
        default="",
        help="comma-separated datastore managers to measure (default: every "
        "registered plugin whose engine is installed)",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file to write (default: bench/results/<timestamp>.json)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp"),
        help="directory in which the private work directory is made "
        "(default /tmp; it must be traversable by the engine user)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="API load generator (auto: wrk when installed, else httpx)",
    )
    parser.add_argument(
        "--warm-pool",
        type=int,
        default=None,
        metavar="N",
        help="Redis warm instances the measured coffer up keeps ([compute] redis_warm_pool; "
        "default: as many as benchmark 2 creates at once, 10 in full mode, 2 in quick mode); "
        "Redis creates are timed from a full pool. 0 measures Redis creates built from scratch",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log Coffer's own messages")
    args = parser.parse_args(argv)
    if args.warm_pool is not None and not 0 <= args.warm_pool <= 64:
        parser.error("--warm-pool must be between 0 and 64")
    return args


def host_facts(engines: list[Any]) -> dict[str, Any]:
    from bench.density import mem_total_mb

    return {
        "cores": os.cpu_count(),
        "memory_mb": round(mem_total_mb()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "engines": {engine.manager: engine.version for engine in engines},
    }


def _coffer_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("coffer")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Stop(BaseException):
    """SIGTERM arrived: unwind so every ``finally`` stops what it started (a BaseException, so
    no library's ``except Exception`` swallows it)."""


def _on_sigterm(*_: Any) -> None:
    raise _Stop("stopped by SIGTERM")


def run(args: argparse.Namespace) -> int:
    counts = QUICK if args.quick else FULL
    selected = set(args.only or BENCHMARKS)
    if selected & {"delete", "density"}:
        selected.add("provision")
    only_engines = [e.strip() for e in args.engines.split(",") if e.strip()] or None
    started_at = datetime.now(UTC)
    started = time.monotonic()
    results: dict[str, BenchmarkResult] = {}
    generator_name = "-"

    output = args.output or REPO / "bench" / "results" / (
        started_at.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "") + ".json"
    )
    coffer_log = output.with_suffix(".coffer-up.log")
    coffer_ref: list[CofferProcess] = []

    def attempt(key: str, body: Callable[[], BenchmarkResult]) -> None:
        name, title = TITLES[key]
        LOG.info("running %s", name)
        began = time.monotonic()
        try:
            result = body()
        except (Exception, _Stop) as exc:
            error = f"{type(exc).__name__}: {exc}"
            for coffer in [] if isinstance(exc, _Stop) else coffer_ref:
                if coffer.proc is not None and coffer.proc.poll() is not None:
                    error += f" (coffer up had exited with code {coffer.proc.returncode})"
                # The state dir goes away with the work directory; its log is the evidence.
                coffer_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(coffer.log_path, coffer_log)
                error += f"; coffer up's log is kept in {coffer_log}"
            result = BenchmarkResult(name, title, error=error)
            LOG.error("%s failed: %s", name, result.error)
            if isinstance(exc, _Stop):
                results[key] = result
                raise
        result.seconds = time.monotonic() - began
        results[key] = result

    from bench.provision import Provisioned, available_engines

    engines, skipped_engines = available_engines(only_engines)
    workspace = Workspace(args.workdir)
    try:
        coffer_benches = selected - {"messaging"}
        if coffer_benches and not engines:
            for key in coffer_benches:
                name, title = TITLES[key]
                results[key] = BenchmarkResult(
                    name,
                    title,
                    skipped=skipped_engines,
                    error="no engine can be measured: no registered plugin has its engine "
                    "installed here (see the skipped lines)",
                )
        elif coffer_benches:
            try:
                warm_pool = counts.concurrent_width if args.warm_pool is None else args.warm_pool
                with running_coffer(
                    workspace, COFFER_COMPUTE__REDIS_WARM_POOL=str(warm_pool)
                ) as coffer:
                    coffer_ref.append(coffer)
                    LOG.info("coffer up is serving at %s", coffer.base_url)
                    api = CofferApi(coffer)
                    provisioned = Provisioned()
                    try:
                        from bench.api_load import bench_api, pick_generator
                        from bench.density import bench_density
                        from bench.provision import bench_concurrent, bench_delete, bench_provision

                        if "provision" in selected:
                            attempt(
                                "provision",
                                lambda: bench_provision(
                                    api, workspace, engines, counts.provision_runs, provisioned
                                ),
                            )
                        if "density" in selected:
                            attempt(
                                "density",
                                lambda: bench_density(
                                    api,
                                    coffer,
                                    workspace,
                                    engines,
                                    provisioned,
                                    idle_agents=counts.idle_agents,
                                    window=counts.idle_window,
                                    windows=counts.idle_windows,
                                    settle=counts.idle_settle,
                                    extrapolate=counts.extrapolate_fit,
                                ),
                            )
                        if "delete" in selected:
                            attempt("delete", lambda: bench_delete(api, coffer, provisioned))
                        if "concurrent" in selected:
                            attempt(
                                "concurrent",
                                lambda: bench_concurrent(
                                    api,
                                    workspace,
                                    engines,
                                    counts.concurrent_width,
                                    counts.concurrent_rounds,
                                ),
                            )
                        if "backup" in selected:
                            from bench.backups import bench_backups

                            attempt(
                                "backup",
                                lambda: bench_backups(
                                    api, workspace, engines, counts.backup_dataset_mb
                                ),
                            )
                        if "api" in selected:
                            generator = pick_generator(workspace, args.load_generator)
                            generator_name = generator.name
                            attempt(
                                "api",
                                lambda: bench_api(
                                    api,
                                    coffer,
                                    workspace,
                                    generator=generator,
                                    connections=counts.api_connections,
                                    duration=counts.api_duration,
                                    runs=counts.api_runs,
                                    recorded=counts.api_recorded,
                                    warm_up=not args.quick,
                                ),
                            )
                    finally:
                        for raw in provisioned.raw:
                            raw.destroy()
                        api.close()
            except BenchError as exc:
                # coffer up did not start, or would not let the demo user in.
                for key in coffer_benches - set(results):
                    name, title = TITLES[key]
                    results[key] = BenchmarkResult(name, title, error=f"BenchError: {exc}")
            coffer_ref.clear()
            for key in coffer_benches & set(results):
                results[key].skipped.extend(skipped_engines)
        if "messaging" in selected:
            from bench.messaging import bench_messaging

            attempt(
                "messaging",
                lambda: bench_messaging(
                    workspace,
                    runs=counts.messaging_runs,
                    heartbeats=counts.heartbeats,
                    calls=counts.rpc_calls,
                ),
            )
    finally:
        workspace.close()
    survivors = workspace.survivors

    ordered = [results[key] for key in BENCHMARKS if key in results]
    finished_at = datetime.now(UTC)
    facts = host_facts(engines)
    document: dict[str, Any] = {
        "coffer_version": _coffer_version(),
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": started_at.isoformat(timespec="seconds"),
        "finished": finished_at.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "host": facts,
        "load_generator": generator_name,
        "counts": asdict(counts),
        "benchmarks": {result.name: result.to_json() for result in ordered},
        "leftover_processes": survivors,
    }
    write_json(output, document)
    print(
        f"Coffer {document['coffer_version']} benchmarks, {document['mode']} mode, "
        f"{started_at:%Y-%m-%d %H:%M} UTC, {facts['cores']} cores, "
        f"{facts['memory_mb'] / 1024:.0f} GiB, {document['seconds']:.0f} s"
    )
    print("ratio = Coffer median / raw median; targets are printed, never enforced.")
    print()
    print(render_table(ordered))
    print()
    print(f"JSON written to {output}")
    if survivors:
        print(f"WARNING: processes survived clean-up: {survivors}", file=sys.stderr)
    failed = [result.name for result in ordered if result.error]
    return 1 if failed or survivors else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR, handlers=[handler]
    )
    # Coffer's own warnings (a reply lost at shutdown and the like) are provoked on purpose by
    # some benchmarks; --verbose shows them.
    LOG.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = run(args)
    except (KeyboardInterrupt, _Stop):
        print("interrupted; everything started was stopped", file=sys.stderr)
        code = 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
