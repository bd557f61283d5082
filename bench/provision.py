"""Benchmarks 1-3: provision latency, provision under concurrency, delete latency.

Coffer's side goes through the Trove API of a running ``coffer up`` exactly as a tenant would:
``POST /instances`` with one database and one user, then a real client (PyMySQL, psycopg,
redis-py) tries to log in as that user until it can. The clock stops at the first successful
log-in. The raw side provisions the same engine by hand (see ``bench.engines``) and stops its
clock the same way, with the same client and the same polling interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.engines import (
    LOGIN_POLL,
    RAW_ENGINES,
    Credentials,
    RawEngine,
    try_login,
    wait_login,
)
from bench.harness import (
    BenchError,
    CofferApi,
    CofferProcess,
    Workspace,
    port_open,
    wait_warm_pool,
)
from bench.harness import private_address as address_of
from bench.report import BenchmarkResult, Check, Metric, Target

LOG = logging.getLogger("bench")

#: Longest a single create may take before the benchmark gives up on it.
CREATE_TIMEOUT = 120.0
#: Longest a single delete may take.
DELETE_TIMEOUT = 120.0


@dataclass(frozen=True)
class EngineChoice:
    """An engine both Coffer (a registered plugin) and this host (its binaries) can run."""

    manager: str
    version: str
    capabilities: frozenset[str]
    raw: type[RawEngine]

    @property
    def port(self) -> int:
        return self.raw.port

    def credentials(self) -> Credentials | None:
        """What to create and log in with; None when the plugin creates no users."""
        if "users" not in self.capabilities:
            return None
        return Credentials.fresh(with_database="databases" in self.capabilities)

    def create_body(self, name: str, creds: Credentials | None) -> dict[str, Any]:
        from bench.engines import FLAVOR_ID

        body: dict[str, Any] = {
            "name": name,
            "flavorRef": FLAVOR_ID,
            "volume": {"size": 1},
            "datastore": {"type": self.manager},
        }
        if creds is not None:
            user: dict[str, Any] = {"name": creds.user, "password": creds.password}
            if creds.database:
                body["databases"] = [{"name": creds.database}]
                user["databases"] = [{"name": creds.database}]
            body["users"] = [user]
        return body


def available_engines(only: Sequence[str] | None = None) -> tuple[list[EngineChoice], list[str]]:
    """Registered plugins whose engine is installed here and that have a raw baseline; and a
    sentence for each registered plugin left out."""
    from coffer.datastores.registry import PLUGINS, installed_engines, plugin_class

    installed = {engine.manager: engine.version for engine in installed_engines()}
    chosen, skipped = [], []
    for manager in PLUGINS:
        if only and manager not in only:
            continue
        if manager not in installed:
            skipped.append(f"{manager}: the plugin is registered but its engine is not installed")
            continue
        raw = RAW_ENGINES.get(manager)
        if raw is None:
            skipped.append(f"{manager}: no raw baseline is written for this engine yet")
            continue
        caps = frozenset(str(cap) for cap in plugin_class(manager).capabilities)
        chosen.append(EngineChoice(manager, installed[manager], caps, raw))
    for manager in only or ():
        if manager not in PLUGINS:
            skipped.append(f"{manager}: no Coffer plugin is registered for it")
    return chosen, skipped


@dataclass
class CofferInstance:
    instance_id: str
    address: str
    engine: EngineChoice
    seconds: float


@dataclass
class Provisioned:
    """What benchmark 1 leaves running: benchmark 6 weighs it, benchmark 3 deletes it."""

    coffer: list[CofferInstance] = field(default_factory=list)
    raw: list[RawEngine] = field(default_factory=list)


# -- one provision each way ---------------------------------------------------------------------


def coffer_provision(api: CofferApi, engine: EngineChoice, name: str) -> CofferInstance:
    """POST one instance and wait until its user can log in; the clock runs over both."""
    creds = engine.credentials()
    started = time.perf_counter()
    deadline = time.monotonic() + CREATE_TIMEOUT
    instance_id = api.create(engine.create_body(name, creds))
    address = None
    attempts = 0
    while True:
        # Look at the instance every 0.1 s until it has an address, then every 0.5 s (to notice
        # an ERROR); in between, only the log-in is tried.
        if attempts % (5 if address is None else 25) == 0:
            shown = api.show(instance_id)
            if shown["status"] == "ERROR":
                fault = shown.get("fault", {}).get("message", "no fault recorded")
                raise BenchError(f"instance {instance_id} ({engine.manager}) failed: {fault}")
            address = address or address_of(shown)
        if address is not None and try_login(engine.manager, address, creds):
            return CofferInstance(instance_id, address, engine, time.perf_counter() - started)
        if time.monotonic() > deadline:
            raise BenchError(
                f"instance {instance_id} ({engine.manager}) was not usable in "
                f"{CREATE_TIMEOUT:.0f} s"
            )
        attempts += 1
        time.sleep(LOGIN_POLL)


def raw_provision(workspace: Workspace, engine: EngineChoice) -> tuple[RawEngine, float]:
    """Provision ``engine`` by hand and wait for the same log-in; returns it (running)."""
    address = workspace.raw_block.take()
    raw = engine.raw(
        workspace.subdir(f"r-{engine.manager}", for_engine=True), address, workspace.user
    )
    creds = engine.credentials()
    started = time.perf_counter()
    deadline = time.monotonic() + CREATE_TIMEOUT
    try:
        raw.provision(creds, deadline)
        wait_login(engine.manager, address, creds, deadline)
    except BaseException:
        raw.destroy()
        raise
    return raw, time.perf_counter() - started


def wait_gone(address: str, port: int, path_exists: Callable[[], bool], what: str) -> None:
    """Wait until nothing accepts connections at ``address:port`` and the directory is gone."""
    deadline = time.monotonic() + DELETE_TIMEOUT
    while port_open(address, port, timeout=0.2) or path_exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not gone {DELETE_TIMEOUT:.0f} s after its delete")
        time.sleep(LOGIN_POLL)


# -- the benchmarks -----------------------------------------------------------------------------


PROVISION_TARGET = Target(
    "p50 <= 1.0x raw, worst <= 1.5x raw",
    (Check("median", "<=", 1.0, relative=True), Check("max", "<=", 1.5, relative=True)),
)
REDIS_TARGET = Target("ready <= 0.3 s", (Check("median", "<=", 0.3),))
CONCURRENT_TARGET = Target("<= 1.2x raw", (Check("median", "<=", 1.2, relative=True),))


def _ready(api: CofferApi, engine: EngineChoice) -> None:
    """Before a timed Redis create: the warm pool full again (refills of earlier creates done)."""
    if engine.manager == "redis":
        wait_warm_pool(api.coffer)


def _pooled(api: CofferApi, engine: EngineChoice) -> str:
    """The label of figures timed from the Redis warm pool."""
    pool = api.coffer.warm_pool
    return " (warm pool)" if engine.manager == "redis" and pool > 0 else ""


def bench_provision(
    api: CofferApi,
    workspace: Workspace,
    engines: Sequence[EngineChoice],
    runs: int,
    keep: Provisioned,
) -> BenchmarkResult:
    """Benchmark 1: ``runs`` creates per engine each way, interleaved; instances kept in
    ``keep`` for the delete benchmark."""
    result = BenchmarkResult("1-provision", "Provision latency: POST until the user logs in")
    for engine in engines:
        # The host's first create of an engine also builds its template data directory (once
        # per host and engine version): measured, and shown on a line of its own, so the
        # figures below are those of every later create.
        _ready(api, engine)
        first = coffer_provision(api, engine, f"bench-{engine.manager}-first")
        keep.coffer.append(first)
        raw, seconds = raw_provision(workspace, engine)
        keep.raw.append(raw)
        LOG.info(
            "provision %s, first on this host: coffer %.3f s, raw %.3f s",
            engine.manager,
            first.seconds,
            seconds,
        )
        result.metrics.append(
            Metric(
                benchmark=result.name,
                name=f"{engine.manager}: first create on the host",
                unit="s",
                samples=[first.seconds],
                baseline_label=engine.raw.label,
                baseline=[seconds],
            )
        )
        ours: list[float] = []
        theirs: list[float] = []
        for index in range(runs):
            _ready(api, engine)
            instance = coffer_provision(api, engine, f"bench-{engine.manager}-{index}")
            keep.coffer.append(instance)
            ours.append(instance.seconds)
            raw, seconds = raw_provision(workspace, engine)
            keep.raw.append(raw)
            theirs.append(seconds)
            LOG.info(
                "provision %s #%d: coffer %.3f s, raw %.3f s",
                engine.manager,
                index,
                instance.seconds,
                seconds,
            )
        result.metrics.append(
            Metric(
                benchmark=result.name,
                name=f"{engine.manager} {engine.version}: create until log-in"
                + _pooled(api, engine),
                unit="s",
                samples=ours,
                baseline_label=engine.raw.label,
                baseline=theirs,
                target=REDIS_TARGET if engine.manager == "redis" else PROVISION_TARGET,
            )
        )
    return result


def bench_concurrent(
    api: CofferApi, workspace: Workspace, engines: Sequence[EngineChoice], width: int, rounds: int
) -> BenchmarkResult:
    """Benchmark 2: ``width`` creates at once until every log-in works, each way, ``rounds``
    times per engine. Coffer's instances are deleted (untimed) after each round."""
    result = BenchmarkResult(
        "2-concurrent", f"{width} concurrent creates until all log-ins succeed"
    )
    for engine in engines:
        # One create first (deleted, not timed here): if this is the host's first create of the
        # engine, it builds the engine's template, a once-per-host cost benchmark 1 reports on
        # its own line; the rounds measure creates on a host that has it, as benchmark 1 does.
        warm = coffer_provision(api, engine, f"bench-cw-{engine.manager}")
        LOG.info("concurrent %s: a first create took %.3f s", engine.manager, warm.seconds)
        delete_all(api, [warm.instance_id])
        ours: list[float] = []
        theirs: list[float] = []
        for round_index in range(rounds):
            _ready(api, engine)
            with ThreadPoolExecutor(max_workers=width) as pool:
                started = time.perf_counter()
                names = [f"bench-c{round_index}-{engine.manager}-{i}" for i in range(width)]
                created = list(pool.map(coffer_provision, [api] * width, [engine] * width, names))
                ours.append(time.perf_counter() - started)
            delete_all(api, [instance.instance_id for instance in created])
            raws: list[RawEngine] = []
            futures: list[Future[tuple[RawEngine, float]]] = []
            try:
                with ThreadPoolExecutor(max_workers=width) as pool:
                    started = time.perf_counter()
                    futures = [pool.submit(raw_provision, workspace, engine) for _ in range(width)]
                    for future in futures:
                        raws.append(future.result()[0])
                    theirs.append(time.perf_counter() - started)
            finally:
                # Also those provisioned before a sibling failed.
                for future in futures:
                    if future.done() and future.exception() is None:
                        raw = future.result()[0]
                        if raw not in raws:
                            raws.append(raw)
                for raw in raws:
                    raw.destroy()
            LOG.info(
                "concurrent %s round %d: coffer %.3f s, raw %.3f s",
                engine.manager,
                round_index,
                ours[-1],
                theirs[-1],
            )
        result.metrics.append(
            Metric(
                benchmark=result.name,
                name=f"{engine.manager}: {width} creates until all log in{_pooled(api, engine)}",
                unit="s",
                samples=ours,
                baseline_label=f"the same by hand, {width} in parallel",
                baseline=theirs,
                target=CONCURRENT_TARGET,
            )
        )
    return result


def delete_all(api: CofferApi, instance_ids: Sequence[str], timeout: float = 300) -> None:
    """Delete instances through the API and wait until the API no longer lists them."""
    for instance_id in instance_ids:
        api.delete(instance_id)
    deadline = time.monotonic() + timeout
    pending = set(instance_ids)
    while pending:
        for instance_id in list(pending):
            if api.get(f"/instances/{instance_id}").status_code == 404:
                pending.discard(instance_id)
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} instance(s) were not deleted in {timeout:.0f} s")
        time.sleep(0.2)


def bench_delete(
    api: CofferApi, coffer: CofferProcess, provisioned: Provisioned
) -> BenchmarkResult:
    """Benchmark 3: delete what benchmark 1 created, alternating Coffer and raw."""
    result = BenchmarkResult(
        "3-delete", "Delete latency: until the address is free and the directory gone"
    )
    per_engine: dict[str, tuple[EngineChoice, list[float], list[float], str]] = {}
    raws = list(provisioned.raw)
    for instance in provisioned.coffer:
        engine = instance.engine
        entry = per_engine.setdefault(engine.manager, (engine, [], [], ""))
        directory = coffer.instance_dir(instance.instance_id)
        started = time.perf_counter()
        api.delete(instance.instance_id)
        wait_gone(
            instance.address, engine.port, directory.exists, f"instance {instance.instance_id}"
        )
        entry[1].append(time.perf_counter() - started)
        raw = next((r for r in raws if r.manager == engine.raw.manager), None)
        if raw is not None:
            raws.remove(raw)
            provisioned.raw.remove(raw)
            started = time.perf_counter()
            raw.destroy()
            wait_gone(raw.address, raw.port, raw.root.exists, f"raw {raw.manager}")
            entry[2].append(time.perf_counter() - started)
    provisioned.coffer.clear()
    for engine, ours, theirs, _ in per_engine.values():
        if not ours or not theirs:
            continue
        result.metrics.append(
            Metric(
                benchmark=result.name,
                name=f"{engine.manager}: DELETE until gone",
                unit="s",
                samples=ours,
                baseline_label="kill -TERM, wait, rm -rf",
                baseline=theirs,
            )
        )
    return result
