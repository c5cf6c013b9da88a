"""Sans-I/O framing of the PostgreSQL frontend/backend byte streams.

Two readers live here:

* :func:`read_startup` frames the untyped packets that open a connection
  (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
* :class:`FrameBuffer` yields whole typed messages; it is used while a
  connection is being set up, where every message is small and decoded.
* :class:`MessageRelay` is the hot path: it scans a stream of typed messages,
  passes most bytes through untouched (as memoryview slices of the input) and
  reports only the message types a decision needs.

Nothing here imports asyncio or touches a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")
_HEADER_BI = struct.Struct("!Bi")
_unpack_len = struct.Struct("!i").unpack_from

# Startup-phase packets are limited like PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET = 10000


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid message stream."""


class StartupCode(IntEnum):
    """Request codes of the untyped startup-phase packets."""

    PROTOCOL_3_0 = 196608
    CANCEL_REQUEST = 80877102
    SSL_REQUEST = 80877103
    GSSENC_REQUEST = 80877104


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """One untyped startup-phase packet: its code (or protocol version) and body."""

    code: int
    body: bytes

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def read_startup(buf: bytearray) -> StartupPacket | None:
    """Take one startup packet off the front of ``buf``; None if incomplete."""
    if len(buf) < 4:
        return None
    (length,) = _INT32.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < 8:
        return None
    if len(buf) < length:
        return None
    (code,) = _INT32.unpack_from(buf, 4)
    body = bytes(buf[8:length])
    del buf[:length]
    return StartupPacket(code & 0xFFFFFFFF, body)


class Message:
    """A typed message: type byte (as int) and payload (without the header).

    A plain slotted class, not a dataclass: one is built per watched message on the hot path.
    """

    __slots__ = ("payload", "type")

    def __init__(self, type: int, payload: bytes) -> None:
        self.type = type
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and (self.type, self.payload) == (other.type, other.payload)

    def __hash__(self) -> int:
        return hash((self.type, self.payload))

    def __repr__(self) -> str:
        return f"Message({chr(self.type)!r}, {self.payload!r})"

    @property
    def raw(self) -> bytes:
        return _HEADER.pack(bytes((self.type,)), len(self.payload) + 4) + self.payload


def _check_length(msg_type: int, length: int, max_length: int) -> None:
    if length < 4:
        raise ProtocolViolation(f"invalid length {length} for message type {chr(msg_type)!r}")
    if length > max_length:
        raise ProtocolViolation(
            f"message of type {chr(msg_type)!r} is {length} bytes, over the limit of {max_length}"
        )


class FrameBuffer:
    """Accumulate bytes, yield whole typed messages (setup phase, small messages)."""

    def __init__(self, max_length: int = MAX_STARTUP_PACKET) -> None:
        self.buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_message(self) -> Message | None:
        buf = self.buf
        if len(buf) < 5:
            return None
        msg_type = buf[0]
        (length,) = _unpack_len(buf, 1)
        _check_length(msg_type, length, self.max_length)
        end = length + 1
        if len(buf) < end:
            return None
        msg = Message(msg_type, bytes(buf[5:end]))
        del buf[:end]
        return msg

    def take_rest(self) -> bytes:
        rest = bytes(self.buf)
        self.buf.clear()
        return rest


Chunk = memoryview | bytes
Event = Chunk | Message


# What MessageRelay does with a message type (see MessageRelay._kind_table).
# The streamed kinds come first: forwarded as they arrive, even in pieces; never buffered.
_PASS, _TALLY, _THROUGH, _NEUTRAL, _COUNT, _CHECK, _SETTLE, _FLAG, _WATCH, _INTERCEPT, _INVALID = range(11)
_STREAMED = (_PASS, _TALLY, _THROUGH, _NEUTRAL)
_LAST_STREAMED = _NEUTRAL
# Recorded in ``MessageRelay.seen`` in place of a message the relay did not forward (intercepted).
INTERCEPTED_MARK = 0xFF

# A checked type's rule: the payload prefixes it may pass with, and a predicate on
# (data, payload start, payload end) that makes it intercepted anyway.
CheckRule = tuple[tuple[bytes, ...], "Callable[[bytes, int, int], bool] | None"]


@lru_cache(maxsize=64)
def _kind_table(valid: frozenset[int] | None, count: frozenset[int], settle: frozenset[int],
                intercept: frozenset[int], watch: frozenset[int], flag: frozenset[int],
                through: frozenset[int], tally: frozenset[int], check: frozenset[int],
                neutral: frozenset[int]) -> tuple[int, ...]:
    """What a relay does with each type byte (looked up once per message on the hot path).

    A pure function of its arguments, cached: every session builds relays from the same few sets.
    """
    # earlier entries win when a type is in several sets
    precedence = ((intercept, _INTERCEPT), (check, _CHECK), (count, _COUNT), (settle, _SETTLE), (watch, _WATCH),
                  (flag, _FLAG), (through, _THROUGH), (tally, _TALLY), (neutral, _NEUTRAL))

    def kind_of(msg_type: int) -> int:
        if valid is not None and msg_type not in valid:
            return _INVALID
        return next((kind for types, kind in precedence if msg_type in types), _PASS)

    return tuple(kind_of(msg_type) for msg_type in range(256))


class MessageRelay:
    """Scan one direction of a typed message stream for relaying.

    ``feed`` returns a list of events in stream order. A ``memoryview`` or
    ``bytes`` event is a run of bytes to forward unchanged (the fed object
    itself when all of it is forwarded). A :class:`Message` is a message of a
    *watched* type (its bytes are also inside the preceding forwarded run) or
    of an *intercepted* type (its bytes are not forwarded; the caller
    decides). Messages of *counted* types are forwarded and only counted in
    ``counted``, with the last byte of the last one in ``last_byte`` (the
    status of a ReadyForQuery): the hot path builds no object for them.
    ``tail`` tells whether bytes were forwarded after the last counted
    message. A *settle* message (CopyDone) clears it again, but only when
    everything since the last counted message was of a *through* type
    (CopyData). *Flag* types only set ``flagged`` when their payload starts
    with one of ``flag_prefixes``. *Tally* types are forwarded and counted in
    ``tallied`` since the last counted message or message of type
    ``tally_reset`` (``errored`` tells whether one of them was of
    ``error_type``, which is tallied even when watched). A *checked* type is forwarded when its
    payload starts with one of its rule's prefixes and its rule's predicate
    (if any) is false for the payload; otherwise it is intercepted (a checked
    type that is also a counted type is counted either way). Messages of
    other types are never copied: their bytes flow through even when they
    arrive in pieces.

    With ``record`` on, the type byte of every message that is not of a
    through or settle type is appended to ``seen`` in stream order, and
    :data:`INTERCEPTED_MARK` for each intercepted one: the caller learns the
    sequence of requests it forwarded without decoding them.
    """

    __slots__ = ("_body_left", "_kinds", "_partial", "checks", "count", "counted", "error_type", "errored",
                 "flag_prefixes", "flag_types", "flagged", "intercept", "last_byte", "last_counted", "max_length",
                 "neutral", "record", "seen", "settle", "tail", "tail_other", "tallied", "tally", "tally_reset",
                 "through", "valid", "watch")

    def __init__(self, watch: bytes = b"", intercept: bytes = b"", max_length: int = 1 << 30,
                 valid: bytes | None = None, count: bytes = b"", flag: bytes = b"",
                 flag_prefixes: tuple[bytes, ...] = (), settle: bytes = b"", through: bytes = b"",
                 tally: bytes = b"", error_type: int = -1, tally_reset: int = -1,
                 checks: dict[int, CheckRule] | None = None, record: bool = False, neutral: bytes = b"") -> None:
        self.max_length = max_length
        # Messages of a settle type are forwarded and clear ``tail`` without being counted,
        # when only messages of a through type were forwarded since the last counted one.
        self.settle = frozenset(settle)
        self.through = frozenset(through)
        # Messages of a neutral type (Flush) are forwarded and recorded but change no other state.
        self.neutral = frozenset(neutral)
        # Messages of a flag type whose payload starts with one of flag_prefixes set ``flagged``.
        self.flag_types = frozenset(flag)
        self.flag_prefixes = flag_prefixes
        self.flagged = False
        # When given, any other message type is a protocol violation.
        self.valid = None if valid is None else frozenset(valid)
        self.checks: dict[int, CheckRule] = dict(checks or {})
        self.record = record
        self.seen = bytearray()
        self.error_type = error_type
        self.tally_reset = tally_reset  # a watched or intercepted type that resets the tally like a counted one
        self.tallied = 0
        self.errored = False
        self.set_types(watch=watch, intercept=intercept, count=count, tally=tally)
        self.counted = 0
        self.last_byte = 0
        self.last_counted = 0  # type byte of the last counted message
        self.tail = False
        self.tail_other = False  # bytes other than through-type messages since the last counted one
        self._body_left = 0  # bytes still to pass through of an unwatched message
        self._partial = bytearray()  # an incomplete header or watched message

    def set_types(self, *, watch: bytes = b"", intercept: bytes = b"", count: bytes = b"",
                  tally: bytes | None = None) -> None:
        """Change which types are watched, intercepted, counted or tallied (between feeds)."""
        self.watch = frozenset(watch)
        self.intercept = frozenset(intercept)
        self.count = frozenset(count)
        if tally is not None:
            self.tally = frozenset(tally)
        self._kinds = _kind_table(self.valid, self.count, self.settle, self.intercept, self.watch, self.flag_types,
                                  self.through, self.tally, frozenset(self.checks), self.neutral)

    @property
    def at_boundary(self) -> bool:
        """No message is half scanned: the next byte fed starts a message."""
        return not self._body_left and not self._partial

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not self._body_left and not self._partial:
            self._scan(data, 0, events)  # the common case: a chunk that starts on a message
            return events
        view = memoryview(data)
        pos = 0
        end = len(view)
        if self._body_left:
            take = min(self._body_left, end)
            self._body_left -= take
            if take:
                events.append(view[:take])
                self.tail = True
            pos = take
        if self._partial and pos < end:
            pos = self._complete_partial(view, pos, events)
        if pos < end:
            self._scan(data, pos, events)
        return events

    def _complete_partial(self, view: memoryview, pos: int, events: list[Event]) -> int:
        """Grow the pending partial message from ``view``; return the new position."""
        partial = self._partial
        if len(partial) < 5:
            need = 5 - len(partial)
            partial += view[pos : pos + need]
            pos += min(need, len(view) - pos)
            if len(partial) < 5:
                return pos
        msg_type, length = _HEADER_BI.unpack_from(partial, 0)
        _check_length(msg_type, length, self.max_length)
        if self.valid is not None and msg_type not in self.valid:
            raise ProtocolViolation(f"invalid message type {chr(msg_type)!r}")
        kind = self._kinds[msg_type]
        if kind in _STREAMED:
            # Only the header was pending: pass it on and stream the body.
            body_left = length - 4 - (len(partial) - 5)
            events.append(bytes(partial))
            if kind == _NEUTRAL:
                if self.record:
                    self.seen.append(msg_type)
            else:
                self.tail = True
                if kind != _THROUGH:
                    self.tail_other = True
                    if kind == _TALLY:
                        self.tallied += 1
                    if self.record:
                        self.seen.append(msg_type)
            partial.clear()
            take = min(body_left, len(view) - pos)
            if take:
                events.append(view[pos : pos + take])
            self._body_left = body_left - take
            return pos + take
        need = length + 1 - len(partial)
        take = min(need, len(view) - pos)
        partial += view[pos : pos + take]
        pos += take
        if take == need:
            raw = bytes(partial)
            partial.clear()
            self._complete(msg_type, raw, events)
        return pos

    def _passes(self, msg_type: int, data: bytes, start: int, stop: int) -> bool:
        prefixes, predicate = self.checks[msg_type]
        return data.startswith(prefixes, start, stop) and (predicate is None or not predicate(data, start, stop))

    def _complete(self, msg_type: int, raw: bytes, events: list[Event]) -> None:
        """A special message that arrived in pieces: the same decisions as in _scan."""
        kind = self._kinds[msg_type]
        if kind == _CHECK:
            counts = msg_type in self.count
            if self._passes(msg_type, raw, 5, len(raw)):
                events.append(raw)
                if self.record:
                    self.seen.append(msg_type)
            else:
                events.append(Message(msg_type, raw[5:]))
                if self.record:
                    self.seen.append(INTERCEPTED_MARK)
            if counts:
                self._counted(msg_type, raw[-1])
            else:
                self.tail = self.tail_other = True
            return
        if kind == _INTERCEPT:
            events.append(Message(msg_type, raw[5:]))
            if self.record:
                self.seen.append(INTERCEPTED_MARK)
            self._tally_watched(msg_type)
            return
        events.append(raw)
        if self.record and kind != _SETTLE:
            self.seen.append(msg_type)
        if kind == _COUNT:
            self._counted(msg_type, raw[-1])
        elif kind == _SETTLE:
            if not self.tail_other:
                self.tail = False
        elif kind == _FLAG:
            self.tail = self.tail_other = True
            if raw.startswith(self.flag_prefixes, 5):
                self.flagged = True
            if msg_type in self.tally:
                self.tallied += 1
        else:
            events.append(Message(msg_type, raw[5:]))
            self.tail = self.tail_other = True
            self._tally_watched(msg_type)

    def _tally_watched(self, msg_type: int) -> None:
        if msg_type == self.error_type:
            self.tallied += 1
            self.errored = True
        elif msg_type == self.tally_reset:
            self.tallied = 0
            self.errored = False
        elif msg_type in self.tally:
            self.tallied += 1

    def _counted(self, msg_type: int, last: int) -> None:
        self.counted += 1
        self.last_byte = last
        self.last_counted = msg_type
        self.tail = self.tail_other = False
        self.tallied = 0
        self.errored = False

    def _scan(self, data: bytes, pos: int, events: list[Event]) -> None:
        kinds, max_length = self._kinds, self.max_length
        end = len(data)
        run_start = pos
        tail, other = self.tail, self.tail_other
        record = self.record
        seen = self.seen
        unpack = _HEADER_BI.unpack_from
        while end - pos >= 5:
            msg_type, length = unpack(data, pos)
            if length < 4 or length > max_length:
                _check_length(msg_type, length, max_length)
            msg_end = pos + 1 + length
            kind = kinds[msg_type]
            if kind <= _LAST_STREAMED:
                if kind == _PASS:
                    tail = other = True
                    if record:
                        seen.append(msg_type)
                elif kind == _TALLY:
                    tail = other = True
                    self.tallied += 1
                    if record:
                        seen.append(msg_type)
                elif kind == _THROUGH:
                    tail = True
                elif record:  # _NEUTRAL
                    seen.append(msg_type)
                if msg_end > end:
                    self._body_left = msg_end - end
                    pos = end
                    break
                pos = msg_end
                continue
            if kind == _INVALID:
                raise ProtocolViolation(f"invalid message type {chr(msg_type)!r}")
            if msg_end > end:
                break
            if kind == _COUNT:
                self.counted += 1
                self.last_byte = data[msg_end - 1]
                self.last_counted = msg_type
                self.tallied = 0
                self.errored = False
                tail = other = False
                if record:
                    seen.append(msg_type)
            elif kind == _CHECK:
                prefixes, predicate = self.checks[msg_type]
                start = pos + 5
                passes = data.startswith(prefixes, start, msg_end) and (
                    predicate is None or not predicate(data, start, msg_end))
                if not passes:
                    if pos > run_start:
                        events.append(_slice(data, run_start, pos))
                    run_start = msg_end
                    events.append(Message(msg_type, data[start:msg_end]))
                if record:
                    seen.append(msg_type if passes else INTERCEPTED_MARK)
                if msg_type in self.count:
                    self.counted += 1
                    self.last_byte = data[msg_end - 1]
                    self.last_counted = msg_type
                    self.tallied = 0
                    self.errored = False
                    tail = other = False
                else:
                    tail = other = True
            elif kind == _SETTLE:
                if not other:
                    tail = False
            elif kind == _FLAG:
                tail = other = True
                if data.startswith(self.flag_prefixes, pos + 5):
                    self.flagged = True
                if msg_type in self.tally:
                    self.tallied += 1
                if record:
                    self.seen.append(msg_type)
            else:
                if kind == _INTERCEPT:
                    if pos > run_start:
                        events.append(_slice(data, run_start, pos))
                    if record:
                        self.seen.append(INTERCEPTED_MARK)
                else:
                    events.append(_slice(data, run_start, msg_end))
                    tail = other = True
                    if record:
                        self.seen.append(msg_type)
                self._tally_watched(msg_type)
                run_start = msg_end
                events.append(Message(msg_type, bytes(data[pos + 5 : msg_end])))
            pos = msg_end
        self.tail, self.tail_other = tail, other
        if pos > run_start:
            events.append(data if run_start == 0 and pos == end else memoryview(data)[run_start:pos])
        if pos < end:
            self._partial += data[pos:end]


def _slice(data: bytes, start: int, stop: int) -> Chunk:
    """``data[start:stop]`` without copying: the object itself when that is all of it."""
    if start == 0 and stop == len(data):
        return data
    return memoryview(data)[start:stop]
