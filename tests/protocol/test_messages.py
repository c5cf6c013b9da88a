"""Unit tests for hyperpool.protocol.messages: exact encoder bytes, encode/decode round trips, malformed input."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hyperpool.protocol import messages as m
from hyperpool.protocol.framing import FrameBuffer, Message, ProtocolViolation, StartupCode, read_startup

WIRE_DIR = Path(__file__).resolve().parents[3] / "shared" / "wire"


def i32(n: int) -> bytes:
    return struct.pack("!i", n)


def i16(n: int) -> bytes:
    return struct.pack("!h", n)


def only_message(raw: bytes) -> Message:
    """Frame ``raw`` as exactly one typed message (checks the encoder's length field)."""
    fb = FrameBuffer(max_length=1 << 20)
    fb.feed(raw)
    msg = fb.next_message()
    assert msg is not None and fb.take_rest() == b""
    return msg


# --- exact bytes ----------------------------------------------------------------------------

ENCODER_CASES = [
    pytest.param(m.ready_for_query(b"I"), b"Z\x00\x00\x00\x05I", id="ready_for_query-I"),
    pytest.param(m.ready_for_query(b"T"), b"Z\x00\x00\x00\x05T", id="ready_for_query-T"),
    pytest.param(m.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E", id="ready_for_query-E"),
    pytest.param(m.TERMINATE, b"X\x00\x00\x00\x04", id="terminate"),
    pytest.param(m.ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f", id="ssl_request"),
    pytest.param(
        m.cancel_request(0x01020304, -2),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x01\x02\x03\x04\xff\xff\xff\xfe",
        id="cancel_request",
    ),
    pytest.param(
        m.negotiate_protocol_version(0, ["_pq_.compression", "_pq_.x"]),
        b"v\x00\x00\x00\x24\x00\x00\x00\x00\x00\x00\x00\x02_pq_.compression\x00_pq_.x\x00",
        id="negotiate_protocol_version",
    ),
    pytest.param(
        m.negotiate_protocol_version(2, []),
        b"v\x00\x00\x00\x0c\x00\x00\x00\x02\x00\x00\x00\x00",
        id="negotiate_protocol_version-none",
    ),
    pytest.param(m.authentication(m.AUTH_OK), b"R\x00\x00\x00\x08\x00\x00\x00\x00", id="authentication-ok"),
    pytest.param(
        m.authentication(m.AUTH_MD5, b"salt"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt", id="authentication-md5"
    ),
    pytest.param(
        m.authentication_sasl(["SCRAM-SHA-256"]),
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
        id="authentication_sasl",
    ),
    pytest.param(m.parameter_status("a", "b"), b"S\x00\x00\x00\x08a\x00b\x00", id="parameter_status"),
    pytest.param(
        m.backend_key_data(1, -1), b"K\x00\x00\x00\x0c\x00\x00\x00\x01\xff\xff\xff\xff", id="backend_key_data"
    ),
    pytest.param(
        m.error_fields({"S": "ERROR", "C": "08P01"}), b"E\x00\x00\x00\x13SERROR\x00C08P01\x00\x00", id="error"
    ),
    pytest.param(m.error_fields({"M": "hi"}, b"N"), b"N\x00\x00\x00\x09Mhi\x00\x00", id="notice"),
    pytest.param(m.error_fields({}), b"E\x00\x00\x00\x05\x00", id="error-empty"),
    pytest.param(m.command_complete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00", id="command_complete"),
    pytest.param(m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00", id="query"),
    pytest.param(m.password_message(b"pw\x00"), b"p\x00\x00\x00\x07pw\x00", id="password_message"),
    pytest.param(
        m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
        b"p\x00\x00\x00\x1fSCRAM-SHA-256\x00\x00\x00\x00\x09n,,n=,r=x",
        id="sasl_initial_response",
    ),
    pytest.param(
        m.startup_message({"user": "app"}),
        b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00app\x00\x00",
        id="startup_message",
    ),
    pytest.param(m.startup_message({}), b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", id="startup_message-empty"),
    pytest.param(
        m.row_description(["a"]),
        b"T\x00\x00\x00\x1a" + i16(1) + b"a\x00" + i32(0) + i16(0) + i32(25) + i16(-1) + i32(-1) + i16(0),
        id="row_description",
    ),
    pytest.param(m.row_description([]), b"T\x00\x00\x00\x06\x00\x00", id="row_description-empty"),
    pytest.param(
        m.data_row(["ab", None, ""]),
        b"D\x00\x00\x00\x14" + i16(3) + i32(2) + b"ab" + i32(-1) + i32(0),
        id="data_row",
    ),
]


@pytest.mark.parametrize(("got", "expected"), ENCODER_CASES)
def test_encoder_exact_bytes(got: bytes, expected: bytes) -> None:
    assert got == expected


@pytest.mark.parametrize(("got", "expected"), [c for c in ENCODER_CASES if c.values[1][:1] != b"\x00"])
def test_typed_encoders_frame_as_one_message(got: bytes, expected: bytes) -> None:
    msg = only_message(got)
    assert msg.raw == got and msg.type == got[0]


def test_auth_codes() -> None:
    assert (m.AUTH_OK, m.AUTH_CLEARTEXT, m.AUTH_MD5) == (0, 3, 5)
    assert (m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL) == (10, 11, 12)


# --- round trips ----------------------------------------------------------------------------

STARTUP_PARAMS = [
    {},
    {"user": "app"},
    {"user": "app", "database": "postgres", "application_name": "psql"},
    {"user": "ünïcödé", "options": "-c search_path=a,b", "empty": ""},
    {"user": "u" * 500, "database": "d" * 500},
]


@pytest.mark.parametrize("params", STARTUP_PARAMS)
def test_startup_message_round_trip(params: dict[str, str]) -> None:
    raw = m.startup_message(params)
    buf = bytearray(raw + m.query("x"))
    packet = read_startup(buf)
    assert packet is not None
    assert packet.code == StartupCode.PROTOCOL_3_0 and (packet.major, packet.minor) == (3, 0)
    assert buf == m.query("x")
    assert m.decode_startup_params(packet.body) == params
    assert list(m.decode_startup_params(packet.body)) == list(params)  # order kept


ERROR_FIELDS = [
    {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": 'relation "nope" does not exist', "P": "15"},
    {"S": "FATAL", "C": "28P01", "M": "password authentication failed for user \"app\""},
    {"S": "NOTICE", "M": "ünïcödé ✓", "D": ""},
    {},
]


@pytest.mark.parametrize("fields", ERROR_FIELDS)
@pytest.mark.parametrize("type_byte", [b"E", b"N"])
def test_error_fields_round_trip(fields: dict[str, str], type_byte: bytes) -> None:
    msg = only_message(m.error_fields(fields, type_byte))
    assert msg.type == type_byte[0]
    assert m.decode_error_fields(msg.payload) == fields


@pytest.mark.parametrize(
    ("name", "value"),
    [("client_encoding", "UTF8"), ("TimeZone", "Europe/Paris"), ("application_name", ""), ("ünï", "✓")],
)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    msg = only_message(m.parameter_status(name, value))
    assert msg.type == ord("S")
    assert m.decode_parameter_status(msg.payload) == (name, value)


@pytest.mark.parametrize(("pid", "secret"), [(0, 0), (1234, 5678), (2**31 - 1, -(2**31)), (-1, 1)])
def test_backend_key_data_round_trip(pid: int, secret: int) -> None:
    msg = only_message(m.backend_key_data(pid, secret))
    assert msg.type == ord("K")
    assert m.decode_backend_key_data(msg.payload) == (pid, secret)


@pytest.mark.parametrize(
    ("mechanism", "data"),
    [("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"), ("SCRAM-SHA-256-PLUS", b""), ("X", b"\x00\x01\xff" * 50)],
)
def test_sasl_initial_response_round_trip(mechanism: str, data: bytes) -> None:
    msg = only_message(m.sasl_initial_response(mechanism, data))
    assert msg.type == ord("p")
    assert m.decode_sasl_initial_response(msg.payload) == (mechanism, data)


@pytest.mark.parametrize("mechanisms", [["SCRAM-SHA-256"], ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], []])
def test_authentication_sasl_round_trip(mechanisms: list[str]) -> None:
    msg = only_message(m.authentication_sasl(mechanisms))
    assert msg.type == ord("R")
    code, data = m.decode_authentication(msg.payload)
    assert code == m.AUTH_SASL
    assert m.decode_sasl_mechanisms(data) == mechanisms


@pytest.mark.parametrize(
    ("code", "data"), [(m.AUTH_OK, b""), (m.AUTH_MD5, b"\x01\x02\x03\x04"), (m.AUTH_SASL_FINAL, b"v=abc")]
)
def test_authentication_round_trip(code: int, data: bytes) -> None:
    assert m.decode_authentication(only_message(m.authentication(code, data)).payload) == (code, data)


def test_password_round_trip() -> None:
    assert m.decode_password(only_message(m.password_message(b"secret\x00")).payload) == b"secret"


# --- real captures --------------------------------------------------------------------------


def _capture_messages(path: Path) -> tuple[bytes, list[Message], list[Message]]:
    client, server = bytearray(), b""
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["from"] == "client":
            client += bytes.fromhex(rec["hex"])
        else:
            server += bytes.fromhex(rec["hex"])
    total = len(client)
    packet = read_startup(client)
    assert packet is not None
    startup = b"".join(
        bytes.fromhex(json.loads(line)["hex"]) for line in path.read_text().splitlines()
        if json.loads(line)["from"] == "client"
    )[: total - len(client)]
    out = []
    for stream in (bytes(client), server):
        fb = FrameBuffer(max_length=1 << 20)
        fb.feed(stream)
        msgs = []
        while (msg := fb.next_message()) is not None:
            msgs.append(msg)
        assert fb.take_rest() == b""
        out.append(msgs)
    return startup, out[0], out[1]


@pytest.mark.parametrize("path", sorted(WIRE_DIR.glob("*.jsonl")), ids=lambda p: p.stem)
def test_decoders_on_captures_and_reencode_identically(path: Path) -> None:
    startup, client_msgs, server_msgs = _capture_messages(path)
    packet = read_startup(bytearray(startup))
    assert packet is not None
    params = m.decode_startup_params(packet.body)
    assert params["user"] == "app" and params["database"] == "postgres"
    assert m.startup_message(params) == startup
    first = client_msgs[0]
    assert first.type == ord("p")
    mechanism, data = m.decode_sasl_initial_response(first.payload)
    assert mechanism == "SCRAM-SHA-256" and data.startswith(b"n,,")
    assert m.sasl_initial_response(mechanism, data) == first.raw
    assert client_msgs[-1].raw == m.TERMINATE
    seen = set()
    for msg in server_msgs:
        kind = chr(msg.type)
        seen.add(kind)
        if kind == "R":
            code, rest = m.decode_authentication(msg.payload)
            assert m.authentication(code, rest) == msg.raw
            if code == m.AUTH_SASL:
                assert m.decode_sasl_mechanisms(rest) == ["SCRAM-SHA-256"]
                assert m.authentication_sasl(m.decode_sasl_mechanisms(rest)) == msg.raw
        elif kind == "S":
            assert m.parameter_status(*m.decode_parameter_status(msg.payload)) == msg.raw
        elif kind == "K":
            assert m.backend_key_data(*m.decode_backend_key_data(msg.payload)) == msg.raw
        elif kind in "EN":
            fields = m.decode_error_fields(msg.payload)
            assert {"S", "V", "C", "M"} <= set(fields)
            assert m.error_fields(fields, bytes([msg.type])) == msg.raw
        elif kind == "Z":
            assert m.ready_for_query(msg.payload) == msg.raw
    assert {"R", "S", "K", "Z"} <= seen


# --- malformed input ------------------------------------------------------------------------

MALFORMED: list[Any] = [
    # StartupMessage body (after the protocol version)
    pytest.param(m.decode_startup_params, b"user\x00app", id="startup-unterminated"),
    pytest.param(m.decode_startup_params, b"user\x00app\x00", id="startup-no-final-terminator"),
    pytest.param(m.decode_startup_params, b"user\x00\x00", id="startup-name-without-value"),
    pytest.param(m.decode_startup_params, b"user\x00app\x00database\x00\x00", id="startup-odd-strings"),
    pytest.param(m.decode_startup_params, b"\x00\x00", id="startup-double-terminator"),
    pytest.param(m.decode_startup_params, b"user\x00\xff\xfe\x00\x00", id="startup-bad-utf8"),
    # ParameterStatus
    pytest.param(m.decode_parameter_status, b"a\x00b", id="parameter-status-unterminated"),
    pytest.param(m.decode_parameter_status, b"a\x00", id="parameter-status-one-string"),
    pytest.param(m.decode_parameter_status, b"a\x00b\x00c\x00", id="parameter-status-three-strings"),
    pytest.param(m.decode_parameter_status, b"", id="parameter-status-empty"),
    pytest.param(m.decode_parameter_status, b"\xff\x00b\x00", id="parameter-status-bad-utf8"),
    # SASLInitialResponse
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256", id="sasl-no-nul"),
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00", id="sasl-no-length"),
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00\x00\x00\x00", id="sasl-short-length"),
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00" + i32(5) + b"abcd", id="sasl-length-too-big"),
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00" + i32(3) + b"abcd", id="sasl-length-too-small"),
    pytest.param(m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00" + i32(-2) + b"", id="sasl-length-negative"),
    pytest.param(m.decode_sasl_initial_response, b"", id="sasl-empty"),
    # Authentication
    pytest.param(m.decode_authentication, b"", id="auth-empty"),
    pytest.param(m.decode_authentication, b"\x00\x00\x00", id="auth-short"),
    # BackendKeyData
    pytest.param(m.decode_backend_key_data, b"\x00" * 7, id="key-short"),
    pytest.param(m.decode_backend_key_data, b"\x00" * 9, id="key-long"),
    pytest.param(m.decode_backend_key_data, b"", id="key-empty"),
    # PasswordMessage
    pytest.param(m.decode_password, b"secret", id="password-unterminated"),
    pytest.param(m.decode_password, b"", id="password-empty"),
]


@pytest.mark.parametrize(("decoder", "payload"), MALFORMED)
def test_malformed_input_raises_protocol_violation(decoder: Callable[[bytes], object], payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decoder(payload)


@pytest.mark.parametrize(
    "payload", [b"SERROR", b"SERROR\x00MHello", b"S"], ids=["one-field", "second-field", "code-only"]
)
def test_decode_error_fields_unterminated_field_raises_protocol_violation(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.decode_error_fields(payload)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x00", {}),
        (b"user\x00\x00\x00", {"user": ""}),
        (b"a\x00b\x00a\x00c\x00\x00", {"a": "c"}),  # a repeated name: the last value wins
    ],
)
def test_decode_startup_params_edge_cases(body: bytes, expected: dict[str, str]) -> None:
    assert m.decode_startup_params(body) == expected


def test_decode_error_fields_non_utf8_value_is_replaced() -> None:
    assert m.decode_error_fields(b"M\xff\x00\x00") == {"M": "\ufffd"}


def test_decode_sasl_mechanisms_skips_empty() -> None:
    assert m.decode_sasl_mechanisms(b"") == []
    assert m.decode_sasl_mechanisms(b"\x00") == []
    assert m.decode_sasl_mechanisms(b"A\x00B\x00\x00") == ["A", "B"]
