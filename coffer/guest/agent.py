"""``coffer guestagent``: one per instance, beside its database server.

The agent is a level-triggered loop plus RPC endpoints. Each cycle it observes the engine, takes
at most one action (start an engine that should run but does not), logs one sentence when it acts,
and reports what it saw to the conductor. An unexpected exception never ends the loop. RPC
requests (sealed with this instance's key) arrive on ``guestagent.<instance id>``.

Local state lives in the instance's volume: ``guest.json`` (written by the compute driver, holds
the key), ``state/prepared`` once prepare has succeeded, and ``state/desired`` (``running`` or
``stopped``) so a restarted agent knows whether the engine should run.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coffer.bus.envelope import StaticKeyRing
from coffer.bus.rpc import RpcClient, RpcServer
from coffer.bus.topics import CONDUCTOR_TOPIC, guest_topic
from coffer.datastores.registry import DEFAULT_PORTS, plugin_class
from coffer.errors import CofferError, NotImplementedByDatastore
from coffer.guest.datastores.base import Datastore, EngineSpec
from coffer.guest.layout import InstanceLayout
from coffer.status import ServiceStatus

if TYPE_CHECKING:
    from coffer.guest.backup.worker import BackupWorker

LOG = logging.getLogger("coffer.guestagent")

#: How old the volume's measured size may be in a heartbeat. Measuring walks every file of the
#: volume (it is a directory, so ``statvfs`` cannot tell), which was most of an idle agent's CPU
#: at one walk per heartbeat; a change of the engine's status measures it again at once, and the
#: ``volume_stats`` call always measures.
VOLUME_REFRESH = 60.0

_DELEGATED = (
    "create_databases",
    "list_databases",
    "delete_database",
    "create_users",
    "list_users",
    "get_user",
    "update_user",
    "change_passwords",
    "delete_user",
    "grant_access",
    "list_access",
    "revoke_access",
    "enable_root",
    "disable_root",
    "is_root_enabled",
    "volume_stats",
)


class GuestAgent:
    """The agent of one instance. Build with a ``guest.json`` path, then ``run()``."""

    rpc_methods = frozenset(
        {
            "prepare",
            "ping",
            "get_status",
            "stop_db",
            "start_db",
            "restart",
            "reconfigure",
            "apply_overrides",
            "create_backup",
            "backup_status",
            "restore",
            "restore_status",
            "guest_log_list",
            "guest_log_action",
            *_DELEGATED,
        }
    )

    def __init__(self, config_path: Path) -> None:
        config = json.loads(config_path.read_text())
        self.instance_id: str = config["instance_id"]
        self.manager: str = config["manager"]
        self._key = base64.b64decode(config["key"])
        self.url: str = config["transport_url"]
        self.interval = float(config.get("heartbeat_interval", 10.0))
        self.layout = InstanceLayout(config_path.parent)
        self.spec = engine_spec(self.layout, self.manager, config)
        self.datastore: Datastore = plugin_class(self.manager)(self.spec)
        self._state_dir = self.layout.root / "state"
        self._state_dir.mkdir(exist_ok=True)
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._action_lock = threading.Lock()
        self._conductor = RpcClient(
            self.url, CONDUCTOR_TOPIC, self.instance_id, self._key, sender=self.instance_id
        )
        self._server = RpcServer(
            self.url,
            guest_topic(self.instance_id),
            self,
            StaticKeyRing({self.instance_id: self._key}),
            workers=2,
        )
        self._last_report_error = 0.0
        self._backup_worker: BackupWorker | None = None
        #: The last measured volume size, when it was measured and the status reported with it.
        self._volume: dict[str, int] | None = None
        self._volume_at = 0.0
        self._volume_status: ServiceStatus | None = None

    @property
    def _backups(self) -> BackupWorker:
        """Backups and restores run in background threads (``coffer.guest.backup.worker``), so
        the loop keeps reporting heartbeats while they stream. Made on first use: an agent that
        never backs up never loads the backup pipeline."""
        if self._backup_worker is None:
            from coffer.guest.backup.worker import BackupWorker

            self._backup_worker = BackupWorker(
                lambda: self.datastore,
                self._state_dir,
                self._report_backup,
                lambda: self.prepared,
                archive_report=self._report_archive,
                restore_report=self._report_restore,
            )
        return self._backup_worker

    # -- local state -----------------------------------------------------------------------------

    @property
    def prepared(self) -> bool:
        return (self._state_dir / "prepared").exists()

    def _desired(self) -> str:
        path = self._state_dir / "desired"
        return path.read_text().strip() if path.exists() else "running"

    def _set_desired(self, value: str) -> None:
        tmp = self._state_dir / "desired.tmp"
        tmp.write_text(value)
        tmp.replace(self._state_dir / "desired")

    # -- RPC endpoints -----------------------------------------------------------------------------

    def ping(self) -> str:
        return "pong"

    def prepare(
        self,
        databases: list[dict[str, Any]],
        users: list[dict[str, Any]],
        overrides: dict[str, Any] | None = None,
        restart_required: list[str] | None = None,
        warm: bool = False,
    ) -> str:
        """Initialise, configure and start the engine, then create databases and users, and
        apply ``overrides`` (the values of the configuration group the instance is created
        with) before it is reported ready (``_initial_overrides``).

        Idempotent: a repeated prepare (the taskmanager retrying after a crash) only makes sure
        the engine runs. ``warm``: the instance is built for the warm pool
        (``taskmanager.warm_pool``), started with no users; the prepare of the create that takes
        it over adds them then, with the engine running (for datastores whose prepare can run
        again: Redis).
        """
        if self._backup_worker is not None:  # none yet: no restore can be running
            self._backup_worker.ensure_not_restoring()
        warm_marker = self._state_dir / "warm"
        with self._action_lock:
            if not self.prepared:
                LOG.info(
                    "preparing %s engine%s", self.manager, " as a warm instance" if warm else ""
                )
                self._prepare_engine(databases, users, overrides, restart_required)
                if warm:
                    warm_marker.touch()
                (self._state_dir / "prepared").touch()
                self._set_desired("running")
            elif not warm and warm_marker.exists():
                LOG.info("a warm instance taken over: adding its databases and users")
                self._prepare_engine(databases, users, overrides, restart_required)
                warm_marker.unlink()
            elif not self.datastore.is_running():
                self.datastore.start()
            status = self.datastore.status()
        self._report(status)
        return status.value

    def _prepare_engine(
        self,
        databases: list[dict[str, Any]],
        users: list[dict[str, Any]],
        overrides: dict[str, Any] | None,
        restart_required: list[str] | None,
    ) -> None:
        try:
            self.datastore.prepare(databases, users)
            if overrides:
                self._initial_overrides(overrides, restart_required or [])
        except Exception as exc:
            self._report(ServiceStatus.FAILED, message=str(exc))
            raise

    def _initial_overrides(self, values: dict[str, Any], restart_required: list[str]) -> None:
        """Apply a new instance's configuration group; if some values take effect only at a
        start, restart the engine once now, so it is ready with every value and nothing waits
        for a restart after the instance is ACTIVE. (The caller holds the action lock.)"""
        handler = getattr(self.datastore, "overrides", None)
        if handler is None:
            raise NotImplementedByDatastore(
                f"The {self.manager} datastore does not support configuration groups."
            )
        result = handler.apply(values, restart_required)
        if result["pending_restart"]:
            LOG.info("restarting the new engine once for %s", ", ".join(result["pending_restart"]))
            self.datastore.restart()
            result = handler.apply(values, restart_required)
            if result["pending_restart"]:
                raise RuntimeError(
                    "The engine did not take " + ", ".join(result["pending_restart"]) + " at start."
                )

    def get_status(self) -> str:
        return self.datastore.status().value

    def stop_db(self) -> None:
        with self._action_lock:
            self._set_desired("stopped")
            self.datastore.stop()
        self._report(self.datastore.status())

    def start_db(self) -> None:
        with self._action_lock:
            self._set_desired("running")
            self.datastore.start()
        self._report(self.datastore.status())

    def restart(self) -> None:
        with self._action_lock:
            self.datastore.stop()
            self._set_desired("running")
            self.datastore.start()
        self._report(self.datastore.status())

    def reconfigure(self) -> dict[str, Any]:
        """Read ``guest.json`` again (the compute driver rewrote it for a resize or an access
        change) and make the engine match it: restart it once when its addresses or sizing
        changed, else let it pick up what it can while running (PostgreSQL reloads its access
        rules and volume-bound settings). Returns ``{"restarted", "status"}``."""
        config = json.loads(self.layout.guest_config.read_text())
        spec = engine_spec(self.layout, self.manager, config)
        with self._action_lock:
            old = self.spec
            restart = (old.bind_addresses, old.memory_mb, old.vcpus) != (
                spec.bind_addresses,
                spec.memory_mb,
                spec.vcpus,
            )
            datastore = plugin_class(self.manager)(spec)
            if restart:
                LOG.info("addresses or sizing changed; restarting the engine to apply them")
                self.datastore.stop()
            self.spec, self.datastore = spec, datastore
            # The volume may have grown: the next heartbeat measures it again instead of
            # reporting the old total over the one the taskmanager recorded.
            self._volume = None
            if self.prepared and self._desired() == "running":
                datastore.start()  # after a stop: a fresh start; else adopts (and reloads)
            status = datastore.status()
        self._report(status)
        return {"restarted": restart, "status": status.value}

    def apply_overrides(
        self, values: dict[str, Any], restart_required: list[str]
    ) -> dict[str, Any]:
        """Run the engine with exactly ``values`` (a configuration group's; none after a detach):
        see ``coffer.guest.config.overrides.OverridesHandler.apply``."""
        handler = getattr(self.datastore, "overrides", None)
        if handler is None:
            raise NotImplementedByDatastore(
                f"The {self.manager} datastore does not support configuration groups."
            )
        with self._action_lock:
            result: dict[str, Any] = handler.apply(values, restart_required)
        return result

    def create_backup(
        self,
        backup_id: str,
        storage: dict[str, Any],
        storage_key: str,
        backup_key: str,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        archive: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start taking a backup in the background (see ``BackupWorker.start_backup``); with
        ``archive``, also keep archiving the engine's log there from now on."""
        result = self._backups.start_backup(
            backup_id, storage, storage_key, backup_key, parent, metadata, archive
        )
        if archive is not None:
            # The engine's configuration names the archive's settings (archive_timeout): a
            # running engine rewrites and reloads it if they changed, a stopped one stays so.
            with self._action_lock:
                if self.datastore.is_running():
                    self.datastore.start()
        return result

    def backup_status(self, backup_id: str) -> dict[str, Any]:
        return self._backups.backup_status(backup_id)

    def restore(
        self,
        backups: list[dict[str, Any]],
        storage: dict[str, Any],
        pitr: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start filling the empty data directory from a backup chain (recovered to a point in
        time with ``pitr``), before ``prepare``."""
        return self._backups.start_restore(backups, storage, pitr)

    def restore_status(self) -> dict[str, Any]:
        return self._backups.restore_status()

    def _report_archive(self, extent: dict[str, Any]) -> None:
        self._conductor.cast(
            "update_archive", instance_id=self.instance_id, sent_at=time.time(), **extent
        )

    def _report_restore(self, fields: dict[str, Any]) -> None:
        self._conductor.cast(
            "update_restore", instance_id=self.instance_id, sent_at=time.time(), **fields
        )

    def guest_log_list(self, **options: Any) -> list[dict[str, Any]]:
        """The instance's logs (see ``coffer.guest.logs``)."""
        result: list[dict[str, Any]] = self._guest_logs().list(**options)
        return result

    def guest_log_action(self, name: str, **request: Any) -> dict[str, Any]:
        """Show, switch, publish or discard one log (see ``coffer.guest.logs``)."""
        result: dict[str, Any] = self._guest_logs().action(name, **request)
        return result

    def _guest_logs(self) -> Any:
        # Imported on first use: most agents never serve a log call.
        from coffer.guest.logs import GuestLogs

        owner = getattr(self.datastore, "_owner", None)
        return GuestLogs(
            self.instance_id,
            self.manager,
            lambda: self.datastore,
            self.layout,
            self._action_lock,
            owner,
        )

    def _report_backup(self, backup_id: str, fields: dict[str, Any]) -> None:
        self._conductor.cast(
            "update_backup",
            instance_id=self.instance_id,
            backup_id=backup_id,
            sent_at=time.time(),
            **fields,
        )

    def __getattr__(self, name: str) -> Any:
        # Database/user/root calls go straight to the datastore plugin.
        if name in _DELEGATED:
            return getattr(self.datastore, name)
        raise AttributeError(name)

    # -- the loop ----------------------------------------------------------------------------------

    def _volume_for_report(self, status: ServiceStatus) -> dict[str, int] | None:
        """The volume's size for a heartbeat: measured again when older than
        ``VOLUME_REFRESH`` or when the engine's status changed since, else the last figure."""
        now = time.monotonic()
        if (
            self._volume is None
            or status is not self._volume_status
            or now - self._volume_at >= VOLUME_REFRESH
        ):
            try:
                self._volume = self.datastore.volume_stats()
            except Exception:
                self._volume = None
            self._volume_at, self._volume_status = now, status
        return self._volume

    def _report(self, status: ServiceStatus, message: str | None = None) -> None:
        volume = self._volume_for_report(status)
        try:
            self._conductor.cast(
                "heartbeat",
                instance_id=self.instance_id,
                status=status.value,
                sent_at=time.time(),
                volume=volume,
                message=message,
            )
        except CofferError as exc:
            # The bus may be down (control plane restarting); the next cycle reports again.
            now = time.monotonic()
            if now - self._last_report_error > 60:
                LOG.warning("cannot report to the conductor: %s", exc)
                self._last_report_error = now

    def cycle(self) -> None:
        """Observe, act at most once, report."""
        if not self.prepared:
            return  # nothing to look after until prepare has run
        with self._action_lock:
            status = self.datastore.status()
            if self._desired() == "running" and status in (
                ServiceStatus.SHUTDOWN,
                ServiceStatus.CRASHED,
            ):
                LOG.info("engine is %s but should run; starting it", status.value)
                self._report(status)
                try:
                    self.datastore.start()
                except Exception as exc:
                    LOG.error("could not start the engine: %s", exc)
                status = self.datastore.status()
        self._report(status)

    def run(self) -> None:
        self._server.start()
        LOG.info("guest agent for instance %s serving", self.instance_id)
        if (self._state_dir / "archive.json").exists():  # archiving was enabled by a backup
            try:
                self._backups.resume_archiving()
            except Exception:
                LOG.exception("could not resume log archiving")
        while not self._stop.is_set():
            try:
                self.cycle()
            except Exception:
                LOG.exception("guest agent cycle failed; continuing")
            self._poke.wait(timeout=self.interval)
            self._poke.clear()
        self.shutdown()

    def request_stop(self, *_: Any) -> None:
        self._stop.set()
        self._poke.set()

    def shutdown(self) -> None:
        """Stop serving and stop the engine (the instance is being deleted or the host stops)."""
        LOG.info("guest agent stopping")
        self._server.stop()
        if self._backup_worker is not None:
            self._backup_worker.stop_archiving()
        try:
            with self._action_lock:
                self.datastore.stop()
        except Exception:
            LOG.exception("engine did not stop cleanly")
        try:
            self._report(ServiceStatus.SHUTDOWN)
        finally:
            self._conductor.close()


def engine_spec(layout: InstanceLayout, manager: str, config: dict[str, Any]) -> EngineSpec:
    """The engine's spec from ``guest.json``: the instance's addresses (private, then public),
    its flavor, its volume and the networks clients may connect from."""
    addresses = config["addresses"]
    binds = [a for a in (addresses.get("private"), addresses.get("public")) if a]
    flavor = config["flavor"]
    return EngineSpec(
        layout=layout,
        bind_addresses=binds,
        port=DEFAULT_PORTS[manager],
        memory_mb=int(flavor["ram"]),
        vcpus=int(flavor["vcpus"]),
        volume_size_gb=int(config["volume_size_gb"]),
        allowed_cidrs=tuple(config.get("allowed_cidrs") or ()),
        template_dir=Path(config["template_dir"]) if config.get("template_dir") else None,
    )


def main(config_path: Path) -> None:
    agent = GuestAgent(config_path)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    agent.run()


USAGE = "usage: python -m coffer.guest.agent --config <the instance's guest.json>"


def cli(argv: list[str]) -> int:
    """``python -m coffer.guest.agent --config PATH``: what the compute driver runs.

    The same agent as ``coffer guestagent``, without the command-line framework and the
    control plane's settings model, which an agent never needs: an idle agent is one of many
    per host, so what it imports is what it costs (see ``tests/unit/test_agent_imports.py``).
    """
    if len(argv) != 2 or argv[0] != "--config":
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if not path.is_file():
        print(f"{USAGE}\n{path} is not a file", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # forked from a supervisor (see coffer.compute.zygote): not its handlers
    )
    logging.getLogger("kombu").setLevel(logging.WARNING)
    main(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
