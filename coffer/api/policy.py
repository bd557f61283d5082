"""Named policy rules: who may do what through the API.

Every API action has a rule named as in Trove (``instance:create``,
``instance:extension:user:create``, ``backup:index:all_projects``, ...) whose default allows the
roles ``admin`` (everything, in every project), ``member`` (its own project) and ``reader`` (look
at its own project, change nothing). Operators override rules in a YAML file (``[DEFAULT]
policy_file``, default ``<state_dir>/policy.yaml`` when present); ``coffer manage policy sample``
prints the defaults.

Rules use oslo.policy's language, so Trove operators' files read the same:

* ``role:<name>`` - the token holds that role; ``rule:<name>`` - another rule holds;
* ``<credential>:<value>`` - e.g. ``project_id:%(tenant)s``, where ``%(tenant)s`` is the target
  project (the project in the URL); credentials are ``project_id``, ``user_id`` and
  ``is_admin``;
* ``@`` (or an empty string) always, ``!`` never; ``and``, ``or``, ``not`` and parentheses.

Routes depend on ``authorize(rule)``: it authenticates the token, checks the URL's project,
counts the request against the project's rate limits, then enforces the rule, so every route goes
through one place. A denial is 403 ``forbidden`` naming the rule.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request

from coffer.api.context import (
    READ_METHODS,
    RequestContext,
    authenticate_request_async,
    get_services,
    public_base_url,
)
from coffer.api.errors import request_id_of
from coffer.config import Settings
from coffer.errors import ConfigError, Forbidden, ServiceUnavailable
from coffer.identity import AuthContext
from coffer.quotas import RateLimiter

LOG = logging.getLogger(__name__)

POLICY_FILE_NAME = "policy.yaml"


@dataclass(frozen=True)
class RuleDefault:
    """A rule's name, its default check, what it guards, and the requests it applies to."""

    name: str
    check: str
    description: str
    operations: tuple[str, ...] = ()


def _r(name: str, check: str, description: str, *operations: str) -> RuleDefault:
    return RuleDefault(name, check, description, operations)


# Operations are written below /v1.0/{tenant_id}, the prefix of every Trove route.
_I = "/instances/{instance_id}"
_U = f"{_I}/users/{{user}}"
_V = "/datastores/{datastore}/versions/{version}"
_MV = "/mgmt/datastores/versions/{version_id}/parameters"
_ADMIN = "rule:admin"
_OWNER = "rule:admin_or_owner"
_READER = "rule:admin_or_reader"
_ANY = "@"

#: Every rule Coffer knows, with its default. A name not listed here is refused in a policy file.
DEFAULT_RULES: tuple[RuleDefault, ...] = (
    # -- building blocks ---------------------------------------------------------------------
    _r("admin", "role:admin", "An administrator: every action, in every project."),
    _r(
        "project_member",
        "role:member and project_id:%(tenant)s",
        "A member of the project the request is about (the project in the URL).",
    ),
    _r(
        "project_reader",
        "(role:reader or role:member) and project_id:%(tenant)s",
        "A reader or member of the project the request is about.",
    ),
    _r("admin_or_owner", "rule:admin or rule:project_member", "An admin, or a project member."),
    _r("admin_or_reader", "rule:admin or rule:project_reader", "An admin, or a project reader."),
    _r("default", _OWNER, "Trove's rule for actions no other rule names."),
    # -- instances ---------------------------------------------------------------------------
    _r("instance:create", _OWNER, "Create an instance.", "POST /instances"),
    _r("instance:index", _READER, "List instances.", "GET /instances"),
    _r("instance:detail", _READER, "List instances with details.", "GET /instances/detail"),
    _r("instance:show", _READER, "Show an instance.", f"GET {_I}"),
    _r("instance:update", _OWNER, "Rename or change an instance.", f"PUT {_I}"),
    _r("instance:edit", _OWNER, "Change an instance (deprecated PATCH).", f"PATCH {_I}"),
    _r("instance:delete", _OWNER, "Delete an instance.", f"DELETE {_I}"),
    _r("instance:force_delete", _OWNER, "reset_status with force_delete.", f"POST {_I}/action"),
    _r("instance:reset_status", _ADMIN, "Reset an instance's status.", f"POST {_I}/action"),
    _r("instance:restart", _OWNER, "Restart an instance's database.", f"POST {_I}/action"),
    _r("instance:resize_flavor", _OWNER, "Resize an instance's flavor.", f"POST {_I}/action"),
    _r("instance:resize_volume", _OWNER, "Resize an instance's volume.", f"POST {_I}/action"),
    _r("instance:promote_to_replica_source", _OWNER, "Promote a replica.", f"POST {_I}/action"),
    _r("instance:eject_replica_source", _OWNER, "Eject a dead source.", f"POST {_I}/action"),
    _r("instance:backups", _READER, "List an instance's backups.", f"GET {_I}/backups"),
    _r("instance:configuration", _READER, "Show its configuration.", f"GET {_I}/configuration"),
    _r("instance:guest_log_list", _READER, "List an instance's logs.", f"GET {_I}/log"),
    _r(
        "instance:guest_log_action",
        _OWNER,
        "Show, enable, disable, publish or discard a log (Trove checks no rule here).",
        f"POST {_I}/log",
    ),
    _r(
        "instance:guest_log_contents",
        _READER,
        "Read a published log's text (a Coffer extension).",
        f"GET {_I}/log/{{name}}",
    ),
    # -- databases, users, access, root ------------------------------------------------------
    _r("instance:extension:database:index", _READER, "List databases.", f"GET {_I}/databases"),
    _r(
        "instance:extension:database:create",
        _OWNER,
        "Create databases (also with a new instance).",
        f"POST {_I}/databases",
        "POST /instances",
    ),
    _r(
        "instance:extension:database:show",
        _READER,
        "Show a database.",
        f"GET {_I}/databases/{{name}}",
    ),
    _r(
        "instance:extension:database:delete",
        _OWNER,
        "Drop a database.",
        f"DELETE {_I}/databases/{{name}}",
    ),
    _r("instance:extension:user:index", _READER, "List users.", f"GET {_I}/users"),
    _r(
        "instance:extension:user:create",
        _OWNER,
        "Create users (also with a new instance).",
        f"POST {_I}/users",
        "POST /instances",
    ),
    _r("instance:extension:user:show", _READER, "Show a user.", f"GET {_U}"),
    _r("instance:extension:user:update", _OWNER, "Change a user.", f"PUT {_U}"),
    _r("instance:extension:user:update_all", _OWNER, "Set passwords.", f"PUT {_I}/users"),
    _r("instance:extension:user:delete", _OWNER, "Delete a user.", f"DELETE {_U}"),
    _r("instance:extension:user_access:index", _READER, "List access.", f"GET {_U}/databases"),
    _r("instance:extension:user_access:update", _OWNER, "Grant access.", f"PUT {_U}/databases"),
    _r(
        "instance:extension:user_access:delete",
        _OWNER,
        "Revoke access.",
        f"DELETE {_U}/databases/{{db}}",
    ),
    _r("instance:extension:root:index", _READER, "Was root enabled?", f"GET {_I}/root"),
    _r("instance:extension:root:create", _OWNER, "Enable root.", f"POST {_I}/root"),
    _r("instance:extension:root:delete", _OWNER, "Disable root.", f"DELETE {_I}/root"),
    # -- backups -----------------------------------------------------------------------------
    _r("backup:index", _READER, "List the project's backups.", "GET /backups"),
    _r("backup:index:all_projects", _ADMIN, "List other projects' backups.", "GET /backups"),
    _r("backup:create", _OWNER, "Create a backup.", "POST /backups"),
    _r("backup:show", _READER, "Show a backup.", "GET /backups/{id}"),
    _r("backup:delete", _OWNER, "Delete a backup.", "DELETE /backups/{id}"),
    _r("backup_strategy:create", _OWNER, "Create a strategy.", "POST /backup_strategies"),
    _r("backup_strategy:index", _READER, "List strategies.", "GET /backup_strategies"),
    _r("backup_strategy:delete", _OWNER, "Delete strategies.", "DELETE /backup_strategies"),
    _r("backup_schedule:create", _OWNER, "Create a backup schedule.", "POST /backup_schedules"),
    _r("backup_schedule:index", _READER, "List backup schedules.", "GET /backup_schedules"),
    _r("backup_schedule:show", _READER, "Show a schedule.", "GET /backup_schedules/{id}"),
    _r("backup_schedule:update", _OWNER, "Change a schedule.", "PUT /backup_schedules/{id}"),
    _r("backup_schedule:delete", _OWNER, "Delete a schedule.", "DELETE /backup_schedules/{id}"),
    # -- configuration groups ----------------------------------------------------------------
    _r("configuration:index", _READER, "List groups.", "GET /configurations"),
    _r("configuration:create", _OWNER, "Create a group.", "POST /configurations"),
    _r("configuration:show", _READER, "Show a group.", "GET /configurations/{id}"),
    _r("configuration:instances", _READER, "Its instances.", "GET /configurations/{id}/instances"),
    _r("configuration:update", _OWNER, "Replace its values.", "PUT /configurations/{id}"),
    _r("configuration:edit", _OWNER, "Change some values.", "PATCH /configurations/{id}"),
    _r("configuration:delete", _OWNER, "Delete a group.", "DELETE /configurations/{id}"),
    _r("configuration-parameter:index", _ANY, "List parameters.", f"GET {_V}/parameters"),
    _r("configuration-parameter:show", _ANY, "Show a parameter.", f"GET {_V}/parameters/{{name}}"),
    _r(
        "configuration-parameter:index_by_version",
        _ANY,
        "List parameters (by version id).",
        "GET /datastores/versions/{version}/parameters",
    ),
    _r(
        "configuration-parameter:show_by_version",
        _ANY,
        "Show a parameter (by version id).",
        "GET /datastores/versions/{version}/parameters/{name}",
    ),
    # -- catalogue ---------------------------------------------------------------------------
    _r("flavor:index", _ANY, "List flavors.", "GET /flavors"),
    _r("flavor:show", _ANY, "Show a flavor.", "GET /flavors/{flavor_id}"),
    _r("datastore:index", _ANY, "List datastores.", "GET /datastores"),
    _r("datastore:show", _ANY, "Show a datastore.", "GET /datastores/{datastore}"),
    _r("datastore:delete", _ADMIN, "Delete a datastore.", "DELETE /datastores/{datastore}"),
    _r("datastore:version_index", _ANY, "List versions.", "GET /datastores/{datastore}/versions"),
    _r("datastore:version_show", _ANY, "Show a version.", f"GET {_V}"),
    _r(
        "datastore:version_show_by_uuid",
        _ANY,
        "Show a version by id.",
        "GET /datastores/versions/{version_id}",
    ),
    _r("datastore:list_associated_flavors", _ANY, "A version's flavors.", f"GET {_V}/flavors"),
    # -- limits and quotas -------------------------------------------------------------------
    _r("limits:index", _READER, "Show the project's limits.", "GET /limits"),
    _r(
        "quota:show",
        _READER,
        "Show a project's quotas and usage (the target is the project in the path).",
        "GET /mgmt/quotas/{project_id}",
    ),
    _r("quota:update", _ADMIN, "Set a project's quotas.", "PUT /mgmt/quotas/{project_id}"),
    # -- management --------------------------------------------------------------------------
    _r("mgmt:instance:index", _ADMIN, "List every project's instances.", "GET /mgmt/instances"),
    _r(
        "mgmt:instance:show",
        _ADMIN,
        "Show an instance's server, agent and engine details.",
        "GET /mgmt/instances/{instance_id}",
    ),
    _r(
        "mgmt:instance:action",
        _ADMIN,
        "Stop or reboot an instance's engine.",
        "POST /mgmt/instances/{instance_id}/action",
    ),
    _r(
        "mgmt:datastore_version:index", _ADMIN, "List all versions.", "GET /mgmt/datastore-versions"
    ),
    _r(
        "mgmt:datastore_version:create",
        _ADMIN,
        "Register a version.",
        "POST /mgmt/datastore-versions",
    ),
    _r(
        "mgmt:datastore_version:show",
        _ADMIN,
        "Show a version.",
        "GET /mgmt/datastore-versions/{id}",
    ),
    _r(
        "mgmt:datastore_version:edit",
        _ADMIN,
        "Edit a version.",
        "PATCH /mgmt/datastore-versions/{id}",
    ),
    _r(
        "mgmt:datastore_version:delete",
        _ADMIN,
        "Delete a version.",
        "DELETE /mgmt/datastore-versions/{id}",
    ),
    _r("mgmt:configuration_parameter:index", _ADMIN, "List rules.", f"GET {_MV}"),
    _r("mgmt:configuration_parameter:create", _ADMIN, "Add a rule.", f"POST {_MV}"),
    _r("mgmt:configuration_parameter:show", _ADMIN, "Show a rule.", f"GET {_MV}/{{name}}"),
    _r("mgmt:configuration_parameter:update", _ADMIN, "Change a rule.", f"PUT {_MV}/{{name}}"),
    _r("mgmt:configuration_parameter:delete", _ADMIN, "Delete a rule.", f"DELETE {_MV}/{{name}}"),
)

RULE_NAMES: frozenset[str] = frozenset(rule.name for rule in DEFAULT_RULES)


# --- the rule language --------------------------------------------------------------------------


class PolicySyntaxError(ValueError):
    """A rule's text does not parse; the message says where."""


class _Check:
    """A parsed rule: true when it allows ``creds`` on ``target`` (``policy`` resolves
    ``rule:`` references, so an override of a building block changes every rule using it)."""

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def references(self) -> Iterable[str]:
        return ()


@dataclass(frozen=True)
class _Const(_Check):
    value: bool

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return self.value


@dataclass(frozen=True)
class _RoleCheck(_Check):
    role: str

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return self.role.lower() in {r.lower() for r in creds.get("roles", ())}


@dataclass(frozen=True)
class _RuleCheck(_Check):
    rule: str

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return policy.allows(self.rule, target, creds)

    def references(self) -> Iterable[str]:
        return (self.rule,)


_TEMPLATE = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class _GenericCheck(_Check):
    """``<credential>:<value>``; ``value`` may name target attributes as ``%(name)s``."""

    key: str
    value: str

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        try:
            wanted = _TEMPLATE.sub(lambda m: str(target[m.group(1)]), self.value)
        except KeyError:
            return False  # the target lacks the attribute: never a match (as oslo.policy)
        if self.key not in creds:
            return False
        return str(creds[self.key]) == wanted


@dataclass(frozen=True)
class _Not(_Check):
    inner: _Check

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return not self.inner(policy, target, creds)

    def references(self) -> Iterable[str]:
        return self.inner.references()


@dataclass(frozen=True)
class _All(_Check):
    parts: tuple[_Check, ...]

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return all(part(policy, target, creds) for part in self.parts)

    def references(self) -> Iterable[str]:
        return [ref for part in self.parts for ref in part.references()]


@dataclass(frozen=True)
class _Any(_Check):
    parts: tuple[_Check, ...]

    def __call__(self, policy: Policy, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        return any(part(policy, target, creds) for part in self.parts)

    def references(self) -> Iterable[str]:
        return [ref for part in self.parts for ref in part.references()]


#: Credentials a generic check may test (``role:`` and ``rule:`` have their own checks).
CREDENTIAL_KEYS = ("project_id", "user_id", "is_admin")


def _words(text: str) -> list[str]:
    # oslo.policy's tokeniser: split on blanks, then peel parentheses off each word's ends, so
    # "%(tenant)s" keeps its own parentheses.
    out: list[str] = []
    for word in text.split():
        stripped = word.lstrip("(")
        out.extend("(" * (len(word) - len(stripped)))
        core = stripped.rstrip(")")
        if core:
            out.append(core)
        out.extend(")" * (len(stripped) - len(core)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.words = _words(text)
        self.pos = 0

    def parse(self) -> _Check:
        if not self.words:
            return _Const(True)  # an empty rule allows everyone, as in oslo.policy
        check = self._or()
        if self.pos != len(self.words):
            raise PolicySyntaxError(f"unexpected {self.words[self.pos]!r}")
        return check

    def _peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def _take(self) -> str:
        word = self._peek()
        if word is None:
            raise PolicySyntaxError("the rule ends too early")
        self.pos += 1
        return word

    def _or(self) -> _Check:
        parts = [self._and()]
        while (self._peek() or "").lower() == "or":
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else _Any(tuple(parts))

    def _and(self) -> _Check:
        parts = [self._not()]
        while (self._peek() or "").lower() == "and":
            self._take()
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else _All(tuple(parts))

    def _not(self) -> _Check:
        word = self._take()
        if word.lower() == "not":
            return _Not(self._not())
        if word == "(":
            inner = self._or()
            if self._peek() != ")":
                raise PolicySyntaxError("a '(' is not closed")
            self._take()
            return inner
        if word == ")" or word.lower() in ("and", "or"):
            raise PolicySyntaxError(f"unexpected {word!r}")
        return _atom(word)


def _atom(word: str) -> _Check:
    if word == "@":
        return _Const(True)
    if word == "!":
        return _Const(False)
    kind, sep, value = word.partition(":")
    if not sep or not kind or not value:
        raise PolicySyntaxError(
            f"{word!r} is not a check; use role:<name>, rule:<name>, <credential>:<value>, @ or !"
        )
    if kind == "role":
        return _RoleCheck(value)
    if kind == "rule":
        return _RuleCheck(value)
    if kind not in CREDENTIAL_KEYS:
        raise PolicySyntaxError(
            f"{kind!r} is not a credential a rule can test{_did_you_mean(kind, CREDENTIAL_KEYS)}"
            f"; use one of {', '.join(CREDENTIAL_KEYS)}, role: or rule:"
        )
    return _GenericCheck(kind, value)


def parse_rule(text: str) -> _Check:
    """Parse a rule's text; ``PolicySyntaxError`` says what is wrong."""
    return _Parser(text).parse()


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the policy ----------------------------------------------------------------------------------


#: Most allowed combinations a policy remembers before it starts again.
_MAX_REMEMBERED = 10_000


class PolicyDenied(Forbidden):
    """A policy rule does not allow the request (403 ``forbidden``); ``rule`` names it."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def credentials_of(auth: AuthContext) -> dict[str, Any]:
    """What rules see of the caller."""
    return {
        "roles": auth.roles,
        "project_id": auth.project_id,
        "user_id": auth.user_id,
        "is_admin": auth.is_admin,
    }


class Policy:
    """The effective rules: the defaults, with ``overrides`` (``{name: rule text}``) applied.

    Construction validates everything and raises ``ConfigError`` listing every problem: an
    unknown rule name (with a did-you-mean), a rule that does not parse, a ``rule:`` reference
    to a rule that does not exist, and rules that refer to each other in a loop. ``source``
    names where the overrides came from, for those messages. Its rules never change (it only
    remembers which checks they allowed), so one instance serves every request thread.
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None, source: str = "") -> None:
        where = f"{source}: " if source else ""
        problems: list[str] = []
        texts = {rule.name: rule.check for rule in DEFAULT_RULES}
        for name, text in (overrides or {}).items():
            if name not in texts:
                problems.append(
                    f"{where}{name!r} is not a policy rule{_did_you_mean(str(name), texts)}"
                )
            elif text is not None and not isinstance(text, str):
                problems.append(f'{where}rule {name!r} must be a string, like "role:admin"')
            else:
                texts[name] = text or ""
        self._checks: dict[str, _Check] = {}
        for name, text in texts.items():
            try:
                self._checks[name] = parse_rule(text)
            except PolicySyntaxError as exc:
                problems.append(f"{where}rule {name!r} ({text!r}): {exc}")
        for name, check in self._checks.items():
            for ref in check.references():
                if ref not in self._checks:
                    problems.append(
                        f"{where}rule {name!r} refers to rule {ref!r}, which does not exist"
                        f"{_did_you_mean(ref, self._checks)}"
                    )
        if not problems:
            problems.extend(f"{where}{loop}" for loop in self._loops())
        if problems:
            raise ConfigError(problems)
        self.texts: dict[str, str] = texts
        self.overridden: frozenset[str] = frozenset(overrides or {})
        # Allowed (rule, project, caller) combinations (``enforce_on_project``); denials are
        # not remembered, so their errors are built afresh.
        self._allowed: dict[tuple[str, str, str, str, frozenset[str]], bool] = {}

    def _loops(self) -> list[str]:
        found: list[str] = []
        state: dict[str, int] = {}  # 1: being visited, 2: done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                loop = [*path[path.index(name) :], name]
                found.append(f"rules refer to each other in a loop: {' -> '.join(loop)}")
                return
            state[name] = 1
            for ref in self._checks[name].references():
                visit(ref, [*path, name])
            state[name] = 2

        for name in self._checks:
            visit(name, [])
        return found

    def allows(self, rule: str, target: Mapping[str, Any], creds: Mapping[str, Any]) -> bool:
        """True when ``rule`` allows ``creds`` to act on ``target``; ``KeyError`` for a name
        that is not a rule (a programming error, never a user's)."""
        return self._checks[rule](self, target, creds)

    def enforce_on_project(self, rule: str, tenant: str, auth: AuthContext) -> None:
        """``enforce(rule, {"tenant": tenant}, auth)``, with the answer remembered: the rules
        are fixed and see nothing else, so the same caller, roles and project always get the
        same answer (every route's own rule is checked this way, on every request)."""
        key = (rule, tenant, auth.user_id, auth.project_id, auth.roles)
        if self._allowed.get(key):
            return
        self.enforce(rule, {"tenant": tenant}, auth)
        if len(self._allowed) >= _MAX_REMEMBERED:
            self._allowed.clear()
        self._allowed[key] = True

    def enforce(self, rule: str, target: Mapping[str, Any], auth: AuthContext) -> None:
        """Raise ``PolicyDenied`` (403) unless ``rule`` allows ``auth`` on ``target``."""
        if self.allows(rule, target, credentials_of(auth)):
            return
        roles = ", ".join(sorted(auth.roles)) or "none"
        raise PolicyDenied(
            rule,
            f"Policy rule {rule!r} does not allow user {auth.user_name!r} (roles on project "
            f"{auth.project_name!r}: {roles}) to do this; ask an administrator for a role the "
            "rule allows.",
        )


def policy_path(settings: Settings) -> Path | None:
    """The policy file in effect: ``policy_file`` if set, else ``<state_dir>/policy.yaml`` if
    it exists, else None (the defaults)."""
    if settings.default.policy_file is not None:
        return settings.default.policy_file
    candidate = settings.state_dir / POLICY_FILE_NAME
    return candidate if candidate.is_file() else None


def load_policy(settings: Settings) -> Policy:
    """The policy for ``settings``; ``ConfigError`` listing every problem in the file.

    A process serving the API should call this at start, so a bad file stops it there.
    """
    path = policy_path(settings)
    if path is None:
        return Policy()
    if not path.is_file():
        raise ConfigError([f"policy_file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot read the policy file: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f'{path}: a policy file must map rule names to rules, like "instance:create": '
                '"rule:admin"'
            ]
        )
    return Policy(data, source=str(path))


def sample_yaml(*, commented: bool = True) -> str:
    """The default rules as a policy file, each with its description and requests.

    Commented out by default (as oslo.policy's samples are), so the file changes nothing until
    a rule is uncommented; with ``commented=False`` every rule is active.
    """
    lines = [
        "# Coffer API policy. Each key is a rule name, each value a rule in oslo.policy's",
        '# language ("role:admin", "rule:admin_or_owner", "project_id:%(tenant)s", "@", "!",',
        "# and, or, not, parentheses). Rules not listed keep their defaults.",
        "",
    ]
    prefix = "#" if commented else ""
    for rule in DEFAULT_RULES:
        lines.append(f"# {rule.description}")
        lines.extend(f"#   {op.replace(' /', ' /v1.0/{tenant_id}/', 1)}" for op in rule.operations)
        # JSON strings are YAML too, and quote the way oslo.policy's samples do.
        lines.append(f"{prefix}{json.dumps(rule.name)}: {json.dumps(rule.check)}")
        lines.append("")
    return "\n".join(lines)


# --- enforcement in requests --------------------------------------------------------------------

_policy_lock = threading.Lock()
#: ``request.state`` attributes the audit log reads.
ACTION_STATE = "coffer_action"
_ACTION_FIXED = "coffer_action_fixed"
AUTH_STATE = "coffer_auth"


def policy_of(request: Request) -> Policy:
    """The app's policy, loaded on first use from the app's settings and kept on ``app.state``.

    If the file is invalid, requests are refused with 503 and the problems go to the log (the
    API's start-up should have called ``load_policy`` and stopped).
    """
    state = request.app.state
    policy: Policy | None = getattr(state, "coffer_policy", None)
    if policy is not None:
        return policy
    with _policy_lock:
        policy = getattr(state, "coffer_policy", None)
        if policy is None:
            try:
                policy = load_policy(get_services(request).settings)
            except ConfigError as exc:
                LOG.error("the API policy cannot be loaded: %s", exc.message)
                raise ServiceUnavailable(
                    "The API's policy file is invalid, so no request can be authorized; an "
                    "operator must fix it (the API log lists the problems)."
                ) from exc
            state.coffer_policy = policy
    return policy


def rate_limiter_of(request: Request) -> RateLimiter:
    """The app's rate limiter (one per API process), created on first use."""
    state = request.app.state
    limiter: RateLimiter | None = getattr(state, "coffer_rate_limiter", None)
    if limiter is None:
        with _policy_lock:
            limiter = getattr(state, "coffer_rate_limiter", None)
            if limiter is None:
                limiter = RateLimiter.from_settings(get_services(request).settings)
                state.coffer_rate_limiter = limiter
    return limiter


def enforce(
    request: Request, ctx: RequestContext, rule: str, target: Mapping[str, Any] | None = None
) -> None:
    """Enforce ``rule`` inside a handler (for rules that depend on the body or the target).

    ``target`` defaults to the URL's project (``{"tenant": ctx.project_id}``). On a route whose
    rule was deferred, records ``rule`` as the request's action for the audit log (an extra
    check on a route with its own rule, such as users given with a new instance, does not).
    """
    if rule not in RULE_NAMES:
        raise KeyError(f"{rule!r} is not a policy rule")
    if not getattr(request.state, _ACTION_FIXED, False):
        setattr(request.state, ACTION_STATE, rule)
    policy_of(request).enforce(rule, target or {"tenant": ctx.project_id}, ctx.auth)
    _read_only_backstop(request, ctx.auth)


def _read_only_backstop(request: Request, auth: AuthContext) -> None:
    # Behind the rules, not instead of them: even a policy file that lets readers change things
    # does not let a reader-only token write.
    if auth.is_read_only and request.method not in READ_METHODS:
        raise Forbidden(
            f"User {auth.user_name!r} has only the reader role on project "
            f"{auth.project_name!r}, which allows GET requests only; ask for the member role "
            "to make changes."
        )


class Authorize:
    """FastAPI dependency that authorizes a ``/v1.0/{tenant_id}/...`` request; returns its
    ``RequestContext``. Use as ``ctx: Annotated[RequestContext, Depends(authorize("rule"))]``.

    In order: 401 for a missing or invalid token; 403 when the URL's project is not the token's
    (admins may name any project); 413 ``overLimit`` with ``Retry-After`` when the project is
    over its rate limit; 403 naming the rule when ``rule`` does not allow the caller; and, as a
    backstop behind the rules, 403 when a read-only token tries anything but GET/HEAD.

    ``rule=None`` with ``deferred`` rule names is for routes whose rule depends on the body
    (``POST .../action``) or on another project (quotas): the handler must call ``enforce`` with
    one of them before it changes anything (``enforce`` applies the same backstop).
    """

    def __init__(self, rule: str | None, deferred: Sequence[str] = ()) -> None:
        for name in (rule, *deferred):
            if name is not None and name not in RULE_NAMES:
                raise KeyError(f"{name!r} is not a policy rule{_did_you_mean(name, RULE_NAMES)}")
        if rule is None and not deferred:
            raise ValueError("give the route's rule, or the rules its handler enforces")
        self.rule = rule
        self.deferred = tuple(deferred)

    def __repr__(self) -> str:
        return f"authorize({self.rule or self.deferred!r})"

    async def __call__(self, request: Request, tenant_id: str) -> RequestContext:
        return await authorize_request(request, tenant_id, self.rule, self.deferred)


async def authorize_request(
    request: Request, tenant_id: str, rule: str | None, deferred: Sequence[str] = ()
) -> RequestContext:
    """What ``Authorize`` does, for routes served without FastAPI's dependencies (the hot
    reads, ``coffer.api.responses.HotRoute``): the same checks in the same order, the same
    errors. ``rule`` and ``deferred`` must be rule names (``Authorize`` checks them once)."""
    # Async, so a request whose token was validated lately costs no hop to a worker thread;
    # what follows the authentication is in-memory work.
    state = request.state
    setattr(state, ACTION_STATE, rule or "|".join(deferred))
    setattr(state, _ACTION_FIXED, rule is not None)
    auth = await authenticate_request_async(request)
    setattr(state, AUTH_STATE, auth)
    if tenant_id != auth.project_id and not auth.is_admin:
        raise Forbidden(
            f"This token is for project {auth.project_id}; use a URL with that project id "
            f"(/v1.0/{auth.project_id}/...)."
        )
    path = request.url.path
    below = path.split(f"/v1.0/{tenant_id}", 1)[-1] or "/"
    rate_limiter_of(request).hit(auth.project_id, request.method, below)
    ctx = RequestContext(
        auth=auth,
        project_id=tenant_id,
        request_id=request_id_of(request),
        base_url=public_base_url(request),
    )
    if rule is not None:
        policy_of(request).enforce_on_project(rule, tenant_id, auth)
        _read_only_backstop(request, auth)
    return ctx


def authorize(rule: str | None, *, deferred: Sequence[str] = ()) -> Authorize:
    """The dependency for a route guarded by ``rule`` (see ``Authorize``)."""
    return Authorize(rule, deferred)
