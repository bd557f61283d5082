"""Redis incremental backups from the append-only file, against real ``redis-server``s.

Keys of every kind, in two keyspaces, are written over TCP with redis-py as a tenant user; a full
backup, more writes (a transaction among them), an incremental, more, a second incremental,
then writes that no backup may hold; each backup's chain is restored into a new instance and
read back key by key (type, value, whether it expires). Through the ``file`` driver, the S3
driver against a real Swift with s3api, and native Swift; with Redis rewriting its AOF between
two backups; from an RDB snapshot of the kind Coffer took before; with a writer running during
the backup; and end to end through the Trove API of a real ``coffer up``.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis_fixtures
from coffer_harness import Coffer, TenantApi
from swift_harness import Swift, running_swift

from coffer.backup import seal_stream
from coffer.guest.backup.worker import BackupWorker, open_storage
from coffer.guest.datastores.redis import RedisDatastore
from coffer.storage.s3 import S3Storage

pytestmark = pytest.mark.integration

PASSWORD = "tenant-Secret-pw-7"
Snapshot = dict[int, dict[str, tuple[str, Any, bool]]]


# --- the keyspace, key by key ---------------------------------------------------------------------


def snapshot(client: redis.Redis) -> Snapshot:
    """Every key of every keyspace: (type, value, expires?)."""
    found: Snapshot = {}
    for db in range(16):
        client.execute_command("SELECT", db)
        keys: dict[str, tuple[str, Any, bool]] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            value: Any
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = sorted(client.smembers(key))
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = kind
            keys[str(key)] = (str(kind), value, client.ttl(key) > 0)
        if keys:
            found[db] = keys
    client.execute_command("SELECT", 0)
    return found


def tenant(address: str, db: int = 0) -> redis.Redis:
    return redis_fixtures.login(address, "app", PASSWORD, db=db)


class Instances:
    """Redis datastores made by one test, stopped and then killed by PID at the end."""

    def __init__(self, run_as: str) -> None:
        self._root = redis_fixtures.instance_root()
        self.base = self._root.__enter__().parent
        self.run_as = run_as
        self.made: list[RedisDatastore] = []

    def new(self, name: str) -> tuple[RedisDatastore, str]:
        address = redis_fixtures.free_loopback_address("127.34.7")
        spec = redis_fixtures.make_spec(self.base / name, [address], self.run_as)
        datastore = RedisDatastore(spec)
        self.made.append(datastore)
        return datastore, address

    def close(self) -> None:
        try:
            for datastore in self.made:
                with contextlib.suppress(Exception):
                    datastore.stop(timeout=20)
                redis_fixtures.kill_engines(str(datastore.config_file))
        finally:
            self._root.__exit__(None, None, None)


@pytest.fixture
def instances(engine_user: str) -> Iterator[Instances]:
    made = Instances(engine_user)
    try:
        yield made
    finally:
        made.close()


def _wait(check: Callable[[], dict[str, Any]], done: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = check()
        if status["state"] in done or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


class Source:
    """A prepared source instance with its backup worker and what it backed up."""

    def __init__(self, instances: Instances, storage: dict[str, Any]) -> None:
        self.instances = instances
        self.storage = storage
        self.datastore, self.address = instances.new("source")
        self.datastore.prepare([], [{"name": "app", "password": PASSWORD}])
        state = instances.base / "source-state"
        state.mkdir()
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.worker = BackupWorker(
            lambda: self.datastore,
            state,
            lambda b, f: self.reports.append((b, f)),
            prepared=lambda: True,
        )
        self.keys: dict[str, bytes] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def backup(self, backup_id: str, parent: str | None = None) -> dict[str, Any]:
        key = secrets.token_bytes(32)
        self.keys[backup_id] = key
        self.worker.start_backup(
            backup_id,
            self.storage,
            f"demo/{backup_id}",
            base64.b64encode(key).decode(),
            parent=self.results[parent]["engine_position"] if parent else None,
        )
        result: dict[str, Any] = _wait(
            lambda: self.worker.backup_status(backup_id), {"completed", "failed"}
        )
        assert result["state"] == "completed", result
        self.results[backup_id] = result
        return result

    def link(self, backup_id: str) -> dict[str, Any]:
        result = self.results[backup_id]
        return {
            "backup_id": backup_id,
            "storage_key": f"demo/{backup_id}",
            "backup_key": base64.b64encode(self.keys[backup_id]).decode(),
            "wrapped_key": result["wrapped_key"],
            "checksum": result["checksum"],
        }

    def restore(self, name: str, chain: list[str]) -> tuple[RedisDatastore, str, dict[str, Any]]:
        """A new instance from ``chain``; prepared (with the tenant user) if the restore worked."""
        datastore, address = self.instances.new(name)
        state = self.instances.base / f"{name}-state"
        state.mkdir()
        worker = BackupWorker(lambda: datastore, state, lambda b, f: None, prepared=lambda: False)
        worker.start_restore([self.link(b) for b in chain], self.storage)
        status = _wait(worker.restore_status, {"done", "failed"})
        if status["state"] == "done":
            datastore.prepare([], [{"name": "app", "password": PASSWORD}])
        return datastore, address, status

    def snapshot(self) -> Snapshot:
        with tenant(self.address) as client:
            return snapshot(client)


def _first_writes(address: str) -> None:
    with tenant(address) as client:
        for i in range(1, 51):
            client.set(f"item:{i}", f"first-{i}")
        client.set("binary", bytes(range(256)).decode("latin-1"))
        client.hset("user:1", mapping={"name": "ada", "role": "admin"})
        client.rpush("queue", "a", "b", "c")
        client.sadd("tags", "x", "y")
        client.zadd("scores", {"ada": 3.5, "bob": 1.0})
        client.set("expiring", "soon", ex=3600)
    with tenant(address, db=3) as client:
        client.set("other-db", "three")


def _second_writes(address: str) -> None:
    with tenant(address) as client:
        client.set("item:51", "second-51")
        client.set("item:2", "changed-2")
        client.delete("item:3")
        client.hset("user:1", "role", "reader")
        client.lpop("queue")
        client.zincrby("scores", 2, "bob")
        pipe = client.pipeline(transaction=True)  # MULTI ... EXEC in the AOF
        pipe.incr("counter")
        pipe.set("item:52", "in-a-transaction")
        pipe.execute()
    with tenant(address, db=3) as client:
        client.set("other-db", "three-changed")
        client.set("new-in-3", "yes")


def _third_writes(address: str) -> None:
    with tenant(address) as client:
        client.set("item:53", "third-53")
        client.delete("tags")
        client.persist("expiring")
        client.set("big", "v" * 200_000)


def _chain_round_trip(source: Source) -> None:
    _first_writes(source.address)
    moment_one = source.snapshot()
    one = source.backup("b-one")
    position = one["engine_position"]
    assert position["format"] == "aof" and position["self_contained"] is True
    assert position["aof_offset"] >= 0 and position["aof_base"].endswith(".base.rdb")

    _second_writes(source.address)
    moment_two = source.snapshot()
    two = source.backup("b-two", parent="b-one")
    assert two["engine_position"]["self_contained"] is False, two["engine_position"]
    assert two["engine_position"]["aof_offset"] > position["aof_offset"]
    # Only the writes since the first backup.
    assert two["raw_size"] < one["raw_size"]

    _third_writes(source.address)
    moment_three = source.snapshot()
    three = source.backup("b-three", parent="b-two")
    assert three["engine_position"]["self_contained"] is False
    assert three["raw_size"] < 300_000

    with tenant(source.address) as client:
        client.set("after-all", "never restored")
        client.set("item:1", "changed after all")

    for name, chain, moment in (
        ("r-one", ["b-one"], moment_one),
        ("r-two", ["b-one", "b-two"], moment_two),
        ("r-three", ["b-one", "b-two", "b-three"], moment_three),
    ):
        restored, address, status = source.restore(name, chain)
        assert status == {"state": "done", "backups": chain}, status
        with tenant(address) as client:
            assert snapshot(client) == moment, name
        # The restored AOF is Redis's own: it keeps appending, and survives a restart.
        with tenant(address) as client:
            client.set("written-after-restore", name)
        restored.stop()
        restored.start()
        with tenant(address) as client:
            assert client.get("written-after-restore") == name
            assert client.get("item:1") == "first-1"

    # A chain with a link left out is refused before anything is written.
    refused, _, status = source.restore("r-gap", ["b-one", "b-three"])
    assert status["state"] == "failed"
    assert "does not continue" in status["reason"], status
    assert not refused.layout.data_dir.exists() or not any(refused.layout.data_dir.iterdir())


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swift(engine_user: str) -> Iterator[Swift]:
    with running_swift(engine_user) as running:
        yield running


def _s3(swift: Swift) -> dict[str, Any]:
    bucket = f"coffer-{uuid.uuid4().hex[:12]}"
    storage = {
        "driver": "s3",
        "s3_endpoint_url": swift.proxy_url,
        "s3_region_name": swift.region,
        "s3_bucket": bucket,
        "s3_access_key_id": swift.user,
        "s3_secret_access_key": swift.key,
        "s3_multipart_threshold": 5 * 1024 * 1024,
        "s3_multipart_chunksize": 5 * 1024 * 1024,
    }
    with open_storage(storage) as store:
        assert isinstance(store, S3Storage)
        store.client.create_bucket(Bucket=bucket)
    return storage


def _native_swift(swift: Swift) -> dict[str, Any]:
    return {
        "driver": "swift",
        "swift_auth_url": swift.auth_url,
        "swift_auth_version": "1",
        "swift_user": swift.user,
        "swift_key": swift.key,
        "swift_container": f"coffer-{uuid.uuid4().hex[:12]}",
        "swift_segment_size": 1024 * 1024,
    }


def test_an_incremental_chain_restores_each_moment_key_by_key(instances: Instances) -> None:
    store = instances.base / "store"
    store.mkdir()
    source = Source(instances, {"driver": "file", "file_directory": str(store)})
    _chain_round_trip(source)
    assert sorted(p.name for p in store.iterdir()) == [
        "demo%2Fb-one",
        "demo%2Fb-three",
        "demo%2Fb-two",
    ]
    # The conductor heard each result and never a key.
    assert all(
        base64.b64encode(k).decode() not in repr(source.reports) for k in source.keys.values()
    )


@pytest.mark.parametrize("driver", ["s3", "swift"])
def test_an_incremental_chain_through_swift(
    instances: Instances, swift: Swift, driver: str
) -> None:
    storage = _s3(swift) if driver == "s3" else _native_swift(swift)
    _chain_round_trip(Source(instances, storage))


def test_after_an_aof_rewrite_the_incremental_is_self_contained(instances: Instances) -> None:
    """Redis rewrote its AOF between two backups (here asked for; Redis also does it on its
    own as the AOF grows): the incremental carries a new base, and the chain goes on from it."""
    store = instances.base / "store"
    store.mkdir()
    source = Source(instances, {"driver": "file", "file_directory": str(store)})
    _first_writes(source.address)
    source.backup("b-one")
    _second_writes(source.address)
    with redis_fixtures.admin_client(source.datastore) as admin:
        admin.execute_command("BGREWRITEAOF")
        deadline = time.monotonic() + 30
        while (
            admin.info("persistence")["aof_rewrite_in_progress"]
            or admin.info("persistence")["aof_rewrite_scheduled"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    _third_writes(source.address)
    moment_two = source.snapshot()
    two = source.backup("b-two", parent="b-one")
    position = two["engine_position"]
    assert position["self_contained"] is True
    assert "rewritten" in position["rebased"], position
    assert position["aof_base"] != source.results["b-one"]["engine_position"]["aof_base"]
    with tenant(source.address) as client:
        client.set("item:60", "after two")
    moment_three = source.snapshot()
    three = source.backup("b-three", parent="b-two")
    assert three["engine_position"]["self_contained"] is False
    for name, chain, moment in (
        ("r-two", ["b-one", "b-two"], moment_two),
        ("r-three", ["b-one", "b-two", "b-three"], moment_three),
    ):
        _, address, status = source.restore(name, chain)
        assert status["state"] == "done", status
        with tenant(address) as client:
            assert snapshot(client) == moment, name


def test_an_rdb_backup_of_before_still_restores_and_can_be_built_on(
    instances: Instances,
) -> None:
    """Backups taken before AOF backups are RDB snapshots (sealed as they were): they restore
    as before, and an incremental on one is self-contained."""
    store = instances.base / "store"
    store.mkdir()
    storage = {"driver": "file", "file_directory": str(store)}
    source = Source(instances, storage)
    _first_writes(source.address)
    moment_one = source.snapshot()
    with redis_fixtures.admin_client(source.datastore) as admin:
        admin.execute_command("SAVE")
        saved_at = int(admin.info("persistence")["rdb_last_save_time"])
    rdb = (source.datastore.layout.data_dir / "dump.rdb").read_bytes()
    assert rdb.startswith(b"REDIS")
    key = secrets.token_bytes(32)
    sealed, info_of = seal_stream(iter([rdb]), key, "b-rdb")
    with open_storage(storage) as store_driver:
        store_driver.put_stream("demo/b-rdb", sealed, {})
    info = info_of()
    source.keys["b-rdb"] = key
    source.results["b-rdb"] = {
        "wrapped_key": info.wrapped_key,
        "checksum": info.checksum,
        "engine_position": {"rdb_last_save_time": saved_at},
    }
    restored, address, status = source.restore("r-rdb", ["b-rdb"])
    assert status["state"] == "done", status
    with tenant(address) as client:
        assert snapshot(client) == moment_one
    assert not restored.backups.restore_pending()  # AOF rebuilt at its first start

    _second_writes(source.address)
    moment_two = source.snapshot()
    two = source.backup("b-two", parent="b-rdb")
    assert two["engine_position"]["self_contained"] is True
    assert "RDB" in two["engine_position"]["rebased"]
    _, address, status = source.restore("r-two", ["b-rdb", "b-two"])
    assert status["state"] == "done", status
    with tenant(address) as client:
        assert snapshot(client) == moment_two


def test_a_backup_taken_while_writes_go_on_cuts_between_transactions(
    instances: Instances,
) -> None:
    """A writer adds ``n:<i>`` and increments ``count`` in one MULTI/EXEC, without pause, while
    the backups run: every restore holds exactly the keys ``n:0`` .. ``n:<count - 1>``, and at
    least every write acknowledged before the backup began."""
    store = instances.base / "store"
    store.mkdir()
    source = Source(instances, {"driver": "file", "file_directory": str(store)})
    stop = threading.Event()
    acknowledged = [0]

    def write() -> None:
        with tenant(source.address) as client:
            i = 0
            while not stop.is_set():
                pipe = client.pipeline(transaction=True)
                pipe.set(f"n:{i}", "v" * (i % 700))
                pipe.incr("count")
                pipe.execute()
                i += 1
                acknowledged[0] = i

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        time.sleep(0.3)
        before_one = acknowledged[0]
        source.backup("b-one")
        time.sleep(0.3)
        before_two = acknowledged[0]
        source.backup("b-two", parent="b-one")
    finally:
        stop.set()
        writer.join(timeout=10)
    assert source.results["b-two"]["engine_position"]["self_contained"] is False
    for name, chain, floor in (
        ("r-one", ["b-one"], before_one),
        ("r-two", ["b-one", "b-two"], before_two),
    ):
        _, address, status = source.restore(name, chain)
        assert status["state"] == "done", status
        with tenant(address) as client:
            count = int(client.get("count") or 0)
            assert count >= floor > 0, (name, count, floor)
            keys = set(client.scan_iter("n:*", count=5000))
            assert keys == {f"n:{i}" for i in range(count)}, name


# --- through the API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up)


def _wait_backup(api: TenantApi, backup_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = api.request("GET", f"/backups/{backup_id}")
        assert resp.status_code == 200, resp.text
        backup: dict[str, Any] = resp.json()["backup"]
        if backup["status"] in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
            return backup
        time.sleep(0.1)


def _back_up(api: TenantApi, instance_id: str, name: str, **extra: Any) -> dict[str, Any]:
    resp = api.request(
        "POST", "/backups", json={"backup": {"name": name, "instance": instance_id, **extra}}
    )
    assert resp.status_code == 202, resp.text
    backup = _wait_backup(api, resp.json()["backup"]["id"])
    assert backup["status"] == "COMPLETED", backup
    return backup


def _ready(api: TenantApi, body: dict[str, Any]) -> dict[str, Any]:
    shown = api.wait_settled(api.create(**body), timeout=180)
    assert shown["status"] == "ACTIVE", shown
    return shown


def _positions(coffer: Coffer, *backup_ids: str) -> list[dict[str, Any]]:
    import json

    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        rows = [
            conn.execute("SELECT engine_position FROM backups WHERE id = ?", (b,)).fetchone()
            for b in backup_ids
        ]
    return [json.loads(row[0]) for row in rows]


def test_incremental_backups_through_the_api(coffer_up: Coffer, api: TenantApi) -> None:
    body = {
        "flavorRef": "6",
        "volume": {"size": 1},
        "users": [{"name": "app", "password": PASSWORD}],
    }
    made: list[str] = []
    try:
        source = _ready(api, {**body, "name": "redis-inc-src", "datastore": {"type": "redis"}})
        made.append(source["id"])
        address = source["ip"][0]
        _first_writes(address)
        with tenant(address) as client:
            moment_one = snapshot(client)
        first = _back_up(api, source["id"], "full")
        assert first["parent_id"] is None
        _second_writes(address)
        with tenant(address) as client:
            moment_two = snapshot(client)
        second = _back_up(api, source["id"], "incremental", incremental=1)
        assert second["parent_id"] == first["id"]
        assert second["raw_size_bytes"] < first["raw_size_bytes"]
        _third_writes(address)
        with tenant(address) as client:
            moment_three = snapshot(client)
        third = _back_up(api, source["id"], "incremental-2", parent_id=second["id"])
        assert third["parent_id"] == second["id"]
        with tenant(address) as client:
            client.set("after-all", "never restored")
        positions = _positions(coffer_up, first["id"], second["id"], third["id"])
        assert [p["self_contained"] for p in positions] == [True, False, False]

        for backup, moment in ((first, moment_one), (second, moment_two), (third, moment_three)):
            # ACL users are not part of a Redis backup: the restore asks for its user again.
            restored = _ready(
                api,
                {
                    **body,
                    "name": f"from-{backup['name']}",
                    "restorePoint": {"backupRef": backup["id"]},
                },
            )
            made.append(restored["id"])
            with tenant(restored["ip"][0]) as client:
                assert snapshot(client) == moment, backup["name"]

        # Deleting the full backup deletes the incrementals built on it.
        resp = api.request("DELETE", f"/backups/{first['id']}")
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + 60
        while any(
            api.request("GET", f"/backups/{b['id']}").status_code != 404
            for b in (first, second, third)
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")


def test_transactions_in_the_aof_survive_a_restart(instances: Instances) -> None:
    """Redis 7.0 replays the AOF as ``default`` and EXEC checks that user's rules: with root
    disabled, MULTI/EXEC blocks must still load, also on an instance whose ``users.acl`` has
    the disabled root of older Coffers (``-@all``)."""
    datastore, address = instances.new("restarted")
    datastore.prepare([], [{"name": "app", "password": PASSWORD}])
    assert datastore.is_root_enabled() is False

    def transaction(tag: str) -> None:
        with tenant(address) as client:
            pipe = client.pipeline(transaction=True)
            pipe.set(f"in-multi:{tag}", tag)
            pipe.incr("multi-count")
            pipe.execute()
            client.eval("redis.call('SET', KEYS[1], ARGV[1])", 1, f"by-script:{tag}", tag)

    transaction("one")
    datastore.stop()
    datastore.start()
    with tenant(address) as client:
        assert client.get("in-multi:one") == "one" and client.get("by-script:one") == "one"
        assert client.get("multi-count") == "1"

    # An instance made by an older Coffer: its disabled root has no commands.
    datastore.stop()
    lines = datastore.acl_file.read_text().splitlines()
    old = [
        line if not line.startswith("user default ") else "user default off -@all" for line in lines
    ]
    datastore.acl_file.write_text("\n".join(old) + "\n")
    datastore.start()
    transaction("two")
    datastore.stop()
    datastore.start()
    with tenant(address) as client:
        assert client.get("in-multi:two") == "two" and client.get("multi-count") == "2"
    assert redis_fixtures.login_refused(address, "default", "")
    with redis_fixtures.admin_client(datastore) as admin:
        assert "off" in admin.acl_getuser("default")["flags"]
