"""Day-2 operations on real PostgreSQL and Redis instances, through the HTTP API of a real
``coffer up``: a restart-required parameter puts the instance in RESTART_REQUIRED until a restart
makes it live; PostgreSQL's pg_hba follows an access change (a client outside the new CIDRs is
refused, checked with real logins from chosen source addresses); Redis takes dynamic values
with CONFIG SET and immutable ones at the restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from coffer_harness import Coffer, TenantApi
from postgresql_fixtures import SourceRelay

pytestmark = pytest.mark.integration

PASSWORD = "app-Pass-1"
#: Client source addresses for the allowed-CIDR check; no instance ever gets them.
INSIDE, OUTSIDE = "127.9.9.77", "127.9.9.78"
SETTLE_SECONDS = 30


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (psycopg.Error, redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g} s (last: {last!r})")


def settled(api: TenantApi, instance_id: str, status: str = "ACTIVE") -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        shown = api.show(instance_id)
        healthy = status != "ACTIVE" or shown["operating_status"] == "HEALTHY"
        return shown if shown["status"] == status and healthy else None

    result: dict[str, Any] = wait_for(f"{instance_id} {status}", check, SETTLE_SECONDS)
    return result


def address(api: TenantApi, instance_id: str, kind: str = "private") -> str:
    (found,) = [a["address"] for a in api.show(instance_id)["addresses"] if a["type"] == kind]
    return str(found)


def group(api: TenantApi, datastore: str, values: dict[str, Any]) -> str:
    body = {
        "configuration": {"name": datastore, "values": values, "datastore": {"type": datastore}}
    }
    resp = api.request("POST", "/configurations", json=body)
    assert resp.status_code == 200, resp.text
    group_id: str = resp.json()["configuration"]["id"]
    return group_id


def update(api: TenantApi, instance_id: str, **instance: Any) -> None:
    resp = api.request("PUT", f"/instances/{instance_id}", json={"instance": instance})
    assert resp.status_code == 202, resp.text


def restart(api: TenantApi, instance_id: str) -> None:
    resp = api.request("POST", f"/instances/{instance_id}/action", json={"restart": {}})
    assert resp.status_code == 202, resp.text


@pytest.fixture(scope="module")
def api(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up)


@pytest.fixture(scope="module")
def postgres(api: TenantApi) -> Iterator[str]:
    instance_id = api.create(
        name="pg-day2",
        flavorRef="6",
        volume={"size": 1},
        datastore={"type": "postgresql"},
        databases=[{"name": "appdb"}],
        users=[{"name": "app", "password": PASSWORD, "databases": [{"name": "appdb"}]}],
    )
    settled(api, instance_id)
    yield instance_id
    api.delete_and_wait_gone(instance_id)


def pg_login(host: str, port: int = 5432) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=host,
        port=port,
        user="app",
        password=PASSWORD,
        dbname="appdb",
        connect_timeout=5,
        sslmode="disable",
        autocommit=True,
    )


def pg_show(host: str, name: str) -> str:
    with pg_login(host) as conn:
        row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def test_postgresql_restart_required_parameter_is_live_after_restart(
    api: TenantApi, postgres: str
) -> None:
    host = address(api, postgres)
    assert (pg_show(host, "max_connections"), pg_show(host, "work_mem")) == ("32", "4MB")
    group_id = group(api, "postgresql", {"max_connections": 77, "work_mem": 8192})
    update(api, postgres, configuration=group_id)
    settled(api, postgres, "RESTART_REQUIRED")
    assert pg_show(host, "work_mem") == "8MB"  # reloaded: live at once
    assert pg_show(host, "max_connections") == "32"  # needs the postmaster to restart
    (event, *_) = api.request("GET", f"/instances/{postgres}/events").json()["events"]
    assert event["action"] == "attach_configuration" and event["state"] == "succeeded"
    assert event["details"]["pending_restart"] == ["max_connections"]

    restart(api, postgres)
    settled(api, postgres)
    assert pg_show(host, "max_connections") == "77"
    assert pg_show(host, "work_mem") == "8MB"

    update(api, postgres, configuration=None)
    settled(api, postgres, "RESTART_REQUIRED")
    assert pg_show(host, "work_mem") == "4MB"
    restart(api, postgres)
    settled(api, postgres)
    assert pg_show(host, "max_connections") == "32"
    assert api.request("DELETE", f"/configurations/{group_id}").status_code == 202


def _login_through(source: str, target: str) -> str:
    """Log in to ``target`` from ``source``; "ok" or the server's refusal."""
    with SourceRelay(source, (target, 5432)) as relay:
        try:
            conn = pg_login("127.0.0.1", relay.port)
        except psycopg.OperationalError as exc:
            return str(exc)
        with conn:
            row = conn.execute("SELECT host(inet_client_addr())").fetchone()
        assert row is not None and row[0] == source
        return "ok"


def test_postgresql_access_change_rewrites_pg_hba(api: TenantApi, postgres: str) -> None:
    started = time.monotonic()
    update(api, postgres, access={"is_public": True, "allowed_cidrs": [f"{INSIDE}/32"]})
    shown = settled(api, postgres)
    assert time.monotonic() - started < SETTLE_SECONDS
    assert shown["access"] == {"is_public": True, "allowed_cidrs": [f"{INSIDE}/32"]}
    public = address(api, postgres, "public")
    assert _login_through(INSIDE, public) == "ok"
    refused = _login_through(OUTSIDE, public)
    assert f'no pg_hba.conf entry for host "{OUTSIDE}"' in refused
    assert f'no pg_hba.conf entry for host "{OUTSIDE}"' in _login_through(
        OUTSIDE, address(api, postgres)
    )

    # Private again, open to every network: the public address is gone, everyone gets in.
    started = time.monotonic()
    update(api, postgres, access={"is_public": False, "allowed_cidrs": []})
    shown = settled(api, postgres)
    assert time.monotonic() - started < SETTLE_SECONDS
    assert [a["type"] for a in shown["addresses"]] == ["private"]
    assert _login_through(OUTSIDE, address(api, postgres)) == "ok"
    with pytest.raises(psycopg.OperationalError):
        pg_login(public).close()


@pytest.fixture(scope="module")
def redis_instance(api: TenantApi) -> Iterator[tuple[str, str]]:
    instance_id = api.create(
        name="redis-day2", flavorRef="6", volume={"size": 1}, datastore={"type": "redis"}
    )
    settled(api, instance_id)
    resp = api.request("POST", f"/instances/{instance_id}/root")
    assert resp.status_code == 200, resp.text
    yield instance_id, resp.json()["user"]["password"]
    api.delete_and_wait_gone(instance_id)


def test_redis_values_apply_live_and_immutable_ones_at_restart(
    api: TenantApi, redis_instance: tuple[str, str]
) -> None:
    instance_id, root_password = redis_instance

    def config(name: str) -> str:
        client = redis.Redis(
            host=address(api, instance_id),
            username="default",
            password=root_password,
            decode_responses=True,
            socket_timeout=5,
        )
        try:
            return str(client.config_get(name)[name])
        finally:
            client.close()

    assert (config("maxmemory-policy"), config("databases")) == ("noeviction", "16")
    group_id = group(api, "redis", {"maxmemory-policy": "allkeys-lru", "databases": 32})
    update(api, instance_id, configuration=group_id)
    settled(api, instance_id, "RESTART_REQUIRED")
    assert config("maxmemory-policy") == "allkeys-lru"
    assert config("databases") == "16"
    restart(api, instance_id)
    settled(api, instance_id)
    assert (config("maxmemory-policy"), config("databases")) == ("allkeys-lru", "32")

    update(api, instance_id, configuration=None)
    settled(api, instance_id, "RESTART_REQUIRED")
    assert config("maxmemory-policy") == "noeviction"  # the flavor's, from redis.conf
    restart(api, instance_id)
    settled(api, instance_id)
    assert config("databases") == "16"
    assert api.request("DELETE", f"/configurations/{group_id}").status_code == 202


def _postmaster_pid(api: TenantApi, instance_id: str) -> int:
    pidfile = api.coffer.state_dir / "instances" / instance_id / "run" / "postgres.pid"
    return int(pidfile.read_text().split()[0])


def test_postgresql_created_with_a_group_is_active_with_its_values(api: TenantApi) -> None:
    """A restart-required value is live when the instance is ACTIVE (the guest restarted the
    new engine once before reporting it ready), with no RESTART_REQUIRED and no restart after."""
    group_id = group(api, "postgresql", {"max_connections": 77, "work_mem": 8192})
    instance_id = api.create(
        name="pg-tuned",
        flavorRef="6",
        volume={"size": 1},
        datastore={"type": "postgresql"},
        databases=[{"name": "appdb"}],
        users=[{"name": "app", "password": PASSWORD, "databases": [{"name": "appdb"}]}],
        configuration=group_id,
    )
    try:
        shown = settled(api, instance_id)
        assert shown["configuration"]["id"] == group_id
        pid = _postmaster_pid(api, instance_id)
        host = address(api, instance_id)
        assert (pg_show(host, "max_connections"), pg_show(host, "work_mem")) == ("77", "8MB")
        assert api.show(instance_id)["status"] == "ACTIVE"
        assert _postmaster_pid(api, instance_id) == pid
        events = api.request("GET", f"/instances/{instance_id}/events").json()["events"]
        assert events == []
    finally:
        api.delete_and_wait_gone(instance_id)
    assert api.request("DELETE", f"/configurations/{group_id}").status_code == 202


def test_postgresql_resize_keeps_every_row_and_resizes_the_engine(
    api: TenantApi, postgres: str
) -> None:
    host = address(api, postgres)
    with pg_login(host) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept SELECT g, 'row ' || g FROM generate_series(1, 500) g")
    # A 1 GB volume and a 256 MB flavor: max_wal_size is an eighth of the volume,
    # shared_buffers a quarter of the RAM.
    assert (pg_show(host, "max_wal_size"), pg_show(host, "shared_buffers")) == ("128MB", "64MB")
    pid = _postmaster_pid(api, postgres)
    with pg_login(host) as session:  # opened before the volume resize, used after it
        resp = api.request(
            "POST", f"/instances/{postgres}/action", json={"resize": {"volume": {"size": 2}}}
        )
        assert resp.status_code == 202, resp.text
        shown = settled(api, postgres)
        assert shown["volume"]["size"] == 2
        assert pg_show(host, "max_wal_size") == "256MB"  # reloaded: the engine kept running
        assert _postmaster_pid(api, postgres) == pid
        row = session.execute("SELECT count(*) FROM kept").fetchone()
        assert row == (500,)

    resp = api.request("POST", f"/instances/{postgres}/action", json={"resize": {"flavorRef": "1"}})
    assert resp.status_code == 202, resp.text
    shown = settled(api, postgres)
    assert shown["flavor"]["id"] == "1"
    assert pg_show(host, "shared_buffers") == "128MB"
    with pg_login(host) as conn:
        row = conn.execute("SELECT count(*), sum(id) FROM kept").fetchone()
    assert row == (500, 500 * 501 // 2)
    events = api.request("GET", f"/instances/{postgres}/events").json()["events"]
    assert [(e["action"], e["state"]) for e in events[:2]] == [
        ("resize_flavor", "succeeded"),
        ("resize_volume", "succeeded"),
    ]
