"""``coffer backup ...`` against a real ``coffer up`` and a real MariaDB instance, with the
credentials of the ``clouds.yaml`` that ``coffer up`` wrote (as the ``openstack`` CLI takes
them): create follows the backup to COMPLETED with its bytes and rate, list and show find it,
restore follows the new instance to ACTIVE with the rows of the backup, showing the bytes the
guest verified and restored (reported through the conductor, read from the API) and the
rate, delete removes it; a refused request prints the API's sentence and exits 1; no
credentials exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from typing import Any

import pymysql
import pytest
from coffer_harness import VENV_BIN, Coffer, TenantApi, mariadb_instance

pytestmark = pytest.mark.integration

PASSWORD = "cli-Secret-pw-1"


def _coffer(coffer: Coffer, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [str(VENV_BIN / "coffer"), "backup", *args],
        env=env if env is not None else coffer.cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(address: str) -> list[tuple[int, str]]:
    conn = pymysql.connect(host=address, user="app", password=PASSWORD, database="shop")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, v FROM items ORDER BY id LIMIT 3")
            return [(int(a), str(b)) for a, b in cur.fetchall()]
    finally:
        conn.close()


def _restore_watching(
    coffer: Coffer, api: TenantApi, backup_id: str, made: list[str]
) -> tuple[Any, list[dict[str, Any]]]:
    """``coffer backup restore`` run to its end while the instance's restore progress
    (``GET /instances/{id}/restore``) is read every 0.2 s; the finished process (stdout, stderr
    as text) and the progress seen."""
    command = [str(VENV_BIN / "coffer"), "backup", "restore", backup_id, "cli-restored"]
    views: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*command, "--flavor", "6", "--size", "1"],
            # Unbuffered, so its first line (the new instance's id) arrives as it is written.
            env={**coffer.cli_env(), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            found = re.search(r"into instance (\S+)\.", first)
            assert found, first
            made.append(found.group(1))
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                resp = api.request("GET", f"/instances/{found.group(1)}/restore")
                assert resp.status_code == 200, resp.text
                if resp.json()["restore"]:
                    views.append(resp.json()["restore"])
                time.sleep(0.2)
            out = first + proc.stdout.read()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out, err.read()), views


def _check_restore_views(views: list[dict[str, Any]], total: int) -> None:
    """The guest's figures reached the API: non-zero, never past the chain's engine bytes, only
    growing, and at the end every byte verified and restored."""
    assert views, "the API never showed the restore's progress"
    assert all(v["total_bytes"] == total for v in views), views
    for field in ("verified_bytes", "restored_bytes"):
        values = [v[field] for v in views]
        assert values == sorted(values), (field, values)
        assert all(0 <= n <= total for n in values), (field, values)
    assert max(v["verified_bytes"] for v in views) > 0, views
    assert len({(v["verified_bytes"], v["restored_bytes"]) for v in views}) > 1, views
    order = ["waiting", "verifying", "restoring", "starting"]
    phases = [order.index(v["phase"]) for v in views]
    assert phases == sorted(phases), views
    if views[-1]["phase"] == "starting":
        assert views[-1]["verified_bytes"] == views[-1]["restored_bytes"] == total, views[-1]


def _check_restore_lines(stderr: str, total_mb: float) -> None:
    """Without a terminal the CLI prints each change of the restore's figures as a line: the
    bytes of the current pass of the total, growing within the pass, and the rate."""
    lines = re.findall(
        r"restore (waiting|verifying|restoring|starting): ([0-9.]+) MB of ([0-9.]+) MB"
        r"(?:, ([0-9.]+) MB/s)?",
        stderr,
    )
    assert lines, stderr
    assert all(abs(float(of) - total_mb) < 0.1 for _p, _d, of, _r in lines), lines
    assert all(float(done) <= float(of) for _p, done, of, _r in lines), lines
    assert any(float(done) > 0 for _p, done, _of, _r in lines), lines
    for phase in ("verifying", "restoring"):
        done = [float(d) for p, d, _of, _r in lines if p == phase]
        assert done == sorted(done), (phase, lines)
    assert any(rate for *_x, rate in lines) or "MB/s" in stderr, stderr


def test_backup_cli_creates_follows_restores_and_deletes(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    made: list[str] = []
    try:
        source_id = api.create(**mariadb_instance("cli-src", "shop", "app", PASSWORD))
        made.append(source_id)
        source = api.wait_settled(source_id, timeout=180)
        assert source["status"] == "ACTIVE", source
        conn = pymysql.connect(host=source["ip"][0], user="app", password=PASSWORD, database="shop")
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE items (id INT PRIMARY KEY, v TEXT)")
                cur.execute(
                    "INSERT INTO items SELECT seq, REPEAT(MD5(seq), 30) FROM seq_1_to_30000"
                )
            conn.commit()
        finally:
            conn.close()
        expected = _rows(source["ip"][0])

        created = _coffer(coffer_up, "create", "cli-src", "from-the-cli")
        assert created.returncode == 0, created.stdout + created.stderr
        match = re.search(
            r"Backup (\S+) COMPLETED: ([0-9.]+) MB from the engine, stored as ([0-9.]+) MB, "
            r"in [0-9.]+ s \(([0-9.]+) MB/s\)",
            created.stdout,
        )
        assert match, created.stdout
        backup_id = match.group(1)
        assert float(match.group(2)) > 1 and float(match.group(4)) > 0
        # The progress display (stderr) ends with the bytes read and the rate.
        assert "backup completed" in created.stderr and "MB/s" in created.stderr, created.stderr

        shown = _coffer(coffer_up, "show", backup_id, "--json")
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert record["status"] == "COMPLETED" and record["instance_id"] == source_id
        assert abs(record["raw_size_bytes"] / 1e6 - float(match.group(2))) < 0.1
        listed = _coffer(coffer_up, "list", "--instance", "cli-src", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [b["id"] for b in json.loads(listed.stdout)] == [backup_id]

        restored, views = _restore_watching(coffer_up, api, backup_id, made)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        finished = r"ACTIVE: restored [0-9.]+ MB in [0-9.]+ s \([0-9.]+ MB/s\)"
        assert re.search(finished, restored.stdout), restored.stdout
        new_id = re.search(r"into instance (\S+)\.", restored.stdout)
        assert new_id is not None
        assert _rows(api.show(new_id.group(1))["ip"][0]) == expected
        _check_restore_views(views, record["raw_size_bytes"])
        _check_restore_lines(restored.stderr, record["raw_size_bytes"] / 1e6)

        deleted = _coffer(coffer_up, "delete", backup_id, "--wait")
        assert deleted.returncode == 0, deleted.stderr
        assert api.request("GET", f"/backups/{backup_id}").status_code == 404

        # Refused: the API's sentence, exit status 1; no credentials: usage error, 2.
        missing = _coffer(coffer_up, "show", "no-such-backup")
        assert missing.returncode == 1
        assert "Backup no-such-backup could not be found." in missing.stderr
        bare = {k: v for k, v in coffer_up.cli_env().items() if not k.startswith("OS_")}
        nothing = _coffer(coffer_up, "list", env=bare)
        assert nothing.returncode == 2 and "no credentials" in nothing.stderr
        assert PASSWORD not in created.stdout + created.stderr + restored.stdout
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")
