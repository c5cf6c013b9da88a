"""Unit tests for hyperpool.protocol.framing: MessageRelay on real captures cut every way, FrameBuffer, read_startup."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hyperpool.protocol import messages
from hyperpool.protocol.framing import (
    MAX_STARTUP_PACKET,
    FrameBuffer,
    Message,
    MessageRelay,
    ProtocolViolation,
    StartupCode,
    StartupPacket,
    read_startup,
)

WIRE_DIR = Path(__file__).resolve().parents[3] / "shared" / "wire"
CAPTURE_FILES = sorted(WIRE_DIR.glob("*.jsonl"))

FRONTEND_TYPES = b"BCdcfDEHFPpQSX"
BACKEND_TYPES = b"123ACDEGHIKNnRSsTtVvWZcd"


def msg(type_byte: bytes, payload: bytes = b"") -> bytes:
    """Hand-built typed message, independent of the code under test."""
    return type_byte + struct.pack("!i", len(payload) + 4) + payload


def header(type_byte: bytes, length: int) -> bytes:
    return type_byte + struct.pack("!i", length)


# --- captures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One direction of a capture, as a typed message stream (client: startup packet removed)."""

    name: str
    stream: bytes
    chunks: tuple[bytes, ...]  # the chunking the relay recorded, concatenating to ``stream``


def _drop_prefix(chunks: list[bytes], n: int) -> list[bytes]:
    out = []
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        out.append(chunk[n:])
        n = 0
    return out


def _load(path: Path) -> dict[str, Side]:
    chunks: dict[str, list[bytes]] = {"client": [], "server": []}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            chunks[rec["from"]].append(bytes.fromhex(rec["hex"]))
    client = bytearray(b"".join(chunks["client"]))
    total = len(client)
    packet = read_startup(client)
    assert packet is not None and packet.code == StartupCode.PROTOCOL_3_0
    client_chunks = _drop_prefix(chunks["client"], total - len(client))
    server = b"".join(chunks["server"])
    return {
        "client": Side(f"{path.stem}:client", bytes(client), tuple(client_chunks)),
        "server": Side(f"{path.stem}:server", server, tuple(chunks["server"])),
    }


CAPTURES = {path.stem: _load(path) for path in CAPTURE_FILES}


def reference_parse(stream: bytes) -> list[tuple[int, bytes, int, int]]:
    """Trivial independent parser: (type, payload, start, end) for each typed message."""
    out = []
    pos = 0
    while pos < len(stream):
        (length,) = struct.unpack("!i", stream[pos + 1 : pos + 5])
        assert length >= 4
        out.append((stream[pos], stream[pos + 5 : pos + 1 + length], pos, pos + 1 + length))
        pos += 1 + length
    assert pos == len(stream), "capture stream does not end on a message boundary"
    return out


def test_captures_are_present_and_well_formed() -> None:
    assert len(CAPTURES) >= 5
    for sides in CAPTURES.values():
        for side in sides.values():
            assert b"".join(side.chunks) == side.stream
            assert reference_parse(side.stream)


# --- MessageRelay on captures ---------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    id: str
    side: str
    watch: bytes = b""
    intercept: bytes = b""
    valid: bytes | None = None


RELAY_CONFIGS = [
    # as hyperpool.upstream relays the server side
    RelayConfig("server-ZSE", "server", watch=b"ZSE"),
    RelayConfig("server-passthrough", "server"),
    # as hyperpool.session relays the client side
    RelayConfig("client-QSF-X", "client", watch=b"QSF", intercept=b"X", valid=FRONTEND_TYPES),
    RelayConfig("client-intercept-PBDC", "client", intercept=b"PBDC"),
    RelayConfig("client-watch-SQ-intercept-PBDC", "client", watch=b"SQ", intercept=b"PBDC", valid=FRONTEND_TYPES),
]

STRATEGIES = ["whole", "bytewise", "splits", "recorded", "random"]
EDGE = 64  # every split point within this many bytes of either end is always tried
SPLIT_STEP = 5  # in the middle of the stream, every SPLIT_STEP-th split point


def split_points(n: int) -> list[int]:
    points = set(range(min(EDGE, n) + 1)) | set(range(max(0, n - EDGE), n + 1)) | set(range(0, n + 1, SPLIT_STEP))
    return sorted(points)


def feed_plans(strategy: str, side: Side) -> Iterator[list[bytes]]:
    stream = side.stream
    if strategy == "whole":
        yield [stream]
    elif strategy == "bytewise":
        yield [stream[i : i + 1] for i in range(len(stream))]
    elif strategy == "splits":
        for i in split_points(len(stream)):
            yield [stream[:i], stream[i:]]
    elif strategy == "recorded":
        yield list(side.chunks)
    elif strategy == "random":
        rng = random.Random(len(stream))
        for _ in range(10):
            cuts = sorted(rng.sample(range(len(stream) + 1), rng.randint(2, 40)))
            yield [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    else:  # pragma: no cover
        raise AssertionError(strategy)


def expected_relay_output(stream: bytes, watch: bytes, intercept: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
    """Forwarded bytes, and (type, payload, forwarded length when the event is due) per reported message."""
    forwarded = []
    reported = []
    offset = 0
    for msg_type, payload, start, end in reference_parse(stream):
        if msg_type in intercept:
            reported.append((msg_type, payload, offset))
            continue
        forwarded.append(stream[start:end])
        offset += end - start
        if msg_type in watch:
            reported.append((msg_type, payload, offset))
    return b"".join(forwarded), reported


def run_relay(relay: MessageRelay, feeds: list[bytes]) -> list[bytes | Message]:
    events: list[bytes | Message] = []
    for data in feeds:
        for ev in relay.feed(data):
            # memoryview events alias the fed buffer: copy them at once.
            events.append(ev if type(ev) is Message else bytes(ev))
    return events


def check_events(events: list[bytes | Message], intercept: bytes,
                 forwarded: bytes, reported: list[tuple[int, bytes, int]]) -> None:
    chunks: list[bytes] = []
    got: list[tuple[int, bytes, int]] = []
    misplaced: list[Message] = []  # watched messages not right after the chunk ending with their bytes
    offset = 0
    prev: bytes | Message | None = None
    for ev in events:
        if type(ev) is Message:
            got.append((ev.type, ev.payload, offset))
            if ev.type not in intercept and (type(prev) is not bytes or not prev.endswith(ev.raw)):
                misplaced.append(ev)
        else:
            chunks.append(ev)
            offset += len(ev)
        prev = ev
    # (plain asserts outside the loop: pytest's assertion rewriting is slow in hot loops)
    assert not misplaced
    assert b"".join(chunks) == forwarded
    if got != reported:
        assert [(t, p) for t, p, _ in got] == [(t, p) for t, p, _ in reported]
        assert got == reported  # each event arrives exactly when the forwarded stream reaches it


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config", RELAY_CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_relay_capture(capture: str, config: RelayConfig, strategy: str) -> None:
    side = CAPTURES[capture][config.side]
    forwarded, reported = expected_relay_output(side.stream, config.watch, config.intercept)
    plans = 0
    for feeds in feed_plans(strategy, side):
        assert b"".join(feeds) == side.stream
        relay = MessageRelay(watch=config.watch, intercept=config.intercept, valid=config.valid)
        check_events(run_relay(relay, feeds), config.intercept, forwarded, reported)
        plans += 1
    assert plans


def test_relay_capture_configs_are_not_vacuous() -> None:
    """Every watch/intercept set reports something on at least one capture."""
    for config in RELAY_CONFIGS:
        selected = config.watch + config.intercept
        counts = [
            sum(1 for t, *_ in reference_parse(sides[config.side].stream) if t in selected)
            for sides in CAPTURES.values()
        ]
        assert not selected or any(counts), config.id
    pipeline = CAPTURES["psycopg-extended-prepared-pipeline"]["client"].stream
    types = bytes(t for t, *_ in reference_parse(pipeline))
    assert b"PBDEPBDEPBDES" in types  # interception really happens mid-pipeline


def test_relay_two_relays_share_nothing() -> None:
    a, b = MessageRelay(watch=b"Z"), MessageRelay(watch=b"Z")
    rfq = msg(b"Z", b"I")
    assert a.feed(rfq[:3]) == []
    assert [bytes(e) if not isinstance(e, Message) else e for e in b.feed(rfq)] == [rfq, Message(ord("Z"), b"I")]


# --- MessageRelay on hand-built streams -----------------------------------------------------

SMALL_STREAM = (
    msg(b"Q", b"SELECT 1\x00")
    + msg(b"P", b"\x00SELECT $1\x00\x00\x00")
    + msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    + msg(b"H")
    + msg(b"S")
    + msg(b"d", b"x" * 300)
    + msg(b"c")
    + msg(b"X")
)


SMALL_CUTS = sorted({
    min(max(b + d, 0), len(SMALL_STREAM))
    for b in [start for *_, start, _ in reference_parse(SMALL_STREAM)] + [len(SMALL_STREAM)]
    for d in (-1, 0, 1, 4, 5, 6)
})


@pytest.mark.parametrize(
    ("watch", "intercept"),
    [
        pytest.param(b"", b"", id="passthrough"),
        pytest.param(b"QSF", b"X", id="QSF-X"),
        pytest.param(b"", b"PBDC", id="intercept-PBDC"),
        pytest.param(b"SHX", b"QdB", id="SHX-QdB"),
        pytest.param(bytes(range(256)), b"", id="watch-all"),
        pytest.param(b"", bytes(range(256)), id="intercept-all"),
    ],
)
def test_relay_small_stream_three_way_cuts(watch: bytes, intercept: bytes) -> None:
    """Cut twice near every message boundary and inside every header (three feeds)."""
    stream = SMALL_STREAM
    forwarded, reported = expected_relay_output(stream, watch, intercept)
    for i in SMALL_CUTS:
        for j in SMALL_CUTS:
            if j >= i:
                relay = MessageRelay(watch=watch, intercept=intercept, valid=FRONTEND_TYPES)
                check_events(run_relay(relay, [stream[:i], stream[i:j], stream[j:]]), intercept, forwarded, reported)


def test_relay_unwatched_bodies_are_views_of_the_input() -> None:
    """Unwatched message bytes are passed through as slices of the fed buffer, even across feeds."""
    body = bytes(range(256)) * 400
    stream = msg(b"D", body)
    relay = MessageRelay(watch=b"Z")
    first, second = stream[:1000], stream[1000:]
    ev1 = relay.feed(first)
    ev2 = relay.feed(second)
    # each event is the fed object itself (all of it forwarded) or a memoryview of it: never a copy
    assert all(e is first or (isinstance(e, memoryview) and e.obj is first) for e in ev1)
    assert all(e is second or (isinstance(e, memoryview) and e.obj is second) for e in ev2)
    assert b"".join(bytes(e) for e in ev1 + ev2) == stream


def test_relay_empty_feed_yields_nothing() -> None:
    relay = MessageRelay(watch=b"Z")
    assert relay.feed(b"") == []
    relay.feed(msg(b"D", b"abc")[:7])
    assert relay.feed(b"") == []
    relay.feed(msg(b"Z", b"I")[:3])
    assert relay.feed(b"") == []


def test_relay_max_length_boundary_is_inclusive() -> None:
    max_length = 64
    for type_byte, watch in [(b"Q", b"Q"), (b"D", b"")]:
        stream = msg(type_byte, b"a" * (max_length - 4))
        for i in range(len(stream) + 1):
            relay = MessageRelay(watch=watch, max_length=max_length)
            events = run_relay(relay, [stream[:i], stream[i:]])
            assert b"".join(e for e in events if isinstance(e, bytes)) == stream


# --- MessageRelay errors ---------------------------------------------------------------------

PREFIX = msg(b"Q", b"SELECT 1\x00") + msg(b"D", b"row")
BAD_HEADERS = [
    pytest.param(b"Q", 3, 100, id="watched-length-3"),
    pytest.param(b"D", 3, 100, id="unwatched-length-3"),
    pytest.param(b"Q", 0, 100, id="watched-length-0"),
    pytest.param(b"D", -1, 100, id="unwatched-length-negative"),
    pytest.param(b"Q", -(2**31), 100, id="watched-length-min-int"),
    pytest.param(b"Q", 101, 100, id="watched-over-max"),
    pytest.param(b"D", 101, 100, id="unwatched-over-max"),
    pytest.param(b"X", 101, 100, id="intercepted-over-max"),
    pytest.param(b"D", 2**31 - 1, 1 << 30, id="unwatched-over-default-max"),
    pytest.param(b"Q", 2**31 - 1, 1 << 30, id="watched-over-default-max"),
]


def bad_feed_plans(bad: bytes) -> Iterator[list[bytes]]:
    yield [bad]
    yield [bad[i : i + 1] for i in range(len(bad))]
    for i in range(len(bad) + 1):
        yield [bad[:i], bad[i:]]


@pytest.mark.parametrize(("type_byte", "length", "max_length"), BAD_HEADERS)
@pytest.mark.parametrize("with_prefix", [False, True])
def test_relay_bad_length_raises(type_byte: bytes, length: int, max_length: int, with_prefix: bool) -> None:
    bad = (PREFIX if with_prefix else b"") + header(type_byte, length) + b"payload"
    for feeds in bad_feed_plans(bad):
        relay = MessageRelay(watch=b"QSF", intercept=b"X", max_length=max_length)
        with pytest.raises(ProtocolViolation):
            for data in feeds:
                relay.feed(data)


@pytest.mark.parametrize("type_byte", [b"x", b"\x00", b"\xff", b"Z", b"R"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_relay_invalid_type_raises(type_byte: bytes, with_prefix: bool) -> None:
    bad = (PREFIX if with_prefix else b"") + msg(type_byte, b"abc") + msg(b"S")
    for feeds in bad_feed_plans(bad):
        relay = MessageRelay(watch=b"QSF", intercept=b"X", valid=FRONTEND_TYPES)
        with pytest.raises(ProtocolViolation, match="invalid message type"):
            for data in feeds:
                relay.feed(data)


@pytest.mark.parametrize("watch", [b"x", b""])
def test_relay_invalid_type_even_if_watched(watch: bytes) -> None:
    relay = MessageRelay(watch=watch, valid=b"Q")
    with pytest.raises(ProtocolViolation):
        relay.feed(msg(b"x"))


def test_relay_without_valid_accepts_any_type() -> None:
    stream = b"".join(msg(bytes([t]), b"p") for t in range(256))
    relay = MessageRelay()
    assert b"".join(bytes(e) for e in relay.feed(stream)) == stream


def test_relay_violation_detected_only_once_header_is_complete() -> None:
    relay = MessageRelay(max_length=100)
    bad = header(b"D", 1000)
    for i in range(4):
        relay.feed(bad[i : i + 1])
    with pytest.raises(ProtocolViolation, match="over the limit"):
        relay.feed(bad[4:5])


# --- FrameBuffer ----------------------------------------------------------------------------


def drain(fb: FrameBuffer) -> list[Message]:
    out = []
    while (m := fb.next_message()) is not None:
        out.append(m)
    return out


@pytest.mark.parametrize("capture", sorted(CAPTURES))
@pytest.mark.parametrize("side", ["client", "server"])
def test_framebuffer_bytewise(capture: str, side: str) -> None:
    stream = CAPTURES[capture][side].stream
    fb = FrameBuffer(max_length=1 << 20)
    got: list[Message] = []
    for i in range(len(stream)):
        fb.feed(stream[i : i + 1])
        got.extend(drain(fb))
    assert [(m.type, m.payload) for m in got] == [(t, p) for t, p, *_ in reference_parse(stream)]
    assert b"".join(m.raw for m in got) == stream
    assert fb.take_rest() == b""


def test_framebuffer_recorded_chunks_and_message_raw() -> None:
    side = CAPTURES["psql-simple-copy-errors"]["server"]
    fb = FrameBuffer(max_length=1 << 20)
    got: list[Message] = []
    for chunk in side.chunks:
        fb.feed(chunk)
        got.extend(drain(fb))
    assert b"".join(m.raw for m in got) == side.stream
    assert all(isinstance(m.payload, bytes) for m in got)


def test_framebuffer_take_rest() -> None:
    first, second = msg(b"R", b"\x00\x00\x00\x00"), msg(b"Z", b"I")
    fb = FrameBuffer()
    fb.feed(first + second[:3])
    assert fb.next_message() == Message(ord("R"), b"\x00\x00\x00\x00")
    assert fb.next_message() is None
    assert fb.take_rest() == second[:3]
    assert fb.take_rest() == b""
    assert fb.next_message() is None
    fb.feed(second)
    assert fb.take_rest() == second  # take_rest does not frame


def test_framebuffer_incomplete_returns_none_and_keeps_bytes() -> None:
    m = msg(b"S", b"client_encoding\x00UTF8\x00")
    for i in range(len(m)):
        fb = FrameBuffer()
        fb.feed(m[:i])
        assert fb.next_message() is None
        assert bytes(fb.buf) == m[:i]
        fb.feed(m[i:])
        assert fb.next_message() == Message(ord("S"), b"client_encoding\x00UTF8\x00")
        assert fb.next_message() is None


@pytest.mark.parametrize(
    ("length", "max_length"),
    [
        (17, 16),
        (3, 16),
        (0, 16),
        (-5, 16),
        (MAX_STARTUP_PACKET + 1, MAX_STARTUP_PACKET),
        (2**31 - 1, MAX_STARTUP_PACKET),
    ],
)
def test_framebuffer_bad_length_raises_on_header(length: int, max_length: int) -> None:
    fb = FrameBuffer(max_length=max_length)
    fb.feed(header(b"p", length))  # the body need not have arrived
    with pytest.raises(ProtocolViolation):
        fb.next_message()


def test_framebuffer_default_max_and_boundary() -> None:
    fb = FrameBuffer()
    assert fb.max_length == MAX_STARTUP_PACKET
    m = msg(b"p", b"a" * (MAX_STARTUP_PACKET - 4))
    fb.feed(m)
    got = fb.next_message()
    assert got is not None and got.raw == m


# --- read_startup ---------------------------------------------------------------------------

GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
CANCEL_REQUEST = b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + struct.pack("!ii", 4242, -7)
STARTUP = b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00app\x00\x00"

STARTUP_CASES = [
    pytest.param(STARTUP, StartupPacket(StartupCode.PROTOCOL_3_0, b"user\x00app\x00\x00"), id="startup"),
    pytest.param(SSL_REQUEST, StartupPacket(StartupCode.SSL_REQUEST, b""), id="ssl"),
    pytest.param(GSSENC_REQUEST, StartupPacket(StartupCode.GSSENC_REQUEST, b""), id="gssenc"),
    pytest.param(CANCEL_REQUEST, StartupPacket(StartupCode.CANCEL_REQUEST, struct.pack("!ii", 4242, -7)), id="cancel"),
    pytest.param(b"\x00\x00\x00\x08\x00\x03\x00\x02", StartupPacket(0x30002, b""), id="protocol-3.2-empty"),
]


@pytest.mark.parametrize(("packet", "expected"), STARTUP_CASES)
def test_read_startup_decodes(packet: bytes, expected: StartupPacket) -> None:
    buf = bytearray(packet)
    assert read_startup(buf) == expected
    assert buf == bytearray()


def test_read_startup_codes_match_protocol_docs() -> None:
    assert StartupCode.PROTOCOL_3_0 == (3 << 16)
    assert StartupCode.CANCEL_REQUEST == (1234 << 16) | 5678
    assert StartupCode.SSL_REQUEST == (1234 << 16) | 5679
    assert StartupCode.GSSENC_REQUEST == (1234 << 16) | 5680
    pkt = StartupPacket(StartupCode.SSL_REQUEST, b"")
    assert (pkt.major, pkt.minor) == (1234, 5679)
    v3 = StartupPacket(StartupCode.PROTOCOL_3_0, b"")
    assert (v3.major, v3.minor) == (3, 0)


@pytest.mark.parametrize(("packet", "expected"), STARTUP_CASES)
def test_read_startup_incomplete_returns_none_and_leaves_buffer(packet: bytes, expected: StartupPacket) -> None:
    for i in range(len(packet)):
        buf = bytearray(packet[:i])
        assert read_startup(buf) is None
        assert buf == packet[:i]
    buf = bytearray()
    for i in range(len(packet)):
        buf += packet[i : i + 1]
        got = read_startup(buf)
        assert (got is None) == (i < len(packet) - 1)
    assert got == expected and buf == bytearray()


@pytest.mark.parametrize(("packet", "expected"), STARTUP_CASES)
def test_read_startup_consumes_exactly_one_packet(packet: bytes, expected: StartupPacket) -> None:
    trailer = msg(b"p", b"secret\x00") + SSL_REQUEST
    buf = bytearray(packet + trailer)
    assert read_startup(buf) == expected
    assert buf == trailer


def test_read_startup_ssl_then_startup_back_to_back() -> None:
    buf = bytearray(SSL_REQUEST + STARTUP + GSSENC_REQUEST[:5])
    codes = []
    while (pkt := read_startup(buf)) is not None:
        codes.append(pkt.code)
    assert codes == [StartupCode.SSL_REQUEST, StartupCode.PROTOCOL_3_0]
    assert buf == GSSENC_REQUEST[:5]


@pytest.mark.parametrize("length", [0, 4, 7, -1, -(2**31), MAX_STARTUP_PACKET + 1, 2**31 - 1])
def test_read_startup_bad_length_raises(length: int) -> None:
    buf = bytearray(struct.pack("!ii", length, StartupCode.PROTOCOL_3_0))
    with pytest.raises(ProtocolViolation):
        read_startup(buf)


def test_read_startup_max_length_is_inclusive() -> None:
    body = b"user\x00" + b"a" * (MAX_STARTUP_PACKET - 8 - 7) + b"\x00\x00"
    packet = struct.pack("!ii", MAX_STARTUP_PACKET, StartupCode.PROTOCOL_3_0) + body
    assert len(packet) == MAX_STARTUP_PACKET
    buf = bytearray(packet[:-1])
    assert read_startup(buf) is None
    buf += packet[-1:]
    got = read_startup(buf)
    assert got is not None and got.body == body and buf == bytearray()


@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_read_startup_on_captures(capture: str) -> None:
    path = WIRE_DIR / f"{capture}.jsonl"
    client = bytearray()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["from"] == "client":
            client += bytes.fromhex(rec["hex"])
    pkt = read_startup(client)
    assert pkt is not None
    assert (pkt.major, pkt.minor) == (3, 0)
    params = messages.decode_startup_params(pkt.body)
    assert params["user"] == "app" and params["database"] == "postgres"
    assert bytes(client) == CAPTURES[capture]["client"].stream
