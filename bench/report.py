"""Figures, their summaries, targets, the printed table and the JSON document.

A ``Metric`` is one measured quantity of Coffer (samples over repeated runs) together with the
raw baseline measured in the same run. Its summary is median, p95, min and max; its ratio is
Coffer's median over the baseline's median, so "1.20x" always reads "Coffer's figure is 1.2 times
the raw figure", whether lower or higher is better. Targets are evaluated and printed, never
enforced: a missed target is a finding, not a failure.
"""

from __future__ import annotations

import json
import math
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATS = ("median", "p95", "min", "max")


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of a non-empty sample list."""
    if not samples:
        raise ValueError("a percentile of no samples is undefined")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, p95, min and max of a non-empty sample list."""
    if not samples:
        raise ValueError("cannot summarize an empty sample list")
    return {
        "median": float(statistics.median(samples)),
        "p95": float(percentile(samples, 0.95)),
        "min": float(min(samples)),
        "max": float(max(samples)),
    }


@dataclass(frozen=True)
class Check:
    """One condition of a target.

    ``relative`` checks compare Coffer's ``stat`` with the baseline's same ``stat`` (a ratio);
    absolute checks compare Coffer's ``stat`` with ``limit`` in the metric's unit.
    """

    stat: str
    op: str  # "<=", "<", ">=", ">"
    limit: float
    relative: bool = False

    def evaluate(self, coffer: dict[str, float], raw: dict[str, float] | None) -> bool | None:
        value = coffer[self.stat]
        if self.relative:
            if raw is None or raw[self.stat] == 0:
                return None
            value = value / raw[self.stat]
        compare: Callable[[float, float], bool] = {
            "<=": operator.le,
            "<": operator.lt,
            ">=": operator.ge,
            ">": operator.gt,
        }[self.op]
        return bool(compare(value, self.limit))


@dataclass(frozen=True)
class Target:
    """A target as printed (``text``) and the checks that decide whether it was met."""

    text: str
    checks: tuple[Check, ...]

    def evaluate(self, coffer: dict[str, float], raw: dict[str, float] | None) -> bool | None:
        results = [check.evaluate(coffer, raw) for check in self.checks]
        if any(result is None for result in results):
            return None
        return all(results)


@dataclass
class Metric:
    """One measured quantity of Coffer and its raw baseline from the same run."""

    benchmark: str
    name: str
    unit: str
    samples: list[float]
    baseline_label: str
    baseline: list[float]
    better: str = "lower"  # or "higher"
    target: Target | None = None
    note: str = ""

    def summary(self) -> dict[str, float]:
        return summarize(self.samples)

    def baseline_summary(self) -> dict[str, float]:
        return summarize(self.baseline)

    def ratio(self) -> float | None:
        """Coffer's median over the baseline's median (None if the baseline is zero)."""
        raw = statistics.median(self.baseline)
        if raw == 0:
            return None
        return float(statistics.median(self.samples) / raw)

    def target_met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.evaluate(self.summary(), self.baseline_summary())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "better": self.better,
            "coffer": {"n": len(self.samples), **self.summary(), "samples": self.samples},
            "raw": {
                "label": self.baseline_label,
                "n": len(self.baseline),
                **self.baseline_summary(),
                "samples": self.baseline,
            },
            "ratio": self.ratio(),
            "target": None
            if self.target is None
            else {"text": self.target.text, "met": self.target_met()},
            "note": self.note,
        }


@dataclass
class BenchmarkResult:
    """Everything one benchmark produced: metrics, and why anything was skipped or failed."""

    name: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "metrics": [metric.to_json() for metric in self.metrics],
            "skipped": self.skipped,
            "error": self.error,
            "seconds": round(self.seconds, 2),
        }


def fmt(value: float | None) -> str:
    """A figure with about four significant digits and no exponent."""
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


_COLUMNS = (
    ("measure", 52, "<"),
    ("unit", 6, "<"),
    ("n", 3, ">"),
    ("median", 9, ">"),
    ("p95", 9, ">"),
    ("min", 9, ">"),
    ("max", 9, ">"),
    ("ratio", 7, ">"),
    ("target", 0, "<"),
)


def _line(cells: Sequence[str]) -> str:
    parts = []
    for (_, width, align), cell in zip(_COLUMNS, cells, strict=True):
        if width and len(cell) > width and align == "<":
            cell = cell[: width - 1] + "~"
        parts.append(f"{cell:{align}{width}}" if width else cell)
    return "  ".join(parts).rstrip()


def render_table(results: Sequence[BenchmarkResult]) -> str:
    """The human-readable table: each Coffer figure, then its raw baseline on the next line."""
    header = _line([name for name, _, _ in _COLUMNS])
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(f"[{result.name}] {result.title}")
        for metric in result.metrics:
            coffer, raw = metric.summary(), metric.baseline_summary()
            met = metric.target_met()
            verdict = "" if met is None else (" (met)" if met else " (MISSED)")
            target = f"{metric.target.text}{verdict}" if metric.target else ""
            ratio = metric.ratio()
            lines.append(
                _line(
                    [
                        "  " + metric.name,
                        metric.unit,
                        str(len(metric.samples)),
                        *(fmt(coffer[stat]) for stat in STATS),
                        "-" if ratio is None else f"{ratio:.2f}x",
                        target,
                    ]
                )
            )
            lines.append(
                _line(
                    [
                        "    raw: " + metric.baseline_label,
                        metric.unit,
                        str(len(metric.baseline)),
                        *(fmt(raw[stat]) for stat in STATS),
                        "",
                        "",
                    ]
                )
            )
        for reason in result.skipped:
            lines.append(f"  skipped: {reason}")
        if result.error:
            lines.append(f"  FAILED: {result.error}")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` (parents created), replacing any older file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
