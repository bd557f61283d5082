"""Ten Redis creates at once through a real ``coffer up``: every one ends ACTIVE with its own
user able to log in (and not another instance's), every create operation ends ``done`` with
the users' passwords gone from its payload, and deleting them all leaves nothing behind."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from coffer_harness import Coffer, TenantApi, processes_under, redis_ping

pytestmark = pytest.mark.integration

WIDTH = 10


def _create(api: TenantApi, index: int) -> str:
    return api.create(
        name=f"burst-{index}",
        flavorRef="6",
        volume={"size": 1},
        datastore={"type": "redis"},
        users=[{"name": f"user{index}", "password": f"burst-secret-{index}"}],
    )


def test_ten_redis_creates_at_once(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    with ThreadPoolExecutor(max_workers=WIDTH) as pool:
        ids = list(pool.map(lambda index: _create(api, index), range(WIDTH)))
        shown = list(pool.map(api.wait_settled, ids))
    try:
        addresses = []
        for index, view in enumerate(shown):
            assert view["status"] == "ACTIVE", view
            assert view["operating_status"] in ("ACTIVE", "HEALTHY"), view
            address = view["addresses"][0]["address"]
            addresses.append(address)
            assert redis_ping(address, f"user{index}", f"burst-secret-{index}") is True
        assert len(set(addresses)) == WIDTH
        # One instance's user is not a user of another instance.
        with pytest.raises(redis.AuthenticationError):
            redis_ping(addresses[1], "user0", "burst-secret-0")

        with sqlite3.connect(coffer_up.state_dir / "coffer.db") as conn:
            rows = conn.execute(
                "select id, state, step, payload from operations where kind = 'create_instance' "
                f"and instance_id in ({','.join('?' * WIDTH)})",
                ids,
            ).fetchall()
        assert len(rows) == WIDTH
        for _op_id, state, step, payload in rows:
            assert (state, step) == ("done", "done")
            assert "burst-secret" not in payload  # the users' passwords left with prepare
        log = coffer_up.log("up")
        assert "burst-secret" not in log
        done = [line for line in log.splitlines() if "done: create_instance" in line]
        op_ids = [row[0] for row in rows]
        # Every create's log line; no step ran into a retry.
        assert sum(any(op in line for op in op_ids) for line in done) == WIDTH
        assert not any(
            op in line and "failed (attempt" in line for line in log.splitlines() for op in op_ids
        )
    finally:
        for instance_id in ids:
            api.delete_and_wait_gone(instance_id)
    for instance_id in ids:
        volume = coffer_up.state_dir / "instances" / instance_id
        assert not volume.exists()
        assert processes_under(volume) == []
    with sqlite3.connect(coffer_up.state_dir / "coffer.db") as conn:
        held = conn.execute(
            f"select count(*) from address_allocations where instance_id in "
            f"({','.join('?' * WIDTH)})",
            ids,
        ).fetchone()
    assert held == (0,)
