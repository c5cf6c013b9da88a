"""SCRAM-SHA-256 (RFC 5802, RFC 7677) and md5 password authentication, sans-I/O.

Everything here works on the SASL *payload data* carried by PostgreSQL's authentication messages
(SASLInitialResponse, SASLResponse, AuthenticationSASLContinue, AuthenticationSASLFinal); framing those
messages is the job of :mod:`hyperpool.protocol.framing`.

``ScramServer`` checks a client against a stored :class:`ScramVerifier` (hyperpool as the database, towards
applications); ``ScramClient`` proves a plain-text password to a server (hyperpool towards the upstream
database). Both are small state machines: each step must be called once, in order, and any exception ends
the exchange (a later call raises :class:`AuthError`).

Passwords are used as their UTF-8 bytes. PostgreSQL first applies SASLprep (RFC 4013) and falls back to the
raw bytes when SASLprep rejects the password; SASLprep is the identity on printable ASCII, so the two agree
for ASCII passwords. SASLprep is deliberately not implemented: a non-ASCII password that SASLprep would
rewrite (for instance one that is not in NFKC form) will not match a verifier PostgreSQL built.

Channel binding (SCRAM-SHA-256-PLUS) is not supported; clients that request it are refused.
"""

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
MAX_ITERATIONS = 10_000_000  # a server asking for more is broken or hostile: pbkdf2 would take minutes
SALT_LENGTH = 16
_NONCE_LENGTH = 18  # random bytes, base64-encoded into 24 printable characters (as PostgreSQL does)
_KEY_LENGTH = 32  # SHA-256 digest size
_GS2_HEADER = "n,,"  # no channel binding, no authorization identity

_VERIFIER_RE = re.compile(r"SCRAM-SHA-256\$([0-9]{1,10}):([^$:]+)\$([^$:]+):([^$:]+)")
_VERIFIER_FORMAT = "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
_MD5_HASH_RE = re.compile(r"md5[0-9a-f]{32}")
_ITERATIONS_RE = re.compile(r"[0-9]{1,10}")


class AuthError(Exception):
    """The authentication exchange is malformed or out of order (the peer broke the protocol)."""


class AuthFailed(AuthError):
    """The exchange was well formed but the password is wrong (proof or server signature mismatch)."""


class _Step(Enum):
    """The message a SCRAM state machine expects next."""

    CLIENT_FIRST = "client-first-message"
    SERVER_FIRST = "server-first-message"
    CLIENT_FINAL = "client-final-message"
    SERVER_FINAL = "server-final-message"
    DONE = "nothing (the exchange is complete)"
    FAILED = "nothing (the exchange failed)"


# --- primitives ------------------------------------------------------------------------------------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    if len(left) != len(right):
        raise ValueError("operands of different lengths")
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64 decode; raises binascii.Error (a ValueError) on anything but canonical base64."""
    return base64.b64decode(text.encode("ascii", "replace"), validate=True)


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


@lru_cache(maxsize=64)
def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Memoized SaltedPassword: reconnecting to the same upstream reuses the same salt and count."""
    return _pbkdf2(password, salt, iterations)


def _client_and_server_keys(salted_password: bytes) -> tuple[bytes, bytes]:
    return _hmac(salted_password, b"Client Key"), _hmac(salted_password, b"Server Key")


# --- verifiers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScramVerifier:
    """What a server stores instead of the password (``pg_authid.rolpassword`` for SCRAM)."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __str__(self) -> str:
        """PostgreSQL's format: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``."""
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def _check_iterations(iterations: int) -> None:
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"SCRAM iteration count must be between 1 and {MAX_ITERATIONS}, not {iterations}")


def make_verifier(
    password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    """Build a verifier for ``password`` (UTF-8, no SASLprep); a random 16-byte salt by default."""
    salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
    if not salt:
        raise ValueError("SCRAM salt must not be empty")
    _check_iterations(iterations)
    client_key, server_key = _client_and_server_keys(_pbkdf2(password, salt, iterations))
    return ScramVerifier(iterations, salt, _sha256(client_key), server_key)


def parse_verifier(text: str) -> ScramVerifier:
    """Parse PostgreSQL's verifier format; raises ValueError naming what is wrong."""
    match = _VERIFIER_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: expected {_VERIFIER_FORMAT!r}")
    _check_iterations(int(match[1]))
    salt, stored_key, server_key = (_verifier_field(match[i], name) for i, name in _VERIFIER_FIELDS)
    return ScramVerifier(int(match[1]), salt, stored_key, server_key)


_VERIFIER_FIELDS = ((2, "salt"), (3, "StoredKey"), (4, "ServerKey"))


def _verifier_field(text: str, name: str) -> bytes:
    try:
        value = _unb64(text)
    except ValueError:
        raise ValueError(f"SCRAM verifier {name} is not valid base64") from None
    if name != "salt" and len(value) != _KEY_LENGTH:
        raise ValueError(f"SCRAM verifier {name} must be {_KEY_LENGTH} bytes, not {len(value)}")
    return value


def is_scram_verifier(text: str) -> bool:
    try:
        parse_verifier(text)
    except ValueError:
        return False
    return True


def is_md5_hash(text: str) -> bool:
    """True for PostgreSQL's md5 password format: ``md5`` followed by 32 lowercase hex digits."""
    return _MD5_HASH_RE.fullmatch(text) is not None


# --- message parsing -------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("SCRAM message is not valid UTF-8") from None


def _is_printable(nonce: str) -> bool:
    """RFC 5802 ``printable``: %x21-2B / %x2D-7E (visible ASCII except ',')."""
    return bool(nonce) and all("!" <= char <= "~" and char != "," for char in nonce)


def _nonce_argument(nonce: bytes | None) -> str:
    """A caller-supplied nonce (tests inject them), or a fresh random one."""
    if nonce is None:
        return _b64(secrets.token_bytes(_NONCE_LENGTH))
    text = nonce.decode("ascii", "replace")
    if not _is_printable(text):
        raise ValueError("SCRAM nonce must be non-empty visible ASCII without ','")
    return text


def _parse_attributes(text: str, expected: tuple[str, ...]) -> dict[str, str]:
    """Split ``a=1,b=2`` into a dict; the first attributes must be ``expected``, in that order."""
    attributes: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1 or not ("a" <= key <= "z" or "A" <= key <= "Z") or key in attributes:
            raise AuthError(f"malformed SCRAM attribute {part[:16]!r}")
        attributes[key] = value
    if tuple(attributes)[: len(expected)] != expected:
        raise AuthError(f"SCRAM message must start with the attributes {', '.join(expected)}")
    return attributes


def _decode_base64(text: str, what: str) -> bytes:
    try:
        return _unb64(text)
    except ValueError:
        raise AuthError(f"SCRAM {what} is not valid base64") from None


def _split_gs2_header(text: str) -> tuple[str, str]:
    """Return (GS2 header, client-first-message-bare) of a client-first-message."""
    cbind_flag, sep1, rest = text.partition(",")
    authzid, sep2, bare = rest.partition(",")
    if cbind_flag.startswith("p="):
        raise AuthError("SCRAM channel binding is not supported")
    if not (sep1 and sep2) or cbind_flag not in ("n", "y"):
        raise AuthError("malformed GS2 header in SCRAM client-first-message")
    if authzid:
        raise AuthError("SCRAM authorization identity is not supported")
    return f"{cbind_flag},,", bare


def _split_proof(text: str) -> tuple[str, bytes]:
    """Return (client-final-message-without-proof, proof) of a client-final-message."""
    without_proof, sep, proof = text.rpartition(",p=")
    if not sep:
        raise AuthError("SCRAM client-final-message lacks the proof")
    return without_proof, _decode_base64(proof, "proof")


def _parse_iterations(text: str) -> int:
    if _ITERATIONS_RE.fullmatch(text) is None or not 1 <= int(text) <= MAX_ITERATIONS:
        raise AuthError(f"SCRAM iteration count must be between 1 and {MAX_ITERATIONS}")
    return int(text)


def _parse_salt(text: str) -> bytes:
    salt = _decode_base64(text, "salt")
    if not salt:
        raise AuthError("SCRAM salt is empty")
    return salt


def _saslname(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


# --- state machines --------------------------------------------------------------------------------------


class _Exchange:
    """Step bookkeeping shared by both sides: a step is entered once, and a failure ends the exchange."""

    def __init__(self, first: _Step) -> None:
        self._step = first

    def _enter(self, expected: _Step) -> None:
        step, self._step = self._step, _Step.FAILED  # until the step succeeds
        if step is not expected:
            raise AuthError(f"unexpected SCRAM {expected.value}; expecting {step.value}")

    @property
    def done(self) -> bool:
        """True once the exchange completed successfully."""
        return self._step is _Step.DONE


class ScramServer(_Exchange):
    """Server side of one SCRAM-SHA-256 exchange against a stored verifier.

    ``nonce`` is the server's part of the nonce (appended to the client's); random when omitted.
    """

    def __init__(self, verifier: ScramVerifier, nonce: bytes | None = None) -> None:
        super().__init__(_Step.CLIENT_FIRST)
        self._verifier = verifier
        self._server_nonce = _nonce_argument(nonce)
        self._gs2_header = ""
        self._nonce = ""
        self._auth_prefix = ""  # client-first-message-bare "," server-first-message

    def client_first(self, data: bytes) -> bytes:
        """Take the SASLInitialResponse data; return the server-first-message."""
        self._enter(_Step.CLIENT_FIRST)
        self._gs2_header, bare = _split_gs2_header(_decode(data))
        client_nonce = _parse_attributes(bare, ("n", "r"))["r"]  # n= is ignored, as PostgreSQL does
        if not _is_printable(client_nonce):
            raise AuthError("SCRAM client nonce must be visible ASCII")
        self._nonce = client_nonce + self._server_nonce
        server_first = f"r={self._nonce},s={_b64(self._verifier.salt)},i={self._verifier.iterations}"
        self._auth_prefix = f"{bare},{server_first}"
        self._step = _Step.CLIENT_FINAL
        return server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes:
        """Take the SASLResponse data; verify the proof and return the server-final-message."""
        self._enter(_Step.CLIENT_FINAL)
        without_proof, proof = _split_proof(_decode(data))
        attributes = _parse_attributes(without_proof, ("c", "r"))
        if _decode_base64(attributes["c"], "channel binding") != self._gs2_header.encode("ascii"):
            raise AuthError("SCRAM channel binding does not match the GS2 header")
        if attributes["r"] != self._nonce:
            raise AuthError("SCRAM nonce mismatch")
        auth_message = f"{self._auth_prefix},{without_proof}".encode()
        self._verify_proof(proof, auth_message)
        self._step = _Step.DONE
        return b"v=" + _b64(_hmac(self._verifier.server_key, auth_message)).encode("ascii")

    def _verify_proof(self, proof: bytes, auth_message: bytes) -> None:
        if len(proof) != _KEY_LENGTH:
            raise AuthError("SCRAM proof has the wrong length")
        client_key = _xor(proof, _hmac(self._verifier.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), self._verifier.stored_key):
            raise AuthFailed("password authentication failed")


class ScramClient(_Exchange):
    """Client side of one SCRAM-SHA-256 exchange (hyperpool authenticating to the upstream database).

    ``user`` goes into ``n=``; PostgreSQL ignores it (libpq sends it empty), but RFC test vectors need it.
    """

    def __init__(self, password: str, nonce: bytes | None = None, *, user: str = "") -> None:
        super().__init__(_Step.CLIENT_FIRST)
        self._password = password
        self._first_bare = f"n={_saslname(user)},r={_nonce_argument(nonce)}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        """Return the client-first-message (the SASLInitialResponse data)."""
        self._enter(_Step.CLIENT_FIRST)
        self._step = _Step.SERVER_FIRST
        return f"{_GS2_HEADER}{self._first_bare}".encode()

    def server_first(self, data: bytes) -> bytes:
        """Take the AuthenticationSASLContinue data; return the client-final-message with the proof."""
        self._enter(_Step.SERVER_FIRST)
        server_first = _decode(data)
        attributes = _parse_attributes(server_first, ("r", "s", "i"))
        self._check_server_nonce(attributes["r"])
        salt = _parse_salt(attributes["s"])
        salted = _salted_password(self._password, salt, _parse_iterations(attributes["i"]))
        without_proof = f"c={_b64(_GS2_HEADER.encode('ascii'))},r={attributes['r']}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode()
        client_key, server_key = _client_and_server_keys(salted)
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._step = _Step.SERVER_FINAL
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def server_final(self, data: bytes) -> None:
        """Take the AuthenticationSASLFinal data; raise AuthFailed unless the server signature is right."""
        self._enter(_Step.SERVER_FINAL)
        attributes = _parse_attributes(_decode(data), ())
        if "e" in attributes:
            raise AuthFailed(f"server rejected SCRAM authentication: {attributes['e']}")
        if tuple(attributes) != ("v",):
            raise AuthError("SCRAM server-final-message must carry exactly one of v= or e=")
        signature = _decode_base64(attributes["v"], "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("SCRAM server signature mismatch")
        self._step = _Step.DONE

    def _check_server_nonce(self, nonce: str) -> None:
        client_nonce = self._first_bare.rpartition(",r=")[2]
        if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce) or not _is_printable(nonce):
            raise AuthError("SCRAM server nonce does not extend the client nonce")


# --- md5 -------------------------------------------------------------------------------------------------


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_hash(password: str, user: str) -> str:
    """PostgreSQL's stored md5 password: ``"md5" + md5hex(password + user)``."""
    return "md5" + _md5_hex((password + user).encode("utf-8"))


def md5_client_response(password_or_hash: str, user: str, salt: bytes) -> bytes:
    """The PasswordMessage content (no trailing NUL) answering AuthenticationMD5Password with ``salt``.

    A value that looks like an md5 hash is used as one (PostgreSQL has the same ambiguity).
    """
    stored = password_or_hash if is_md5_hash(password_or_hash) else md5_hash(password_or_hash, user)
    return b"md5" + _md5_hex(stored[3:].encode("ascii") + salt).encode("ascii")


def md5_check(stored: str, user: str, salt: bytes, response: bytes) -> bool:
    """Check a PasswordMessage (one trailing NUL tolerated) against a plain-text or md5-hashed password.

    A SCRAM verifier cannot answer an md5 challenge: passing one is a caller bug and raises ValueError.
    """
    if is_scram_verifier(stored):
        raise ValueError("an md5 response cannot be checked against a SCRAM verifier")
    response = bytes(response).removesuffix(b"\x00")
    return hmac.compare_digest(md5_client_response(stored, user, salt), response)
