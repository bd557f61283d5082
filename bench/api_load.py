"""Benchmark 4: API throughput and latency under a load generator on loopback.

``GET /instances`` (a page of 20 out of 1,000 recorded instances), ``GET /instances/{id}`` and
``GET /flavors`` of a running ``coffer up``, against a FastAPI + uvicorn endpoint that returns a
constant body of the same size (``bench.constant_app``). The 1,000 instances are rows inserted
into that Coffer's private control DB, named ``bench-fake-NNNN`` and marked ``bench_fake`` in
their compute reference, shut off so nothing ever tries to run them; they are deleted again at
the end (and the whole state dir goes with the benchmark's work directory).

The load generator is ``wrk`` (Debian package ``wrk``) when installed, else an asyncio + httpx
generator. The auth token reaches wrk through its environment and a Lua script, never argv.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import Session

from bench.harness import REPO, BenchError, CofferApi, CofferProcess, Workspace, free_port
from bench.report import BenchmarkResult, Check, Metric, Target, percentile
from coffer.cli.up import KEEP_ALIVE_SECONDS

LOG = logging.getLogger("bench")

FAKE_PREFIX = "bench-fake-"
TOKEN_ENV = "BENCH_AUTH_TOKEN"  # noqa: S105 - the variable's name, not a token
_WRK_SCRIPT = """-- Adds the auth token from the environment, so it never appears in argv.
local token = os.getenv("BENCH_AUTH_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["X-Auth-Token"] = token
end
"""
THROUGHPUT_TARGET = Target(">= 0.5x constant body", (Check("median", ">=", 0.5, relative=True),))


@dataclass(frozen=True)
class LoadRun:
    """One load-generator run against one URL."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int


# -- fake instances -------------------------------------------------------------------------------


def seed_fake_instances(coffer: CofferProcess, project_id: str, count: int) -> list[str]:
    """Insert ``count`` inert instance rows for ``project_id``; returns their ids."""
    from coffer.db.models import DatastoreVersion, Instance, ServiceStatusRow, new_id
    from coffer.status import ServerStatus, ServiceStatus, Task

    engine = create_engine(f"sqlite:///{coffer.db_path}", connect_args={"timeout": 30})
    try:
        with Session(engine) as session, session.begin():
            version = session.scalars(select(DatastoreVersion).limit(1)).first()
            if version is None:
                raise BenchError("the control DB has no datastore version to file instances under")
            ids = [new_id() for _ in range(count)]
            for index, instance_id in enumerate(ids):
                session.add(
                    Instance(
                        id=instance_id,
                        tenant_id=project_id,
                        name=f"{FAKE_PREFIX}{index:04d}",
                        flavor_id="6",
                        volume_size=1,
                        datastore_version_id=version.id,
                        task=Task.NONE,
                        server_status=ServerStatus.SHUTOFF,
                        encrypted_key="bench-fake: no key, no server",
                        compute_ref={"bench_fake": True},
                    )
                )
                session.add(
                    ServiceStatusRow(instance_id=instance_id, status=ServiceStatus.SHUTDOWN)
                )
        return ids
    finally:
        engine.dispose()


def remove_fake_instances(coffer: CofferProcess, ids: list[str]) -> None:
    from coffer.db.models import Instance, ServiceStatusRow

    engine = create_engine(f"sqlite:///{coffer.db_path}", connect_args={"timeout": 30})
    try:
        with Session(engine) as session, session.begin():
            session.execute(delete(ServiceStatusRow).where(ServiceStatusRow.instance_id.in_(ids)))
            session.execute(delete(Instance).where(Instance.id.in_(ids)))
    finally:
        engine.dispose()


# -- the constant-body server -----------------------------------------------------------------


@contextmanager
def constant_server(workspace: Workspace) -> Iterator[str]:
    """Run ``bench.constant_app`` under uvicorn; yields its base URL."""
    port = free_port()
    home = workspace.subdir("constant")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(home / "uvicorn.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.constant_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "--lifespan",
                "off",
                "--timeout-keep-alive",
                str(KEEP_ALIVE_SECONDS),
            ],
            cwd=home,  # so the workspace's clean-up finds it even if we die
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError("the constant-body server exited at start; see its log")
            try:
                if httpx.get(f"{base}/const/2", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("the constant-body server did not answer in 30 s")
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load generators --------------------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> LoadRun:
    """Figures from ``wrk --latency`` output; BenchError if any request failed."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", output, re.M))
    if rate is None or total is None or set(latency) != {"50", "99"}:
        raise BenchError(f"could not read wrk's output:\n{output}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if bad:
        raise BenchError(f"{bad.group(1)} responses were errors; wrk said:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors and any(int(count) for count in errors.groups()):
        raise BenchError(f"socket errors under load; wrk said:\n{output}")

    def split(text: str) -> float:
        match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
        assert match is not None
        return _ms(match.group(1), match.group(2))

    return LoadRun(
        float(rate.group(1)), split(latency["50"]), split(latency["99"]), int(total.group(1))
    )


class LoadGenerator:
    """Drives one URL with ``connections`` keep-alive connections for ``duration`` seconds."""

    name = "abstract"

    def run(self, url: str, connections: int, duration: float, token: str | None) -> LoadRun:
        raise NotImplementedError


class Wrk(LoadGenerator):
    def __init__(self, workspace: Workspace) -> None:
        binary = shutil.which("wrk")
        if binary is None:
            raise BenchError("wrk is not installed")
        self.binary = binary
        version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        first = (version.stdout + version.stderr).strip().splitlines()
        self.name = first[0].split(" [")[0] if first else "wrk"
        self.script = workspace.subdir("wrk") / "auth.lua"
        self.script.write_text(_WRK_SCRIPT)

    def run(self, url: str, connections: int, duration: float, token: str | None) -> LoadRun:
        env = dict(os.environ)
        env[TOKEN_ENV] = token or ""
        # One thread: wrk's event loop outruns a Python server many times over, and the second
        # core is better left to the server.
        result = subprocess.run(
            [
                self.binary,
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(self.script),
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
        return parse_wrk(result.stdout)


class HttpxLoad(LoadGenerator):
    """The fallback: ``connections`` asyncio tasks, each a keep-alive request loop."""

    name = "httpx/asyncio (wrk not installed)"

    def run(self, url: str, connections: int, duration: float, token: str | None) -> LoadRun:
        return asyncio.run(self._run(url, connections, duration, token))

    async def _run(self, url: str, connections: int, duration: float, token: str | None) -> LoadRun:
        headers = {"X-Auth-Token": token} if token else {}
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        latencies: list[float] = []
        failures = 0
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=10) as client:
            end = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal failures
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    resp = await client.get(url)
                    latencies.append((time.perf_counter() - started) * 1000)
                    if resp.status_code >= 300:
                        failures += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - started
        if failures:
            raise BenchError(f"{failures} responses from {url} were errors")
        if not latencies:
            raise BenchError(f"no request to {url} completed")
        return LoadRun(
            len(latencies) / elapsed,
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            len(latencies),
        )


def pick_generator(workspace: Workspace, choice: str) -> LoadGenerator:
    """``wrk``, ``httpx``, or ``auto`` (wrk when installed)."""
    if choice == "httpx" or (choice == "auto" and shutil.which("wrk") is None):
        return HttpxLoad()
    return Wrk(workspace)


# -- the benchmark ------------------------------------------------------------------------------


def bench_api(
    api: CofferApi,
    coffer: CofferProcess,
    workspace: Workspace,
    *,
    generator: LoadGenerator,
    connections: int,
    duration: float,
    runs: int,
    recorded: int = 1000,
    warm_up: bool = True,
) -> BenchmarkResult:
    result = BenchmarkResult(
        "4-api",
        f"API under load: {connections} connections, {recorded} instances recorded "
        f"({generator.name})",
    )
    ids = seed_fake_instances(coffer, api.project, recorded)
    try:
        listing = api.get("/instances")
        page = len(listing.json().get("instances", [])) if listing.status_code == 200 else 0
        if page != 20:
            raise BenchError(f"GET /instances returned {page} instances, not a page of 20")
        endpoints = [
            ("GET /instances (page of 20)", "/instances"),
            ("GET /instances/{id}", f"/instances/{ids[len(ids) // 2]}"),
            ("GET /flavors", "/flavors"),
        ]
        with constant_server(workspace) as constant_base:
            for label, suffix in endpoints:
                resp = api.get(suffix)
                if resp.status_code != 200:
                    raise BenchError(f"{label} answered {resp.status_code}")
                size = len(resp.content)
                ours_url = f"{coffer.base_url}{api.path(suffix)}"
                theirs_url = f"{constant_base}/const/{size}"
                if warm_up:
                    # Warm both (caches, connection pools, the thread pool) before measuring.
                    generator.run(ours_url, connections, 1, api.token)
                    generator.run(theirs_url, connections, 1, api.token)
                ours: list[LoadRun] = []
                theirs: list[LoadRun] = []
                for _ in range(runs):
                    ours.append(generator.run(ours_url, connections, duration, api.token))
                    theirs.append(generator.run(theirs_url, connections, duration, api.token))
                LOG.info(
                    "api %s: %.0f req/s vs %.0f",
                    label,
                    ours[-1].requests_per_second,
                    theirs[-1].requests_per_second,
                )
                baseline = f"constant {size} B body, FastAPI+uvicorn"
                latency_target = (
                    Target("p99 < 50 ms at 32 connections", (Check("median", "<", 50.0),))
                    if connections == 32
                    else None
                )
                result.metrics += [
                    Metric(
                        result.name,
                        f"{label}: throughput",
                        "req/s",
                        [r.requests_per_second for r in ours],
                        baseline,
                        [r.requests_per_second for r in theirs],
                        better="higher",
                        target=THROUGHPUT_TARGET,
                    ),
                    Metric(
                        result.name,
                        f"{label}: latency p50",
                        "ms",
                        [r.p50_ms for r in ours],
                        baseline,
                        [r.p50_ms for r in theirs],
                    ),
                    Metric(
                        result.name,
                        f"{label}: latency p99",
                        "ms",
                        [r.p99_ms for r in ours],
                        baseline,
                        [r.p99_ms for r in theirs],
                        target=latency_target,
                    ),
                ]
    finally:
        remove_fake_instances(coffer, ids)
    return result
