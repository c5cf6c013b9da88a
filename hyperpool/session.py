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
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, cast

from hyperpool import auth
from hyperpool.admin import AdminConsole
from hyperpool.cache import HIT, STALE, Fill
from hyperpool.caching import (
    Classifier,
    Request,
    bound_request,
    commits_prepared,
    parsed_request,
    rolls_back,
    settings_key,
    simple_key,
    simple_request,
    storable,
)
from hyperpool.config import ADMIN_DATABASES
from hyperpool.database import Database
from hyperpool.errors import ClientProtocolError, PoolError, ProxyError, UpstreamError, error_response
from hyperpool.prepared import PREFIX, Statement
from hyperpool.probes import ORIGIN_RTT_PARAMETER
from hyperpool.protocol import messages
from hyperpool.protocol.framing import (
    INTERCEPTED_MARK,
    CheckRule,
    FrameBuffer,
    Message,
    MessageRelay,
    ProtocolViolation,
    StartupCode,
    StartupPacket,
    read_startup,
)
from hyperpool.protocol.tracker import FAIL, FAKE, SWALLOW_CLOSE, SWALLOW_PARSE
from hyperpool.sql import effects as sql_effects
from hyperpool.stats import count_error
from hyperpool.upstream import Rows, ServerConnection, send_cancel, snapshot_sql

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
_MARK = bytes((INTERCEPTED_MARK,))
_QUERY, _PARSE, _BIND, _DESCRIBE, _CLOSE = b"QPBDC"
_STATEMENT = ord("S")
_DEALLOCATED = messages.command_complete("DEALLOCATE")
_FAILING_PARSE = messages.parse(PREFIX + b"never", b"hyperpool: this Parse fails on purpose", b"\x00\x00")
# a client's statements beyond this many are refused (hyperpool answers most Parses itself: no server limit applies)
MAX_CLIENT_STATEMENTS = 10_000
_UNREAD = "unread_state"  # pin reason: the session-state read-back failed
LONG_WAIT = 1.0  # seconds: a client that waited longer for a server connection is logged (pool exhaustion)
# Flush asks the server to send what it has: it neither starts nor continues a transaction
# (psycopg's executemany sends Sync then Flush), and with no server attached there is nothing to flush.
_FLUSH = b"H"
_FUNCTION_CALL = ord("F")


def _everything(data: bytes, start: int, stop: int) -> bool:
    """The query cache looks at every Query and Parse."""
    return True


def check_rules(look: sql_effects.Predicate, caching: bool = False) -> dict[int, CheckRule]:
    """What the client relay lets through without Python looking at it: statements whose text ``look``
    finds nothing in (none when the query cache is on), and extended-protocol messages that name only the
    unnamed statement (named statements are renamed to hyperpool's, see prepared.py)."""
    text = _everything if caching else look
    return {
        _QUERY: ((b"",), text),
        _PARSE: ((b"\x00",), text),
        _BIND: ((b"\x00\x00",), None),
        _DESCRIBE: ((b"P", b"S\x00"), None),
        _CLOSE: ((b"P", b"S\x00"), None),
    }


def _syncs(kinds: bytes | bytearray) -> int:
    return kinds.count(b"S") + kinds.count(b"Q") + kinds.count(b"F") if kinds else 0
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


def _address(info: object) -> tuple[str, int]:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return ("unix", 0)


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
        self._look: sql_effects.Predicate = sql_effects.worth_parsing
        self._refusing = False  # pinning: refuse
        # (bytes, their Query/Sync/FunctionCall count, their request types) or (an intercepted message, 0, b"")
        self._queued: list[tuple[bytes | Message, int, bytes | bytearray]] = []
        self.statements: dict[bytes, Statement] = {}  # the client's protocol-level named statements
        self.sql_prepared: dict[str, str] = {}  # the client's SQL-level prepared statements: name -> PREPARE
        self.pins: tuple[str, ...] = ()  # why the client keeps its server connection between transactions
        self._bound: deque[Statement] = deque(maxlen=4)  # statements bound lately (for a result-shape change)
        self._unsynced = False  # bytes went to the server after the last Query/Sync
        self._server_reading_paused = False
        self._client_reading_paused = False
        self._writing_paused = False  # the client's transport buffer is over its high-water mark
        self._loop = asyncio.get_running_loop()  # once: each call costs a getpid() on 3.11
        self._handshaking = False
        self.waiting_since: float | None = None  # monotonic time the client started waiting for a server
        self.connected_at = time.time()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._admin: AdminConsole | None = None
        # the query cache (see caching.py): on when the database has one at login
        self._caching = False  # answer from the query cache (and fill it)
        self._noting = False  # note the tables written: for this database's cache or a peer's
        self._settings_key: tuple[str | None, ...] | None = None  # of self.wanted, for cache keys (None: compute)
        self._fill: Fill | None = None  # this client's query is filling the cache
        self._capture: list[bytes] | None = None  # its response so far
        self._captured = 0
        self._held = 0  # queued items answered by another client's fill of the same key, when it comes
        self._writes: set[str] = set()  # tables written since the transaction began: invalidated at its end
        self._writes_all = False  # ... or every table of the database
        self._ddl = False  # ... and the catalog must be read again
        self._rolled_back = False  # the last statement sent was ROLLBACK: the writes never happened
        self._noted_write = False  # the last text noted may write
        self._unnamed_write: bytes | None = None  # the unnamed statement's text when it may write (Bind alone
        # executes it again)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self.state.sessions.add(self)
        self._login_task = self._loop.create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self._admin is not None:
            self._setup.feed(data)
            self._admin_requests()
            return
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
        except (ssl.SSLError, ConnectionError) as broken:  # (one name per except: mypyc types each once)
            log.info("client connection failed during login: %s", broken)
            self._close_transport()  # nothing readable can be sent on a broken TLS stream
        except ProxyError as exc:
            self.state.count_login_failure(exc.sqlstate)
            if exc.sqlstate.startswith("28"):
                log.info("client authentication failed for user %r from %s: %s", self.user, self.peer[0],
                         exc.message)
            self.fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as unexpected:
            log.exception("unexpected error during client login")
            self.fail(unexpected)
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
        if db_name in ADMIN_DATABASES:
            self._start_admin(auth_ok)
            return
        database = self.state.databases.get(db_name)
        if database is None:
            self.send(auth_ok)  # PostgreSQL, too, checks the database after authentication
            raise ProxyError(f'database "{db_name}" does not exist', sqlstate="3D000", fatal=True)
        self.state.check_client_limit(database)
        self.database = database
        database.clients += 1
        self.pool_mode = database.config.pool.pool_mode
        shown, self.wanted = await database.prepare_client(self.wanted)
        self.state.want_catalog(database)
        self.key = self.state.register_cancel_key(self)
        # one write for the end of authentication and the whole welcome
        self.send(auth_ok + shown + messages.backend_key_data(*self.key) + _READY_IDLE)

    # --- the admin console ------------------------------------------------------------------

    def _start_admin(self, auth_ok: bytes) -> None:
        if self.user not in self.state.config.admin_users:
            self.send(auth_ok)
            raise ProxyError("not allowed to use the admin console", sqlstate="42501", fatal=True,
                             hint="list the user in admin.users")
        self._admin = AdminConsole(self.state)
        shown = b"".join(messages.parameter_status(k, v) for k, v in (
            ("server_version", "15.0 (hyperpool admin console)"), ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on")))
        self.phase = Phase.READY
        self.send(auth_ok + shown + messages.backend_key_data(0, 0) + _READY_IDLE)
        self._admin_requests()

    def _admin_requests(self) -> None:
        """Run every complete admin request; one ReadyForQuery after each."""
        admin = self._admin
        assert admin is not None
        while self.phase is Phase.READY:
            try:
                msg = self._setup.next_message()
            except ProtocolViolation as violation:  # (one name per except: mypyc types each once)
                self.fail(ClientProtocolError(str(violation)))
                return
            if msg is None:
                return
            if msg.type == _TERMINATE:
                self._close_transport()
                return
            if msg.type != _QUERY:
                self.send(error_response(ProxyError("the admin console speaks only the simple query protocol",
                                                    sqlstate="08P01")))
                if msg.type == _SYNC:
                    self.send(_READY_IDLE)
                continue
            try:
                reply = admin.execute(msg.payload[:-1].decode(errors="replace"))
            except ProxyError as exc:
                reply = error_response(exc)
            except Exception as unexpected:  # never a traceback to the client, never a dead console
                log.exception("admin command failed")
                reply = error_response(unexpected)
            self.send(reply + _READY_IDLE)

    def _start_relay(self) -> None:
        if self.phase is not Phase.LOGIN or self._admin is not None:
            return
        self.phase = Phase.READY
        assert self.database is not None
        transaction_mode = self.pool_mode == "transaction"
        self._refusing = transaction_mode and self.database.config.pool.pinning == "refuse"
        self._look = sql_effects.worth_parsing_refusing if self._refusing else sql_effects.worth_parsing
        self._caching = transaction_mode and self.database.cache is not None
        self._noting = transaction_mode and self.state.notes_writes(self.database)
        # In session mode the client keeps its server connection: its statements need no renaming.
        self._reader = MessageRelay(count=_SYNC_TYPES, intercept=bytes([_TERMINATE]), settle=_COPY_END, through=b"d",
                                    max_length=self.state.config.max_packet_size, valid=FRONTEND_TYPES,
                                    checks=check_rules(self._look, self._noting) if transaction_mode else None,
                                    record=True,
                                    neutral=_FLUSH)
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
        if self._caching and data[0] == _QUERY and self.server is None and self._hit(data, reader):
            return
        try:
            events = reader.feed(data)
        except ProtocolViolation as exc:
            self.fail(ClientProtocolError(str(exc)))
            return
        syncs, reader.counted = reader.counted, 0
        kinds = reader.seen
        reader.seen = bytearray()
        if self.state.shutting_down and self._between_transactions():
            self.fail(_ADMIN_SHUTDOWN)  # no new transactions once shutdown has begun
            return
        self._unsynced = reader.tail
        try:
            self._route(events, syncs, kinds)
        except ProtocolViolation as exc:
            self.fail(ClientProtocolError(str(exc)))  # (a connection out of step is discarded, not reused)

    def _between_transactions(self) -> bool:
        """Whether requests arriving now begin a new transaction (the last one ended, or none began)."""
        server = self.server
        return server is None or (server.tx_status == b"I" and not server.outstanding and not self._unsynced
                                  and not server.copy_in)

    def _route(self, events: list[bytes | memoryview | Message], syncs: int, kinds: bytearray) -> None:
        if self._caching and self._from_cache(events, syncs, kinds):
            return
        if self._unnamed_write is not None and self._noting and _BIND in kinds and self._binds_unnamed_first(
                events, kinds):
            self._note_text(self._unnamed_write)  # a Bind without a Parse executes the writing statement again
        server = self.server
        if server is None and kinds and kinds.count(_FLUSH) == len(kinds) and not self._queued and \
                self._attach_task is None:
            return  # only Flush, and nothing pending anywhere
        if server is None and kinds == b"S" and not self._queued and self._attach_task is None:
            self._lone_sync()
            return
        if server is None and events and self._attach_task is None and not self.state.shutting_down and \
                (type(events[0]) is not Message or events[0].type != _TERMINATE):  # type: ignore[union-attr]
            assert self.database is not None
            server = self.database.pool.try_acquire()  # the hot path: an idle server, no task
            if server is not None:
                self._use_server(server)
        if len(events) == 1 and type(events[0]) is not Message:
            if server is not None and not self._queued:  # the common case: a transaction's bytes
                server.record(kinds)
                server.transmit(events[0], syncs)  # type: ignore[arg-type]
            else:
                self._forward([(events[0], syncs, kinds)])  # type: ignore[list-item]
        elif len(events) == 2 and server is not None and not self._queued and self._bind_prepared(events, kinds):
            return  # the common case with prepared statements: Bind of one this connection has
        elif events:
            self._forward_mixed(events, kinds)

    @staticmethod
    def _binds_unnamed_first(events: list[bytes | memoryview | Message], kinds: bytearray) -> bool:
        """Whether a Bind the relay let through (unnamed portal and statement) comes before any Parse of the
        unnamed statement in these requests: it executes the statement parsed in an earlier batch."""
        intercepted = (e for e in events if type(e) is Message)
        for i in range(len(kinds)):  # (not `for kind in kinds`: mypyc cannot compile it over a bytearray)
            kind = kinds[i]
            if kind == INTERCEPTED_MARK:
                msg = next(intercepted, None)
                if type(msg) is Message and msg.type == _PARSE and msg.payload[:1] == b"\x00":
                    return False
            elif kind == _BIND:
                return True
        return False

    def _lone_sync(self) -> None:
        """A Sync with nothing before it, outside a transaction: PostgreSQL would only say ReadyForQuery 'I',
        so hyperpool does, without a server. An edge instance probing this one uses it: the answer carries
        this instance's RTT to the origin (see probes.py)."""
        assert self.database is not None
        rtt = self.state.origin_rtt(self.database)
        shown = b"" if rtt is None else messages.parameter_status(ORIGIN_RTT_PARAMETER, f"{rtt * 1000:.3f}")
        self.send(shown + _READY_IDLE)

    def _bind_prepared(self, events: list[bytes | memoryview | Message], kinds: bytearray) -> bool:
        """Bind + (Execute, Sync...) of a statement the attached server connection already has."""
        msg, rest = events
        if type(msg) is not Message or msg.type != _BIND or type(rest) is Message or kinds[:1] != _MARK:
            return False
        portal, name, offset = messages.decode_bind_names(msg.payload)
        stmt = self.statements.get(name)
        server = self.server
        assert server is not None
        if stmt is None or stmt.name not in server.prepared:
            return False
        if self._noting:
            self._note_statement(stmt)  # (may find it stateful)
        if stmt.stateful:
            return False
        server.prepared.move_to_end(stmt.name)
        self._bound.append(stmt)
        kinds[0] = _BIND
        server.record(kinds)
        server.transmit(messages.bind_renamed(msg.payload, portal, stmt.name, offset) + rest,  # type: ignore[operator]
                        _syncs(kinds))
        return True

    def _forward_mixed(self, events: list[bytes | memoryview | Message], kinds: bytearray) -> None:
        """Bytes and intercepted messages, in order; ``kinds`` has a mark for each intercepted one."""
        segments = kinds.split(_MARK)
        items: list[tuple[bytes | Message, int, bytes | bytearray]] = []
        chunks: list[bytes | memoryview] = []
        index = 0
        for ev in events:
            if type(ev) is not Message:
                chunks.append(ev)  # type: ignore[arg-type]
                continue
            segment = segments[index]
            index += 1
            if chunks:
                items.append((b"".join(chunks), _syncs(segment), segment))
                chunks = []
            if ev.type == _TERMINATE:  # type: ignore[union-attr]
                self._forward(items)
                self._close_transport()
                return
            items.append((ev, 0, b""))  # type: ignore[arg-type]
        if chunks:
            segment = segments[index]
            items.append((b"".join(chunks), _syncs(segment), segment))
        self._forward(items)

    def _forward(self, items: list[tuple[bytes | Message, int, bytes | bytearray]]) -> None:
        if not items:
            return
        server = self.server
        if server is None and self._attach_task is None:
            if self.state.shutting_down:
                self.fail(_ADMIN_SHUTDOWN)  # no new transactions once shutdown has begun
                return
            if len(items) == 2 and not self._held and self._prepared_here(items):
                return
            # (_route already took an idle server if there was one: this client waits for one)
        if server is not None and not self._queued:
            if len(items) == 1 and type(items[0][0]) is not Message:
                data, syncs, kinds = items[0]
                server.record(kinds)
                server.transmit(data, syncs)  # type: ignore[arg-type]
            else:
                self._send(server, items)
            return
        self._queued.extend((bytes(d) if type(d) is memoryview else d, n, k) for d, n, k in items)
        if self._attach_task is None and self.server is None and not self._held:
            self._attach_task = self._loop.create_task(self._attach())

    def _prepared_here(self, items: list[tuple[bytes | Message, int, bytes | bytearray]]) -> bool:
        """Answer Parse + Sync of a statement some server connection already accepted, outside a
        transaction, without taking a server connection (libpq's PQprepare blocks its caller: pgbench
        -M prepared would otherwise wait for a server held by a client in the same thread)."""
        msg, (sync, _, kinds) = items[0][0], items[1]
        if type(msg) is not Message or msg.type != _PARSE or kinds != b"S" or sync != messages.SYNC:
            return False
        name, sql, types = messages.decode_parse(msg.payload)
        if not name or name in self.statements or self._look(sql, 0, len(sql)):
            return False
        stmt = self.state.statements.get(sql, types, self.wanted.get("search_path"))
        if not stmt.verified:
            return False
        self.statements[name] = stmt
        self.send(messages.PARSE_COMPLETE + _READY_IDLE)
        return True

    # --- the query cache ------------------------------------------------------------------

    def _from_cache(self, events: list[bytes | memoryview | Message], syncs: int, kinds: bytearray) -> bool:
        """Answer a request group from the query cache (True), or let it go to a server (False); on a miss
        the response is captured for the cache while it streams to this client."""
        if self._held:
            self._forward_mixed(events, kinds)  # queued behind the request another client's fill answers
            return True
        if self._fill is not None:
            self._abandon_fill()  # more requests behind the filling one: its response would not end alone
        database = self.database
        assert database is not None
        cache = database.cache
        if cache is None:
            return False
        if _FUNCTION_CALL in kinds:
            self._writes_all = True  # a fast-path function call may write anything
            self._rolled_back = False
        first = events[0] if events else None
        if type(first) is not Message or first.type not in (_QUERY, _PARSE, _BIND):
            return False
        if self.server is not None or self._queued or self._attach_task is not None or self.pins:
            if first.type != _BIND:
                cache.count_not_cacheable("pinned" if self.pins else "transaction")
            return False
        classifier = database.classifier
        if classifier is None or self.state.shutting_down:
            cache.count_not_cacheable("no-catalog")
            return False
        request = self._cache_request(first, events) \
            if syncs == 1 and kinds[-1] in (_MARK[0], _SYNC) and not self._unsynced else None
        if request is None:
            if first.type != _BIND:
                cache.count_not_cacheable("pipelined")
            return False
        # An entry exists only for a request judged cacheable with the same text and settings (and DDL through
        # hyperpool empties the cache): a hit needs no verdict.
        status, entry = cache.find(request.key, database.clock())
        if entry is not None:
            self.send(entry.response)
            if status == STALE and cache.begin_refresh(request.key, entry):
                self._refresh(request, classifier)
            return True
        verdict = classifier.verdict(request.sql, self.wanted.get("search_path"))
        if not verdict.cacheable:
            cache.count_not_cacheable(verdict.reason)
            return False
        cache.stats.misses += 1
        if cache.join(request.key, self._joined):
            self._held = -1  # (no server is taken for it meanwhile)
            self._forward_mixed(events, kinds)
            self._held = len(self._queued)
            return True
        self._fill = cache.begin_fill(request.key, verdict.reads, verdict.max_age)
        self._capture = []
        self._captured = 0
        return False

    def _hit(self, data: bytes, reader: MessageRelay) -> bool:
        """The cache's fast path: ``data`` is exactly one simple Query of an idle client, and a fresh entry
        answers it (anything else goes the whole way: the relay, then _from_cache)."""
        database = self.database
        if self._queued or self._attach_task is not None or self._held or self.pins or self._fill is not None \
                or database is None or database.cache is None or not reader.at_boundary \
                or len(data) != 1 + int.from_bytes(data[1:5], "big") or self.state.shutting_down:
            return False
        settings = self._settings_key
        if settings is None:
            settings = self._settings_key = settings_key(self.wanted)
        status, entry = database.cache.find(simple_key(data, settings), database.clock())
        if status != HIT or entry is None:
            if entry is not None:  # stale: counted once the whole way decides (and refreshes)
                database.cache.stats.stale -= 1
            return False
        self.send(entry.response)
        return True

    def _refresh(self, request: Request, classifier: Classifier) -> None:
        """Run a stale entry's request again in the background (stale-while-revalidate)."""
        database = self.database
        assert database is not None and database.cache is not None
        verdict = classifier.verdict(request.sql, self.wanted.get("search_path"))
        fill = database.cache.begin_fill(request.key, verdict.reads, verdict.max_age)
        self.state.spawn(database.refresh(fill, request, dict(self.wanted)))

    def _cache_request(self, first: Message, events: list[bytes | memoryview | Message]) -> Request | None:
        settings = self._settings_key
        if settings is None:
            settings = self._settings_key = settings_key(self.wanted)
        if first.type == _QUERY:
            return simple_request(first.raw, settings) if len(events) == 1 else None
        if len(events) != 2 or type(events[1]) is Message:
            return None
        rest = events[1]
        rest = rest if type(rest) is bytes else bytes(rest)  # type: ignore[arg-type]
        if first.type == _PARSE:
            name, sql, types = messages.decode_parse(first.payload)
            return None if name else parsed_request(sql, types, rest, settings)  # type: ignore[arg-type]
        _, name, _ = messages.decode_bind_names(first.payload)
        stmt = self.statements.get(name)
        if stmt is None:
            return None
        return bound_request(first.payload, stmt.sql, stmt.types, rest, settings)  # type: ignore[arg-type]

    def _joined(self, response: bytes | None) -> None:
        """The fill this client waited for ended: its response answers the held request (or, when the
        fill failed, the request goes to a server after all)."""
        held, self._held = self._held, 0
        if self.phase is not Phase.READY or not held:
            return
        if response is not None:
            del self._queued[:held]
            self.send(response)
        if self._queued and self.server is None and self._attach_task is None:
            self._attach_task = self._loop.create_task(self._attach())

    def _keep(self, data: bytes | memoryview) -> None:
        """Part of a response that fills the cache."""
        capture = self._capture
        assert capture is not None and self.database is not None
        self._captured += len(data)
        cache = self.database.cache
        if cache is None or self._captured > cache.settings.max_entry_bytes:
            if cache is not None:
                cache.stats.too_big += 1
            self._abandon_fill()  # returned, not stored: clients waiting for it run the query themselves
            return
        capture.append(data if type(data) is bytes else bytes(data))

    def _fill_done(self, status: bytes) -> None:
        fill, self._fill = self._fill, None
        capture, self._capture = self._capture, None
        assert fill is not None and self.database is not None
        response = b"".join(capture) if capture is not None and status == b"I" else b""
        if storable(response):
            fill.store(response, self.database.clock())
        else:
            fill.fail()

    def _abandon_fill(self) -> None:
        fill, self._fill = self._fill, None
        self._capture = None
        if fill is not None:
            fill.fail()

    def _note_text(self, sql: bytes) -> bool:
        """A Query or Parse text goes to the server: remember the tables it may write. True when it may also
        change session state unseen: it calls code the catalog does not show to be harmless (a function
        calling set_config(), say), so the state is read back after it."""
        database = self.database
        assert database is not None
        self._rolled_back = False  # (a ROLLBACK sets it again after this)
        classifier = database.classifier
        if classifier is None:  # no catalog yet (or DDL is being read): nothing can be ruled out
            self._writes_all = self._noted_write = True
            return True
        verdict = classifier.verdict(sql, self.wanted.get("search_path"))
        self._noted_write = verdict.writes_all or bool(verdict.writes)
        if verdict.writes_all:
            self._writes_all = True
            self._ddl = self._ddl or verdict.ddl
        elif verdict.writes:
            self._writes.update(verdict.writes)
        return verdict.writes_all and not verdict.ddl

    def _note_statement(self, stmt: Statement) -> None:
        """A named statement is executed: remember the tables it may write (and whether it may change
        session state unseen, once the catalog can tell)."""
        if self._note_text(stmt.sql) and self.database is not None and self.database.classifier is not None:
            stmt.stateful = True

    def _publish_writes(self) -> None:
        """The transaction that wrote ended (ReadyForQuery 'I'): what read its tables is gone from the cache."""
        assert self.database is not None
        if not self._rolled_back:
            for database in self.state.same_origin(self.database):  # (other entries for the same database too)
                cache = database.cache
                if cache is not None:
                    if self._writes_all:
                        cache.invalidate_all()
                    else:
                        cache.invalidate(self._writes)
                if self._ddl:
                    database.catalog_changed()
                    self.state.refresh_catalog(database)
        if not self._unsynced or self._rolled_back:  # (more requests are on their way: they may be in it)
            self._writes = set()
            self._writes_all = self._ddl = False

    def cache_switched(self) -> None:
        """A reload turned the database's cache (or a peer's) on or off: look at every statement from now on
        (or not)."""
        database = self.database
        if self._reader is None or database is None or self.pool_mode != "transaction":
            return
        self._caching = database.cache is not None
        self._noting = self.state.notes_writes(database)
        self._reader.checks.update(check_rules(self._look, self._noting))

    async def _attach(self) -> None:
        assert self.database is not None
        started = self._loop.time()
        self.waiting_since = time.monotonic()
        try:
            server = await self.database.pool.acquire()
        except ProxyError as exc:
            self.fail(exc)
            return
        finally:
            self._attach_task = None
            self.waiting_since = None
            stats = self.database.stats
            waited = self._loop.time() - started
            stats.waits += 1
            stats.wait_time += waited
            stats.wait_histogram.observe(waited)
            if waited > LONG_WAIT:
                pool = self.database.pool
                log.warning("client waited %.1f s for a server connection to database %s (pool_size %d, "
                            "%d waiting)", waited, self.database.config.name, pool.settings.pool_size,
                            len(pool.waiters))
        if self.phase is not Phase.READY:
            self.database.pool.release(server)
            return
        self._use_server(server)

    def _use_server(self, server: ServerConnection) -> None:
        self.server = server
        server.client = self
        if self._writing_paused:
            self._pause_server()
        server.apply_settings(self, self.wanted, self.sql_prepared)
        if self._queued:
            items, self._queued = self._queued, []
            self._send(server, items)

    def _send(self, server: ServerConnection, items: list[tuple[bytes | Message, int, bytes | bytearray]]) -> None:
        """Send bytes and intercepted messages (renamed, answered, or refused here) to ``server``."""
        out: list[bytes] = []
        syncs = 0
        try:
            for data, count, kinds in items:
                if type(data) is Message:
                    syncs += self._request(server, data, out)
                else:
                    server.record(kinds)
                    out.append(data)  # type: ignore[arg-type]
                    syncs += count
        except (ProtocolViolation, ProxyError) as exc:
            # requests may be recorded that were never sent: _return_server discards the connection
            self.fail(exc if isinstance(exc, ProxyError) else ClientProtocolError(str(exc)))
            return
        if out:
            server.transmit(out[0] if len(out) == 1 else b"".join(out), syncs)
        elif server.busy:  # hyperpool answered everything itself while its own query runs
            server.when_internal_done(lambda: self.server_ready(server, server.tx_status))
        else:
            self.server_ready(server, server.tx_status)  # hyperpool answered everything itself

    # --- intercepted requests -------------------------------------------------------------

    def _request(self, server: ServerConnection, msg: Message, out: list[bytes]) -> int:
        """Add what ``msg`` becomes to ``out``; return how many ReadyForQuery it will get."""
        kind = msg.type
        if kind == _QUERY:
            return self._query(server, msg, out)
        if kind == _PARSE:
            self._parse(server, msg, out)
        elif kind == _BIND:
            self._bind(server, msg, out)
        elif kind == _DESCRIBE:
            self._describe(server, msg, out)
        elif kind == _CLOSE:
            self._close(server, msg, out)
        return 0

    def _effects(self, sql: bytes) -> sql_effects.Effects:
        return sql_effects.effects(sql) if self._look(sql, 0, len(sql)) else sql_effects.NO_EFFECTS

    def _refusal(self, effects: sql_effects.Effects) -> str | None:
        if not self._refusing or not effects.pins:
            return None
        assert self.database is not None
        return sql_effects.refusal_sql(effects.pins, self.database.config.name)

    def _query(self, server: ServerConnection, msg: Message, out: list[bytes]) -> int:
        effects = self._effects(msg.payload[:-1])
        refusal = self._refusal(effects)
        if refusal is not None:
            server.record(b"Q")
            out.append(messages.query(refusal))
            return 1
        if effects.statements == 1 and len(effects.deallocates) == 1:
            name = effects.deallocates[0].encode()
            if name in self.statements:  # a protocol-level statement: it only exists in hyperpool
                server.record_edit(FAKE, lambda: _DEALLOCATED + messages.ready_for_query(server.tx_status),
                                   self._forget(name))
                return 0
            if name.startswith(PREFIX):  # one of hyperpool's own, shared by every client: not the client's
                server.record(b"Q")
                out.append(messages.query(f'DEALLOCATE "~{effects.deallocates[0]}"'))
                return 1
        self._note(server, effects)
        if self._noting:
            sql = msg.payload[:-1]
            if self._note_text(sql):
                server.state_changed = True
                server.dirty_for = self
            if rolls_back(sql):
                self._rolled_back = True
            elif commits_prepared(sql):
                self._writes_all = True  # another transaction's writes, unknown here
        server.record(b"Q")
        out.append(msg.raw)
        return 1

    def _note(self, server: ServerConnection, effects: sql_effects.Effects) -> None:
        if effects.check_after:
            server.state_changed = True
            server.dirty_for = self
        if effects.deallocates_all:
            # the client's protocol-level statements are gone now, as in PostgreSQL (on every connection);
            # the server connection's own list is corrected by the read-back after the transaction
            self.statements.clear()
            server.forget_statements()

    def _parse(self, server: ServerConnection, msg: Message, out: list[bytes]) -> None:
        name, sql, types = messages.decode_parse(msg.payload)
        effects = self._effects(sql)
        refusal = self._refusal(effects)
        raw = msg.raw
        if refusal is not None:
            sql, types = refusal.encode(), b"\x00\x00"
            raw = messages.parse(name, sql, types)
        else:
            self._note(server, effects)
        opaque = self._noting and self._note_text(sql)
        if opaque and not name:
            server.state_changed = True
            server.dirty_for = self
        if not name:
            self._unnamed_write = sql if self._noting and self._noted_write else None
            server.record(b"P")
            out.append(raw)
            return
        old = self.statements.get(name)
        if old is not None:
            # PostgreSQL refuses a second Parse of a name: a Parse that cannot succeed makes the server fail
            # (and skip to Sync) the same way; the client sees PostgreSQL's error for its own name
            error = ProxyError(f'prepared statement "{name.decode(errors="replace")}" already exists',
                               sqlstate="42P05")
            server.record_edit(FAIL, error_response(error))
            out.append(_FAILING_PARSE)
            return
        if len(self.statements) >= MAX_CLIENT_STATEMENTS:
            raise ProxyError(f"more than {MAX_CLIENT_STATEMENTS} prepared statements in one session",
                             sqlstate="53400", fatal=True)
        stmt = self.state.statements.get(sql, types, self.wanted.get("search_path"))
        assert self.database is not None
        # (not while the catalog is being read: the statement is shared, and judged again at each Bind)
        stmt.stateful = stmt.stateful or effects.check_after or (opaque and self.database.classifier is not None)
        self.statements[name] = stmt

        def outcome(ok: bool) -> None:
            if ok:
                stmt.verified = True
            elif self.statements.get(name) is stmt:
                del self.statements[name]  # as in PostgreSQL: a failed Parse defines nothing

        if stmt.name in server.prepared:
            server.prepared.move_to_end(stmt.name)
            server.record_edit(FAKE, messages.PARSE_COMPLETE, outcome)
            return
        self._make_room(server, out)
        server.prepared[stmt.name] = None

        def parsed(ok: bool) -> None:
            if not ok:
                server.prepared.pop(stmt.name, None)
            outcome(ok)

        server.record_edit(_PARSE, b"", parsed)
        out.append(stmt.parse)

    def _make_room(self, server: ServerConnection, out: list[bytes]) -> None:
        """Evict the least recently used statements beyond max_prepared_statements (Close, answer swallowed)."""
        assert self.database is not None
        limit = self.database.config.pool.max_prepared_statements
        while len(server.prepared) >= limit:
            victim, _ = server.prepared.popitem(last=False)

            def evicted(ok: bool, victim: bytes = victim) -> None:
                if not ok:  # skipped after an error: the server still has it
                    server.prepared[victim] = None
                    server.prepared.move_to_end(victim, last=False)

            server.record_edit(SWALLOW_CLOSE, b"", evicted)
            out.append(messages.close(b"S", victim))

    def _prepare_on(self, server: ServerConnection, stmt: Statement, out: list[bytes]) -> None:
        """Make sure ``server`` has ``stmt`` before the request that needs it (Parse, answer swallowed)."""
        if stmt.name in server.prepared:
            server.prepared.move_to_end(stmt.name)
            return
        self._make_room(server, out)
        server.prepared[stmt.name] = None

        def prepared(ok: bool) -> None:
            if not ok:
                server.prepared.pop(stmt.name, None)
            else:
                stmt.verified = True

        server.record_edit(SWALLOW_PARSE, b"", prepared)
        out.append(stmt.parse)

    def _target(self, name: bytes) -> Statement | bytes:
        """The client's statement called ``name``, or the name to send for one it does not have."""
        stmt = self.statements.get(name)
        if stmt is not None:
            return stmt
        # unknown here: PostgreSQL says so (an SQL-level PREPAREd name works as in PostgreSQL)
        return b"~" + name if name.startswith(PREFIX) else name

    def _forget(self, name: bytes) -> Callable[[bool], None]:
        """Forget the client's statement ``name`` now (later requests in the same pipeline must not see
        it); the returned outcome puts it back if the server skipped the request after an error."""
        stmt = self.statements.pop(name, None)

        def outcome(ok: bool) -> None:
            if not ok and stmt is not None and name not in self.statements:
                self.statements[name] = stmt

        return outcome

    def _bind(self, server: ServerConnection, msg: Message, out: list[bytes]) -> None:
        portal, name, rest = messages.decode_bind_names(msg.payload)
        raw = msg.raw
        if name:
            target = self._target(name)
            if isinstance(target, Statement):
                self._prepare_on(server, target, out)
                self._bound.append(target)
                if self._noting:
                    self._note_statement(target)
                if target.stateful:  # e.g. set_config(): each execution may change session state
                    server.state_changed = True
                    server.dirty_for = self
                target = target.name
            if target != name:
                raw = messages.bind_renamed(msg.payload, portal, target, rest)
        elif self._unnamed_write is not None and self._noting:
            self._note_text(self._unnamed_write)  # (to a named portal) it writes again
        server.record(b"B")
        out.append(raw)

    def _describe(self, server: ServerConnection, msg: Message, out: list[bytes]) -> None:
        kind, name = messages.decode_target(msg.payload)
        raw = msg.raw
        if kind == _STATEMENT and name:
            target = self._target(name)
            if isinstance(target, Statement):
                self._prepare_on(server, target, out)
                target = target.name
            raw = messages.describe(b"S", target)
        server.record(b"D")
        out.append(raw)

    def _close(self, server: ServerConnection, msg: Message, out: list[bytes]) -> None:
        kind, name = messages.decode_target(msg.payload)
        if kind == _STATEMENT and name:
            # The statement stays prepared on the server for other clients; PostgreSQL, too, answers
            # CloseComplete for a name that does not exist.
            server.record_edit(FAKE, messages.CLOSE_COMPLETE, self._forget(name))
            return
        server.record(b"C")
        out.append(msg.raw)

    # --- relay: server -> client (called by ServerConnection) ----------------------------

    def server_data(self, data: bytes | memoryview) -> None:
        if self._capture is not None:
            self._keep(data)
        if self.transport is not None:
            self.transport.write(data)

    def server_ready(self, server: ServerConnection, status: bytes) -> None:
        if self._fill is not None:
            self._fill_done(status)
        if status == b"I" and (self._writes or self._writes_all):
            self._publish_writes()
        if status != b"I" or self._unsynced or self.pool_mode != "transaction":
            return
        if server.state_changed:
            if server.cancels_in_flight:  # a cancel must not hit hyperpool's own query
                server.after_cancels(lambda: self._release_if_idle(server))
            else:
                self._read_session_state(server)  # decides about releasing when the answer is in
            return
        if self.pins:
            return  # pinned: the session's state lives on this server connection
        if server.cancels_in_flight:
            server.after_cancels(lambda: self._release_if_idle(server))
        else:
            self._release_if_idle(server)

    def _read_session_state(self, server: ServerConnection) -> None:
        """After a transaction that may have changed session state, ask the server what it now holds:
        settings and SQL-level prepared statements follow the client to its next server connection,
        anything that cannot move pins the client here."""
        server.state_changed = False
        rows: Rows = []
        # the client's requests may follow this query: only what was prepared before it can be gone
        known = list(server.prepared)

        def done(conn: ServerConnection, status: bytes, error: dict[str, str] | None) -> None:
            if error is not None:
                if conn.closed or status != b"I":
                    conn.close(f"reading session state failed: {error.get('M', '')}")
                    return
                # e.g. the client's own statement_timeout cut it short, or a late cancel: the state is
                # unknown, so the client keeps this connection and the next transaction's end tries again
                log.warning("could not read session state back (%s): client pinned", error.get("M", ""))
                conn.state_changed = True
                self.pins = (*[p for p in self.pins if p != _UNREAD], _UNREAD)
                return
            self._adopt_session_state(conn, rows, known)
            if self.server is conn and not conn.busy:
                self.server_ready(conn, conn.tx_status)

        server.send_internal(snapshot_sql(None if server.db.via else server.db.user), done, rows)

    def _adopt_session_state(self, server: ServerConnection, rows: Rows, known: list[bytes]) -> None:
        settings: dict[str, str] = {}
        prepared: dict[str, str] = {}
        protocol: set[bytes] = set()
        pins: list[str] = []
        for row in rows:
            if len(row) != 3:
                continue
            kind, name, value = row
            if name is None:
                continue
            if kind == "s" and value is not None:
                settings[name] = value
            elif kind == "p" and value is not None:
                prepared[name] = sql_effects.prepare_statement(value, name) or value
            elif kind == "q":
                protocol.add(name.encode())
            elif kind == "x":
                pins.append(name)
        self.wanted = settings
        self._settings_key = None
        server.applied = dict(settings)
        self.sql_prepared = prepared
        server.sql_prepared = dict(prepared)
        if not server.db.via:  # (through another instance the names there are its own, not these)
            for gone in known:
                if gone not in protocol:
                    server.prepared.pop(gone, None)  # deallocated (DISCARD ALL, DEALLOCATE ALL)
        if tuple(pins) != self.pins:
            log.debug("client %s pinned: %s", self.key[0], ", ".join(pins) or "no longer")
        self.pins = tuple(pins)

    def _release_if_idle(self, server: ServerConnection) -> None:
        if self.server is not server or server.busy or self._unsynced or server.tx_status != b"I":
            return  # the client went on (or left) meanwhile; that path decides
        if server.state_changed or self.pins or server.pending_requests():
            if server.state_changed and not server.cancels_in_flight:
                self._read_session_state(server)
            return  # (a late cancel: the state read-back or the pin decides)
        self._detach(server)
        assert self.database is not None
        self.database.pool.release(server)
        if self.state.shutting_down:
            self.fail(_ADMIN_SHUTDOWN)

    def server_plan_changed(self) -> None:
        """PostgreSQL refused a prepared statement whose result shape changed (DDL): give the statements
        this client bound lately new names, so every server connection prepares them afresh."""
        for stmt in set(self._bound):
            self.state.statements.renew(stmt)
        self._bound.clear()

    def server_parameter(self, name: str, value: str) -> None:
        self.wanted[name] = value
        self._settings_key = None

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
        if self.database is not None:
            count_error(self.database.stats, exc.sqlstate[:2] if isinstance(exc, ProxyError) else "XX")
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
        self._abandon_fill()
        if self._writes or self._writes_all:
            self._publish_writes()  # a COMMIT may have been on its way: assume it happened
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
        if server.closed or server.outstanding or self._unsynced or server.cancels_in_flight or server.copy_in or \
                server.pending_requests():
            pool.discard(server, "client disconnected mid-query")
            return
        if server.busy:  # only hyperpool's own queries run (e.g. the read-back of the session state)
            server.when_internal_done(lambda: self._return_server(server))
            return
        steps = (["ROLLBACK"] if server.tx_status != b"I" else []) + \
            (["DISCARD ALL"] if self.pool_mode == "session" or self.pins or server.state_changed else [])
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
                conn.state_changed = False
                conn.forget_statements()
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
