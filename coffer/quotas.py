"""Per-project quotas (instances, RAM, volume GB, backups) and per-project API rate limits.

Quotas
    A project's usage of each resource is a row in ``quota_usages``; what each holder (an
    instance, a backup) charged is kept in ``quota_charges``. ``reserve`` checks the limits and
    adds the charge in the caller's transaction, after locking the project's usage rows
    (``SELECT ... FOR UPDATE`` on PostgreSQL and MySQL; on SQLite the write transaction's
    ``BEGIN IMMEDIATE`` already serialises writers), so two concurrent creates can never both
    take the last unit. ``release`` gives a holder's charges back and deletes them in the
    caller's transaction, so releasing twice (a failed create that is later deleted) gives back
    once. Limits are the configured defaults (``max_<resource>_per_tenant``) unless an admin set
    a project's own in ``quotas``; -1 means unlimited.

Rate limits
    ``RateLimiter`` keeps Trove's leaky buckets in memory, per project and per limit (GET, POST,
    PUT, DELETE on everything; POST on ``/mgmt``), each allowing ``value`` requests per minute.
    Like Trove's, the buckets belong to one API process.
"""

from __future__ import annotations

import difflib
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from coffer.config import Settings
from coffer.db.models import Quota, QuotaCharge, QuotaUsage
from coffer.errors import BadRequest, NotFound, OverLimit

#: Every quota resource, in the order the API lists them. RAM is in MB, volumes in GB.
RESOURCES: tuple[str, ...] = ("instances", "ram", "volumes", "backups")
UNLIMITED = -1


class QuotaExceeded(OverLimit):
    """A reservation would take a project over one or more of its limits (413 ``overLimit``)."""


class QuotaResourceUnknown(NotFound):
    """A quota request named a resource Coffer does not count (404, as in Trove)."""


class RateLimited(OverLimit):
    """Too many requests from one project; retry after ``retry_after`` seconds."""

    def __init__(self, details: str, retry_after: float) -> None:
        super().__init__("This request was rate-limited.")
        self.details = details
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """Whole seconds to wait, as the ``Retry-After`` header and Trove's body carry it."""
        return str(max(0, math.ceil(self.retry_after)))


# --- limits and usage ---------------------------------------------------------------------------


def default_limits(settings: Settings) -> dict[str, int]:
    """The configured default limit of every resource."""
    d = settings.default
    return {
        "instances": d.max_instances_per_tenant,
        "ram": d.max_ram_per_tenant,
        "volumes": d.max_volumes_per_tenant,
        "backups": d.max_backups_per_tenant,
    }


def get_limits(session: Session, settings: Settings, project_id: str) -> dict[str, int]:
    """The limit of every resource for ``project_id``: its own where set, else the default."""
    limits = default_limits(settings)
    for row in session.scalars(select(Quota).where(Quota.project_id == project_id)):
        if row.resource in limits:
            limits[row.resource] = row.hard_limit
    return limits


def get_usage(session: Session, project_id: str) -> dict[str, int]:
    """How much of every resource ``project_id`` uses now (0 where it never used any)."""
    usage = dict.fromkeys(RESOURCES, 0)
    for row in session.scalars(select(QuotaUsage).where(QuotaUsage.project_id == project_id)):
        if row.resource in usage:
            usage[row.resource] = row.in_use
    return usage


def usage_report(session: Session, settings: Settings, project_id: str) -> list[dict[str, Any]]:
    """Trove's ``GET /mgmt/quotas/{project}`` rows: resource, in_use, reserved, limit.

    Reservations here are taken and committed in one transaction, so ``reserved`` is always 0.
    """
    limits = get_limits(session, settings, project_id)
    usage = get_usage(session, project_id)
    return [
        {"resource": r, "in_use": usage[r], "reserved": 0, "limit": limits[r]} for r in RESOURCES
    ]


def set_limits(
    session: Session, settings: Settings, project_id: str, changes: Mapping[str, Any]
) -> dict[str, int]:
    """Set ``project_id``'s limits from ``{resource: limit}``; ``None`` leaves one unchanged.

    Every entry is validated before anything is written: an unknown resource raises
    ``QuotaResourceUnknown`` (404), a limit that is not a whole number of at least -1 raises
    ``BadRequest`` (400). A limit below the current usage is accepted; it refuses new
    reservations until usage falls. Returns the limits that were set.
    """
    if not isinstance(changes, Mapping) or not changes:
        raise BadRequest(
            'Give the limits to set, e.g. {"quotas": {"instances": 20}}; resources: '
            f"{', '.join(RESOURCES)}."
        )
    wanted: dict[str, int] = {}
    for resource, value in changes.items():
        _check_resource(resource)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadRequest(f"The limit for {resource} must be a whole number, -1 or more.")
        try:
            limit = int(value)
        except ValueError:
            raise BadRequest(
                f"The limit for {resource} must be a whole number, -1 or more."
            ) from None
        if limit < UNLIMITED:
            raise BadRequest(
                f"The limit for {resource} is {limit}; use -1 for unlimited or a number of 0 "
                "or more."
            )
        wanted[resource] = limit
    for resource, limit in wanted.items():
        row = session.get(Quota, (project_id, resource))
        if row is None:
            session.add(Quota(project_id=project_id, resource=resource, hard_limit=limit))
        else:
            row.hard_limit = limit
    session.flush()
    return wanted


def _check_resource(resource: str) -> None:
    if resource not in RESOURCES:
        close = difflib.get_close_matches(str(resource), RESOURCES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise QuotaResourceUnknown(
            f"Quota resource {resource!r} is unknown.{hint} Known resources: "
            f"{', '.join(RESOURCES)}."
        )


# --- reservations --------------------------------------------------------------------------------


def reserve(
    session: Session,
    settings: Settings,
    project_id: str,
    holder_id: str,
    deltas: Mapping[str, int],
) -> None:
    """Charge ``deltas`` (``{resource: amount}``) to ``project_id`` on behalf of ``holder_id``.

    Runs in the caller's write transaction and takes effect when it commits; if the caller rolls
    back, nothing was charged. The project's usage rows stay locked until then, so the check and
    the increment are atomic against every other reservation of the project. Positive amounts
    must fit under the limits, else ``QuotaExceeded`` (413) names every resource that would be
    over and nothing is charged; negative amounts (a resize down) are always accepted. Charging
    the same holder again adds to its charge (a resize up).
    """
    wanted = {r: int(amount) for r, amount in deltas.items() if amount}
    for resource in wanted:
        _check_resource(resource)
    if not wanted:
        return
    usage = _lock_usage(session, project_id)
    limits = get_limits(session, settings, project_id)
    overs = sorted(
        r
        for r, amount in wanted.items()
        if amount > 0 and limits[r] != UNLIMITED and usage[r].in_use + amount > limits[r]
    )
    if overs:
        detail = ", ".join(f"{r} {usage[r].in_use} of {limits[r]}" for r in overs)
        raise QuotaExceeded(
            f"Quota exceeded for resources: {overs}. The project uses {detail}, and this "
            f"request needs {', '.join(f'{wanted[r]} more {r}' for r in overs)}; free some or "
            "ask an administrator to raise the quota."
        )
    # The holder's earlier charges in one read, before any change (so no autoflush in between);
    # the usage updates and new charges then go out in one flush.
    charges = {
        charge.resource: charge
        for charge in session.scalars(
            select(QuotaCharge).where(
                QuotaCharge.holder_id == holder_id, QuotaCharge.resource.in_(list(wanted))
            )
        )
    }
    for resource, amount in wanted.items():
        usage[resource].in_use = max(0, usage[resource].in_use + amount)
        charge = charges.get(resource)
        if charge is None:
            session.add(
                QuotaCharge(
                    holder_id=holder_id, resource=resource, project_id=project_id, amount=amount
                )
            )
        else:
            charge.amount += amount
    session.flush()


def release(session: Session, holder_id: str) -> dict[str, int]:
    """Give back everything ``holder_id`` charged, in the caller's write transaction.

    Idempotent: the charges are deleted, so a second release (even a concurrent one, which waits
    for the first's lock) finds nothing. Returns ``{resource: amount}`` given back.
    """
    first = session.scalars(select(QuotaCharge).where(QuotaCharge.holder_id == holder_id)).first()
    if first is None:
        return {}
    usage = _lock_usage(session, first.project_id)
    # Read the charges again under the lock: a concurrent release may have taken them since.
    charges = session.scalars(
        select(QuotaCharge)
        .where(QuotaCharge.holder_id == holder_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    returned: dict[str, int] = {}
    for charge in charges:
        row = usage.get(charge.resource)
        if row is not None:
            row.in_use = max(0, row.in_use - charge.amount)
        returned[charge.resource] = charge.amount
        session.delete(charge)
    session.flush()
    return returned


def charges_of(session: Session, holder_id: str) -> dict[str, int]:
    """What ``holder_id`` holds now (empty once released)."""
    rows = session.scalars(select(QuotaCharge).where(QuotaCharge.holder_id == holder_id))
    return {row.resource: row.amount for row in rows}


def _lock_usage(session: Session, project_id: str) -> dict[str, QuotaUsage]:
    """The project's usage rows, created if missing and locked for this transaction.

    Rows are never deleted, so once a project has all of them (every reservation but its first)
    one locking read is enough; only a project seen for the first time pays for the insert.
    """
    rows = _select_usage_for_update(session, project_id)
    if len(rows) < len(RESOURCES):
        _insert_missing_usage(session, project_id)
        rows = _select_usage_for_update(session, project_id)
    return rows


def _select_usage_for_update(session: Session, project_id: str) -> dict[str, QuotaUsage]:
    rows = session.scalars(
        select(QuotaUsage)
        .where(QuotaUsage.project_id == project_id)
        .order_by(QuotaUsage.resource)  # one lock order everywhere: no deadlocks
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    return {row.resource: row for row in rows}


def _insert_missing_usage(session: Session, project_id: str) -> None:
    # Two first reservations of a project race to create its rows; an insert that ignores
    # existing keys lets the loser wait for the winner instead of failing.
    values = [{"project_id": project_id, "resource": r, "in_use": 0} for r in RESOURCES]
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(QuotaUsage).values(values).on_conflict_do_nothing())
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(QuotaUsage).values(values).on_conflict_do_nothing())
    elif dialect in ("mysql", "mariadb"):
        session.execute(insert(QuotaUsage).values(values).prefix_with("IGNORE"))
    else:
        have = set(
            session.scalars(select(QuotaUsage.resource).where(QuotaUsage.project_id == project_id))
        )
        missing = [v for v in values if v["resource"] not in have]
        if missing:
            session.execute(insert(QuotaUsage).values(missing))


# --- rate limits ---------------------------------------------------------------------------------

_UNIT_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}


@dataclass(frozen=True)
class RateLimit:
    """``value`` requests per ``unit`` for requests whose method is ``verb`` and whose path
    (below ``/v1.0/{project}``) matches ``regex``; ``uri`` is how Trove displays it."""

    verb: str
    uri: str
    regex: str
    value: int
    unit: str = "MINUTE"

    @property
    def seconds(self) -> int:
        return _UNIT_SECONDS[self.unit]

    def applies(self, verb: str, path: str) -> bool:
        return self.verb == verb and re.match(self.regex, path) is not None


def default_rate_limits(settings: Settings) -> list[RateLimit]:
    """Trove's default limits from the ``http_*_rate`` options; a rate of 0 has no limit.

    PATCH (Trove's deprecated edit) counts against the PUT limit.
    """
    d = settings.default
    limits = [
        RateLimit("POST", "*", ".*", d.http_post_rate),
        RateLimit("PUT", "*", ".*", d.http_put_rate),
        RateLimit("DELETE", "*", ".*", d.http_delete_rate),
        RateLimit("GET", "*", ".*", d.http_get_rate),
        RateLimit("POST", "*/mgmt", "^/mgmt", d.http_mgmt_post_rate),
    ]
    return [limit for limit in limits if limit.value > 0]


@dataclass
class _Bucket:
    #: Seconds of "water" in the bucket; each request pours in ``unit / value`` seconds and the
    #: bucket drains one second per second. A request that would overflow ``unit`` waits.
    level: float = 0.0
    last: float = field(default_factory=time.monotonic)


class RateLimiter:
    """Per-project leaky buckets over ``limits``; thread-safe (handlers run in a thread pool).

    ``hit`` counts one request or raises ``RateLimited`` without counting it; ``report`` is the
    rate part of ``GET /limits``. ``clock`` returns monotonic seconds (tests may pass their own).
    """

    #: Buckets idle this long are forgotten, so the map does not grow with every project seen.
    IDLE_SECONDS = 3600.0

    def __init__(self, limits: list[RateLimit], clock: Any = time.monotonic) -> None:
        self.limits = list(limits)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._last_sweep = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls(default_rate_limits(settings))

    def hit(self, project_id: str, verb: str, path: str) -> None:
        """Count a ``verb`` request to ``path`` (below ``/v1.0/{project}``) by ``project_id``."""
        verb = "PUT" if verb == "PATCH" else verb
        now = self._clock()
        with self._lock:
            self._sweep(now)
            matching = [
                (i, limit) for i, limit in enumerate(self.limits) if limit.applies(verb, path)
            ]
            buckets = [(limit, self._bucket(project_id, i, now)) for i, limit in matching]
            for limit, bucket in buckets:
                cost = limit.seconds / limit.value
                if bucket.level + cost > limit.seconds:
                    wait = bucket.level + cost - limit.seconds
                    raise RateLimited(
                        f"Only {limit.value} {limit.verb} request(s) can be made to {limit.uri} "
                        f"every {limit.unit.lower()}.",
                        wait,
                    )
            for limit, bucket in buckets:
                bucket.level += limit.seconds / limit.value

    def report(self, project_id: str) -> list[dict[str, Any]]:
        """Trove's rate-limit entries of ``GET /limits`` for ``project_id``."""
        now = self._clock()
        wall = time.time()
        rows = []
        with self._lock:
            for i, limit in enumerate(self.limits):
                bucket = self._bucket(project_id, i, now)
                cost = limit.seconds / limit.value
                remaining = int((limit.seconds - bucket.level) / cost + 1e-9)
                wait = max(0.0, bucket.level + cost - limit.seconds)
                next_available = datetime.fromtimestamp(wall + wait, UTC).replace(tzinfo=None)
                rows.append(
                    {
                        "verb": limit.verb,
                        "uri": limit.uri,
                        "regex": limit.regex,
                        "value": limit.value,
                        "remaining": max(0, remaining),
                        "unit": limit.unit,
                        "nextAvailable": next_available.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
        return rows

    def _bucket(self, project_id: str, index: int, now: float) -> _Bucket:
        bucket = self._buckets.setdefault((project_id, index), _Bucket(last=now))
        bucket.level = max(0.0, bucket.level - (now - bucket.last))
        bucket.last = now
        return bucket

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.IDLE_SECONDS:
            return
        self._last_sweep = now
        stale = [k for k, b in self._buckets.items() if now - b.last > self.IDLE_SECONDS]
        for key in stale:
            del self._buckets[key]
