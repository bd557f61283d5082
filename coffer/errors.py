"""Coffer's error family.

Every error a user can see is a ``CofferError``. Its HTTP status and Trove fault name are class
attributes resolved along the MRO, so a new subclass inherits the right status from its parent
instead of silently becoming a 400 or a 500. Messages are sentences a user can act on and never
contain secrets.
"""

from __future__ import annotations


class CofferError(Exception):
    """Base of every error Coffer reports to a user or an operator."""

    status: int = 500
    fault: str = "instanceFault"
    #: True when retrying the same operation later may succeed (a driver's transient fault).
    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CofferError):
    status = 400
    fault = "badRequest"


class ValidationError(BadRequest):
    """A field, argument or config key failed validation; nothing was changed."""


class Unauthorized(CofferError):
    status = 401
    fault = "unauthorized"


class Forbidden(CofferError):
    status = 403
    fault = "forbidden"


class NotFound(CofferError):
    status = 404
    fault = "itemNotFound"


class Conflict(CofferError):
    status = 409
    fault = "conflict"


class OverLimit(CofferError):
    status = 413
    fault = "overLimit"


class UnprocessableEntity(CofferError):
    status = 422
    fault = "unprocessableEntity"


class NotImplementedByDatastore(CofferError):
    status = 501
    fault = "notImplemented"


class ServiceUnavailable(CofferError):
    status = 503
    fault = "serviceUnavailable"
    transient = True


class ConfigError(CofferError):
    """The configuration is invalid; raised at start with every problem listed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
        )


# --- errors from the guest and the engines -----------------------------------------------------


class GuestError(CofferError):
    """The guest agent reported a failure while carrying out a request."""

    status = 500
    fault = "serverError"


class GuestTimeout(GuestError):
    """The guest agent did not answer in time."""

    status = 503
    fault = "serviceUnavailable"
    transient = True


class EngineError(CofferError):
    """The database engine refused or failed an operation."""


class DatabaseAlreadyExists(BadRequest):
    pass


class UserAlreadyExists(BadRequest):
    pass


class DatabaseNotFound(NotFound):
    pass


class UserNotFound(NotFound):
    pass


class RootHistoryNotFound(NotFound):
    pass


# --- errors on the bus -------------------------------------------------------------------------


class BusError(CofferError):
    """The message bus failed (connection lost, broker down)."""

    status = 503
    fault = "serviceUnavailable"
    transient = True


class RpcTimeout(BusError):
    """No reply arrived within the call's timeout."""


class SealError(BusError):
    """A message could not be opened: wrong key, tampered, replayed or stale.

    Not transient: the same message will never open.
    """

    transient = False


class RemoteError(CofferError):
    """The server side of an RPC call raised; carries the remote class name and message."""

    def __init__(self, kind: str, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


# --- errors from the compute layer -------------------------------------------------------------


class ComputeError(CofferError):
    """The compute driver could not create, start or remove an instance's server."""


class AddressPoolExhausted(ComputeError):
    status = 503
    fault = "serviceUnavailable"
