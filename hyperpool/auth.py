"""Client authentication, done by hyperpool itself (never forwarded to the database).

The exchange is driven through a small I/O interface so the session owns the
socket; the messages and failures match PostgreSQL's (28P01 with the same
wording for a wrong password and an unknown user, so users cannot be probed).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Protocol

from hyperpool.config import Config, UserConfig
from hyperpool.errors import AuthenticationError, ClientProtocolError
from hyperpool.protocol import messages, scram
from hyperpool.protocol.framing import Message, ProtocolViolation


class AuthIO(Protocol):
    def send(self, data: bytes) -> None: ...
    async def read_message(self) -> Message: ...


def _failed(method: str, user: str) -> AuthenticationError:
    return AuthenticationError(f'{method} authentication failed for user "{user}"')


async def _read_password(io: AuthIO) -> Message:
    msg = await io.read_message()
    if msg.type != ord("p"):
        raise ClientProtocolError(
            f"expected password response, got message type {chr(msg.type)!r}", sqlstate="08P01"
        )
    return msg


# A verifier for users that do not exist, so the exchange looks the same (PostgreSQL's mock auth): the salt
# is stable per user name for the life of the process and the iteration count is the configured one, so
# neither tells an unknown user from a known one. No key derivation is run: no password can match it.
_MOCK_SECRET = os.urandom(32)


def _mock_verifier(user_name: str, iterations: int) -> scram.ScramVerifier:
    salt = hmac.digest(_MOCK_SECRET, user_name.encode("utf-8", "surrogateescape"), "sha256")[:scram.SALT_LENGTH]
    return scram.ScramVerifier(iterations, salt, os.urandom(32), os.urandom(32))


async def _scram(io: AuthIO, user_name: str, user: UserConfig | None, iterations: int) -> bytes:
    verifier = user.scram if user is not None and user.scram is not None else _mock_verifier(user_name, iterations)
    server = scram.ScramServer(verifier)
    io.send(messages.authentication_sasl([scram.MECHANISM]))
    try:
        mechanism, data = messages.decode_sasl_initial_response((await _read_password(io)).payload)
        if mechanism != scram.MECHANISM:
            raise ClientProtocolError("client selected an invalid SASL authentication mechanism")
        io.send(messages.authentication(messages.AUTH_SASL_CONTINUE, server.client_first(data)))
        final = server.client_final((await _read_password(io)).payload)
    except scram.AuthFailed:
        raise _failed("password", user_name) from None
    except (scram.AuthError, ProtocolViolation) as exc:
        raise ClientProtocolError(f"malformed SCRAM message: {exc}") from None
    if user is None:
        raise _failed("password", user_name)
    return messages.authentication(messages.AUTH_SASL_FINAL, final)


async def _md5(io: AuthIO, user_name: str, user: UserConfig | None) -> None:
    salt = os.urandom(4)
    io.send(messages.authentication(messages.AUTH_MD5, salt))
    response = messages.decode_password((await _read_password(io)).payload)
    if user is None or not scram.md5_check(user.password, user_name, salt, response):
        raise _failed("password", user_name)


def _cleartext_ok(user: UserConfig, password: str) -> bool:
    if user.plaintext is not None:
        return hmac.compare_digest(user.plaintext.encode(), password.encode())
    if scram.is_md5_hash(user.password):
        return hmac.compare_digest(scram.md5_hash(password, user.name), user.password)
    assert user.scram is not None
    candidate = scram.make_verifier(password, user.scram.salt, user.scram.iterations)
    return hmac.compare_digest(candidate.stored_key, user.scram.stored_key)


async def _cleartext(io: AuthIO, user_name: str, user: UserConfig | None, tls: bool, config: Config) -> None:
    if not tls and not config.allow_cleartext_over_tcp:
        raise AuthenticationError(
            "password authentication over an unencrypted connection is not allowed",
            sqlstate="28000", hint="connect with TLS (sslmode=require) or set allow_cleartext_over_tcp",
        )
    io.send(messages.authentication(messages.AUTH_CLEARTEXT))
    payload = (await _read_password(io)).payload
    try:
        password = messages.decode_password(payload).decode()
    except (ProtocolViolation, UnicodeDecodeError):
        raise ClientProtocolError("malformed password packet") from None
    if user is None:
        raise _failed("password", user_name)
    # against a SCRAM verifier this is a key derivation (scram_iterations: up to millions): not on the event loop
    ok = _cleartext_ok(user, password) if user.scram is None or user.plaintext is not None else \
        await asyncio.to_thread(_cleartext_ok, user, password)
    if not ok:
        raise _failed("password", user_name)


_AUTH_OK = messages.authentication(messages.AUTH_OK)


async def authenticate(io: AuthIO, config: Config, user_name: str, tls: bool) -> bytes:
    """Run the configured method; raise AuthenticationError on failure.

    On success, return the closing messages (AuthenticationSASLFinal where SCRAM was
    used, then AuthenticationOk) for the caller to send in one write with what follows.
    """
    user = config.users.get(user_name)
    method = config.auth_type
    final = b""
    if method == "trust":
        if user is None and config.users:
            raise AuthenticationError(f'role "{user_name}" does not exist', sqlstate="28000")
    elif method == "scram-sha-256" or (method == "md5" and user is not None and user.scram is not None
                                      and user.plaintext is None):
        final = await _scram(io, user_name, user, config.scram_iterations)
    elif method == "md5":
        await _md5(io, user_name, user)
    else:
        await _cleartext(io, user_name, user, tls, config)
    return final + _AUTH_OK
