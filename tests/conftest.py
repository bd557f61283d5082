"""Shared fixtures. ``tests/`` is on sys.path (pytest inserts a conftest's directory), so test
modules can import ``coffer_harness``."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator

import pytest
from coffer_harness import Coffer, coffer_environment


@pytest.fixture(scope="session")
def engine_user() -> str:
    """The unprivileged user engines run as (scripts/setup creates it when we are root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("coffer")
    except KeyError:
        pytest.fail("the 'coffer' system user is missing; run scripts/setup first")
    return "coffer"


@pytest.fixture(scope="module")
def coffer_up(engine_user: str) -> Iterator[Coffer]:
    """A running ``coffer up`` on embedded defaults, shared by one test module."""
    with coffer_environment() as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        yield coffer
