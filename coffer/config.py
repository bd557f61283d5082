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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

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
    max_instances_per_tenant: int = Field(
        10, ge=-1, description="Default quota: instances per project (-1: unlimited)."
    )
    max_ram_per_tenant: int = Field(
        -1,
        ge=-1,
        description="Default quota: RAM (MB) of all instances per project (-1: unlimited).",
    )
    max_volumes_per_tenant: int = Field(
        40, ge=-1, description="Default quota: volume GB per project (-1: unlimited)."
    )
    max_backups_per_tenant: int = Field(
        50, ge=-1, description="Default quota: backups per project (-1: unlimited)."
    )
    backup_archive_timeout: int = Field(
        60,
        ge=5,
        le=3600,
        description="Seconds after which a PostgreSQL instance closes a WAL file that holds "
        "changes, so its log archive (and the point-in-time restore window) lags at most this "
        "much. Takes effect at each instance's next backup.",
    )
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
    policy_file: Path | None = Field(
        None,
        description="YAML file overriding API policy rules (`coffer manage policy sample` prints "
        "the defaults). Default: <state_dir>/policy.yaml when that file exists.",
    )
    http_get_rate: int = Field(
        200, ge=0, description="GET requests per minute allowed per project (0: no limit)."
    )
    http_post_rate: int = Field(
        200, ge=0, description="POST requests per minute allowed per project (0: no limit)."
    )
    http_put_rate: int = Field(
        200,
        ge=0,
        description="PUT and PATCH requests per minute allowed per project (0: no limit).",
    )
    http_delete_rate: int = Field(
        200, ge=0, description="DELETE requests per minute allowed per project (0: no limit)."
    )
    http_mgmt_post_rate: int = Field(
        200,
        ge=0,
        description="POST requests to /mgmt per minute allowed per project (0: no limit).",
    )
    guest_log_container_name: str = Field(
        "database_logs",
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$",
        description="Top-level folder of the backup storage that published guest logs go to "
        "(Trove's Swift container for logs).",
    )
    guest_log_limit: int = Field(
        1_000_000,
        ge=1024,
        le=100_000_000,
        description="Most bytes in one published piece of a guest log.",
    )
    guest_log_long_query_time: int = Field(
        1000,
        ge=0,
        description="Milliseconds a statement must run to go to a slow_query log (set when the "
        "log is enabled).",
    )


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
    redis_warm_pool: int = Field(
        0,
        ge=0,
        le=64,
        description="Redis instances kept built and running, with no users, for creates to "
        "take over (docs/architecture.md, 'The warm pool'). A create with warm_pool_flavor, "
        "warm_pool_volume_size, default access and no configuration group or backup is then "
        "ready as soon as its users exist. 0 turns the pool off.",
    )
    warm_pool_flavor: str = Field(
        "6",
        min_length=1,
        description="Flavor id the warm instances are built with (the default 6 is d1.micro).",
    )
    warm_pool_volume_size: int = Field(
        1, ge=1, description="Volume size in GB the warm instances are built with."
    )


class IdentitySection(_Section):
    """``[identity]``: the embedded Keystone v3 subset."""

    token_expiration: int = Field(86400, ge=60, description="Token lifetime in seconds.")
    token_cache_time: int = Field(
        5,
        ge=0,
        le=300,
        description="Seconds an API process reuses a token it validated before checking its "
        "user, project and roles in the control DB again (0: no cache). A change made through "
        "another process (a disabled user, a removed role) refuses the token within this long; "
        "one made through the same process, at once.",
    )
    admin_project: str = Field("admin")
    admin_user: str = Field("admin")
    demo_project: str = Field("demo")
    demo_user: str = Field("demo")


_URL_PATTERN = r"^https?://[^\s/]+"


class KeystoneAuthtokenSection(_Section):
    """``[keystone_authtoken]``: validate tokens with an external Keystone (keystonemiddleware).

    Option names and meanings are keystonemiddleware's, so a Trove ``[keystone_authtoken]``
    section can be copied in. Setting ``auth_url`` switches Coffer to the external Keystone: the
    embedded identity routes are then not served.
    """

    www_authenticate_uri: str | None = Field(
        None,
        pattern=_URL_PATTERN,
        description="Public Keystone URL clients authenticate against (e.g. "
        "http://keystone:5000/v3), named by 'coffer up' and in 401 errors. Default: auth_url.",
    )
    auth_url: str | None = Field(
        None,
        pattern=_URL_PATTERN,
        description="Keystone URL for Coffer's own service credentials. Setting it turns on "
        "external Keystone mode.",
    )
    auth_type: str = Field(
        "password",
        pattern="^(v3)?password$",
        description="keystoneauth plugin for the service credentials ('password' or 'v3password').",
    )
    username: str | None = Field(None, description="Coffer's service user in Keystone.")
    password: SecretStr | None = Field(
        None,
        description="That user's password (prefer COFFER_KEYSTONE_AUTHTOKEN__PASSWORD to "
        "keep it out of the file).",
    )
    project_name: str | None = Field(
        None, description="Project the service user's token is scoped to (usually 'service')."
    )
    user_domain_name: str | None = Field("Default", description="Domain of the service user.")
    user_domain_id: str | None = Field(None, description="Domain id of the service user.")
    project_domain_name: str | None = Field("Default", description="Domain of the service project.")
    project_domain_id: str | None = Field(None, description="Domain id of the service project.")
    region_name: str | None = Field(
        None, description="Region of the identity endpoint used to validate tokens."
    )
    interface: str = Field(
        "internal",
        pattern="^(public|internal|admin)$",
        description="Which identity endpoint of the catalog validates tokens.",
    )
    service_type: str = Field(
        "database",
        description="This service's type in the catalog; application credentials with access "
        "rules are checked against it.",
    )
    cafile: Path | None = Field(None, description="CA bundle for HTTPS to Keystone.")
    certfile: Path | None = Field(None, description="Client certificate for HTTPS to Keystone.")
    keyfile: Path | None = Field(None, description="Client key for HTTPS to Keystone.")
    insecure: bool = Field(False, description="Skip TLS verification of Keystone (tests only).")
    http_connect_timeout: int | None = Field(
        None, ge=1, description="Seconds to wait for Keystone to answer."
    )
    http_request_max_retries: int = Field(
        3, ge=0, description="Times to retry a failed connection to Keystone."
    )
    token_cache_time: int = Field(
        300,
        ge=-1,
        description="Seconds a validated token is cached before Keystone is asked again "
        "(0 or -1: no cache). A revoked token stays usable for at most this long.",
    )
    memcached_servers: str | None = Field(
        None,
        description="Comma-separated host:port list of memcached servers for the token cache. "
        "Default: an in-process cache.",
    )
    memcache_security_strategy: str = Field(
        "None",
        pattern="^(None|MAC|ENCRYPT)$",
        description="Protect cached tokens in memcached: None, MAC or ENCRYPT.",
    )
    memcache_secret_key: SecretStr | None = Field(
        None, description="Key for memcache_security_strategy MAC or ENCRYPT."
    )

    @property
    def enabled(self) -> bool:
        """True when tokens are validated by an external Keystone instead of the embedded one."""
        return self.auth_url is not None

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> KeystoneAuthtokenSection:
        if self.enabled:
            missing = [
                name for name in ("username", "password", "project_name") if not getattr(self, name)
            ]
            if missing:
                raise PydanticCustomError(
                    "keystone_incomplete",
                    "auth_url is set, so Coffer validates tokens with Keystone and needs its "
                    "service credentials: set {missing}",
                    {"missing": ", ".join(missing)},
                )
        if self.memcache_security_strategy != "None" and not self.memcache_secret_key:
            raise PydanticCustomError(
                "keystone_incomplete",
                "memcache_security_strategy is {strategy}: set memcache_secret_key too",
                {"strategy": self.memcache_security_strategy},
            )
        return self


_MIB = 1 << 20


class StorageSection(_Section):
    """``[storage]``: where backups are kept (drivers in ``coffer/storage/``)."""

    driver: str = Field(
        "file", description="Backup storage driver: 'file' (a directory), 's3' or 'swift'."
    )
    file_directory: Path | None = Field(
        None,
        description="Directory the file driver keeps backups in. Default: <state_dir>/backups.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        pattern=_URL_PATTERN,
        description="S3 endpoint (e.g. https://s3.example.com, or a Swift proxy serving S3). "
        "Default: AWS for s3_region_name.",
    )
    s3_region_name: str = Field("us-east-1", description="S3 region (signature scope).")
    s3_bucket: str | None = Field(
        None, description="Bucket backups are stored in; it must exist. Required for s3."
    )
    s3_access_key_id: str | None = Field(
        None,
        description="S3 access key id. Unset (with s3_secret_access_key): boto3 looks in the "
        "environment, ~/.aws and the instance role.",
    )
    s3_secret_access_key: SecretStr | None = Field(
        None,
        description="S3 secret key (prefer COFFER_STORAGE__S3_SECRET_ACCESS_KEY to keep it out "
        "of the file).",
    )
    s3_addressing_style: str = Field(
        "path",
        pattern="^(path|virtual|auto)$",
        description="'path' (bucket in the URL path; what S3-compatible stores expect), "
        "'virtual' (bucket in the host name) or 'auto'.",
    )
    s3_verify: bool = Field(True, description="Verify the S3 endpoint's TLS certificate.")
    s3_ca_bundle: Path | None = Field(None, description="CA bundle for the S3 endpoint.")
    s3_multipart_threshold: int = Field(
        64 * _MIB,
        ge=5 * _MIB,
        description="Backups larger than this many bytes are uploaded in parts.",
    )
    s3_multipart_chunksize: int = Field(
        16 * _MIB,
        ge=5 * _MIB,
        le=5 * 1024 * _MIB,
        description="Size of one part in bytes (S3 allows 5 MiB to 5 GiB and 10,000 parts, so "
        "16 MiB parts cap a backup at about 156 GiB).",
    )
    s3_max_concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description="Parts uploaded at once; about this many plus two parts are held in memory.",
    )
    s3_max_attempts: int = Field(5, ge=1, description="Attempts per S3 request (retries + 1).")
    swift_auth_url: str | None = Field(
        None,
        pattern=_URL_PATTERN,
        description="Keystone v3 URL (e.g. http://keystone:5000/v3) or, with "
        "swift_auth_version 1, Swift's auth URL (http://proxy:8080/auth/v1.0). Required for "
        "swift.",
    )
    swift_auth_version: str = Field(
        "3", pattern="^(1|3)$", description="3: Keystone v3; 1: Swift's own auth (tempauth)."
    )
    swift_user: str | None = Field(
        None, description="Swift user (v1: 'account:user'). Required for swift."
    )
    swift_key: SecretStr | None = Field(
        None,
        description="That user's password or key (prefer COFFER_STORAGE__SWIFT_KEY to keep it "
        "out of the file).",
    )
    swift_project_name: str | None = Field(
        None, description="Keystone project that owns the container (v3 only)."
    )
    swift_user_domain_name: str = Field("Default", description="Domain of swift_user (v3).")
    swift_project_domain_name: str = Field(
        "Default", description="Domain of swift_project_name (v3)."
    )
    swift_region_name: str | None = Field(
        None, description="Region whose object-store endpoint is used (v3)."
    )
    swift_interface: str = Field(
        "public",
        pattern="^(public|internal|admin)$",
        description="Which object-store endpoint of the catalog to use (v3).",
    )
    swift_container: str = Field(
        "database_backups",
        description="Container for backups (Trove's default); segments go to <container>_segments.",
    )
    swift_segment_size: int = Field(
        1024 * _MIB,
        ge=_MIB,
        le=5 * 1024 * _MIB,
        description="Bytes per segment of a backup (Swift allows at most 5 GiB per segment "
        "and, by default, 1000 segments per object: 1 GiB segments cap a backup at 1000 GiB).",
    )
    swift_insecure: bool = Field(False, description="Skip TLS verification (tests only).")
    swift_cacert: Path | None = Field(None, description="CA bundle for Keystone and Swift.")
    swift_retries: int = Field(5, ge=0, description="Retries of a failed Swift request.")

    @model_validator(mode="after")
    def _complete_for_driver(self) -> StorageSection:
        missing: list[str] = []
        if self.driver == "s3":
            missing = [] if self.s3_bucket else ["s3_bucket"]
            if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
                missing.append("both s3_access_key_id and s3_secret_access_key (or neither)")
        elif self.driver == "swift":
            missing = [
                name
                for name in ("swift_auth_url", "swift_user", "swift_key")
                if not getattr(self, name)
            ]
            if self.swift_auth_version == "3" and not self.swift_project_name:
                missing.append("swift_project_name")
        if missing:
            raise PydanticCustomError(
                "storage_incomplete",
                "the {driver} backup storage driver needs {missing}",
                {"driver": self.driver, "missing": ", ".join(missing)},
            )
        return self


SECTIONS: dict[str, type[_Section]] = {
    "DEFAULT": DefaultSection,
    "database": DatabaseSection,
    "compute": ComputeSection,
    "identity": IdentitySection,
    "keystone_authtoken": KeystoneAuthtokenSection,
    "storage": StorageSection,
}


class Settings(BaseModel):
    """All of Coffer's options, one attribute per INI section."""

    model_config = ConfigDict(extra="forbid")

    default: DefaultSection
    database: DatabaseSection
    compute: ComputeSection
    identity: IdentitySection
    keystone_authtoken: KeystoneAuthtokenSection = Field(
        default_factory=lambda: KeystoneAuthtokenSection.model_validate({})
    )
    storage: StorageSection = Field(default_factory=lambda: StorageSection.model_validate({}))

    # -- derived values ----------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        # Absolute, because it is handed to guest agents that run in other directories.
        return self.default.state_dir.expanduser().absolute()

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
