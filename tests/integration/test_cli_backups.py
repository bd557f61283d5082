"""``coffer backup ...`` against a real ``coffer up`` and a real MariaDB instance, with the
credentials of the ``clouds.yaml`` that ``coffer up`` wrote (as the ``openstack`` CLI takes
them): create follows the backup to COMPLETED with its bytes and rate, list and show find it,
restore follows the new instance to ACTIVE with the rows of the backup, delete removes it; a
refused request prints the API's sentence and exits 1; no credentials exit 2."""

from __future__ import annotations

import json
import re
import subprocess
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

        restored = _coffer(
            coffer_up, "restore", backup_id, "cli-restored", "--flavor", "6", "--size", "1"
        )
        new_id = re.search(r"into instance (\S+)\.", restored.stdout)
        if new_id:
            made.append(new_id.group(1))
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert re.search(r"ACTIVE: restored [0-9.]+ MB in [0-9.]+ s", restored.stdout)
        assert new_id is not None
        assert _rows(api.show(new_id.group(1))["ip"][0]) == expected

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
