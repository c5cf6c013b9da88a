"""Errors that carry a SQLSTATE, and the one place that turns them into ErrorResponse bytes.

``ClientProtocolError`` is "the client broke the protocol"; ``UpstreamError``
is "the database (or the way to it) failed"; ``PoolError`` is hyperpool's own
refusal (limits, timeouts). Everything the client may see goes through
:func:`error_response`, which never includes a Python traceback.
"""

from __future__ import annotations

from collections.abc import Mapping

from hyperpool.protocol import messages


class ProxyError(Exception):
    """An error to report to a client as an ErrorResponse."""

    sqlstate = "XX000"
    fatal = False

    def __init__(self, message: str, *, sqlstate: str | None = None, fatal: bool | None = None,
                 detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if fatal is not None:
            self.fatal = fatal
        self.detail = detail
        self.hint = hint

    def fields(self) -> dict[str, str]:
        severity = "FATAL" if self.fatal else "ERROR"
        fields = {"S": severity, "V": severity, "C": self.sqlstate, "M": self.message}
        if self.detail:
            fields["D"] = self.detail
        if self.hint:
            fields["H"] = self.hint
        return fields


class ClientProtocolError(ProxyError):
    """The client sent something that is not valid protocol: 08P01, connection closed."""

    sqlstate = "08P01"
    fatal = True


class AuthenticationError(ProxyError):
    """Password authentication failed (28P01) or the role is not allowed (28000)."""

    sqlstate = "28P01"
    fatal = True


class UpstreamError(ProxyError):
    """The database could not be reached or failed underneath a client (08006 class)."""

    sqlstate = "08006"
    fatal = True


class UpstreamErrorResponse(ProxyError):
    """The database itself answered with an ErrorResponse; its fields are relayed as they are."""

    fatal = True

    def __init__(self, server_fields: Mapping[str, str]) -> None:
        super().__init__(server_fields.get("M", "upstream error"), sqlstate=server_fields.get("C", "XX000"))
        self.server_fields = dict(server_fields)

    def fields(self) -> dict[str, str]:
        return dict(self.server_fields)


class PoolError(ProxyError):
    """hyperpool refuses: too many clients, wait timeout, paused or shutting down."""

    sqlstate = "53300"
    fatal = True


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the reason."""


def error_response(exc: BaseException) -> bytes:
    """ErrorResponse bytes for any exception: ProxyError keeps its fields, anything else is XX000."""
    if isinstance(exc, ProxyError):
        return messages.error_fields(exc.fields())
    fields = {"S": "FATAL", "V": "FATAL", "C": "XX000", "M": "internal error in hyperpool"}
    return messages.error_fields(fields)
