"""Guest logs on the guest's side: listing, switching on and off, publishing and discarding.

The agent's ``guest_log_list`` and ``guest_log_action`` RPCs land here (``GuestLogs``). The
engine's part is small and lives in its datastore: ``log_sources()`` (which file each log is
written to), ``apply_log_switches()`` (make the running engine follow ``etc/logs.json``) and,
for engines that keep a log in memory, ``collect_logs()``. Which logs exist is
``coffer.guest.config.logs.CATALOGUE``.

**Publishing** copies what was written since the last publish to the backup storage the
control plane names in the request (``[storage]``: file, S3 or Swift), as Trove copies to
Swift: objects ``<container>/<instance id>/<datastore>-<log>/log-<n>`` of at most ``limit``
bytes each, whole lines only, plus ``<container>/<instance id>/<datastore>-<log>_metafile``
(JSON: what was published, when, in which objects). Each object's metadata carries its line
count (``lines``), which Trove's clients read. Where the guest is up to is kept in
``state/guest_logs.json``; a log file that was replaced or shortened since (rotated) is
published again from its start. **Discard** deletes the published objects and the metafile;
the next publish starts from the beginning of the file again (as Trove's does).

Secrets: the engines mask or never receive clear-text passwords (MariaDB logs statements with
passwords masked; the PostgreSQL agent sends SCRAM verifiers with statement logging off; Redis
redacts AUTH, HELLO and ACL SETUSER arguments). As a last guard, the engine's admin password
is replaced by ``***`` in whatever is published.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from coffer.errors import BadRequest, ValidationError
from coffer.guest.config.logs import (
    DEFAULT_LONG_QUERY_MS,
    LogSource,
    LogSpec,
    LogSwitches,
    LogType,
    find_log,
    log_specs,
    read_switches,
    write_switches,
)
from coffer.guest.layout import InstanceLayout, write_private_file

LOG = logging.getLogger(__name__)

STATE_FILE = "guest_logs.json"
DEFAULT_CONTAINER = "database_logs"
#: Trove's ``guest_log_limit``: the most bytes one published object holds.
DEFAULT_LIMIT = 1_000_000
#: Bounds on what a request may ask for (the control plane checks its options the same way).
MIN_LIMIT = 1024
MAX_LIMIT = 100_000_000
_CONTAINER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_READ_BLOCK = 1 << 20
#: Serialises publishes and discards (an agent process serves one instance, with two RPC
#: workers).
_PUBLISHING = threading.Lock()


class LogStatus(StrEnum):
    """Trove's log statuses (the values are what the API shows)."""

    DISABLED = "Disabled"
    ENABLED = "Enabled"
    UNAVAILABLE = "Unavailable"
    READY = "Ready"
    PUBLISHED = "Published"
    PARTIAL = "Partial"
    ROTATED = "Rotated"
    RESTART_REQUIRED = "Restart_Required"


@dataclass
class Progress:
    """How far one log has been published (``state/guest_logs.json``)."""

    #: Bytes of the source file published (for a view: read through).
    offset: int = 0
    #: The source file's inode when ``offset`` was recorded; another one means it was replaced.
    inode: int | None = None
    #: Objects published so far (the next one is numbered ``chunks + 1``).
    chunks: int = 0
    #: When the last publish finished (seconds since the epoch), or None.
    published_at: float | None = None


@dataclass(frozen=True)
class Request:
    """The control plane's options that come with every log call."""

    container: str = DEFAULT_CONTAINER
    limit: int = DEFAULT_LIMIT
    long_query_ms: int = DEFAULT_LONG_QUERY_MS

    @classmethod
    def checked(
        cls, container: object = None, limit: object = None, long_query_ms: object = None
    ) -> Request:
        container = DEFAULT_CONTAINER if container is None else container
        limit = DEFAULT_LIMIT if limit is None else limit
        long_query_ms = DEFAULT_LONG_QUERY_MS if long_query_ms is None else long_query_ms
        if not isinstance(container, str) or not _CONTAINER.fullmatch(container):
            raise ValidationError(
                "The log container must be 1-64 letters, digits, '.', '_' or '-', not starting "
                "with '.'."
            )
        if type(limit) is not int or not MIN_LIMIT <= limit <= MAX_LIMIT:
            raise ValidationError(
                f"The log chunk limit must be a whole number of bytes from {MIN_LIMIT} to "
                f"{MAX_LIMIT}."
            )
        if type(long_query_ms) is not int or long_query_ms < 0:
            raise ValidationError("The long query time must be a whole number of milliseconds.")
        return cls(container, limit, long_query_ms)


def _flag(name: str, value: object) -> bool:
    """Trove's log flags are 0 or 1 (booleans are taken too)."""
    if value is None:
        return False
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise ValidationError(f"{name} must be 0 or 1.")


class GuestLogs:
    """The logs of one instance. ``datastore`` returns the agent's current datastore (it is
    replaced when the instance is reconfigured); ``lock`` is the agent's action lock, held while
    the engine's settings change so they never race a start or stop."""

    def __init__(
        self,
        instance_id: str,
        manager: str,
        datastore: Callable[[], Any],
        layout: InstanceLayout,
        lock: threading.Lock,
        owner: str | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.manager = manager
        self._datastore = datastore
        self.layout = layout
        self._lock = lock
        self._owner = owner
        self._state_path = layout.root / "state" / STATE_FILE

    # -- RPC -------------------------------------------------------------------------------------

    def list(
        self,
        container: str | None = None,
        limit: int | None = None,
        long_query_ms: int | None = None,
    ) -> list[dict[str, Any]]:
        """Every log of the engine with its Trove fields."""
        options = Request.checked(container, limit, long_query_ms)
        self._collect()
        switches = read_switches(self.layout)
        progress = self._load()
        return [self._view(spec, switches, progress, options) for spec in log_specs(self.manager)]

    def action(
        self,
        name: str,
        enable: object = None,
        disable: object = None,
        publish: object = None,
        discard: object = None,
        storage: dict[str, Any] | None = None,
        container: str | None = None,
        limit: int | None = None,
        long_query_ms: int | None = None,
    ) -> dict[str, Any]:
        """Trove's ``guest_log_action``: name only shows the log; otherwise, in this order,
        discard the published objects, switch the log on, publish what is new, switch it off.

        ``enable`` with ``disable`` is refused, ``publish`` switches a USER log on unless
        ``disable`` is given, and SYS logs cannot be switched (ValidationError, before any
        change). ``storage`` (the ``[storage]`` options) is needed to publish or discard.
        """
        options = Request.checked(container, limit, long_query_ms)
        spec = find_log(self.manager, name)
        on, off = _flag("enable", enable), _flag("disable", disable)
        push, drop = _flag("publish", publish), _flag("discard", discard)
        if on and off:
            raise ValidationError("Give either enable or disable, not both.")
        if spec.type is LogType.SYS and (on or off):
            raise ValidationError(
                f"The {spec.name} log is a SYS log: it is always on and can only be published "
                "or discarded."
            )
        if (push or drop) and not storage:
            raise ValidationError("Publishing or discarding a log needs the backup storage.")
        if push and not off and spec.type is LogType.USER:
            on = True
        if drop:
            self._discard(spec, options, storage or {})
        if on:
            self._switch(spec, True, options)
        if push:
            self._publish(spec, options, storage or {})
        if off:
            self._switch(spec, False, options)
        self._collect()
        return self._view(spec, read_switches(self.layout), self._load(), options)

    # -- switching -------------------------------------------------------------------------------

    def _switch(self, spec: LogSpec, on: bool, options: Request) -> None:
        with self._lock:
            old = read_switches(self.layout)
            enabled = set(old.enabled)
            (enabled.add if on else enabled.discard)(spec.name)
            threshold = options.long_query_ms if on else old.long_query_ms
            if enabled == set(old.enabled) and threshold == old.long_query_ms:
                return
            wanted = LogSwitches(frozenset(enabled), threshold, old.pending_restart)
            write_switches(self.layout, wanted, self._owner)
            datastore = self._datastore()
            try:
                later = datastore.apply_log_switches() if datastore.is_running() else set()
            except Exception:
                write_switches(self.layout, old, self._owner)
                raise
            pending = (set(old.pending_restart) - {spec.name}) | set(later)
            write_switches(
                self.layout, LogSwitches(wanted.enabled, threshold, frozenset(pending)), self._owner
            )
        LOG.info(
            "switched the %s log %s%s",
            spec.name,
            "on" if on else "off",
            " (takes effect at the next restart)" if spec.name in later else "",
        )

    # -- publishing ------------------------------------------------------------------------------

    def _keys(self, spec: LogSpec, options: Request) -> tuple[str, str]:
        """(object prefix, metafile name), both inside the container."""
        base = f"{self.instance_id}/{self.manager}-{spec.name}"
        return base + "/", base + "_metafile"

    def _source(self, spec: LogSpec) -> LogSource:
        if spec.name == "guest":
            return LogSource(self.layout.log_dir / "agent.log")
        sources: dict[str, LogSource] = self._datastore().log_sources()
        return sources[spec.name]

    def _publish(self, spec: LogSpec, options: Request, storage_spec: dict[str, Any]) -> None:
        from coffer.guest.backup.worker import open_storage

        source = self._source(spec)
        prefix, metafile = self._keys(spec, options)
        with _PUBLISHING:
            self._collect()
            progress = self._load()
            mine = progress.get(spec.name, Progress())
            try:
                info = source.path.stat()
            except FileNotFoundError:
                return  # nothing written yet: nothing to publish
            offset = mine.offset
            if mine.inode != info.st_ino or offset > info.st_size:
                offset = 0  # rotated: the file now holds new text from its start
            end = info.st_size
            storage = open_storage(storage_spec)
            try:
                stored: list[str] = []
                secret = self._secret()
                for text in _chunks(source, offset, end, options.limit, secret):
                    mine.chunks += 1
                    key = f"{options.container}/{prefix}log-{mine.chunks:08d}"
                    body = text.encode("utf-8")
                    storage.put_stream(
                        key, [body], {"lines": str(text.count("\n")), "log": spec.name}
                    )
                    stored.append(key)
                published_end = _last_line_end(source.path, offset, end)
                mine = Progress(published_end, info.st_ino, mine.chunks, time.time())
                progress[spec.name] = mine
                self._save(progress)
                document = {
                    "instance_id": self.instance_id,
                    "datastore": self.manager,
                    "log": spec.name,
                    "type": spec.type.value,
                    "published_bytes": mine.offset,
                    "objects": mine.chunks,
                    "prefix": prefix,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                storage.put_stream(
                    f"{options.container}/{metafile}",
                    [json.dumps(document, indent=2, sort_keys=True).encode()],
                )
            finally:
                storage.close()
        LOG.info("published %d new object(s) of the %s log", len(stored), spec.name)

    def _discard(self, spec: LogSpec, options: Request, storage_spec: dict[str, Any]) -> None:
        from coffer.guest.backup.worker import open_storage

        prefix, metafile = self._keys(spec, options)
        with _PUBLISHING:
            storage = open_storage(storage_spec)
            try:
                keys = [obj.key for obj in storage.list(f"{options.container}/{prefix}")]
                for key in keys:
                    storage.delete(key)
                storage.delete(f"{options.container}/{metafile}")
            finally:
                storage.close()
            progress = self._load()
            progress.pop(spec.name, None)
            self._save(progress)
        LOG.info("discarded %d published object(s) of the %s log", len(keys), spec.name)

    # -- views -----------------------------------------------------------------------------------

    def _view(
        self,
        spec: LogSpec,
        switches: LogSwitches,
        progress: dict[str, Progress],
        options: Request,
    ) -> dict[str, Any]:
        prefix, metafile = self._keys(spec, options)
        mine = progress.get(spec.name, Progress())
        try:
            info: os.stat_result | None = self._source(spec).path.stat()
        except (FileNotFoundError, KeyError):
            info = None
        size = info.st_size if info is not None else 0
        rotated = (
            info is not None
            and mine.inode is not None
            and (mine.inode != info.st_ino or mine.offset > size)
        )
        published = 0 if rotated else mine.offset
        if spec.type is LogType.USER and not switches.is_on(spec.name):
            status = LogStatus.DISABLED
        elif spec.name in switches.pending_restart:
            status = LogStatus.RESTART_REQUIRED
        elif info is None:
            status = LogStatus.UNAVAILABLE if spec.type is LogType.SYS else LogStatus.ENABLED
        elif rotated:
            status = LogStatus.ROTATED
        elif mine.chunks == 0 and published == 0:
            status = LogStatus.READY if size else LogStatus.ENABLED
        elif published >= size:
            status = LogStatus.PUBLISHED
        else:
            status = LogStatus.PARTIAL
        return {
            "name": spec.name,
            "type": spec.type.value,
            "status": status.value,
            "published": published,
            "pending": max(0, size - published),
            "container": options.container,
            "prefix": prefix,
            "metafile": metafile,
        }

    # -- state -----------------------------------------------------------------------------------

    def _collect(self) -> None:
        collect = getattr(self._datastore(), "collect_logs", None)
        if collect is None:
            return
        try:
            collect()
        except Exception as exc:  # the engine may be down: show what was collected before
            LOG.warning("could not collect the engine's in-memory logs: %s", exc)

    def _secret(self) -> str | None:
        try:
            return (self.layout.secrets_dir / "os_admin.password").read_text().strip() or None
        except OSError:
            return None

    def _load(self) -> dict[str, Progress]:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            LOG.warning("ignoring unreadable %s: %s", self._state_path, exc)
            return {}
        found: dict[str, Progress] = {}
        for name, item in (data if isinstance(data, dict) else {}).items():
            if isinstance(item, dict):
                try:
                    found[str(name)] = Progress(**item)
                except TypeError:
                    continue
        return found

    def _save(self, progress: dict[str, Progress]) -> None:
        document = {name: asdict(item) for name, item in sorted(progress.items())}
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_private_file(self._state_path, text, self._owner, mode=0o640)


# --- reading a source -----------------------------------------------------------------------------


def _last_line_end(path: Path, start: int, end: int) -> int:
    """The offset just after the last newline in ``path[start:end]`` (``start`` if none): a
    line still being written is published next time, whole."""
    if end <= start:
        return start
    with path.open("rb") as handle:
        position = end
        while position > start:
            size = min(_READ_BLOCK, position - start)
            handle.seek(position - size)
            block = handle.read(size)
            index = block.rfind(b"\n")
            if index >= 0:
                return position - size + index + 1
            position -= size
    return start


def _lines(path: Path, start: int, end: int) -> Iterator[str]:
    """The whole lines of ``path[start:end]``, each with its newline."""
    stop = _last_line_end(path, start, end)
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = stop - start
        while remaining > 0:
            line = handle.readline(remaining)
            if not line:
                break
            remaining -= len(line)
            yield line.decode("utf-8", errors="replace")


#: A PostgreSQL server log line that starts an entry (``log_line_prefix`` = ``%m [%p] ...``).
_PG_ENTRY = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[\d+\] ")
_PG_STATEMENT = re.compile(r"\bLOG: {2}(?:statement|execute [^:]*):")
_PG_DURATION = re.compile(r"\bLOG: {2}duration: ")
_PG_PROCESS = re.compile(r" \[\d+\] ")


def _entries(lines: Iterable[str]) -> Iterator[str]:
    """PostgreSQL server log entries: a prefixed line and the continuation lines after it."""
    entry: list[str] = []
    for line in lines:
        if _PG_ENTRY.match(line) and entry:
            yield "".join(entry)
            entry = []
        entry.append(line)
    if entry:
        yield "".join(entry)


def _view_lines(source: LogSource, start: int, end: int) -> Iterator[str]:
    lines = _lines(source.path, start, end)
    if source.view is None:
        yield from lines
        return
    if source.view == "postgresql-statements":
        pattern = _PG_STATEMENT
    elif source.view == "postgresql-durations":
        pattern = _PG_DURATION
    else:  # pragma: no cover - views are the datastores' own constants
        raise BadRequest(f"Unknown log view {source.view!r}.")
    # With both logs on, PostgreSQL writes a statement once: in its "statement:" entry, and
    # the "duration:" entry after it names none; the durations view puts it back.
    last_statement: dict[str, str] = {}
    for entry in _entries(lines):
        first = entry.split("\n", 1)[0]
        process = _PG_PROCESS.search(first)
        statement = _PG_STATEMENT.search(first)
        if process is not None and statement is not None:
            last_statement[process.group(0)] = entry[statement.end() :]
        if pattern is _PG_DURATION and pattern.search(first) and "statement:" not in first:
            known = last_statement.pop(process.group(0), None) if process else None
            if known is not None:
                yield first + "  statement:" + known
                continue
        if pattern.search(first):
            yield entry


def _chunks(
    source: LogSource, start: int, end: int, limit: int, secret: str | None
) -> Iterator[str]:
    """The text of ``source[start:end]`` in pieces of at most ``limit`` bytes, split between
    lines (a single longer line is cut)."""
    piece: list[str] = []
    size = 0
    for text in _view_lines(source, start, end):
        if secret:
            text = text.replace(secret, "***")
        encoded = len(text.encode("utf-8"))
        if piece and size + encoded > limit:
            yield "".join(piece)
            piece, size = [], 0
        while encoded > limit:
            cut = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
            yield cut
            text = text[len(cut) :]
            encoded = len(text.encode("utf-8"))
        if text:
            piece.append(text)
            size += encoded
    if piece:
        yield "".join(piece)
