"""The Redis warm pool through a real ``coffer up`` (``[compute] redis_warm_pool``).

Warm instances are built, hidden from tenants, taken over by creates that fit them (the
tenant's user logs in, another tenant's does not, the quota is charged), left alone by creates
that do not fit, refilled after use, found again after ``coffer up`` is killed with SIGKILL,
and deleted, leaving no process or volume behind, when the pool is turned off.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from typing import Any

import pytest
import redis
from coffer_harness import Coffer, TenantApi, coffer_environment, quota_in_use, redis_ping

pytestmark = pytest.mark.integration

POOL = 2
WARM_PROJECT = "coffer-warm-pool"


def _warm(coffer: Coffer, ready_only: bool = True) -> set[str]:
    """Ids of the live warm instances (ready ones: idle, ACTIVE, engine running)."""
    query = (
        "select i.id from instances i join service_statuses s on s.instance_id = i.id "
        "where i.tenant_id = ? and i.deleted = 0"
    )
    if ready_only:
        query += (
            " and i.task = 'none' and i.server_status = 'active'"
            " and s.status in ('running', 'healthy')"
        )
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        ids = {row[0] for row in conn.execute(query, (WARM_PROJECT,))}
    conn.close()
    return ids


def _wait_pool(coffer: Coffer, count: int, timeout: float = 90) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = _warm(coffer)
        if len(ready) == count and len(_warm(coffer, ready_only=False)) == count:
            return ready
        time.sleep(0.2)
    raise AssertionError(
        f"the warm pool did not settle at {count} in {timeout:.0f} s: "
        f"{_warm(coffer, ready_only=False)}\n{coffer.log('up')[-3000:]}"
    )


def _redis_body(name: str, user: str, password: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "redis"},
        "users": [{"name": user, "password": password}],
        **extra,
    }


def test_the_warm_pool_serves_fitting_creates_and_survives_a_crash(engine_user: str) -> None:
    with coffer_environment(COFFER_COMPUTE__REDIS_WARM_POOL=str(POOL)) as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        admin = TenantApi(coffer, user="admin", project="admin")
        warm = _wait_pool(coffer, POOL)

        # Hidden from tenants: not listed, not shown.
        listed = api.request("GET", "/instances").json()["instances"]
        assert listed == []
        some = next(iter(warm))
        assert api.request("GET", f"/instances/{some}").status_code == 404

        # A fitting create takes a warm instance over: same id, ACTIVE, the user logs in.
        taken = api.create(**_redis_body("fast", "alice", "warm-secret-1"))
        assert taken in warm
        shown = api.wait_settled(taken)
        assert shown["status"] == "ACTIVE", shown
        address = shown["addresses"][0]["address"]
        assert redis_ping(address, "alice", "warm-secret-1") is True
        with pytest.raises(redis.AuthenticationError):
            redis_ping(address, "alice", "wrong-password")
        assert [i["id"] for i in api.request("GET", "/instances").json()["instances"]] == [taken]
        assert quota_in_use(admin, api.project, "instances") == 1
        assert quota_in_use(admin, api.project, "ram") == 256
        assert "warm-secret-1" not in coffer.log("up")
        with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
            (payload,) = conn.execute(
                "select payload from operations where kind = 'create_instance' "
                "and instance_id = ? and state = 'done' order by created desc limit 1",
                (taken,),
            ).fetchone()
        conn.close()
        assert "warm-secret-1" not in payload

        # A create that does not fit (another flavor) is built as usual.
        other = api.create(**_redis_body("other", "bob", "warm-secret-2", flavorRef="1"))
        assert other not in warm
        assert api.wait_settled(other)["status"] == "ACTIVE"

        # The pool is topped up with new warm instances once the creates are over.
        refilled = _wait_pool(coffer, POOL)
        assert taken not in refilled and len(refilled - warm) == 1

        # SIGKILL: the next coffer up finds the same warm instances and builds none.
        coffer.stop("up", sig=signal.SIGKILL)
        coffer.start("up", "up")
        coffer.wait_api()
        assert _wait_pool(coffer, POOL) == refilled
        again = TenantApi(coffer).create(**_redis_body("after-crash", "carol", "warm-secret-3"))
        assert again in refilled
        shown = api.wait_settled(again)
        assert redis_ping(shown["addresses"][0]["address"], "carol", "warm-secret-3") is True

        for instance_id in (taken, other, again):
            api.delete_and_wait_gone(instance_id)

        # Turned off: the next coffer up deletes every warm instance, processes and volumes.
        coffer.stop("up", sig=signal.SIGINT)
        coffer.env["COFFER_COMPUTE__REDIS_WARM_POOL"] = "0"
        coffer.start("up", "up")
        coffer.wait_api()
        leftover = _warm(coffer, ready_only=False)
        deadline = time.monotonic() + 60
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = _warm(coffer, ready_only=False)
        assert leftover == set()
        every = warm | refilled | {other}
        assert [p.name for p in (coffer.state_dir / "instances").glob("*") if p.name in every] == []
