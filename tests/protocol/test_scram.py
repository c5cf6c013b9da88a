"""Unit tests for hyperpool.protocol.scram: RFC 7677 vectors, a real psql capture, malformed input, md5."""

import base64
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hyperpool.protocol.scram import (
    MECHANISM,
    AuthError,
    AuthFailed,
    ScramClient,
    ScramServer,
    ScramVerifier,
    is_md5_hash,
    is_scram_verifier,
    make_verifier,
    md5_check,
    md5_client_response,
    md5_hash,
    parse_verifier,
)

WIRE_DIR = Path(__file__).resolve().parents[3] / "shared" / "wire"
PSQL_CAPTURE = WIRE_DIR / "psql-simple-copy-errors.jsonl"

# RFC 7677, section 3.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Low iteration counts keep the non-vector tests fast; the algorithm does not depend on the count.
FAST = 16


@pytest.fixture(scope="module")
def rfc_verifier() -> ScramVerifier:
    return make_verifier(RFC_PASSWORD, RFC_SALT, 4096)


def started_server(password: str = "secret", client_first: bytes = b"n,,n=,r=abc") -> ScramServer:
    server = ScramServer(make_verifier(password, b"salt", FAST), nonce=b"xyz")
    server.client_first(client_first)
    return server


def reference_client_final(password: str, client_first: bytes, server_first: bytes) -> bytes:
    """An independent RFC 5802 client-final computation, for GS2 headers ScramClient never sends."""
    gs2, _, bare = client_first.partition(b",")[2].partition(b",")
    gs2 = client_first[: len(client_first) - len(bare)]
    attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + base64.b64encode(gs2) + b",r=" + attrs[b"r"]
    auth_message = b",".join([bare, server_first, without_proof])
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


# --- RFC 7677 test vector --------------------------------------------------------------------------------


def test_mechanism_name() -> None:
    assert MECHANISM == "SCRAM-SHA-256"


def test_rfc7677_client_messages() -> None:
    client = ScramClient(RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, user="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.server_final(RFC_SERVER_FINAL)
    assert client.done


def test_rfc7677_server_messages(rfc_verifier: ScramVerifier) -> None:
    server = ScramServer(rfc_verifier, nonce=RFC_SERVER_NONCE)
    assert server.client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "user"),
    [("secret", ""), ("", ""), ("pässwörd ünicode", "app"), ("a,b=c", "we,ird=name")],
)
def test_round_trip(password: str, user: str) -> None:
    server = ScramServer(make_verifier(password, iterations=FAST))
    client = ScramClient(password, user=user)
    client_final = client.server_first(server.client_first(client.client_first()))
    client.server_final(server.client_final(client_final))
    assert client.done and server.done


def test_random_nonces_differ() -> None:
    first, second = ScramClient("x").client_first(), ScramClient("x").client_first()
    assert first != second and first.startswith(b"n,,n=,r=") and len(first) == len(b"n,,n=,r=") + 24


@pytest.mark.parametrize("gs2_header", [b"n,,", b"y,,"])
def test_server_accepts_gs2_headers(gs2_header: bytes) -> None:
    client_first = gs2_header + b"n=ignored,r=clientnonce"
    server = ScramServer(make_verifier("pw", b"salt", FAST), nonce=b"servernonce")
    server_first = server.client_first(client_first)
    assert server.client_final(reference_client_final("pw", client_first, server_first)).startswith(b"v=")


def test_wrong_password_fails_on_server() -> None:
    server = ScramServer(make_verifier("right", iterations=FAST))
    client = ScramClient("wrong")
    client_final = client.server_first(server.client_first(client.client_first()))
    with pytest.raises(AuthFailed):
        server.client_final(client_final)
    assert not server.done


@pytest.mark.parametrize(
    "server_final",
    [
        b"v=" + base64.b64encode(bytes(32)),
        b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        b"e=invalid-proof",
        b"e=other-error",
    ],
)
def test_client_rejects_bad_server_final(server_final: bytes) -> None:
    client = ScramClient(RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, user="user")
    client.client_first()
    client.server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthFailed):
        client.server_final(server_final)
    assert not client.done


# --- malformed server input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"n,,",
        b"n,,n=",
        b"n,,n=user",
        b"n,,r=abc",
        b"n,,r=abc,n=user",
        b"n,,n=,r=",
        b"n,,n=,r=a\x01b",
        b"n,,n=,n=,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"p=tls-server-end-point,,n=,r=abc",
        b"n,a=admin,n=,r=abc",
        b"x,,n=,r=abc",
        b"n,n=,r=abc",
        b"n,,n=,r=abc,junk",
    ],
)
def test_server_rejects_malformed_client_first(client_first: bytes) -> None:
    server = ScramServer(make_verifier("pw", b"salt", FAST), nonce=b"xyz")
    with pytest.raises(AuthError) as info:
        server.client_first(client_first)
    assert not isinstance(info.value, AuthFailed)


def _server_first_for_started() -> bytes:
    return b"r=abcxyz,s=" + base64.b64encode(b"salt") + b",i=16"


def _good_final() -> bytes:
    return reference_client_final("secret", b"n,,n=,r=abc", _server_first_for_started())


def _with_proof(proof: bytes) -> bytes:
    return _good_final().rpartition(b",p=")[0] + b",p=" + proof


CLIENT_FINAL_CASES: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"garbage",
    "empty": lambda: b"",
    "not utf-8": lambda: b"\xff" + _good_final(),
    "missing proof": lambda: _good_final().rpartition(b",p=")[0],
    "missing nonce": lambda: _good_final().replace(b",r=abcxyz", b""),
    "missing channel binding": lambda: _good_final().replace(b"c=biws,", b""),
    "attributes out of order": lambda: _good_final().replace(b"c=biws,r=abcxyz", b"r=abcxyz,c=biws"),
    "wrong nonce": lambda: _good_final().replace(b"r=abcxyz", b"r=abcxyZ"),
    "client nonce only": lambda: _good_final().replace(b"r=abcxyz", b"r=abc"),
    "channel binding requested": lambda: _good_final().replace(
        b"c=biws", b"c=" + base64.b64encode(b"p=tls-server-end-point,,")
    ),
    "gs2 header differs from client-first": lambda: _good_final().replace(b"c=biws", b"c=eSws"),
    "bad base64 channel binding": lambda: _good_final().replace(b"c=biws", b"c=bi!ws"),
    "bad base64 proof": lambda: _with_proof(b"not*base64"),
    "unpadded proof": lambda: _with_proof(_good_final().rpartition(b",p=")[2].rstrip(b"=")),
    "short proof": lambda: _with_proof(base64.b64encode(bytes(16))),
    "empty proof": lambda: _with_proof(b""),
}


@pytest.mark.parametrize("make_final", CLIENT_FINAL_CASES.values(), ids=CLIENT_FINAL_CASES.keys())
def test_server_rejects_malformed_client_final(make_final: Callable[[], bytes]) -> None:
    server = started_server()
    with pytest.raises(AuthError) as info:
        server.client_final(make_final())
    assert not isinstance(info.value, AuthFailed)


def test_reference_final_is_accepted() -> None:
    """The baseline the malformed cases above are derived from is itself valid."""
    assert started_server().client_final(_good_final()).startswith(b"v=")


def test_server_rejects_out_of_order_and_reuse() -> None:
    server = ScramServer(make_verifier("secret", b"salt", FAST), nonce=b"xyz")
    with pytest.raises(AuthError, match="unexpected"):
        server.client_final(_good_final())
    server = started_server()
    with pytest.raises(AuthError, match="unexpected"):
        server.client_first(b"n,,n=,r=abc")


def test_failed_exchange_cannot_be_retried() -> None:
    server = started_server()
    with pytest.raises(AuthFailed):
        server.client_final(reference_client_final("wrong", b"n,,n=,r=abc", _server_first_for_started()))
    with pytest.raises(AuthError, match="unexpected"):
        server.client_final(_good_final())


# --- malformed client input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"garbage",
        b"r=otherxyz,s=c2FsdA==,i=4096",
        b"r=abc,s=c2FsdA==,i=4096",
        b"r=abcx,y,s=c2FsdA==,i=4096",
        b"s=c2FsdA==,r=abcxyz,i=4096",
        b"r=abcxyz,i=4096",
        b"r=abcxyz,s=c2FsdA==",
        b"r=abcxyz,s=,i=4096",
        b"r=abcxyz,s=c2Fsd!==,i=4096",
        b"r=abcxyz,s=c2FsdA==,i=0",
        b"r=abcxyz,s=c2FsdA==,i=-1",
        b"r=abcxyz,s=c2FsdA==,i=abc",
        b"r=abcxyz,s=c2FsdA==,i=99999999999",
        b"m=ext,r=abcxyz,s=c2FsdA==,i=4096",
    ],
)
def test_client_rejects_malformed_server_first(server_first: bytes) -> None:
    client = ScramClient("pw", nonce=b"abc")
    client.client_first()
    with pytest.raises(AuthError) as info:
        client.server_first(server_first)
    assert not isinstance(info.value, AuthFailed)


@pytest.mark.parametrize("server_final", [b"", b"garbage", b"v=not*base64", b"x=1", b"v=abcd,x=1"])
def test_client_rejects_malformed_server_final(server_final: bytes) -> None:
    client = ScramClient("pw", nonce=b"abc")
    client.client_first()
    client.server_first(b"r=abcxyz,s=c2FsdA==,i=16")
    with pytest.raises(AuthError):
        client.server_final(server_final)


def test_client_rejects_out_of_order_calls() -> None:
    client = ScramClient("pw", nonce=b"abc")
    with pytest.raises(AuthError, match="unexpected"):
        client.server_first(b"r=abcxyz,s=c2FsdA==,i=16")
    with pytest.raises(AuthError, match="unexpected"):
        client.client_first()


@pytest.mark.parametrize("nonce", [b"", b"a,b", b"a b", b"\xc3\xa9"])
def test_injected_nonce_must_be_printable(nonce: bytes) -> None:
    with pytest.raises(ValueError, match="nonce"):
        ScramClient("pw", nonce=nonce)
    with pytest.raises(ValueError, match="nonce"):
        ScramServer(make_verifier("pw", b"salt", FAST), nonce=nonce)


# --- verifiers --------------------------------------------------------------------------------------------


def test_rfc_verifier_string(rfc_verifier: ScramVerifier) -> None:
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    expected = f"SCRAM-SHA-256$4096:{b64(RFC_SALT).decode()}${b64(stored).decode()}:{b64(server).decode()}"
    assert str(rfc_verifier) == expected
    assert parse_verifier(expected) == rfc_verifier


def test_verifier_round_trip_and_defaults() -> None:
    verifier = make_verifier("pw", iterations=FAST)
    assert len(verifier.salt) == 16 and verifier.iterations == FAST
    assert parse_verifier(str(verifier)) == verifier
    assert make_verifier("pw", iterations=FAST).salt != verifier.salt
    assert str(verifier.stored_key) not in repr(verifier)


def test_make_verifier_default_iterations() -> None:
    assert make_verifier("pw", b"salt").iterations == 4096


@pytest.mark.parametrize(("salt", "iterations"), [(b"", 4096), (b"salt", 0), (b"salt", -5)])
def test_make_verifier_rejects_bad_arguments(salt: bytes, iterations: int) -> None:
    with pytest.raises(ValueError):
        make_verifier("pw", salt, iterations)


_KEY = base64.b64encode(bytes(32)).decode()
_SHORT_KEY = base64.b64encode(bytes(31)).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a SCRAM-SHA-256 verifier"),
        ("md5" + "0" * 32, "not a SCRAM-SHA-256 verifier"),
        ("plaintext", "not a SCRAM-SHA-256 verifier"),
        (f"SCRAM-SHA-1$4096:c2FsdA==${_KEY}:{_KEY}", "not a SCRAM-SHA-256 verifier"),
        (f"SCRAM-SHA-256$4096:c2FsdA==${_KEY}", "not a SCRAM-SHA-256 verifier"),
        (f"SCRAM-SHA-256$4096:c2FsdA==${_KEY}:{_KEY}$", "not a SCRAM-SHA-256 verifier"),
        (f"SCRAM-SHA-256$abc:c2FsdA==${_KEY}:{_KEY}", "not a SCRAM-SHA-256 verifier"),
        (f" SCRAM-SHA-256$4096:c2FsdA==${_KEY}:{_KEY}", "not a SCRAM-SHA-256 verifier"),
        (f"SCRAM-SHA-256$0:c2FsdA==${_KEY}:{_KEY}", "iteration count"),
        (f"SCRAM-SHA-256$4096:c2Fsd!==${_KEY}:{_KEY}", "salt is not valid base64"),
        (f"SCRAM-SHA-256$4096:c2FsdA==${_SHORT_KEY}:{_KEY}", "StoredKey must be 32 bytes"),
        (f"SCRAM-SHA-256$4096:c2FsdA==${_KEY}:{_KEY[:-1]}", "ServerKey is not valid base64"),
    ],
)
def test_parse_verifier_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_verifier(text)
    assert not is_scram_verifier(text)


@pytest.mark.parametrize(
    ("text", "scram", "md5"),
    [
        (str(make_verifier("pw", b"salt", FAST)), True, False),
        ("md5" + hashlib.md5(b"apppassapp").hexdigest(), False, True),
        ("md5" + "A" * 32, False, False),
        ("md5" + "0" * 31, False, False),
        ("md5" + "0" * 33, False, False),
        ("apppass", False, False),
        ("", False, False),
    ],
)
def test_password_format_predicates(text: str, scram: bool, md5: bool) -> None:
    assert is_scram_verifier(text) is scram
    assert is_md5_hash(text) is md5


# --- md5 --------------------------------------------------------------------------------------------------

MD5_SALT = b"\x01\x02\x03\x04"


def _expected_md5_response(password: str, user: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


def test_md5_hash_known_answer() -> None:
    assert md5_hash("apppass", "app") == "md5" + hashlib.md5(b"apppassapp").hexdigest()


@pytest.mark.parametrize("secret", ["apppass", md5_hash("apppass", "app")])
def test_md5_client_response(secret: str) -> None:
    assert md5_client_response(secret, "app", MD5_SALT) == _expected_md5_response("apppass", "app", MD5_SALT)


@pytest.mark.parametrize(
    ("stored", "response", "ok"),
    [
        ("apppass", _expected_md5_response("apppass", "app", MD5_SALT), True),
        (md5_hash("apppass", "app"), _expected_md5_response("apppass", "app", MD5_SALT), True),
        ("apppass", _expected_md5_response("apppass", "app", MD5_SALT) + b"\x00", True),
        ("apppass", _expected_md5_response("wrong", "app", MD5_SALT), False),
        ("apppass", _expected_md5_response("apppass", "other", MD5_SALT), False),
        ("apppass", _expected_md5_response("apppass", "app", b"\x00\x00\x00\x00"), False),
        (md5_hash("other", "app"), _expected_md5_response("apppass", "app", MD5_SALT), False),
        ("apppass", b"", False),
        ("apppass", b"apppass", False),
    ],
)
def test_md5_check(stored: str, response: bytes, ok: bool) -> None:
    assert md5_check(stored, "app", MD5_SALT, response) is ok


def test_md5_check_refuses_scram_verifier() -> None:
    with pytest.raises(ValueError, match="SCRAM"):
        md5_check(str(make_verifier("apppass", b"salt", FAST)), "app", MD5_SALT, b"md5" + b"0" * 32)


# --- real capture (psql 15 against PostgreSQL 15) ---------------------------------------------------------


def _streams(path: Path) -> dict[str, bytes]:
    streams = {"client": b"", "server": b""}
    for line in path.read_text().splitlines():
        chunk = json.loads(line)
        streams[chunk["from"]] += bytes.fromhex(chunk["hex"])
    return streams


def _typed_messages(stream: bytes, start: int = 0) -> list[tuple[bytes, bytes]]:
    """(type byte, payload) for each typed message from ``start``; lengths include themselves."""
    messages, pos = [], start
    while pos + 5 <= len(stream):
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        messages.append((stream[pos : pos + 1], stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages


def _sasl_initial_data(payload: bytes) -> tuple[bytes, bytes]:
    """(mechanism, data) of a SASLInitialResponse payload."""
    mechanism, _, rest = payload.partition(b"\x00")
    (length,) = struct.unpack_from("!i", rest)
    return mechanism, rest[4 : 4 + length]


def _auth_data(messages: list[tuple[bytes, bytes]], code: int) -> bytes:
    """The data after the int32 code of the first Authentication ('R') message with that code."""
    return next(p[4:] for t, p in messages if t == b"R" and struct.unpack_from("!i", p)[0] == code)


@pytest.fixture(scope="module")
def psql_exchange() -> dict[str, bytes]:
    if not PSQL_CAPTURE.exists():
        pytest.skip(f"wire capture {PSQL_CAPTURE} is absent")
    streams = _streams(PSQL_CAPTURE)
    (startup_length,) = struct.unpack_from("!i", streams["client"])
    client = [m for m in _typed_messages(streams["client"], startup_length) if m[0] == b"p"]
    server = _typed_messages(streams["server"])
    mechanism, client_first = _sasl_initial_data(client[0][1])
    assert mechanism == MECHANISM.encode()
    return {
        "client_first": client_first,
        "server_first": _auth_data(server, 11),
        "client_final": client[1][1],
        "server_final": _auth_data(server, 12),
    }


def _nonces(exchange: dict[str, bytes]) -> tuple[bytes, bytes]:
    client_nonce = exchange["client_first"].rpartition(b",r=")[2]
    combined = exchange["server_first"].split(b",")[0].removeprefix(b"r=")
    assert combined.startswith(client_nonce)
    return client_nonce, combined[len(client_nonce) :]


def test_psql_capture_server_side(psql_exchange: dict[str, bytes]) -> None:
    attrs = dict(part.split(b"=", 1) for part in psql_exchange["server_first"].split(b","))
    verifier = make_verifier("apppass", base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    server = ScramServer(verifier, nonce=_nonces(psql_exchange)[1])
    assert server.client_first(psql_exchange["client_first"]) == psql_exchange["server_first"]
    assert server.client_final(psql_exchange["client_final"]) == psql_exchange["server_final"]


def test_psql_capture_client_side(psql_exchange: dict[str, bytes]) -> None:
    client = ScramClient("apppass", nonce=_nonces(psql_exchange)[0])
    assert client.client_first() == psql_exchange["client_first"]
    assert client.server_first(psql_exchange["server_first"]) == psql_exchange["client_final"]
    client.server_final(psql_exchange["server_final"])
    assert client.done


def test_psql_capture_wrong_password_fails(psql_exchange: dict[str, bytes]) -> None:
    attrs = dict(part.split(b"=", 1) for part in psql_exchange["server_first"].split(b","))
    verifier = make_verifier("notapppass", base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    server = ScramServer(verifier, nonce=_nonces(psql_exchange)[1])
    server.client_first(psql_exchange["client_first"])
    with pytest.raises(AuthFailed):
        server.client_final(psql_exchange["client_final"])
