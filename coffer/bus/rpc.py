"""Sealed RPC over kombu: ``RpcClient`` sends casts and calls, ``RpcServer`` serves endpoints.

Routing uses the broker's default exchange (the routing key is the queue name), which every
kombu transport supports without routing state; that matters for the embedded Redis broker, which
keeps nothing across a restart. Target queues are durable and declared by senders too, so a cast
sent before its consumer starts waits for it. Each client has one reply queue (``reply.<uuid>``)
and one listener thread that hands replies to waiting callers by correlation id.

Delivery is at least once while a server process lives (a message is acknowledged after its
handler returns) and the server's replay guard drops redeliveries of messages it already saw.
Message bodies, arguments and results are never logged: they may carry passwords.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import socket
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import kombu
from kombu.exceptions import OperationalError

from coffer.bus.envelope import (
    Envelope,
    KeyRing,
    ReplayGuard,
    SequenceCounter,
    StaticKeyRing,
    open_sealed,
    seal,
)
from coffer.bus.keys import check_key
from coffer.bus.transport import connection, safe_url
from coffer.errors import (
    BusError,
    CofferError,
    NotImplementedByDatastore,
    RemoteError,
    RpcTimeout,
    SealError,
    ValidationError,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-coffer-sealed"
REPLY_PREFIX = "reply."
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,200}$")
_POLL_SECONDS = 0.25
#: How long an idle consumer blocks in one wait on a broker it can be woken from (RabbitMQ,
#: Redis): a blocking BRPOP or socket read, not a poll, so a hundred idle guest agents cost
#: next to no CPU. Stopping does not wait for it: ``_wake_consumers`` cuts the wait short.
IDLE_WAIT_SECONDS = 30.0
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class UnknownMethod(NotImplementedByDatastore):
    """The server has no RPC method by that name (or does not expose it)."""


class BadArguments(ValidationError):
    """An RPC request's arguments do not match the method's signature."""


class InternalError(CofferError):
    """A handler failed unexpectedly; details are in the server's log, not in the reply."""


def check_queue_name(name: str, what: str = "queue name") -> str:
    """Return ``name`` if it is a usable queue name, else raise ``ValidationError``."""
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ValidationError(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit, at most 201 characters"
        )
    return name


def _target_queue(name: str) -> kombu.Queue:
    # No exchange: the default exchange routes by queue name, and no binding must be declared.
    return kombu.Queue(name, durable=True, auto_delete=False)


def _describe(exc: BaseException, url: str) -> str:
    """A one-line description of a transport error without the URL's password."""
    text = str(exc)
    secret = kombu.Connection(url).password
    if secret:
        text = text.replace(secret, "**")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Waiting:
    """The connection one consume loop blocks on, so another thread can wake it to stop.

    ``busy`` is set while a message is handled: that connection is never cut, so the handler
    finishes and its message is acknowledged before the loop sees the stop.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: kombu.Connection | None = None
        self.busy = False


_waiting_lock = threading.Lock()
_waiting: weakref.WeakKeyDictionary[threading.Event, set[_Waiting]] = weakref.WeakKeyDictionary()


def _interruptible(conn: kombu.Connection) -> bool:
    """True for transports whose blocking wait ``_wake_consumers`` can cut short."""
    return str(conn.transport.driver_type) in ("amqp", "redis")


def _blocking_sockets(conn: kombu.Connection) -> list[socket.socket]:
    """The sockets a consumer of ``conn`` may be blocked reading: the AMQP connection's, or
    each Redis channel's connection with a BRPOP in flight. Empty if kombu's internals differ
    (then the loop simply ends at its next timeout)."""
    found: list[socket.socket] = []
    if not conn.connected:
        return found
    if str(conn.transport.driver_type) == "amqp":
        sock = getattr(conn.connection, "sock", None)
        if isinstance(sock, socket.socket):
            found.append(sock)
        return found
    for channel in list(getattr(conn.transport, "channels", None) or ()):
        sock = getattr(getattr(channel, "_in_poll", None), "_sock", None)
        if isinstance(sock, socket.socket):
            found.append(sock)
    return found


def _wake_consumers(stop: threading.Event) -> None:
    """Set ``stop`` and wake every consume loop waiting under it that is not handling a
    message, by shutting its socket down (never closing it: the loop's own thread does that).
    A message the broker hands out at that very moment is lost, as when the process dies."""
    stop.set()
    with _waiting_lock:
        waiters = list(_waiting.get(stop, ()))
    for waiter in waiters:
        with waiter.lock:
            if waiter.busy or waiter.conn is None:
                continue
            for sock in _blocking_sockets(waiter.conn):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _stop_and_join(stop: threading.Event, thread: threading.Thread, timeout: float) -> None:
    """Stop the consume loops under ``stop`` and wait up to ``timeout`` s for ``thread`` to end.
    Wakes them again while waiting: a loop between its check of ``stop`` and its next blocking
    wait has nothing to cut yet."""
    deadline = time.monotonic() + timeout
    while True:
        _wake_consumers(stop)
        remaining = deadline - time.monotonic()
        thread.join(max(0.0, min(0.05, remaining)))
        if not thread.is_alive() or remaining <= 0:
            return


class _Session:
    """One live connection of a consume loop, with a lazily created producer on it."""

    def __init__(self, conn: kombu.Connection) -> None:
        self.conn = conn
        self._producer: kombu.Producer | None = None

    @property
    def producer(self) -> kombu.Producer:
        if self._producer is None:
            self._producer = kombu.Producer(self.conn.channel(), auto_declare=False)
        return self._producer


def _consume_loop(
    url: str,
    queue: kombu.Queue,
    on_message: Callable[[kombu.Message, _Session], None],
    stop: threading.Event,
    name: str,
    *,
    no_ack: bool,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Consume ``queue`` on a connection of its own until ``stop`` is set.

    Reconnects with exponential backoff (0.1 s to 5 s) after any connection or channel error and
    re-declares the queue, so a broker restart only pauses consumption. ``on_message`` runs in
    this thread; an exception escaping it is treated like a connection error.

    While idle it blocks on the broker for up to ``IDLE_WAIT_SECONDS`` at a time (RabbitMQ,
    Redis; other transports poll every ``_POLL_SECONDS``); ``_wake_consumers(stop)`` ends the
    wait at once.
    """
    waiter = _Waiting()
    with _waiting_lock:
        _waiting.setdefault(stop, set()).add(waiter)

    def handle(message: kombu.Message, session: _Session) -> None:
        with waiter.lock:
            waiter.busy = True
        try:
            on_message(message, session)
        finally:
            with waiter.lock:
                waiter.busy = False

    try:
        _consume(url, queue, handle, stop, name, waiter, no_ack=no_ack, on_ready=on_ready)
    finally:
        with _waiting_lock:
            _waiting.get(stop, set()).discard(waiter)


def _consume(
    url: str,
    queue: kombu.Queue,
    on_message: Callable[[kombu.Message, _Session], None],
    stop: threading.Event,
    name: str,
    waiter: _Waiting,
    *,
    no_ack: bool,
    on_ready: Callable[[], None] | None,
) -> None:
    backoff = _BACKOFF_MIN
    lost = False
    while not stop.is_set():
        conn = connection(url)
        wait = IDLE_WAIT_SECONDS if _interruptible(conn) else _POLL_SECONDS
        if str(conn.transport.driver_type) == "redis":
            # The BRPOP itself blocks as long: no round trip to the broker while idle.
            conn.transport.brpop_timeout = wait
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            with waiter.lock:
                waiter.conn = conn
            session = _Session(conn)
            consumer = kombu.Consumer(
                conn.channel(),
                queues=[queue],
                no_ack=no_ack,
                on_message=lambda message, _session=session: on_message(message, _session),
                prefetch_count=None if no_ack else 1,
            )
            consumer.consume()
            if lost:
                log.info("%s is consuming %s again", name, queue.name)
            lost = False
            backoff = _BACKOFF_MIN
            if on_ready is not None:
                on_ready()
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=wait)
                except TimeoutError:  # socket.timeout: nothing arrived
                    continue
        except Exception as exc:  # the loop must survive anything; the broker may come back
            if stop.is_set():
                break
            known = conn.connection_errors + conn.channel_errors + (OperationalError,)
            if isinstance(exc, known):
                # One warning per outage; the retries that follow are only worth a debug line.
                (log.debug if lost else log.warning)(
                    "%s lost the bus at %s (%s); reconnecting in %.1f s",
                    name,
                    safe_url(url),
                    _describe(exc, url),
                    backoff,
                )
            else:
                log.exception("%s failed unexpectedly; reconnecting in %.1f s", name, backoff)
            lost = True
            stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            with waiter.lock:
                waiter.conn = None
            with contextlib.suppress(Exception):
                conn.release()


class RpcClient:
    """Thread-safe. Sends sealed messages to one target queue.

    ``key_id`` and ``key`` seal every request; replies must be sealed with the same key, carry
    the request's correlation id and be addressed to this client's reply queue, or they are
    dropped. ``sender`` is ``"control"`` for control-plane services and the instance id for a
    guest (a guest's conductor only accepts ``sender == key_id``).

    Connections are opened lazily; the reply queue and its listener thread are created on the
    first ``call``. ``close()`` releases them; the client can also be used as a context manager.
    """

    def __init__(
        self, url: str, target: str, key_id: str, key: bytes, sender: str = "control"
    ) -> None:
        check_queue_name(target, "RPC target")
        check_key(key, f"key for {key_id!r}")
        if not key_id or not sender:
            raise ValidationError("an RPC client needs a non-empty key_id and sender")
        self.url = url
        self.target = target
        self.key_id = key_id
        self.sender = sender
        self._key = bytes(key)
        self._keyring = StaticKeyRing({key_id: self._key})
        self._seq = SequenceCounter()
        self._queue = _target_queue(target)
        self.reply_queue = f"{REPLY_PREFIX}{uuid.uuid4().hex}"
        self._publish_lock = threading.Lock()
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._pending: dict[str, Future[Envelope]] = {}
        self._pending_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._listener_ready = threading.Event()
        self._stop = threading.Event()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"RpcClient(url={safe_url(self.url)!r}, target={self.target!r}, "
            f"key_id={self.key_id!r}, sender={self.sender!r})"
        )

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def cast(self, method: str, **kwargs: Any) -> None:
        """Send ``method(**kwargs)`` without waiting for it to run.

        The message is persistent on brokers that persist (RabbitMQ) and waits in the durable
        target queue until a server consumes it. Raises ``TypeError`` for arguments JSON cannot
        carry (nothing is sent) and ``BusError`` if the bus stays unreachable after retries.
        """
        env = self._envelope(method, kwargs)
        self._publish(seal(env, self._key), method, delivery_mode=2)

    def call(self, method: str, timeout: float, **kwargs: Any) -> Any:
        """Run ``method(**kwargs)`` on the server and return its result.

        Raises ``RpcTimeout`` if no reply arrives within ``timeout`` seconds (the request may
        still run later), ``RemoteError`` (with the remote ``kind``, ``message`` and ``status``)
        if the handler raised or the method is unknown, ``BusError`` if the bus is unreachable,
        and ``TypeError`` for arguments JSON cannot carry (nothing is sent).
        """
        if not timeout > 0:
            raise ValueError(f"the timeout of a call must be positive, got {timeout!r}")
        deadline = time.monotonic() + timeout
        correlation_id = uuid.uuid4().hex
        env = self._envelope(
            method, kwargs, reply_to=self.reply_queue, correlation_id=correlation_id
        )
        body = seal(env, self._key)
        self._ensure_listener(deadline)
        future: Future[Envelope] = Future()
        with self._pending_lock:
            self._pending[correlation_id] = future
        try:
            self._publish(body, method, delivery_mode=1, expiration=timeout)
            try:
                reply = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise RpcTimeout(
                    f"{self.target} did not answer {method!r} within {timeout:g} s"
                ) from None
        finally:
            with self._pending_lock:
                self._pending.pop(correlation_id, None)
        if reply.error is not None:
            error = reply.error
            raise RemoteError(
                str(error.get("kind", "RemoteError")),
                str(error.get("message", "the remote call failed")),
                int(error.get("status", 500)),
            )
        return reply.result

    def close(self) -> None:
        """Stop the reply listener, close connections and fail calls still waiting; idempotent."""
        self._closed = True
        listener = self._listener
        if listener is not None:
            _stop_and_join(self._stop, listener, 5)
        else:
            self._stop.set()
        with self._publish_lock:
            self._reset_publisher()
        with self._pending_lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(BusError(f"the RPC client for {self.target} was closed"))

    def _envelope(
        self,
        method: str,
        kwargs: dict[str, Any],
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        if self._closed:
            raise BusError(f"the RPC client for {self.target} is closed")
        if not isinstance(method, str) or not method:
            raise ValueError("an RPC method name must be a non-empty string")
        return Envelope.new(
            key_id=self.key_id,
            sender=self.sender,
            target=self.target,
            method=method,
            kwargs=kwargs,
            seq=self._seq.next(),
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    def _publish(
        self, body: bytes, method: str, delivery_mode: int, expiration: float | None = None
    ) -> None:
        with self._publish_lock:
            if self._conn is None:
                self._conn = connection(self.url)
                self._producer = kombu.Producer(self._conn, auto_declare=False)
            conn, producer = self._conn, self._producer
            assert producer is not None
            try:
                producer.publish(
                    body,
                    exchange="",
                    routing_key=self.target,
                    content_type=CONTENT_TYPE,
                    content_encoding="binary",
                    delivery_mode=delivery_mode,
                    expiration=expiration,
                    declare=[self._queue],
                    retry=True,
                    retry_policy=_PUBLISH_RETRY,
                )
            except conn.connection_errors + conn.channel_errors + (OperationalError,) as exc:
                self._reset_publisher()
                raise BusError(
                    f"could not send {method!r} to {self.target}: the bus at "
                    f"{safe_url(self.url)} is unreachable ({_describe(exc, self.url)})"
                ) from None

    def _reset_publisher(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = None
        self._producer = None

    # -- replies -------------------------------------------------------------------------------

    def _ensure_listener(self, deadline: float) -> None:
        with self._listener_lock:
            if self._listener is None:
                queue = kombu.Queue(
                    self.reply_queue, durable=False, auto_delete=True, exclusive=True
                )
                self._listener = threading.Thread(
                    target=_consume_loop,
                    args=(
                        self.url,
                        queue,
                        self._on_reply,
                        self._stop,
                        f"RPC client of {self.target}",
                    ),
                    kwargs={"no_ack": True, "on_ready": self._listener_ready.set},
                    name=f"rpc-replies-{self.target}",
                    daemon=True,
                )
                self._listener.start()
        if not self._listener_ready.wait(max(0.0, deadline - time.monotonic())):
            raise BusError(
                f"could not listen for replies from {self.target}: the bus at "
                f"{safe_url(self.url)} did not answer in time"
            )

    def _on_reply(self, message: kombu.Message, _session: _Session) -> None:
        try:
            env = open_sealed(message.body, self._keyring, expected_target=self.reply_queue)
        except SealError as exc:
            log.warning("dropped a reply for %s: %s", self.reply_queue, exc)
            return
        if env.correlation_id is None:
            log.warning("dropped a reply for %s without a correlation id", self.reply_queue)
            return
        with self._pending_lock:
            future = self._pending.pop(env.correlation_id, None)
        if future is None:
            # The caller gave up (timeout) or this is a duplicate.
            log.debug("dropped a late reply to %s from %s", env.method, env.sender)
            return
        if not future.done():
            future.set_result(env)


class RpcServer:
    """Consumes `target`, opens each message with `keyring`, checks `guard`, dispatches to
    endpoints.<method>(**kwargs) only for methods in `endpoints.rpc_methods` (a set of names) -
    anything else gets a RemoteError reply. A CofferError raised by a handler becomes a reply
    error with its class name, message and status; any other exception becomes an
    'InternalError' with a generic message (details logged, never secrets). Rejected messages
    (SealError) are logged at WARNING with the reason and dropped (acked), never crash the loop.
    Survives broker restarts (reconnects with backoff).

    ``workers`` consumers each hold their own connection and handle one message at a time, so up
    to ``workers`` handlers run concurrently; handlers must be thread-safe when ``workers > 1``.
    With ``require_sender_is_key_id`` (the conductor) a message whose ``sender`` differs from its
    ``key_id`` is rejected: a guest can speak only for itself. Replies are sealed with the key
    that opened the request and addressed only to ``reply.*`` queues.

    ``guard`` runs on the worker thread immediately before that message's handler, after the
    seal, target and sender checks; it rejects a message by raising ``SealError``. Any other
    exception from the key ring or guard is logged and the message dropped.
    """

    def __init__(
        self,
        url: str,
        target: str,
        endpoints: object,
        keyring: KeyRing,
        guard: Callable[[Envelope], None] | None = None,
        require_sender_is_key_id: bool = False,
        workers: int = 1,
    ) -> None:
        check_queue_name(target, "RPC target")
        if target.startswith(REPLY_PREFIX):
            raise ValidationError(f"RPC target {target!r} uses the reserved prefix 'reply.'")
        if not isinstance(workers, int) or workers < 1:
            raise ValidationError(f"workers must be a positive integer, got {workers!r}")
        self.url = url
        self.target = target
        self.endpoints = endpoints
        self._keyring = keyring
        self._guard = guard if guard is not None else ReplayGuard().check
        self._require_sender = require_sender_is_key_id
        self.workers = workers
        self._signatures = _rpc_signatures(endpoints)
        self._seq = SequenceCounter()
        self._queue = _target_queue(target)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready_lock = threading.Lock()
        self._ready_count = 0
        self._ready = threading.Event()

    def __repr__(self) -> str:
        return f"RpcServer(url={safe_url(self.url)!r}, target={self.target!r})"

    def start(self) -> None:
        """Serve in background threads until ``stop()``; returns at once. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.serve_forever,
            args=(self._stop,),
            name=f"rpc-server-{self.target}",
            daemon=True,
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker has consumed from the queue once; False on timeout."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5) -> None:
        """Ask the workers to stop and wait up to ``timeout`` seconds for them to finish.

        A handler already running is allowed to finish; its message is then acknowledged.
        """
        if self._thread is None:
            self._stop.set()
        else:
            _stop_and_join(self._stop, self._thread, timeout)
            if self._thread.is_alive():
                log.warning("RPC server for %s did not stop within %g s", self.target, timeout)
            else:
                self._thread = None

    def serve_forever(self, stop_event: threading.Event) -> None:
        """Serve in the calling thread (plus ``workers - 1`` helper threads) until
        ``stop_event`` is set; returns when all of them have stopped."""
        helpers = [
            threading.Thread(
                target=self._worker,
                args=(stop_event, index),
                name=f"rpc-server-{self.target}-{index}",
                daemon=True,
            )
            for index in range(1, self.workers)
        ]
        for thread in helpers:
            thread.start()
        try:
            self._worker(stop_event, 0)
        finally:
            for thread in helpers:
                _stop_and_join(stop_event, thread, float("inf"))

    # -- internals -----------------------------------------------------------------------------

    def _worker(self, stop_event: threading.Event, index: int) -> None:
        first = threading.Event()

        def on_ready() -> None:
            if first.is_set():
                return
            first.set()
            with self._ready_lock:
                self._ready_count += 1
                if self._ready_count >= self.workers:
                    self._ready.set()

        _consume_loop(
            self.url,
            self._queue,
            self._on_message,
            stop_event,
            f"RPC server {self.target}#{index}",
            no_ack=False,
            on_ready=on_ready,
        )

    def _on_message(self, message: kombu.Message, session: _Session) -> None:
        try:
            env = self._open(message.body)
        except SealError as exc:
            log.warning("rejected a message on %s: %s", self.target, exc)
            message.ack()
            return
        except Exception:
            # E.g. a key ring backed by a database that failed. Dropping keeps one bad message
            # from stalling the queue forever; senders of important work retry or resume.
            log.exception("could not check a message on %s; dropped it", self.target)
            message.ack()
            return
        started = time.monotonic()
        result, error = self._dispatch(env)
        if env.reply_to is not None:
            self._reply(session, env, result, error)
        message.ack()
        log.debug(
            "%s handled %s from %s in %.1f ms",
            self.target,
            env.method,
            env.sender,
            (time.monotonic() - started) * 1000,
        )

    def _open(self, body: Any) -> Envelope:
        env = open_sealed(body, self._keyring, expected_target=self.target)
        if self._require_sender and env.sender != env.key_id:
            raise SealError(
                f"message {env.msg_id} claims to come from {env.sender!r} but is sealed with "
                f"the key of {env.key_id!r}; a sender may speak only for itself"
            )
        if env.reply_to is not None and not env.reply_to.startswith(REPLY_PREFIX):
            raise SealError(
                f"message {env.msg_id} asks for a reply to {env.reply_to!r}, which is not a "
                "reply queue"
            )
        self._guard(env)
        return env

    def _dispatch(self, env: Envelope) -> tuple[Any, dict[str, Any] | None]:
        signature = self._signatures.get(env.method)
        if signature is None:
            log.warning(
                "%s has no RPC method %r (asked by %s)", self.target, env.method, env.sender
            )
            return None, _error(UnknownMethod(f"{self.target} has no RPC method {env.method!r}"))
        try:
            signature.bind(**env.kwargs)
        except TypeError as exc:
            return None, _error(BadArguments(f"wrong arguments for {env.method!r}: {exc}"))
        handler = getattr(self.endpoints, env.method)
        try:
            return handler(**env.kwargs), None
        except CofferError as exc:
            log.info(
                "%s.%s from %s raised %s", self.target, env.method, env.sender, type(exc).__name__
            )
            return None, _error(exc)
        except Exception as exc:
            details = "".join(traceback.format_exception(exc))
            for secret in _secret_values(env.kwargs):
                details = details.replace(secret, "**")
            log.error(
                "%s.%s (message %s from %s) failed:\n%s",
                self.target,
                env.method,
                env.msg_id,
                env.sender,
                details,
            )
            return None, _error(
                InternalError(f"{self.target} failed to handle {env.method!r}; see its log")
            )

    def _reply(
        self, session: _Session, request: Envelope, result: Any, error: dict[str, Any] | None
    ) -> None:
        assert request.reply_to is not None
        key = self._keyring.key_for(request.key_id)

        def build(result: Any, error: dict[str, Any] | None) -> Envelope:
            assert request.reply_to is not None
            return Envelope.new(
                key_id=request.key_id,
                sender=self.target,
                target=request.reply_to,
                method=request.method,
                seq=self._seq.next(),
                correlation_id=request.correlation_id,
                result=result,
                error=error,
            )

        try:
            body = seal(build(result, error), key)
        except TypeError:
            log.error(
                "%s.%s returned a result JSON cannot carry (%s)",
                self.target,
                request.method,
                type(result).__name__,
            )
            body = seal(
                build(
                    None,
                    _error(InternalError(f"{self.target} returned an unsendable result")),
                ),
                key,
            )
        session.producer.publish(
            body,
            exchange="",
            routing_key=request.reply_to,
            content_type=CONTENT_TYPE,
            content_encoding="binary",
            delivery_mode=1,
        )


def _error(exc: CofferError) -> dict[str, Any]:
    # A RemoteError re-raised by a handler keeps the kind of the original failure.
    kind = exc.kind if isinstance(exc, RemoteError) else type(exc).__name__
    return {"kind": kind, "message": exc.message, "status": int(exc.status)}


_SECRET_NAME = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)


def _secret_values(value: Any, secret: bool = False) -> set[str]:
    """String values under argument names that look secret, to mask them in logged tracebacks."""
    found: set[str] = set()
    if isinstance(value, dict):
        for name, item in value.items():
            found |= _secret_values(item, secret or bool(_SECRET_NAME.search(str(name))))
    elif isinstance(value, list):
        for item in value:
            found |= _secret_values(item, secret)
    elif secret and isinstance(value, str) and len(value) >= 3:
        found.add(value)
    return found


def _rpc_signatures(endpoints: object) -> dict[str, inspect.Signature]:
    names = getattr(endpoints, "rpc_methods", None)
    if isinstance(names, str | bytes) or not isinstance(names, set | frozenset | list | tuple):
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValidationError(
            f"{type(endpoints).__name__} must have an 'rpc_methods' attribute: a set of the "
            "method names it exposes"
        )
    signatures = {}
    for name in sorted(names):
        handler = getattr(endpoints, name, None)
        if name.startswith("_") or not callable(handler):
            raise ValidationError(
                f"{type(endpoints).__name__}.rpc_methods lists {name!r}, which is not a public "
                "method"
            )
        signatures[name] = inspect.signature(handler)
    return signatures
