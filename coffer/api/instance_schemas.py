"""Request bodies for instances, databases, users and root, validated before any side effect.

Structure is checked by pydantic (a failure is a 400 ``Validation error: <field> ...``); the
engine's naming rules are checked by ``coffer.datastores.mysql_rules`` in the routes, so that a
bad name is refused by the API before anything reaches a guest.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_HAS_ALNUM = re.compile(r".*[0-9a-zA-Z]+.*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    # Trove accepts (and ignores) keys it does not know in several bodies; so do we.
    model_config = ConfigDict(extra="allow")


class DatabaseRef(_Lenient):
    name: str = Field(min_length=1, max_length=64)


class DatabaseIn(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    character_set: str | None = None
    collate: str | None = None


class UserIn(_Lenient):
    name: str = Field(min_length=1)
    password: str = Field(min_length=1, repr=False)
    host: str | None = None
    databases: list[DatabaseRef] = Field(default_factory=list)


class VolumeIn(_Lenient):
    size: int | str
    type: str | None = None

    @field_validator("size")
    @classmethod
    def _positive(cls, value: int | str) -> int:
        if isinstance(value, str):
            if not re.fullmatch(r"0*[1-9][0-9]*", value) or len(value) > 40:
                raise ValueError("must be a positive whole number of gigabytes")
            value = int(value)
        if value < 1:
            raise ValueError("must be a positive whole number of gigabytes")
        return value


class DatastoreIn(_Lenient):
    type: str | None = None
    version: str | None = None
    version_number: str | None = None


class AccessIn(_Strict):
    is_public: bool = False
    allowed_cidrs: list[str] = Field(default_factory=list)

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        seen = set()
        for cidr in value:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from exc
            if net.version != 4:
                raise ValueError(f"{cidr!r}: only IPv4 CIDRs are supported")
            if str(net) in seen:
                raise ValueError(f"{cidr!r} is listed twice")
            seen.add(str(net))
        return value


class InstanceIn(_Lenient):
    name: str = Field(min_length=1, max_length=255)
    flavorRef: str | int | None = None
    volume: VolumeIn | None = None
    datastore: DatastoreIn | None = None
    databases: list[DatabaseIn] = Field(default_factory=list)
    users: list[UserIn] = Field(default_factory=list)
    access: AccessIn | None = None
    nics: list[dict[str, Any]] | None = Field(default=None, max_length=1)
    availability_zone: str | None = None
    region_name: str | None = None
    configuration: str | None = None
    restorePoint: dict[str, Any] | None = None
    replica_of: str | None = None
    replica_count: int | None = None
    locality: str | None = None
    modules: list[dict[str, Any]] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HAS_ALNUM.match(value):
            raise ValueError("must contain at least one letter or digit")
        return value


class InstanceCreateBody(_Strict):
    instance: InstanceIn


class InstanceUpdateIn(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    configuration: str | None = None
    replica_of: str | None = None
    slave_of: str | None = None
    datastore_version: str | None = None
    access: AccessIn | None = None


class InstanceUpdateBody(_Strict):
    instance: InstanceUpdateIn


class DatabasesBody(_Strict):
    databases: list[DatabaseIn] = Field(min_length=1)


class UsersBody(_Strict):
    users: list[UserIn] = Field(min_length=1)


class UserPasswordIn(_Lenient):
    name: str = Field(min_length=1)
    password: str = Field(min_length=1, repr=False)
    host: str | None = None


class UsersPasswordBody(_Strict):
    users: list[UserPasswordIn] = Field(min_length=1)


class UserUpdateIn(_Strict):
    name: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, min_length=1, repr=False)
    host: str | None = Field(default=None, min_length=1)


class UserUpdateBody(_Strict):
    user: UserUpdateIn


class AccessGrantBody(_Strict):
    databases: list[DatabaseRef] = Field(min_length=1)


class RootEnableBody(_Lenient):
    password: str | None = Field(default=None, min_length=1, repr=False)
