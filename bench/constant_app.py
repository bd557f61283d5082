"""The API benchmark's baseline: FastAPI answering a constant body of a requested size.

Served by uvicorn with the settings ``coffer up`` gives its API (one process, warning log level,
no access log, no lifespan, the same keep-alive timeout), so the difference to Coffer's
endpoints is Coffer's own work per request: authentication, the control-DB query and the
rendering. The handler is a plain ``def`` like Coffer's, so both run in the same thread pool.
"""

from __future__ import annotations

from functools import lru_cache

from fastapi import FastAPI, Response

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@lru_cache(maxsize=64)
def _body(size: int) -> bytes:
    filler = max(0, size - len(b'{"x":""}'))
    return b'{"x":"' + b"a" * filler + b'"}'


@app.get("/const/{size}")
def constant(size: int) -> Response:
    """``size`` bytes of JSON, the same every time."""
    return Response(content=_body(min(max(size, 0), 10_000_000)), media_type="application/json")
