"""One typed settings object for every Coffer process.

Loaded from ``coffer.conf`` (INI, Trove option names where the meaning is the same) and then from
environment variables ``COFFER_<SECTION>__<OPTION>`` (``COFFER_DEFAULT__BIND_PORT=9000``,
``COFFER_DATABASE__CONNECTION=postgresql+psycopg://...``). Unknown sections and keys are rejected,
and every problem is reported at once in a ``ConfigError``. With no file at all the defaults give a
working single-machine Coffer.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from coffer.errors import ConfigError

ENV_PREFIX = "COFFER_"


def default_state_dir() -> Path:
    """Where Coffer keeps its state when ``state_dir`` is not set.

    As root the engines run as an unprivileged user that must reach instance directories, so the
    state lives in ``/var/lib/coffer`` rather than under root's private home.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/coffer")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "coffer"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DefaultSection(_Section):
    """``[DEFAULT]``: service-wide options."""

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Directory for the control DB, keys, the embedded bus and instance volumes.",
    )
    bind_host: str = Field("127.0.0.1", description="Address the API listens on.")
    bind_port: int = Field(8779, ge=1, le=65535, description="Port the API listens on.")
    public_endpoint: str | None = Field(
        None, description="Base URL clients should use, if it differs from bind_host:bind_port."
    )
    region_name: str = Field("RegionOne", description="Region advertised in the catalog.")
    transport_url: str = Field(
        "embedded://",
        description=(
            "Message bus. 'embedded://' runs a private redis-server on a unix socket in state_dir; "
            "'rabbit://user:pass@host:5672/vhost' uses RabbitMQ; 'redis://...' an external Redis."
        ),
    )
    master_key_file: Path | None = Field(
        None,
        description="File with the 32-byte master key (base64) that wraps per-instance keys. "
        "Default: <state_dir>/master.key, created on first start with mode 0600.",
    )
    max_instances_per_tenant: int = Field(10, ge=-1)
    max_ram_per_tenant: int = Field(-1, ge=-1)
    max_volumes_per_tenant: int = Field(40, ge=-1)
    max_backups_per_tenant: int = Field(50, ge=-1)
    max_accepted_volume_size: int = Field(10, ge=1, description="Largest volume (GB) accepted.")
    agent_heartbeat_expiry: int = Field(
        90, ge=5, description="Seconds without a heartbeat before a guest is treated as gone."
    )
    agent_heartbeat_interval: float = Field(
        10.0, gt=0, description="Seconds between a guest agent's heartbeats."
    )
    agent_call_low_timeout: float = Field(15.0, gt=0)
    agent_call_high_timeout: float = Field(180.0, gt=0)
    usage_timeout: int = Field(
        600, ge=10, description="Seconds a create may take before the instance goes to ERROR."
    )
    instances_page_size: int = Field(20, ge=1, le=1000)
    databases_page_size: int = Field(20, ge=1, le=1000)
    users_page_size: int = Field(20, ge=1, le=1000)
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")


class DatabaseSection(_Section):
    """``[database]``: the control DB."""

    connection: str | None = Field(
        None,
        description="SQLAlchemy URL of the control DB. Default: SQLite file in state_dir.",
    )


class ComputeSection(_Section):
    """``[compute]``: where instances run."""

    driver: str = Field("local", description="Compute driver short name.")
    private_pool: str = Field(
        "127.10.0.0/16", description="CIDR from which each instance gets its private address."
    )
    public_pool: str = Field(
        "127.20.0.0/16", description="CIDR for public addresses (access.is_public)."
    )
    engine_user: str | None = Field(
        None,
        description="Unprivileged OS user that runs guest agents and engines. Default: 'coffer' "
        "when running as root, else the current user.",
    )
    guest_restart_backoff_max: float = Field(
        10.0, gt=0, description="Longest pause before a dead guest agent is restarted."
    )


class IdentitySection(_Section):
    """``[identity]``: the embedded Keystone v3 subset."""

    token_expiration: int = Field(86400, ge=60, description="Token lifetime in seconds.")
    admin_project: str = Field("admin")
    admin_user: str = Field("admin")
    demo_project: str = Field("demo")
    demo_user: str = Field("demo")


SECTIONS: dict[str, type[_Section]] = {
    "DEFAULT": DefaultSection,
    "database": DatabaseSection,
    "compute": ComputeSection,
    "identity": IdentitySection,
}


class Settings(BaseModel):
    """All of Coffer's options, one attribute per INI section."""

    model_config = ConfigDict(extra="forbid")

    default: DefaultSection
    database: DatabaseSection
    compute: ComputeSection
    identity: IdentitySection

    # -- derived values ----------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.default.state_dir

    @property
    def database_url(self) -> str:
        if self.database.connection:
            return self.database.connection
        return f"sqlite:///{self.state_dir / 'coffer.db'}"

    @property
    def master_key_path(self) -> Path:
        return self.default.master_key_file or self.state_dir / "master.key"

    @property
    def engine_user(self) -> str:
        if self.compute.engine_user:
            return self.compute.engine_user
        if os.geteuid() == 0:
            return "coffer"
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name

    @property
    def api_base_url(self) -> str:
        if self.default.public_endpoint:
            return self.default.public_endpoint.rstrip("/")
        host = self.default.bind_host
        if host in ("0.0.0.0", "::"):  # noqa: S104 - only used to build a reachable URL
            host = "127.0.0.1"
        return f"http://{host}:{self.default.bind_port}"


def _attr_name(section: str) -> str:
    return "default" if section == "DEFAULT" else section


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Read ``path`` (if given), then the environment, then ``overrides``; validate everything.

    Raises ``ConfigError`` listing every unknown key and every invalid value at once.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    problems: list[str] = []

    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError([f"config file {file} does not exist"])
        parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read(file)
        except configparser.Error as exc:
            raise ConfigError([f"{file}: {exc}"]) from exc
        for section in parser.sections():
            if section not in SECTIONS:
                problems.append(
                    f"[{section}] is not a known section (known: {', '.join(SECTIONS)})"
                )
                continue
            for key, value in parser.items(section):
                raw[section][key] = value

    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, option = key[len(ENV_PREFIX) :].partition("__")
        match = next((s for s in SECTIONS if s.lower() == section.lower()), None)
        if match is None:
            problems.append(f"environment variable {key}: unknown section {section!r}")
            continue
        raw[match][option.lower()] = value

    # COFFER_STATE_DIR is a short alias for COFFER_DEFAULT__STATE_DIR.
    if env.get("COFFER_STATE_DIR") and "state_dir" not in raw["DEFAULT"]:
        raw["DEFAULT"]["state_dir"] = env["COFFER_STATE_DIR"]

    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)

    sections: dict[str, _Section] = {}
    for name, model in SECTIONS.items():
        fields = model.model_fields
        for key in raw[name]:
            if key not in fields:
                hint = _did_you_mean(key, list(fields))
                problems.append(f"[{name}] {key}: unknown option{hint}")
        try:
            sections[_attr_name(name)] = model(
                **{k: v for k, v in raw[name].items() if k in fields}
            )
        except PydanticValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(part) for part in err["loc"])
                problems.append(f"[{name}] {loc}: {err['msg']}")
    if problems:
        raise ConfigError(problems)
    return Settings.model_validate(sections)


def _did_you_mean(word: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_options() -> list[tuple[str, str, str, str]]:
    """(section, option, default, description) for every option, for docs and ``coffer config``."""
    rows = []
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            default = "(computed)" if field.default_factory else repr(field.default)
            rows.append((section, name, default, field.description or ""))
    return rows


def options_markdown() -> str:
    """``docs/configuration.md``, generated from the settings models so it cannot drift."""
    lines = [
        "# Configuration",
        "",
        "Coffer reads one INI file (`--config coffer.conf` or `COFFER_CONFIG`), then environment",
        "variables `COFFER_<SECTION>__<OPTION>` (e.g. `COFFER_DEFAULT__BIND_PORT=9000`). With no",
        "file, the defaults below give a working single-machine Coffer. Unknown sections or",
        "options are refused at start, with every problem listed at once.",
        "",
        "Generated by `coffer manage config-reference`; do not edit by hand.",
    ]
    current = None
    for section, name, default, help_text in describe_options():
        if section != current:
            lines += ["", f"## [{section}]", "", "| option | default | meaning |", "|---|---|---|"]
            current = section
        lines.append(f"| `{name}` | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"
