"""Ready copies of the host's templates, kept by the zygote (real ``coffer up``, real MariaDB).

After a create, the taskmanager asks the zygote to top up the ready copies of every template;
a fork of the zygote, detached from every instance, makes them. The next create takes one
instead of copying, and still gets a server of its own; deleting the instance whose create
asked for the copies does not cut their making short.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymysql
import pytest
from coffer_harness import Coffer, TenantApi, coffer_environment, mariadb_instance

from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.template import MARKER, SPARES, SPARES_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MariaDBDatastore.detect_version() is None, reason="mariadbd not installed"),
]


def _wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ready_copies(coffer: Coffer) -> dict[str, list[Path]]:
    """Per template (by name): its finished ready copies."""
    templates = coffer.state_dir / "templates"
    return {
        marker.parent.name: sorted((templates / SPARES_DIR / marker.parent.name).glob("ready-*"))
        for marker in templates.glob(f"*/{MARKER}")
    }


def _full(coffer: Coffer) -> bool:
    copies = _ready_copies(coffer)
    making = list((coffer.state_dir / "templates" / SPARES_DIR).glob("*/making-*"))
    return bool(copies) and all(len(c) == SPARES for c in copies.values()) and not making


def _logs_in(address: str, user: str, password: str, database: str) -> bool:
    conn = pymysql.connect(
        host=address, user=user, password=password, database=database, connect_timeout=5
    )
    conn.close()
    return True


def test_the_zygote_keeps_ready_copies_and_creates_take_them(engine_user: str) -> None:
    with coffer_environment() as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        first = api.create(**mariadb_instance("spare-a", "a_db", "app", "pw-a-123456"))
        assert api.wait_settled(first)["status"] == "ACTIVE"
        # The first create built the template; the zygote then made its ready copies, even
        # though the instance that asked is deleted at once.
        api.delete_and_wait_gone(first)
        _wait_for(lambda: _full(coffer), what=f"{SPARES} ready copies")
        (name, copies), *_ = _ready_copies(coffer).items()
        for copy in copies:
            assert copy.stat().st_uid == os.stat(coffer.state_dir / "templates").st_uid
        taken = set(copies)

        second = api.create(**mariadb_instance("spare-b", "b_db", "app", "pw-b-654321"))
        shown = api.wait_settled(second)
        assert shown["status"] == "ACTIVE", shown
        log = (coffer.state_dir / "instances" / second / "log" / "agent.log").read_text()
        assert f"took a ready copy of template {name}" in log
        assert _logs_in(shown["addresses"][0]["address"], "app", "pw-b-654321", "b_db")
        # The copy it took is gone from the ready ones, and a new one replaced it.
        _wait_for(lambda: _full(coffer), what="the ready copies to be topped up again")
        now = set(_ready_copies(coffer)[name])
        assert len(taken - now) == 1
        api.delete_and_wait_gone(second)
