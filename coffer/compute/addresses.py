"""Loopback address pools: each local instance gets its own address (and port 3306/5432/6379).

The whole of 127.0.0.0/8 is local on Linux, so any address in it can be bound without setup.
An allocation is a row of ``address_allocations`` whose primary key is the address itself: the
database, not this process, guarantees that two instances never share an address, even when two
taskmanagers allocate at the same moment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coffer.db.models import AddressAllocation
from coffer.errors import AddressPoolExhausted, ConfigError

PRIVATE = "private"
PUBLIC = "public"
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@dataclass(frozen=True)
class AddressPool:
    """One named CIDR; hands out host addresses lowest first."""

    name: str
    network: ipaddress.IPv4Network

    def addresses(self) -> Iterator[str]:
        """Usable host addresses, lowest first: no network/broadcast, no ``.0`` or ``.255``."""
        for address in self.network.hosts():
            if int(address) & 0xFF not in (0, 255):
                yield str(address)

    @property
    def size(self) -> int:
        return sum(1 for _ in self.addresses())


def parse_pools(private_cidr: str, public_cidr: str) -> tuple[AddressPool, AddressPool]:
    """Check the ``[compute]`` pool options; ``ConfigError`` lists every problem at once."""
    problems: list[str] = []
    networks: dict[str, ipaddress.IPv4Network] = {}
    for name, cidr in ((PRIVATE, private_cidr), (PUBLIC, public_cidr)):
        option = f"[compute] {name}_pool"
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            problems.append(
                f"{option} = {cidr!r} is not a CIDR network ({exc}); use e.g. 127.10.0.0/16"
            )
            continue
        if not isinstance(network, ipaddress.IPv4Network) or not network.subnet_of(_LOOPBACK):
            problems.append(
                f"{option} = {cidr!r} is outside 127.0.0.0/8; the local driver can only hand out "
                "loopback addresses, e.g. 127.10.0.0/16"
            )
            continue
        if not any(True for _ in AddressPool(name, network).addresses()):
            problems.append(f"{option} = {cidr!r} has no usable host address; use a larger range")
            continue
        networks[name] = network
    if len(networks) == 2 and networks[PRIVATE].overlaps(networks[PUBLIC]):
        problems.append(
            f"[compute] private_pool {networks[PRIVATE]} and public_pool {networks[PUBLIC]} "
            "overlap; give them separate ranges"
        )
    if problems:
        raise ConfigError(problems)
    return AddressPool(PRIVATE, networks[PRIVATE]), AddressPool(PUBLIC, networks[PUBLIC])


def _used(session: Session, pool: AddressPool) -> set[str]:
    """Addresses of ``pool`` allocated as far as this transaction can see."""
    return set(
        session.scalars(
            select(AddressAllocation.address).where(AddressAllocation.pool == pool.name)
        )
    )


def claim(session: Session, pool: AddressPool, instance_id: str) -> str:
    """Insert an allocation of the lowest free address of ``pool`` for ``instance_id``.

    Another transaction may take the address we picked between our read and our insert; the
    primary key turns that into an ``IntegrityError``, rolled back to a savepoint, and we try
    the next address. Raises ``AddressPoolExhausted`` when every address is taken.
    """
    used = _used(session, pool)
    for address in pool.addresses():
        if address in used:
            continue
        try:
            with session.begin_nested():
                session.add(
                    AddressAllocation(address=address, pool=pool.name, instance_id=instance_id)
                )
                session.flush()
        except IntegrityError:
            continue
        return address
    raise AddressPoolExhausted(
        f"no free {pool.name} address is left: all {pool.size} addresses of {pool.network} are "
        f"allocated; delete instances that are no longer needed or give [compute] "
        f"{pool.name}_pool a larger range"
    )


def allocate(
    session: Session,
    instance_id: str,
    is_public: bool,
    private_pool: AddressPool,
    public_pool: AddressPool,
) -> tuple[str, str | None]:
    """Make ``instance_id``'s allocations match the request and return ``(private, public)``.

    Existing allocations are kept (so a retry returns the same addresses); a public address held
    although ``is_public`` is now false is released. Runs in a savepoint: on any error the
    caller's transaction is as it was. The caller commits.
    """
    with session.begin_nested():
        rows = session.scalars(
            select(AddressAllocation)
            .where(AddressAllocation.instance_id == instance_id)
            .order_by(AddressAllocation.address)
        ).all()
        held = {row.pool: row.address for row in reversed(rows)}
        private = held.get(PRIVATE) or claim(session, private_pool, instance_id)
        public: str | None = None
        if is_public:
            public = held.get(PUBLIC) or claim(session, public_pool, instance_id)
        elif PUBLIC in held:
            session.execute(
                delete(AddressAllocation).where(
                    AddressAllocation.instance_id == instance_id, AddressAllocation.pool == PUBLIC
                )
            )
    return private, public


def release(session: Session, instance_id: str) -> None:
    """Delete every allocation of ``instance_id`` (none is fine). The caller commits."""
    session.execute(delete(AddressAllocation).where(AddressAllocation.instance_id == instance_id))
    session.flush()


def held_by(session: Session, instance_id: str) -> tuple[str | None, str | None]:
    """``(private, public)`` currently allocated to ``instance_id`` (None where there is none)."""
    rows = session.execute(
        select(AddressAllocation.pool, AddressAllocation.address).where(
            AddressAllocation.instance_id == instance_id
        )
    ).all()
    held = {pool: address for pool, address in rows}
    return held.get(PRIVATE), held.get(PUBLIC)
