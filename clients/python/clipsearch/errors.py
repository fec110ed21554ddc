"""One error hierarchy for engines, servicers and the client SDK.

Engines raise these without knowing gRPC; ``clipsearch.status`` turns them
into gRPC statuses for the servers and turns statuses back into them for callers.
``code`` is the name of the matching ``grpc.StatusCode``.
"""

from __future__ import annotations


class ClipsearchError(Exception):
    code = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        # The request field at fault (reported as a google.rpc.BadRequest violation).
        self.field = field
        # A short machine-readable reason (reported as google.rpc.ErrorInfo).
        self.reason = reason
        # Seconds after which a retry may succeed (google.rpc.RetryInfo and a
        # ``retry-after-ms`` trailer); None when the server gave no hint.
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(ClipsearchError):
    code = "INVALID_ARGUMENT"


class NotFound(ClipsearchError):
    code = "NOT_FOUND"


class AlreadyExists(ClipsearchError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ClipsearchError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ClipsearchError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ClipsearchError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ClipsearchError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(ClipsearchError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ClipsearchError):
    code = "PERMISSION_DENIED"


class Internal(ClipsearchError):
    code = "INTERNAL"


# google.rpc.ErrorInfo reasons that callers act on.
# An index shard does not know a filter key; a caller fanning out over shards may
# find the key on another shard, so this shard simply matches nothing.
UNKNOWN_FILTER_KEY = "UNKNOWN_FILTER_KEY"


ERRORS_BY_CODE: dict[str, type[ClipsearchError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


def error_for_code(code_name: str, message: str) -> ClipsearchError:
    """The exception class matching a gRPC status code name."""
    cls = ERRORS_BY_CODE.get(code_name, ClipsearchError)
    err = cls(message)
    if cls is ClipsearchError:
        err.code = code_name
    return err
