"""The one table from domain errors to HTTP statuses (SPEC §2.3)."""

from __future__ import annotations

from .. import errors as e

STATUS: dict[type[e.KeepError], int] = {
    e.BadRoute: 400,
    e.InvalidLocator: 400,
    e.InvalidSignature: 400,
    e.ContentHashMismatch: 400,
    e.ContentLengthMismatch: 400,
    e.BadRequestBody: 400,
    e.InvalidList: 400,
    e.NoToken: 401,
    e.SignatureExpired: 401,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.BlockNotFound: 404,
    e.MethodNotAllowed: 405,
    e.TooLarge: 413,
    e.ClientGone: 499,
    e.HashCollision: 500,
    e.VolumeError: 500,
    e.TrashDisabled: 500,
    e.ChecksumMismatch: 502,
    e.VolumeUnavailable: 503,
    e.ServiceUnavailable: 503,
    e.Overloaded: 503,
    e.VolumeFull: 507,
}


def status_of(exc: e.KeepError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500
