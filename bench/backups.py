"""Benchmark 7: backup and restore throughput, Coffer against the raw tool to the same storage.

For each engine, one dataset of ``size_mb`` MB is made server-side (MariaDB ``INSERT ...
SELECT`` from the ``seq`` engine, PostgreSQL ``generate_series``, Redis pipelined ``SET``s of
64 KiB values), half incompressible and half text-like, in a Coffer instance and in a raw server
started by hand (``bench.engines``), through the same tenant user. Then:

* **Coffer backup**: ``POST /backups`` until the backup is COMPLETED (engine tool → zstd →
  AES-256-GCM → SHA-256 → the ``file`` driver), MB/s of engine bytes (``raw_size_bytes``).
* **Raw backup**: the tool itself, its output piped into the same ``file`` storage driver in a
  directory of its own: ``mariabackup --backup --stream=mbstream``, ``pg_basebackup -D - -Ft
  -X fetch``, and for Redis a fresh ``BGSAVE`` then the RDB file. MB/s of the tool's bytes.
* **Coffer restore**: ``POST /instances`` with ``restorePoint`` until the tenant user logs in
  to the restored instance (verification of the whole object, decryption, the tool's restore
  path, and the new instance's start), MB/s of the backup's engine bytes.
* **Raw restore**: the stored object read back from the ``file`` driver into the tool's own
  restore path: ``mbstream -x`` then ``mariabackup --prepare``; ``tar -x``; the RDB written to
  a file. No server is started, so the ratio is pessimistic for Coffer by one engine start.

MB are 10^6 bytes; higher is better.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import psycopg
import pymysql
import redis

from bench.engines import Credentials, find_binary, try_login
from bench.harness import BenchError, CofferApi, Workspace, private_address
from bench.provision import CREATE_TIMEOUT, EngineChoice, address_of
from bench.report import BenchmarkResult, Metric
from coffer.storage.file import FileStorage

#: Flavor, volume (GB), and the flavor's RAM (MB) and vCPUs of the measured instances, Coffer's
#: and the raw tools' alike: the quick dataset fits the smallest flavor, a 1 GiB one needs
#: m1.medium's memory (Redis keeps its dataset in RAM).
SMALL = ("6", 1, 256, 1)
LARGE = ("3", 5, 2048, 2)
BACKUP_TIMEOUT = 1800.0
_CHUNK = 1 << 20
LOG = logging.getLogger("bench")
_HALF_TEXT = "abcdefghij" * 100


# --- datasets ----------------------------------------------------------------------------------


def fill(engine: str, address: str, creds: Credentials | None, size_mb: int) -> None:
    """About ``size_mb`` MB of rows (half random, half text), made by the server where it can."""
    rows = max(1, size_mb * 1_000_000 // 1024)
    if engine in ("mariadb", "mysql"):
        assert creds is not None and creds.database
        conn = pymysql.connect(
            host=address,
            user=creds.user,
            password=creds.password,
            database=creds.database,
            autocommit=True,
            read_timeout=3600,
        )
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b BLOB) ENGINE=InnoDB")
                step = 200_000
                for first in range(1, rows + 1, step):
                    last = min(rows, first + step - 1)
                    cur.execute(
                        "INSERT INTO big SELECT seq, "
                        "CONCAT(RANDOM_BYTES(512), REPEAT(MD5(seq), 16)) "
                        f"FROM seq_{first}_to_{last}"
                    )
        finally:
            conn.close()
    elif engine == "postgresql":
        assert creds is not None and creds.database
        with psycopg.connect(
            host=address,
            user=creds.user,
            password=creds.password,
            dbname=creds.database,
            autocommit=True,
            sslmode="disable",
        ) as conn:
            # 512 random bytes (eight SHA-512 digests of fresh random numbers) and 512 bytes of
            # text per row, like the MariaDB rows: a repeated digest would compress to nothing.
            random_half = " || ".join(["sha512(float8send(random()))"] * 8)
            conn.execute(
                f"CREATE TABLE big AS SELECT g AS id, {random_half} "
                "|| convert_to(repeat(md5(g::text), 16), 'UTF8') AS b "
                "FROM generate_series(1, %s) AS g",
                (rows,),
            )
    elif engine == "redis":
        assert creds is not None
        client = redis.Redis(host=address, username=creds.user, password=creds.password)
        try:
            value_size = 64 * 1024
            keys = max(1, size_mb * 1_000_000 // value_size)
            pipe = client.pipeline(transaction=False)
            for index in range(keys):
                pipe.set(f"big:{index}", os.urandom(value_size // 2) + _HALF_TEXT.encode() * 33)
                if index % 64 == 63:
                    pipe.execute()
            pipe.execute()
        finally:
            client.close()
    else:
        raise BenchError(f"no dataset is written for {engine}")


# --- Coffer ------------------------------------------------------------------------------------


def coffer_backup(api: CofferApi, instance_id: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    resp = api.client.post(
        api.path("/backups"), json={"backup": {"name": "bench", "instance": instance_id}}
    )
    if resp.status_code != 202:
        raise BenchError(f"POST /backups answered {resp.status_code}: {resp.text[:300]}")
    backup_id = resp.json()["backup"]["id"]
    deadline = time.monotonic() + BACKUP_TIMEOUT
    while True:
        backup: dict[str, Any] = api.get(f"/backups/{backup_id}").json()["backup"]
        if backup["status"] == "COMPLETED":
            return backup, time.perf_counter() - started
        if backup["status"] == "FAILED" or time.monotonic() > deadline:
            raise BenchError(f"backup {backup_id}: {backup.get('fail_reason') or 'timed out'}")
        time.sleep(0.1)


def coffer_restore(
    api: CofferApi,
    engine: EngineChoice,
    backup: dict[str, Any],
    creds: Credentials | None,
    flavor: tuple[str, int, int, int],
) -> tuple[str, float]:
    """Restore ``backup`` into a new instance; (its id, seconds until the user logs in)."""
    started = time.perf_counter()
    body: dict[str, Any] = {
        "name": f"bench-restore-{engine.manager}",
        "flavorRef": flavor[0],
        "volume": {"size": flavor[1]},
        "restorePoint": {"backupRef": backup["id"]},
    }
    if engine.manager == "redis" and creds is not None:
        # Redis ACL users are not part of an RDB: the restore asks for the user again.
        body["users"] = [{"name": creds.user, "password": creds.password}]
    instance_id = api.create(body)
    deadline = time.monotonic() + BACKUP_TIMEOUT
    address = None
    while True:
        shown = api.show(instance_id)
        if shown["status"] == "ERROR":
            fault = shown.get("fault", {}).get("message", "no fault recorded")
            raise BenchError(f"restore into {instance_id} failed: {fault}")
        address = address or private_address(shown)
        if shown["status"] == "ACTIVE" and address and try_login(engine.manager, address, creds):
            return instance_id, time.perf_counter() - started
        if time.monotonic() > deadline:
            raise BenchError(f"restore into {instance_id} did not finish in time")
        time.sleep(0.1)


def _wait_login(
    api: CofferApi, engine: EngineChoice, instance_id: str, creds: Credentials | None
) -> str:
    """Wait until the new instance is ACTIVE and the tenant user logs in; its address."""
    deadline = time.monotonic() + CREATE_TIMEOUT
    while True:
        shown = api.show(instance_id)
        if shown["status"] == "ERROR":
            fault = shown.get("fault", {}).get("message", "no fault recorded")
            raise BenchError(f"instance {instance_id} ({engine.manager}) failed: {fault}")
        address = address_of(shown)
        # ACTIVE too: the user can log in a moment before the create has finished.
        if (
            shown["status"] == "ACTIVE"
            and address is not None
            and try_login(engine.manager, address, creds)
        ):
            return address
        if time.monotonic() > deadline:
            raise BenchError(f"instance {instance_id} ({engine.manager}) was not usable in time")
        time.sleep(0.1)


# --- the raw tools -----------------------------------------------------------------------------


def _pump(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _finish(proc: subprocess.Popen[bytes], what: str, errors: Path) -> None:
    if proc.wait(timeout=BACKUP_TIMEOUT) != 0:
        tail = " | ".join(errors.read_text(errors="replace").strip().splitlines()[-5:])
        raise BenchError(f"{what} failed with exit code {proc.returncode}: {tail}")


def _tool(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise BenchError(f"{name} is not installed")
    return found


def raw_backup(raw: Any, store: FileStorage, key: str, scratch: Path) -> tuple[int, float]:
    """The raw tool's output piped into ``store``; (bytes stored, seconds)."""
    errors = scratch / f"{key}.err"
    started = time.perf_counter()
    if raw.manager in ("mariadb", "mysql"):
        target = scratch / f"{key}-target"
        target.mkdir()
        argv = [
            _tool("mariabackup"),
            f"--defaults-file={raw.root / 'etc' / 'my.cnf'}",
            "--backup",
            "--stream=mbstream",
            f"--target-dir={target}",
            f"--socket={raw.root / 'run' / 'mysqld.sock'}",
            "--user=root",
        ]
    elif raw.manager == "postgresql":
        _allow_local_replication(raw)
        argv = [
            _tool("pg_basebackup"),
            f"--host={raw.root / 'run'}",
            f"--port={raw.port}",
            "--username=postgres",
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--no-password",
        ]
    elif raw.manager == "redis":
        return _raw_rdb(raw, store, key, started)
    else:
        raise BenchError(f"no raw backup tool is known for {raw.manager}")
    with errors.open("wb") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=scratch
        )
        assert proc.stdout is not None
        try:
            stored = store.put_stream(key, _pump(proc.stdout))
        finally:
            proc.stdout.close()
        _finish(proc, argv[0], errors)
    return stored.size, time.perf_counter() - started


def _allow_local_replication(raw: Any) -> None:
    """initdb's pg_hba here has no replication line; pg_basebackup over the socket needs one."""
    hba = raw.root / "data" / "pg_hba.conf"
    text = hba.read_text()
    if "replication" not in text:
        hba.write_text("local replication all trust\n" + text)
        with psycopg.connect(
            host=str(raw.root / "run"), port=raw.port, user="postgres", autocommit=True
        ) as conn:
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.2)


def _raw_rdb(raw: Any, store: FileStorage, key: str, started: float) -> tuple[int, float]:
    conf = (raw.root / "redis.conf").read_text().splitlines()
    password = next(line.split(" ", 1)[1] for line in conf if line.startswith("requirepass "))
    client = redis.Redis(unix_socket_path=str(raw.root / "run" / "redis.sock"), password=password)
    try:
        before = int(client.info("persistence")["rdb_saves"])
        client.execute_command("BGSAVE", "SCHEDULE")
        while True:
            info = client.info("persistence")
            if int(info["rdb_saves"]) > before and not int(info["rdb_bgsave_in_progress"]):
                break
            time.sleep(0.02)
    finally:
        client.close()
    with (raw.root / "data" / "dump.rdb").open("rb") as handle:
        stored = store.put_stream(key, _pump(handle))
    return stored.size, time.perf_counter() - started


def raw_restore(manager: str, store: FileStorage, key: str, scratch: Path) -> float:
    """The stored object back through the tool's restore path; seconds."""
    target = Path(tempfile.mkdtemp(prefix=f"{manager}-restore-", dir=scratch))
    errors = scratch / f"{key}-restore.err"
    started = time.perf_counter()
    if manager == "redis":
        with (target / "dump.rdb").open("wb") as handle:
            for chunk in store.get_stream(key):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return time.perf_counter() - started
    if manager in ("mariadb", "mysql"):
        argv = [_tool("mbstream"), "-x", "-C", str(target)]
    elif manager == "postgresql":
        argv = ["tar", "--extract", "--file=-", f"--directory={target}", "--no-same-owner"]
    else:
        raise BenchError(f"no raw restore path is known for {manager}")
    with errors.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=err, stdout=err)
        assert proc.stdin is not None
        feeder_error: list[BaseException] = []

        def feed() -> None:
            try:
                for chunk in store.get_stream(key):
                    proc.stdin.write(chunk)  # type: ignore[union-attr]
            except BaseException as exc:  # reported below, after the tool has exited
                feeder_error.append(exc)
            finally:
                proc.stdin.close()  # type: ignore[union-attr]

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        thread.join(BACKUP_TIMEOUT)
        _finish(proc, argv[0], errors)
        if feeder_error:
            raise BenchError(f"reading the stored backup failed: {feeder_error[0]}")
    if manager in ("mariadb", "mysql"):
        prepare = [_tool("mariabackup"), "--prepare", f"--target-dir={target}"]
        with errors.open("ab") as err:
            _finish(subprocess.Popen(prepare, stdout=err, stderr=err), prepare[0], errors)
    return time.perf_counter() - started


# --- the benchmark -----------------------------------------------------------------------------


def bench_backups(
    api: CofferApi,
    workspace: Workspace,
    engines: Sequence[EngineChoice],
    size_mb: int,
) -> BenchmarkResult:
    """Benchmark 7 (see the module docstring): one backup and one restore each way per engine."""
    from bench.cli import TITLES

    name, title = TITLES["backup"]
    result = BenchmarkResult(name, title)
    flavor = SMALL if size_mb <= 64 else LARGE
    scratch = workspace.subdir("backup-bench")
    store = FileStorage(scratch / "raw-store")
    failures: list[str] = []
    for engine in engines:
        if "backup" not in engine.capabilities:
            result.skipped.append(f"{engine.manager}: the plugin takes no backups")
            continue
        made: list[str] = []
        raw = None
        try:
            creds = engine.credentials()
            body = engine.create_body(f"bench-backup-{engine.manager}", creds)
            body["flavorRef"], body["volume"] = flavor[0], {"size": flavor[1]}
            instance_id = api.create(body)
            made.append(instance_id)
            address = _wait_login(api, engine, instance_id, creds)
            fill(engine.manager, address, creds, size_mb)
            backup, backup_seconds = coffer_backup(api, instance_id)
            engine_bytes = int(backup["raw_size_bytes"])
            restored_id, restore_seconds = coffer_restore(api, engine, backup, creds, flavor)
            made.append(restored_id)

            raw = engine.raw(
                workspace.subdir(f"rb-{engine.manager}", for_engine=True),
                workspace.raw_block.take(),
                workspace.user,
                ram_mb=flavor[2],
                vcpus=flavor[3],
                volume_gb=flavor[1],
            )
            raw_creds = engine.credentials()
            raw.provision(raw_creds, time.monotonic() + CREATE_TIMEOUT)
            fill(engine.manager, raw.address, raw_creds, size_mb)
            key = f"{engine.manager}-{secrets.token_hex(4)}"
            raw_bytes, raw_backup_seconds = raw_backup(raw, store, key, scratch)
            raw_restore_seconds = raw_restore(engine.manager, store, key, scratch)
            store.delete(key)
        except Exception as exc:
            # One engine's failure is reported; the other engines are still measured.
            LOG.error("backup benchmark for %s failed: %s", engine.manager, _describe(exc))
            failures.append(f"{engine.manager}: {_describe(exc)}")
            continue
        finally:
            for instance_id in made:
                api.delete(instance_id)
            if raw is not None:
                raw.destroy()
        label = engine.manager + " " + engine.version
        size_note = (
            f"{engine_bytes / 1e6:.0f} MB from the engine, "
            f"{backup['size_bytes'] / 1e6:.0f} MB stored"
        )
        result.metrics.append(
            Metric(
                name,
                f"{label}: backup throughput",
                "MB/s",
                [engine_bytes / backup_seconds / 1e6],
                _RAW_BACKUP_LABELS.get(engine.manager, "raw tool") + " -> file store",
                [raw_bytes / raw_backup_seconds / 1e6],
                better="higher",
                note=size_note,
            )
        )
        result.metrics.append(
            Metric(
                name,
                f"{label}: restore throughput",
                "MB/s",
                [engine_bytes / restore_seconds / 1e6],
                _RAW_RESTORE_LABELS.get(engine.manager, "raw tool") + " (no server start)",
                [raw_bytes / raw_restore_seconds / 1e6],
                better="higher",
                note=size_note,
            )
        )
    if failures:
        result.error = "; ".join(failures)
    return result


def _describe(exc: BaseException, limit: int = 300) -> str:
    """An exception as one printable line: engines' errors can quote binary values."""
    text = f"{type(exc).__name__}: {exc}"
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_RAW_BACKUP_LABELS = {
    "mariadb": "mariabackup --stream=mbstream",
    "postgresql": "pg_basebackup -Ft -D -",
    "redis": "BGSAVE + RDB file",
}
_RAW_RESTORE_LABELS = {
    "mariadb": "mbstream -x + mariabackup --prepare",
    "postgresql": "tar -x of the base backup",
    "redis": "RDB file written",
}
