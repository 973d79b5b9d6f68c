"""Domain errors.

Storage and placement code raise these; it never speaks HTTP. The HTTP layer maps each class to a status in one
table (``keepstore/http/errors.py``). The message of each error is what a client sees in the response body, so the
texts follow the Go keepstore's exactly where clients or tests may match on them.
"""

from __future__ import annotations


class KeepError(Exception):
    """Base of every error keepstore reports to a client."""

    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else self.message)


class BadRoute(KeepError):
    message = "Bad Request"


class InvalidLocator(KeepError):
    message = "invalid locator"


class MethodNotAllowed(KeepError):
    message = "method not allowed"


class NoToken(KeepError):
    message = "no token provided in Authorization header"


class SignatureExpired(KeepError):
    message = "expired signature"


class InvalidSignature(KeepError):
    message = "invalid signature"


class Unauthorized(KeepError):
    """An admin route was called without any token."""

    message = "Unauthorized"


class Forbidden(KeepError):
    """An admin route was called with a token that is not the root token (or admin routes are closed)."""

    message = "Forbidden"


class BlockNotFound(KeepError):
    """No copy of the block (or, for trash operations, no trashed copy) exists where we looked."""

    message = "file does not exist"


class ChecksumMismatch(KeepError):
    """Stored data did not hash to its name (or had the wrong size)."""

    message = "checksum mismatch in stored data"


class ContentHashMismatch(KeepError):
    """A PUT body does not hash to the locator it was sent to."""

    def __init__(self, computed: str, locator: str) -> None:
        super().__init__(f"content hash {computed} did not match specified locator {locator}")


class ContentLengthMismatch(KeepError):
    def __init__(self, got: int, declared: int) -> None:
        super().__init__(f"content length {got} did not match specified data size {declared}")


class BadRequestBody(KeepError):
    """The request body could not be read as HTTP says it should (e.g. broken chunked encoding)."""

    message = "invalid request body"


class TooLarge(KeepError):
    message = "request entity too large"


class HashCollision(KeepError):
    message = "hash collision"


class VolumeFull(KeepError):
    message = "insufficient storage"


class VolumeUnavailable(KeepError):
    message = "volume unavailable"


class VolumeError(KeepError):
    """A backend failed for a reason other than not-found or full (I/O error, permission, network)."""

    message = "volume error"


class ServiceUnavailable(KeepError):
    """A part of the server needed for the request is not available right now (try again later)."""

    message = "service unavailable"


class TrashDisabled(KeepError):
    """The volume refuses to trash (e.g. S3 with BlobTrashLifetime 0 and no UnsafeDelete)."""

    message = "trash is disabled on this volume"


class InvalidList(KeepError):
    """A pull or trash list failed validation; the message names the offending item."""


class Overloaded(KeepError):
    """The request queue is full (answered with 503 and an empty body, as Arvados does)."""

    message = ""


class ClientGone(KeepError):
    """The client went away or the request timed out before a response started (logged as 499)."""

    message = ""
