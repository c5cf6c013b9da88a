"""One client connection: startup, TLS, authentication, then relaying transactions.

After login, the client's bytes are scanned (not decoded) and relayed to a
server connection checked out of the database's pool for the duration of a
transaction (or of the session, in session mode). This is the one place
where exceptions become ErrorResponses for the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from enum import Enum
from typing import TYPE_CHECKING, cast

from hyperpool import auth
from hyperpool.database import Database
from hyperpool.errors import ClientProtocolError, PoolError, ProxyError, UpstreamError, error_response
from hyperpool.protocol import messages
from hyperpool.protocol.framing import (
    FrameBuffer,
    Message,
    MessageRelay,
    ProtocolViolation,
    StartupCode,
    StartupPacket,
    read_startup,
)
from hyperpool.upstream import ServerConnection, send_cancel

if TYPE_CHECKING:
    from hyperpool.server import ServerState

log = logging.getLogger("hyperpool.session")

# Message types a frontend may send after login (PostgreSQL protocol 3.0).
FRONTEND_TYPES = b"BCdcfDEHFPpQSX"
# Messages that the server answers with ReadyForQuery: Query, Sync, FunctionCall.
_SYNC_TYPES = b"QSF"
_TERMINATE = ord("X")
_SYNC = ord("S")
# CopyDone / CopyFail end the CopyData a COPY FROM STDIN sends after its Query or Sync.
_COPY_END = b"cf"
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_NOT_SETTINGS = {"user", "database", "options"}
_READY_IDLE = messages.ready_for_query(b"I")
_ADMIN_SHUTDOWN = PoolError("terminating connection due to administrator command", sqlstate="57P01")


class Phase(Enum):
    LOGIN = "login"
    READY = "ready"
    CLOSED = "closed"


def parse_options(options: str) -> dict[str, str]:
    """The ``-c name=value`` / ``--name=value`` settings of libpq's ``options`` parameter."""
    words = [w.replace("\\ ", " ") for w in re.split(r"(?<!\\)\s+", options.strip()) if w]
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 1
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ClientProtocolError(f"unsupported startup option {word!r}", sqlstate="0A000")
        name, sep, value = word.partition("=")
        if not sep:
            raise ClientProtocolError(f"invalid startup option {word!r}", sqlstate="42601")
        settings[name.replace("-", "_")] = value
        i += 1
    return settings


def client_settings(params: dict[str, str]) -> dict[str, str]:
    """Settings a client asked for at startup, by lower-case name."""
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise ClientProtocolError("hyperpool does not support replication connections", sqlstate="0A000")
    raw = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and k != "replication"}
    raw.update(parse_options(params.get("options", "")))
    settings = {}
    for name, value in raw.items():
        if not _GUC_NAME.match(name):
            raise ClientProtocolError(f'invalid configuration parameter name "{name}"', sqlstate="42602")
        settings[name.lower()] = value
    return settings


class ClientSession(asyncio.Protocol):
    """The server side of one client connection."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.LOGIN
        self.tls = False
        self.user = ""
        self.database: Database | None = None
        self.wanted: dict[str, str] = {}
        self.key = (0, 0)
        self.server: ServerConnection | None = None
        self.pool_mode = "transaction"
        self._setup = FrameBuffer(max_length=65536)
        self._waiter: asyncio.Future[None] | None = None
        self._login_task: asyncio.Task[None] | None = None
        self._attach_task: asyncio.Task[None] | None = None
        self._reader: MessageRelay | None = None
        self._queued: list[bytes | memoryview] = []
        self._queued_syncs = 0
        self._unsynced = False  # bytes went to the server after the last Query/Sync
        self._server_reading_paused = False
        self._client_reading_paused = False
        self._writing_paused = False  # the client's transport buffer is over its high-water mark
        self._loop = asyncio.get_running_loop()  # once: each call costs a getpid() on 3.11
        self._handshaking = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.sessions.add(self)
        self._login_task = self._loop.create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self._reader is None:
            self._setup.feed(data)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            return
        self._relay(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_server()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.server is not None and self.server.transport is not None and self._server_reading_paused:
            self.server.transport.resume_reading()
        self._server_reading_paused = False

    def _pause_server(self) -> None:
        """Stop reading from the server while the client is not keeping up (backpressure)."""
        server = self.server
        if server is not None and server.transport is not None and not self._server_reading_paused:
            server.transport.pause_reading()
            self._server_reading_paused = True

    # --- login --------------------------------------------------------------------------

    async def _wait_data(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter

    async def read_message(self) -> Message:
        while True:
            try:
                msg = self._setup.next_message()
            except ProtocolViolation as exc:
                raise ClientProtocolError(str(exc)) from None
            if msg is not None:
                return msg
            await self._wait_data()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _read_startup(self) -> StartupPacket:
        while True:
            try:
                packet = read_startup(self._setup.buf)
            except ProtocolViolation as exc:
                raise ClientProtocolError(str(exc)) from None
            if packet is not None:
                return packet
            await self._wait_data()

    async def _login(self) -> None:
        limit = self.state.config.client_login_timeout
        # A plain timer rather than asyncio.timeout(): cheaper, and logins are the -C hot path.
        timer = self._loop.call_later(limit, self._login_timed_out) if limit else None
        try:
            params = await self._startup()
            if params is None:
                return
            await self._authenticate(params)
            self._start_relay()
        except (ssl.SSLError, ConnectionError) as exc:
            log.info("client connection failed during login: %s", exc)
            self._close_transport()  # nothing readable can be sent on a broken TLS stream
        except ProxyError as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("unexpected error during client login")
            self.fail(exc)
        finally:
            if timer is not None:
                timer.cancel()

    def _login_timed_out(self) -> None:
        if self.phase is not Phase.LOGIN:
            return
        if self._handshaking:  # no readable ErrorResponse can go into a half-done TLS handshake
            self._close_transport()
        else:
            self.fail(ClientProtocolError("client login timeout", sqlstate="08006"))

    async def _startup(self) -> dict[str, str] | None:
        """Handle SSLRequest/GSSENCRequest/CancelRequest until a StartupMessage; None after a cancel."""
        while True:
            packet = await self._read_startup()
            if packet.code == StartupCode.SSL_REQUEST:
                await self._answer_ssl()
            elif packet.code == StartupCode.GSSENC_REQUEST:
                self.send(b"N")
            elif packet.code == StartupCode.CANCEL_REQUEST:
                self._handle_cancel(packet.body)
                return None
            else:
                return self._startup_params(packet)

    async def _answer_ssl(self) -> None:
        if self._setup.buf:
            raise ClientProtocolError("received unencrypted data after SSL request")
        context = self.state.client_tls
        if context is None or self.tls:
            self.send(b"N")
            return
        self.send(b"S")
        assert self.transport is not None
        self._handshaking = True
        try:
            new = await self._loop.start_tls(self.transport, self, context, server_side=True)
        finally:
            self._handshaking = False
        self.transport = cast(asyncio.Transport, new)
        self.tls = True

    def _startup_params(self, packet: StartupPacket) -> dict[str, str]:
        if packet.major != 3:
            raise ClientProtocolError(
                f"unsupported frontend protocol {packet.major}.{packet.minor}: "
                "server supports 3.0 to 3.0", sqlstate="0A000")
        try:
            params = messages.decode_startup_params(packet.body)
        except ProtocolViolation as exc:
            raise ClientProtocolError(f"invalid startup packet layout: {exc}") from None
        unsupported = sorted(k for k in params if k.startswith("_pq_."))
        if packet.minor > 0 or unsupported:
            self.send(messages.negotiate_protocol_version(0, unsupported))
        return {k: v for k, v in params.items() if not k.startswith("_pq_.")}

    async def _authenticate(self, params: dict[str, str]) -> None:
        self.user = params.get("user", "")
        if not self.user:
            raise ProxyError("no PostgreSQL user name specified in startup packet", sqlstate="28000",
                             fatal=True)
        self.state.check_client_limit(None)
        auth_ok = await auth.authenticate(self, self.state.config, self.user, self.tls)
        self.wanted = client_settings(params)  # checked after authentication, as PostgreSQL does
        db_name = params.get("database") or self.user
        database = self.state.databases.get(db_name)
        if database is None:
            self.send(auth_ok)  # PostgreSQL, too, checks the database after authentication
            raise ProxyError(f'database "{db_name}" does not exist', sqlstate="3D000", fatal=True)
        self.state.check_client_limit(database)
        self.database = database
        database.clients += 1
        self.pool_mode = database.config.pool.pool_mode
        shown, self.wanted = await database.prepare_client(self.wanted)
        self.key = self.state.register_cancel_key(self)
        # one write for the end of authentication and the whole welcome
        self.send(auth_ok + shown + messages.backend_key_data(*self.key) + _READY_IDLE)

    def _start_relay(self) -> None:
        if self.phase is not Phase.LOGIN:
            return
        self.phase = Phase.READY
        self._reader = MessageRelay(count=_SYNC_TYPES, intercept=bytes([_TERMINATE]), settle=_COPY_END, through=b"d",
                                    max_length=self.state.config.max_packet_size, valid=FRONTEND_TYPES)
        rest = self._setup.take_rest()
        if rest:
            self._relay(rest)

    def _handle_cancel(self, body: bytes) -> None:
        if len(body) == 8:
            pid, secret = messages.decode_backend_key_data(body)
            self.state.cancel(pid, secret)
        self._close_transport()

    # --- relay: client -> server ---------------------------------------------------------

    def _relay(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        try:
            events = reader.feed(data)
        except ProtocolViolation as exc:
            self.fail(ClientProtocolError(str(exc)))
            return
        syncs, reader.counted = reader.counted, 0
        self._unsynced = reader.tail
        if len(events) == 1 and type(events[0]) is not Message:
            self._forward(events, syncs)  # type: ignore[arg-type]
            return
        out: list[bytes | memoryview] = []
        for ev in events:
            if type(ev) is Message:  # only Terminate is intercepted
                self._forward(out, syncs)
                self._close_transport()
                return
            out.append(ev)  # type: ignore[arg-type]
        self._forward(out, syncs)

    def _forward(self, out: list[bytes | memoryview], syncs: int) -> None:
        if not out:
            return
        server = self.server
        if server is None and self._attach_task is None:
            if self.state.shutting_down:
                self.fail(_ADMIN_SHUTDOWN)  # no new transactions once shutdown has begun
                return
            assert self.database is not None
            server = self.database.pool.try_acquire()  # the hot path: an idle server, no task
            if server is not None:
                self._use_server(server)
        if server is not None and not self._queued:
            server.write(out[0] if len(out) == 1 else b"".join(out), syncs)
            return
        self._queued.extend(bytes(chunk) for chunk in out)
        self._queued_syncs += syncs
        if self._attach_task is None and self.server is None:
            self._attach_task = self._loop.create_task(self._attach())

    async def _attach(self) -> None:
        assert self.database is not None
        try:
            server = await self.database.pool.acquire()
        except ProxyError as exc:
            self.fail(exc)
            return
        finally:
            self._attach_task = None
        if self.phase is not Phase.READY:
            self.database.pool.release(server)
            return
        self._use_server(server)

    def _use_server(self, server: ServerConnection) -> None:
        self.server = server
        server.client = self
        if self._writing_paused:
            self._pause_server()
        server.apply_settings(self, self.wanted)
        if self._queued:
            data, syncs = b"".join(self._queued), self._queued_syncs
            self._queued, self._queued_syncs = [], 0
            server.write(data, syncs)

    # --- relay: server -> client (called by ServerConnection) ----------------------------

    def server_data(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def server_ready(self, server: ServerConnection, status: bytes) -> None:
        if status != b"I" or self._unsynced or self.pool_mode != "transaction":
            return
        if server.cancels_in_flight:
            server.after_cancels(lambda: self._release_if_idle(server))
        else:
            self._release_if_idle(server)

    def _release_if_idle(self, server: ServerConnection) -> None:
        if self.server is not server or server.busy or self._unsynced or server.tx_status != b"I":
            return  # the client went on (or left) meanwhile; that path decides
        self._detach(server)
        assert self.database is not None
        self.database.pool.release(server)
        if self.state.shutting_down:
            self.fail(_ADMIN_SHUTDOWN)

    def server_parameter(self, name: str, value: str) -> None:
        self.wanted[name] = value

    def sync_was_last_counted(self) -> bool:
        return self._reader is not None and self._reader.last_counted == _SYNC

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        self.server = None
        self._server_reading_paused = False
        if self.phase is Phase.READY:
            self.fail(UpstreamError("server connection lost while serving this client", detail=reason))

    def server_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self._client_reading_paused = True

    def server_resume_writing(self) -> None:
        if self.transport is not None and self._client_reading_paused:
            self.transport.resume_reading()
        self._client_reading_paused = False

    def _detach(self, server: ServerConnection) -> None:
        server.client = None
        self.server = None
        if self._server_reading_paused:
            if server.transport is not None:
                server.transport.resume_reading()
            self._server_reading_paused = False
        if self._client_reading_paused:
            self.server_resume_writing()

    # --- ending -------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` to the client as an ErrorResponse; a fatal one closes the connection."""
        if self.phase is Phase.CLOSED:
            return
        self.send(error_response(exc))
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed()

    def _closed(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.state.sessions.discard(self)
        self.state.unregister_cancel_key(self.key)
        for task in (self._login_task, self._attach_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self.database is not None:
            self.database.clients -= 1
        server, self.server = self.server, None
        if server is not None:
            server.client = None
            self._return_server(server)

    def _return_server(self, server: ServerConnection) -> None:
        """Give a server back after the client left: clean it, or close it if it is mid-query."""
        assert self.database is not None
        pool = self.database.pool
        if self._server_reading_paused and server.transport is not None and not server.closed:
            server.transport.resume_reading()  # or the reset's answer would never be read
        self._server_reading_paused = False
        if server.closed or server.busy or self._unsynced or server.cancels_in_flight:
            pool.discard(server, "client disconnected mid-query")
            return
        steps = (["ROLLBACK"] if server.tx_status != b"I" else []) + \
            (["DISCARD ALL"] if self.pool_mode == "session" else [])
        self._reset(server, steps)

    def _reset(self, server: ServerConnection, steps: list[str]) -> None:
        assert self.database is not None
        pool = self.database.pool
        if not steps:
            pool.release(server)
            return

        def done(conn: ServerConnection, status: bytes, error: dict[str, str] | None) -> None:
            if error is not None or status != b"I":
                pool.discard(conn, "reset failed")
                return
            if steps[0] == "DISCARD ALL":
                conn.applied = {}
                conn.dirty_for = None
            self._reset(conn, steps[1:])

        server.send_internal(steps[0], done)

    async def shutdown(self) -> None:
        """Graceful stop: wait for the current transaction to end, then close."""
        while self.phase is Phase.READY and self.in_transaction:
            await asyncio.sleep(0.05)
        if self.phase is not Phase.CLOSED:
            self.fail(_ADMIN_SHUTDOWN)

    @property
    def in_transaction(self) -> bool:
        server = self.server
        return server is not None and (server.busy or self._unsynced or server.tx_status != b"I")

    def cancel_running_query(self) -> None:
        server = self.server
        if server is None or not (server.busy or self._unsynced):
            return
        # Until PostgreSQL has taken the cancel, the server stays with this client, so the
        # signal can never hit another client's query (see server_ready).
        server.cancel_started()
        self.state.spawn(self._deliver_cancel(server))

    async def _deliver_cancel(self, server: ServerConnection) -> None:
        try:
            await send_cancel(server.db.host, server.db.port, server.cancel_request())
        finally:
            server.cancel_finished()
