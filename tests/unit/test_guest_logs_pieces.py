"""How a log file is cut into published pieces (``coffer.guest.logs``), on real files: whole
lines only, at most the limit per piece, a line still being written held back, the PostgreSQL
statement and duration views, and the admin password never passed on."""

from __future__ import annotations

from pathlib import Path

from coffer.guest.config.logs import LogSource
from coffer.guest.logs import _chunks, _last_line_end

PG_LOG = (
    "2026-11-22 03:11:04.861 UTC [27807] app@appdb LOG:  statement: SELECT 'a'\n"
    "\t  FROM t\n"
    "2026-11-22 03:11:04.867 UTC [27807] app@appdb LOG:  duration: 0.206 ms\n"
    "2026-11-22 03:11:04.870 UTC [27808] bob@appdb LOG:  duration: 12.5 ms  statement: SELECT 2\n"
    '2026-11-22 03:11:04.871 UTC [27809] app@appdb ERROR:  relation "x" does not exist\n'
    "2026-11-22 03:11:04.871 UTC [27809] app@appdb STATEMENT:  SELECT * FROM x\n"
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "some.log"
    path.write_text(text)
    return path


def test_pieces_hold_whole_lines_within_the_limit(tmp_path: Path) -> None:
    lines = [f"line {n:04d} " + "x" * 50 + "\n" for n in range(100)]
    path = _write(tmp_path, "".join(lines) + "half a line")
    size = path.stat().st_size
    pieces = list(_chunks(LogSource(path), 0, size, 1024, None))
    assert len(pieces) > 5
    assert all(len(p.encode()) <= 1024 and p.endswith("\n") for p in pieces)
    assert "".join(pieces) == "".join(lines)  # the unfinished line waits for the next publish
    assert _last_line_end(path, 0, size) == size - len("half a line")


def test_a_publish_continues_where_the_last_one_ended(tmp_path: Path) -> None:
    path = _write(tmp_path, "one\ntwo\n")
    first_end = path.stat().st_size
    with path.open("a") as handle:
        handle.write("three\n")
    text = "".join(_chunks(LogSource(path), first_end, path.stat().st_size, 4096, None))
    assert text == "three\n"


def test_a_line_longer_than_the_limit_is_cut(tmp_path: Path) -> None:
    path = _write(tmp_path, "y" * 3000 + "\n")
    pieces = list(_chunks(LogSource(path), 0, path.stat().st_size, 1024, None))
    assert [len(p) for p in pieces] == [1024, 1024, 953]
    assert "".join(pieces) == "y" * 3000 + "\n"


def test_the_admin_password_is_hidden(tmp_path: Path) -> None:
    path = _write(tmp_path, "connect with s3cret-admin-pw now\n")
    text = "".join(_chunks(LogSource(path), 0, path.stat().st_size, 4096, "s3cret-admin-pw"))
    assert text == "connect with *** now\n"


def test_postgresql_statement_view(tmp_path: Path) -> None:
    # An error's STATEMENT context repeats a statement already logged: not in the view.
    path = _write(tmp_path, PG_LOG)
    source = LogSource(path, view="postgresql-statements")
    text = "".join(_chunks(source, 0, path.stat().st_size, 4096, None))
    assert text.splitlines() == [
        "2026-11-22 03:11:04.861 UTC [27807] app@appdb LOG:  statement: SELECT 'a'",
        "\t  FROM t",
    ]


def test_postgresql_duration_view_names_each_statement(tmp_path: Path) -> None:
    path = _write(tmp_path, PG_LOG)
    source = LogSource(path, view="postgresql-durations")
    text = "".join(_chunks(source, 0, path.stat().st_size, 4096, None))
    assert text.splitlines() == [
        "2026-11-22 03:11:04.867 UTC [27807] app@appdb LOG:  duration: 0.206 ms"
        "  statement: SELECT 'a'",
        "\t  FROM t",
        "2026-11-22 03:11:04.870 UTC [27808] bob@appdb LOG:  duration: 12.5 ms  statement: "
        "SELECT 2",
    ]
