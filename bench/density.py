"""Benchmark 6: density, i.e. what an idle instance costs in memory and CPU.

* Memory of each idle instance's guest agent, against a bare Python interpreter (the floor of
  any agent written in Python), and of the whole instance (supervisor + agent + engine) against
  the same engine provisioned by hand and left idle. The headline figure is PSS (proportional
  set size, ``/proc/<pid>/smaps_rollup``): each page a process maps counts in full if it is the
  process's own and divided by the number of processes sharing it otherwise, so PSS summed over
  processes is the memory they really take. Agents are forks of one pre-imported zygote and
  share most of their pages, so their RSS (which counts every shared page in full in every
  process) overstates them many times over; RSS is still printed beside it, without a target.
* Idle CPU of ``N`` idle guest agents together over a window (``/proc/<pid>/stat`` utime+stime),
  in percent of one core, against the CPU their own engines used in the same window.
* In full mode, how many small instances of each engine fit in this machine's memory:
  extrapolated as MemTotal / per-instance PSS (not measured by starting that many), against
  MemTotal / PSS of the engine alone.

The instances and raw engines weighed are those benchmark 1 provisioned (flavor ``d1.micro``),
idle since; the idle-CPU count adds instances of the lightest registered engine (Redis when its
plugin is there, else the first) until there are ``N``, and deletes those extras afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import BenchError, CofferApi, CofferProcess, Workspace
from bench.provision import (
    CofferInstance,
    EngineChoice,
    Provisioned,
    coffer_provision,
    delete_all,
)
from bench.report import BenchmarkResult, Check, Metric, Target

LOG = logging.getLogger("bench")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SCHEDSTAT = Path("/proc/self/schedstat").exists()
AGENT_MEMORY_TARGET = Target("<= 30 MB", (Check("median", "<=", 30.0),))


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MiB (0 if it is gone): its own pages in full, each
    shared page divided by the number of processes mapping it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_pss_mb(pid: int) -> float:
    """PSS of ``pid`` and all its descendants (PostgreSQL's server is a family of processes)."""
    from coffer.compute import procfs

    return pss_mb(pid) + sum(pss_mb(child.pid) for child in procfs.descendants(pid))


def cpu_seconds(pid: int) -> float:
    """CPU seconds ``pid`` has used so far, summed over its live threads (0 if it is gone).

    The scheduler's nanosecond run time (``/proc/<pid>/task/*/schedstat``) where the kernel
    keeps it: an idle process uses a few clock ticks a minute, too few to count in ticks.
    Otherwise user + system time from ``/proc/<pid>/stat`` in clock ticks.
    """
    if _SCHEDSTAT:
        total_ns = 0
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return 0.0
        for task in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread just ended
                total_ns += int((task / "schedstat").read_text().split()[0])
        return total_ns / 1e9
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def mem_total_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise BenchError("cannot read MemTotal from /proc/meminfo")


class InstanceProcesses:
    """The process tree of one Coffer instance, found through its pidfiles."""

    def __init__(self, coffer: CofferProcess, instance_id: str) -> None:
        from coffer.compute import procfs
        from coffer.compute.supervisor import AGENT_PIDFILE, PIDFILE

        directory = coffer.instance_dir(instance_id)
        supervisor = procfs.read_pidfile(directory / PIDFILE)
        agent = procfs.read_pidfile(directory / AGENT_PIDFILE)
        if supervisor is None or agent is None:
            raise BenchError(f"instance {instance_id} has no supervisor or agent pidfile")
        self.supervisor = supervisor[0]
        self.agent = agent[0]
        self.engines = [p.pid for p in procfs.descendants(self.agent)]
        if not self.engines:
            raise BenchError(f"the agent of instance {instance_id} runs no engine")

    def all(self) -> list[int]:
        return [self.supervisor, self.agent, *self.engines]


def _bare_python_memory(workspace: Workspace, samples: int) -> tuple[list[float], list[float]]:
    """PSS and RSS of idle interpreters of the same Python the agents run."""
    home = workspace.subdir("python")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            cwd=home,
            stdin=subprocess.DEVNULL,
            **workspace.user.popen_identity(),
        )
        for _ in range(samples)
    ]
    try:
        time.sleep(1.0)
        return [pss_mb(proc.pid) for proc in procs], [rss_mb(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _create_many(api: CofferApi, engine: EngineChoice, count: int, width: int) -> list[str]:
    if count <= 0:
        return []
    names = [f"bench-idle-{engine.manager}-{i}" for i in range(count)]
    with ThreadPoolExecutor(max_workers=max(1, min(width, count))) as pool:
        made: list[CofferInstance] = list(
            pool.map(coffer_provision, [api] * count, [engine] * count, names)
        )
    return [instance.instance_id for instance in made]


def bench_density(
    api: CofferApi,
    coffer: CofferProcess,
    workspace: Workspace,
    engines: Sequence[EngineChoice],
    provisioned: Provisioned,
    *,
    idle_agents: int,
    window: float,
    windows: int,
    settle: float,
    extrapolate: bool,
) -> BenchmarkResult:
    """Weigh the instances and raw engines benchmark 1 left running (idle since), plus as many
    more instances of the lightest engine as the idle-CPU count needs; those extra instances
    are deleted again (untimed) before returning."""
    result = BenchmarkResult("6-density", "Density: what an idle instance costs")
    if not engines:
        raise BenchError("no engine to measure")
    lightest = next((e for e in engines if e.manager == "redis"), engines[0])
    ours = {
        e.manager: [i.instance_id for i in provisioned.coffer if i.engine.manager == e.manager]
        for e in engines
    }
    theirs = {
        e.manager: [r for r in provisioned.raw if r.manager == e.raw.manager] for e in engines
    }
    for engine in engines:
        if not ours[engine.manager] or not theirs[engine.manager]:
            raise BenchError(f"benchmark 1 left no idle {engine.manager} instance to weigh")
    extra = _create_many(api, lightest, idle_agents - len(ours[lightest.manager]), width=10)
    try:
        time.sleep(settle)  # let start-up work (InnoDB purge, first heartbeats) die down
        python_pss, python_rss = _bare_python_memory(workspace, samples=3)
        trees = {
            manager: [InstanceProcesses(coffer, i) for i in ids] for manager, ids in ours.items()
        }
        instance_pss: dict[str, list[float]] = {}
        raw_pss: dict[str, list[float]] = {}
        sharing = sum(len(tree.all()) for group in trees.values() for tree in group)
        for engine in engines:
            manager = engine.manager
            agent_pss = [pss_mb(tree.agent) for tree in trees[manager]]
            agent_rss = [rss_mb(tree.agent) for tree in trees[manager]]
            instance_pss[manager] = [sum(pss_mb(p) for p in tree.all()) for tree in trees[manager]]
            raw_pss[manager] = [tree_pss_mb(r.pid) for r in theirs[manager] if r.pid is not None]
            result.metrics += [
                Metric(
                    result.name,
                    f"{manager}: guest agent PSS, idle",
                    "MB",
                    agent_pss,
                    "bare Python interpreter, idle",
                    python_pss,
                    target=AGENT_MEMORY_TARGET,
                    note=(
                        f"{len(agent_pss)} instance(s); shared pages divided among the "
                        f"processes mapping them ({sharing} instance processes weighed here)"
                    ),
                ),
                Metric(
                    result.name,
                    f"{manager}: guest agent RSS, idle",
                    "MB",
                    agent_rss,
                    "bare Python interpreter, idle",
                    python_rss,
                    note="shared pages counted in full in every process",
                ),
                Metric(
                    result.name,
                    f"{manager}: whole instance PSS, idle",
                    "MB",
                    instance_pss[manager],
                    f"{manager} alone, by hand, idle",
                    raw_pss[manager],
                    note="supervisor + guest agent + engine (with its child processes)",
                ),
            ]

        idle = trees[lightest.manager] + [InstanceProcesses(coffer, i) for i in extra]
        agents_cpu: list[float] = []
        engines_cpu: list[float] = []
        for _ in range(windows):
            agent_before = sum(cpu_seconds(tree.agent) for tree in idle)
            engine_before = sum(cpu_seconds(p) for tree in idle for p in tree.engines)
            started = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - started
            agent_after = sum(cpu_seconds(tree.agent) for tree in idle)
            engine_after = sum(cpu_seconds(p) for tree in idle for p in tree.engines)
            agents_cpu.append(100 * (agent_after - agent_before) / elapsed)
            engines_cpu.append(100 * (engine_after - engine_before) / elapsed)
        limit = 5.0 * len(idle) / 100
        result.metrics.append(
            Metric(
                result.name,
                f"{len(idle)} idle {lightest.manager} guest agents: CPU",
                "%core",
                agents_cpu,
                f"their {len(idle)} engines in the same window",
                engines_cpu,
                target=Target(
                    f"<= 5% per 100 agents (here <= {limit:.2g}%)",
                    (Check("median", "<=", limit),),
                ),
                note=f"{windows} window(s) of {window:.0f} s",
            )
        )
        if extrapolate:
            total = mem_total_mb()
            for engine in engines:
                result.metrics.append(
                    Metric(
                        result.name,
                        f"{engine.manager}: small instances that fit (estimate)",
                        "count",
                        [float(total // v) for v in instance_pss[engine.manager] if v > 0],
                        f"{engine.manager} alone, by hand (estimate)",
                        [float(total // v) for v in raw_pss[engine.manager] if v > 0],
                        better="higher",
                        note=f"MemTotal {total:,.0f} MB / idle PSS: extrapolated, not started",
                    )
                )
    finally:
        delete_all(api, extra, timeout=600)
    return result
