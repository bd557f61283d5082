"""``limit``/``marker`` pagination, Trove style.

A list answer carries ``"links": [{"rel": "next", "href": "...?limit=N&marker=<id>"}]`` only when
more items exist. The marker is the key (normally the id) of the last item on the page; the next
page starts after it. As in Trove, items are ordered by that key and the marker is located by
bisection, so a marker whose item was deleted meanwhile still works.

    page = paginate(rows, page_request(request, settings.default.instances_page_size), key_of_id)
    return {"instances": [view(r) for r in page.items], **page.links_field(request)}
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request

from coffer.errors import ValidationError

T = TypeVar("T")

#: Largest page anyone gets, whatever ``limit`` says.
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class PageRequest:
    """What the client asked for: at most ``limit`` items (``None``: all) after ``marker``."""

    limit: int | None
    marker: str | None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of items and the marker of the next page (``None`` on the last page)."""

    items: list[T]
    limit: int | None
    next_marker: str | None

    def links(self, request: Request) -> list[dict[str, str]]:
        """``[{"rel": "next", "href": ...}]`` when more items exist, else ``[]``."""
        if self.next_marker is None or self.limit is None:
            return []
        return [next_link(request, self.limit, self.next_marker)]

    def links_field(self, request: Request) -> dict[str, Any]:
        """``{"links": [...]}`` when there is a next page, else ``{}``: splice into a body."""
        links = self.links(request)
        return {"links": links} if links else {}


def page_request(
    request: Request, default_size: int | None = None, max_size: int = MAX_PAGE_SIZE
) -> PageRequest:
    """Read and validate ``limit`` and ``marker`` from the query string.

    With ``default_size`` the page holds ``min(limit, default_size)`` items (Trove's rule:
    ``limit`` can shrink a page, never grow it past the configured size); without it, ``limit``
    alone decides (capped at ``max_size``) and no ``limit`` means everything. Raises
    ``ValidationError`` (400) when ``limit`` is not a positive integer or ``marker`` is empty.
    """
    raw_limit = request.query_params.get("limit")
    limit: int | None = None
    if raw_limit is not None:
        text = raw_limit.strip()
        if not text.isdigit() or int(text) < 1:
            raise ValidationError(
                f"Validation error: query parameter limit must be a positive integer, "
                f"not {raw_limit[:40]!r}."
            )
        limit = min(int(text), max_size)
    if default_size is not None:
        limit = min(limit or default_size, default_size)
    marker = request.query_params.get("marker")
    if marker is not None and not marker.strip():
        raise ValidationError(
            "Validation error: query parameter marker must be the id of the last item of the "
            "previous page, not empty."
        )
    return PageRequest(limit=limit, marker=marker)


def paginate(items: Sequence[T], page: PageRequest, key: Callable[[T], str]) -> Page[T]:
    """Order ``items`` by ``key`` and cut the page after ``page.marker``."""
    ordered = sorted(items, key=key)
    keys = [key(item) for item in ordered]
    start = bisect.bisect_right(keys, page.marker) if page.marker is not None else 0
    if page.limit is None or start + page.limit >= len(ordered):
        return Page(items=ordered[start:], limit=page.limit, next_marker=None)
    chunk = ordered[start : start + page.limit]
    return Page(items=chunk, limit=page.limit, next_marker=key(chunk[-1]))


def next_link(request: Request, limit: int, marker: str) -> dict[str, str]:
    """The ``next`` link: this request's own URL (scheme and host as the client used them, other
    query parameters kept) with ``limit`` and ``marker`` replaced."""
    href = request.url.include_query_params(limit=limit, marker=marker)
    return {"rel": "next", "href": str(href)}
