"""Encode and decode the messages hyperpool itself must understand.

Everything else is relayed as the original bytes (see framing.MessageRelay).
Names follow the PostgreSQL protocol documentation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from hyperpool.protocol.framing import ProtocolViolation, StartupCode

_I32 = struct.Struct("!i")
_I32I32 = struct.Struct("!ii")


def _msg(type_byte: bytes, payload: bytes = b"") -> bytes:
    return type_byte + _I32.pack(len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


# --- backend messages (hyperpool -> client) -------------------------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def authentication(code: int, data: bytes = b"") -> bytes:
    return _msg(b"R", _I32.pack(code) + data)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return _msg(b"K", _I32I32.pack(pid, secret))


def ready_for_query(status: bytes) -> bytes:
    return _msg(b"Z", status)


def negotiate_protocol_version(minor: int, unsupported: Iterable[str]) -> bytes:
    names = list(unsupported)
    return _msg(b"v", _I32.pack(minor) + _I32.pack(len(names)) + b"".join(_cstr(n) for n in names))


def error_fields(fields: Mapping[str, str], type_byte: bytes = b"E") -> bytes:
    body = b"".join(code.encode() + _cstr(value) for code, value in fields.items())
    return _msg(type_byte, body + b"\x00")


def row_description(columns: Iterable[str | tuple[str, int]]) -> bytes:
    """A text-format RowDescription: column names (typed text, OID 25) or (name, type OID) pairs."""
    cols = [(c, 25) if isinstance(c, str) else c for c in columns]
    out = [struct.pack("!h", len(cols))]
    for name, oid in cols:
        size = 8 if oid == 20 else -1
        out.append(_cstr(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0))
    return _msg(b"T", b"".join(out))


EMPTY_QUERY = b"I\x00\x00\x00\x04"


def data_row(values: Iterable[str | None]) -> bytes:
    vals = list(values)
    out = [struct.pack("!h", len(vals))]
    for v in vals:
        if v is None:
            out.append(_I32.pack(-1))
        else:
            b = v.encode()
            out.append(_I32.pack(len(b)) + b)
    return _msg(b"D", b"".join(out))


def command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


# --- frontend messages (hyperpool -> server, as a client) ----------------------------------


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _I32.pack(StartupCode.PROTOCOL_3_0) + b"".join(
        _cstr(k) + _cstr(v) for k, v in params.items()
    ) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32I32.pack(8, StartupCode.SSL_REQUEST)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(StartupCode.CANCEL_REQUEST) + _I32I32.pack(pid, secret)


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def password_message(data: bytes) -> bytes:
    return _msg(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _msg(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


TERMINATE: bytes = _msg(b"X")
SYNC: bytes = _msg(b"S")
PARSE_COMPLETE: bytes = _msg(b"1")
CLOSE_COMPLETE: bytes = _msg(b"3")


# --- extended query protocol: statement names (hyperpool renames them) -----------------------


def _cstring_at(payload: bytes, start: int) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset after its NUL."""
    end = payload.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation("string field is not NUL-terminated")
    return payload[start:end], end + 1


def decode_parse(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Parse: (statement name, query text, the parameter-type part as sent: int16 count + OIDs)."""
    name, pos = _cstring_at(payload, 0)
    sql, pos = _cstring_at(payload, pos)
    types = payload[pos:]
    if len(types) < 2 or len(types) != 2 + 4 * struct.unpack_from("!h", types)[0]:
        raise ProtocolViolation("invalid Parse message")
    return name, sql, types


def parse(name: bytes, sql: bytes, types: bytes) -> bytes:
    return _msg(b"P", name + b"\x00" + sql + b"\x00" + types)


def decode_bind_names(payload: bytes) -> tuple[bytes, bytes, int]:
    """Bind: (portal name, statement name, offset of the rest of the payload)."""
    portal, pos = _cstring_at(payload, 0)
    statement, pos = _cstring_at(payload, pos)
    return portal, statement, pos


def bind_renamed(payload: bytes, portal: bytes, statement: bytes, rest: int) -> bytes:
    """The Bind message ``payload`` came from, naming ``statement`` instead."""
    return _msg(b"B", portal + b"\x00" + statement + b"\x00" + payload[rest:])


def decode_target(payload: bytes) -> tuple[int, bytes]:
    """Describe / Close: (b'S' or b'P' as int, name)."""
    if len(payload) < 2:
        raise ProtocolViolation("invalid Describe or Close message")
    name, pos = _cstring_at(payload, 1)
    if pos != len(payload):
        raise ProtocolViolation("invalid Describe or Close message")
    return payload[0], name


def describe(kind: bytes, name: bytes) -> bytes:
    return _msg(b"D", kind + name + b"\x00")


def close(kind: bytes, name: bytes) -> bytes:
    return _msg(b"C", kind + name + b"\x00")


# --- decoders ------------------------------------------------------------------------------


def _split_cstrings(payload: bytes) -> list[str]:
    if not payload.endswith(b"\x00"):
        raise ProtocolViolation("string field is not NUL-terminated")
    try:
        return payload[:-1].decode().split("\x00")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid UTF-8 in message") from exc


def decode_startup_params(body: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage body (after the protocol version)."""
    if body in (b"", b"\x00"):
        return {}
    if not body.endswith(b"\x00\x00"):
        raise ProtocolViolation("startup packet is not terminated")
    parts = _split_cstrings(body[:-1])
    if len(parts) % 2:
        raise ProtocolViolation("startup packet has a name without a value")
    return dict(zip(parts[::2], parts[1::2], strict=True))


def decode_parameter_status(payload: bytes) -> tuple[str, str]:
    parts = _split_cstrings(payload)
    if len(parts) != 2:
        raise ProtocolViolation("malformed ParameterStatus")
    return parts[0], parts[1]


def decode_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by field code ('S', 'C', 'M', ...)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        end = payload.find(b"\x00", pos + 1)
        if end < 0:
            raise ProtocolViolation("unterminated field in ErrorResponse/NoticeResponse")
        fields[chr(payload[pos])] = payload[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def decode_authentication(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolViolation("short Authentication message")
    return _I32.unpack_from(payload)[0], payload[4:]


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode(errors="replace") for m in data.split(b"\x00") if m]


def decode_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    """Mechanism name and client-first data of a SASLInitialResponse."""
    nul = payload.find(b"\x00")
    if nul < 0 or len(payload) < nul + 5:
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = payload[:nul].decode(errors="replace")
    (length,) = _I32.unpack_from(payload, nul + 1)
    data = payload[nul + 5 :]
    if length != len(data):
        raise ProtocolViolation("SASLInitialResponse length mismatch")
    return mechanism, data


def decode_backend_key_data(payload: bytes) -> tuple[int, int]:
    if len(payload) != 8:
        raise ProtocolViolation("malformed BackendKeyData")
    return _I32I32.unpack(payload)


def decode_password(payload: bytes) -> bytes:
    if not payload.endswith(b"\x00"):
        raise ProtocolViolation("password packet is not NUL-terminated")
    return payload[:-1]


def decode_data_row(payload: bytes) -> list[str | None]:
    """A DataRow's columns as text (hyperpool only reads rows of its own queries)."""
    if len(payload) < 2:
        raise ProtocolViolation("invalid DataRow")
    (count,) = struct.unpack_from("!h", payload, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise ProtocolViolation("invalid DataRow")
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(payload[pos : pos + length].decode(errors="replace"))
        pos += length
    if pos != len(payload):
        raise ProtocolViolation("invalid DataRow")
    return values
