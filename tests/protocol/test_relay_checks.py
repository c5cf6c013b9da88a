"""Unit tests for MessageRelay's checked types, ``record`` and the completion tally, fed whole, split at every
byte offset, byte by byte and mixed in one chunk; and the client-side check rules hyperpool uses."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from hyperpool.protocol.framing import INTERCEPTED_MARK, CheckRule, Message, MessageRelay
from hyperpool.session import check_rules
from hyperpool.sql.effects import worth_parsing, worth_parsing_refusing

FRONTEND_TYPES = b"BCdcfDEHFPpQSX"
MARK = bytes([INTERCEPTED_MARK])


def msg(type_byte: bytes, payload: bytes = b"") -> bytes:
    """Hand-built typed message, independent of the code under test."""
    return type_byte + struct.pack("!i", len(payload) + 4) + payload


def i16(n: int) -> bytes:
    return struct.pack("!h", n)


def parse(name: bytes, sql: bytes) -> bytes:
    return msg(b"P", name + b"\x00" + sql + b"\x00" + i16(0))


def bind(portal: bytes, statement: bytes) -> bytes:
    return msg(b"B", portal + b"\x00" + statement + b"\x00" + i16(0) + i16(0) + i16(0))


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\x00")


def describe(kind: bytes, name: bytes) -> bytes:
    return msg(b"D", kind + name + b"\x00")


def close(kind: bytes, name: bytes) -> bytes:
    return msg(b"C", kind + name + b"\x00")


EXECUTE = msg(b"E", b"\x00" + struct.pack("!i", 0))
SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


def payload_of(raw: bytes) -> bytes:
    return raw[5:]


def as_message(raw: bytes) -> Message:
    return Message(raw[0], raw[5:])


# --- feeding ----------------------------------------------------------------------------------


def feed_plans(stream: bytes) -> Iterator[list[bytes]]:
    """Whole; cut in two at every offset; byte by byte."""
    yield [stream]
    for i in range(1, len(stream)):
        yield [stream[:i], stream[i:]]
    yield [stream[i : i + 1] for i in range(len(stream))]


def run(relay: MessageRelay, feeds: list[bytes]) -> list[bytes | Message]:
    """Events with runs of forwarded bytes merged: the same list however the stream was cut."""
    events: list[bytes | Message] = []
    for data in feeds:
        for ev in relay.feed(data):
            if isinstance(ev, Message):
                events.append(ev)
                continue
            last = events[-1] if events else None
            if isinstance(last, bytes):
                events[-1] = last + bytes(ev)  # memoryview events alias the fed buffer: copied at once
            else:
                events.append(bytes(ev))
    return [e for e in events if e != b""]


def expected(*parts: tuple[str, bytes]) -> list[bytes | Message]:
    """Events for messages that are forwarded ('fwd'), intercepted ('cut') or forwarded and watched ('watch')."""
    events: list[bytes | Message] = []
    for action, raw in parts:
        if action == "cut":
            events.append(as_message(raw))
            continue
        if events and type(events[-1]) is bytes:
            events[-1] += raw
        else:
            events.append(raw)
        if action == "watch":
            events.append(as_message(raw))
    return events


RelayState = tuple[bytes, int, int, int, int, bool]


def state(relay: MessageRelay) -> RelayState:
    return bytes(relay.seen), relay.counted, relay.last_counted, relay.tallied, relay.last_byte, relay.errored


def check_every_plan(make: Callable[[], MessageRelay], stream: bytes,
                     events: list[bytes | Message]) -> list[MessageRelay]:
    """Same events for every way the stream can be cut; every relay's state is the same too."""
    relays: list[MessageRelay] = []
    failures: list[int] = []
    for feeds in feed_plans(stream):
        relay = make()
        if run(relay, feeds) != events:
            failures.append(len(feeds[0]))
        relays.append(relay)
    assert failures == []  # first-feed lengths of the failing plans
    states = {state(r) for r in relays}
    assert len(states) == 1, states
    return relays


# --- checked types ----------------------------------------------------------------------------


def unnamed_parse_rule(predicate: Callable[[bytes, int, int], bool] | None = None) -> dict[int, CheckRule]:
    return {ord("P"): ((b"\x00",), predicate)}


def test_check_prefix_passes_or_intercepts() -> None:
    unnamed, named = parse(b"", b"SELECT 1"), parse(b"s1", b"SELECT 1")
    stream = unnamed + SYNC + named + SYNC
    events = expected(("fwd", unnamed + SYNC), ("cut", named), ("fwd", SYNC))
    relays = check_every_plan(lambda: MessageRelay(checks=unnamed_parse_rule(), record=True), stream, events)
    assert bytes(relays[0].seen) == b"PS" + MARK + b"S"


@pytest.mark.parametrize(
    ("raw", "passes"),
    [
        pytest.param(parse(b"", b"SELECT 1"), True, id="unnamed"),
        pytest.param(parse(b"s1", b"SELECT 1"), False, id="named"),
        pytest.param(parse(b"", b"SELECT pg_advisory_lock(1)"), False, id="predicate"),
        pytest.param(parse(b"s1", b"SELECT pg_advisory_lock(1)"), False, id="named-and-predicate"),
    ],
)
def test_check_prefix_and_predicate_alone(raw: bytes, passes: bool) -> None:
    events = expected(("fwd" if passes else "cut", raw))
    relays = check_every_plan(lambda: MessageRelay(checks=unnamed_parse_rule(worth_parsing), record=True), raw,
                              events)
    assert bytes(relays[0].seen) == (b"P" if passes else MARK)


def test_check_predicate_sees_exactly_the_payload_once() -> None:
    first, second = parse(b"", b"SELECT 1"), parse(b"", b"SELECT 2")
    stream = first + msg(b"D", b"Sx\x00") + second
    for feeds in feed_plans(stream):
        calls: list[bytes] = []

        def predicate(data: bytes, start: int, stop: int, calls: list[bytes] = calls) -> bool:
            calls.append(bytes(data[start:stop]))
            return data[start:stop].endswith(b"2\x00" + i16(0))

        relay = MessageRelay(checks=unnamed_parse_rule(predicate))
        assert run(relay, feeds) == expected(("fwd", first + msg(b"D", b"Sx\x00")), ("cut", second))
        assert calls == [payload_of(first), payload_of(second)]


def test_check_without_matching_prefix_does_not_call_the_predicate() -> None:
    calls: list[int] = []

    def predicate(data: bytes, start: int, stop: int) -> bool:
        calls.append(start)
        return False

    relay = MessageRelay(checks=unnamed_parse_rule(predicate))
    named = parse(b"s1", b"SELECT 1")
    assert run(relay, [named]) == [as_message(named)]
    assert calls == []


def test_check_any_of_several_prefixes() -> None:
    rules: dict[int, CheckRule] = {ord("D"): ((b"P", b"S\x00"), None)}
    portal, unnamed, named_portal, named = describe(b"P", b""), describe(b"S", b""), describe(b"P", b"c1"), \
        describe(b"S", b"s1")
    stream = portal + unnamed + named_portal + named + SYNC
    events = expected(("fwd", portal + unnamed + named_portal), ("cut", named), ("fwd", SYNC))
    relays = check_every_plan(lambda: MessageRelay(checks=rules, record=True), stream, events)
    assert bytes(relays[0].seen) == b"DDD" + MARK + b"S"


def test_check_prefix_is_matched_inside_the_message_only() -> None:
    """The payload is b'a': it does not start with b'ab', whatever byte follows the message in the chunk.

    Whole (one chunk), the relay reads the next message's type byte as part of the prefix."""
    rules: dict[int, CheckRule] = {ord("Q"): ((b"ab",), None)}
    short, after = msg(b"Q", b"a"), msg(b"b", b"zz")
    stream = short + after
    events = expected(("cut", short), ("fwd", after))
    check_every_plan(lambda: MessageRelay(checks=rules, record=True), stream, events)


def test_checked_and_counted_type_is_counted_either_way() -> None:
    rules: dict[int, CheckRule] = {ord("Q"): ((b"",), worth_parsing)}
    plain, discard = query(b"SELECT 1"), query(b"discard all")
    stream = plain + discard + plain
    events = expected(("fwd", plain), ("cut", discard), ("fwd", plain))
    relays = check_every_plan(lambda: MessageRelay(count=b"QSF", checks=rules, record=True), stream, events)
    relay = relays[0]
    assert relay.counted == 3
    assert relay.last_counted == ord("Q")
    assert relay.last_byte == 0  # the Query's terminating NUL
    assert not relay.tail
    assert bytes(relay.seen) == b"Q" + MARK + b"Q"


@pytest.mark.parametrize("last", [query(b"SELECT 1"), query(b"discard all")], ids=["passes", "intercepted"])
def test_checked_and_counted_type_resets_tail(last: bytes) -> None:
    rules: dict[int, CheckRule] = {ord("Q"): ((b"",), worth_parsing)}
    stream = bind(b"", b"") + last
    for feeds in feed_plans(stream):
        relay = MessageRelay(count=b"QS", checks=rules)
        run(relay, feeds)
        assert relay.counted == 1
        assert not relay.tail


@pytest.mark.parametrize("last", [parse(b"", b"SELECT 1"), parse(b"s1", b"SELECT 1")], ids=["passes", "intercepted"])
def test_checked_type_not_counted_sets_tail(last: bytes) -> None:
    stream = SYNC + last
    for feeds in feed_plans(stream):
        relay = MessageRelay(count=b"S", checks=unnamed_parse_rule())
        run(relay, feeds)
        assert relay.counted == 1
        assert relay.tail


def test_checks_with_watch_and_intercept_in_one_chunk() -> None:
    rules = unnamed_parse_rule()
    unnamed, named = parse(b"", b"SELECT 1"), parse(b"s", b"SELECT 1")
    stream = unnamed + FLUSH + named + SYNC + unnamed + TERMINATE
    events = expected(("fwd", unnamed + FLUSH), ("cut", named), ("watch", SYNC), ("fwd", unnamed), ("cut", TERMINATE))
    relays = check_every_plan(lambda: MessageRelay(watch=b"S", intercept=b"X", checks=rules, record=True),
                              stream, events)
    assert bytes(relays[0].seen) == b"PH" + MARK + b"SP" + MARK


# --- record -----------------------------------------------------------------------------------


def test_record_off_leaves_seen_empty() -> None:
    relay = MessageRelay(count=b"S", intercept=b"X", checks=unnamed_parse_rule())
    run(relay, [parse(b"s", b"x") + SYNC + TERMINATE])
    assert relay.seen == bytearray()


def test_record_every_kind_of_message() -> None:
    """Passed, counted, watched, flagged, tallied: recorded; through and settle: not; intercepted: the mark."""
    copy_data = msg(b"d", b"1\t2\n" * 20)
    stream = (msg(b"Q", b"COPY t FROM STDIN\x00") + copy_data + copy_data + msg(b"c")
              + bind(b"", b"") + msg(b"D", b"P\x00") + EXECUTE + msg(b"H") + SYNC
              + msg(b"f", b"oops\x00") + msg(b"F", b"x" * 30) + TERMINATE)
    events = expected(("fwd", stream[: -len(TERMINATE)]), ("cut", TERMINATE))
    relays = check_every_plan(
        lambda: MessageRelay(count=b"QSF", intercept=b"X", settle=b"cf", through=b"d", flag=b"E", tally=b"B",
                             record=True),
        stream, events)
    assert bytes(relays[0].seen) == b"QBDEHSF" + MARK


def test_seen_accumulates_across_feeds_until_the_caller_takes_it() -> None:
    relay = MessageRelay(count=b"S", intercept=b"X", record=True)
    relay.feed(bind(b"", b"") + SYNC[:2])
    assert bytes(relay.seen) == b"B"  # the Sync is not complete yet
    relay.feed(SYNC[2:] + EXECUTE[:1])
    assert bytes(relay.seen) == b"BS"
    relay.seen = bytearray()  # as the session does
    relay.feed(EXECUTE[1:] + TERMINATE)
    assert bytes(relay.seen) == b"E" + MARK


# --- tally --------------------------------------------------------------------------------------

COMPLETIONS = b"123nTCIs"
STATE_TAGS = (b"SET\x00", b"DISCARD")


def server_relay() -> MessageRelay:
    """As hyperpool relays a server connection's fast path."""
    return MessageRelay(watch=b"SGE", count=b"Z", flag=b"C", flag_prefixes=STATE_TAGS, tally=COMPLETIONS,
                        error_type=ord("E"), tally_reset=ord("Z"))


PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA = msg(b"1"), msg(b"2"), msg(b"3"), msg(b"n")
PARAM_DESC = msg(b"t", i16(0))
ROW_DESC = msg(b"T", i16(1) + b"a\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
DATA_ROW = msg(b"D", i16(1) + struct.pack("!i", 1) + b"1")
SELECT_1 = msg(b"C", b"SELECT 1\x00")
SET_TAG = msg(b"C", b"SET\x00")
EMPTY_QUERY, SUSPENDED = msg(b"I"), msg(b"s")
ERROR = msg(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00")
READY, READY_TX = msg(b"Z", b"I"), msg(b"Z", b"T")
NOTICE = msg(b"N", b"SNOTICE\x00Mx\x00\x00")
PARAM_STATUS = msg(b"S", b"a\x00b\x00")


@pytest.mark.parametrize(
    ("responses", "tallied", "errored", "counted"),
    [
        pytest.param([], 0, False, 0, id="nothing"),
        pytest.param([PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW], 2, False, 0, id="rows-are-not-completions"),
        pytest.param([PARSE_COMPLETE, PARAM_DESC, ROW_DESC, BIND_COMPLETE, NO_DATA, DATA_ROW, SELECT_1], 5, False, 0,
                     id="parameter-description-is-not-a-completion"),
        pytest.param([CLOSE_COMPLETE, EMPTY_QUERY, SUSPENDED, NOTICE, PARAM_STATUS], 3, False, 0,
                     id="async-messages-are-not-completions"),
        pytest.param([SET_TAG, SELECT_1], 2, False, 0, id="flagged-tags-are-tallied"),
        pytest.param([PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY], 0, False, 1, id="reset-by-counted"),
        pytest.param([PARSE_COMPLETE, READY, PARSE_COMPLETE, BIND_COMPLETE], 2, False, 1, id="since-last-counted"),
        pytest.param([PARSE_COMPLETE, ERROR], 2, True, 0, id="error-is-tallied"),
        pytest.param([PARSE_COMPLETE, ERROR, READY], 0, False, 1, id="error-reset-by-counted"),
        pytest.param([ERROR, READY_TX, PARSE_COMPLETE], 1, False, 1, id="error-then-next-group"),
    ],
)
def test_tally_on_the_server_fast_path(responses: list[bytes], tallied: int, errored: bool, counted: int) -> None:
    stream = b"".join(responses)
    events = expected(*[("watch" if raw[:1] in (b"S", b"E") else "fwd", raw) for raw in responses])
    relays = check_every_plan(server_relay, stream, events) if stream else [server_relay()]
    relay = relays[0]
    assert (relay.tallied, relay.errored, relay.counted) == (tallied, errored, counted)
    for r in relays:
        assert (r.tallied, r.errored, r.counted) == (tallied, errored, counted)


def test_flagged_completion_is_flagged_and_tallied() -> None:
    stream = PARSE_COMPLETE + SET_TAG
    for relay in check_every_plan(server_relay, stream, expected(("fwd", stream))):
        assert relay.flagged
        assert relay.tallied == 2


def test_tally_reset_by_a_watched_type() -> None:
    """While hyperpool's own query runs, ReadyForQuery is watched, not counted: it still resets the tally."""
    def make() -> MessageRelay:
        return MessageRelay(watch=b"ZSECGDA", tally=COMPLETIONS, error_type=ord("E"), tally_reset=ord("Z"))

    stream = PARSE_COMPLETE + ERROR + READY + ROW_DESC + DATA_ROW + SELECT_1
    events = expected(("fwd", PARSE_COMPLETE), ("watch", ERROR), ("watch", READY), ("fwd", ROW_DESC),
                      ("watch", DATA_ROW), ("watch", SELECT_1))
    relays = check_every_plan(make, stream, events)
    assert (relays[0].tallied, relays[0].errored, relays[0].counted) == (2, False, 0)  # RowDescription, C
    relays = check_every_plan(make, PARSE_COMPLETE + ERROR + READY,
                              expected(("fwd", PARSE_COMPLETE), ("watch", ERROR), ("watch", READY)))
    assert (relays[0].tallied, relays[0].errored) == (0, False)
    relays = check_every_plan(make, PARSE_COMPLETE + ERROR, expected(("fwd", PARSE_COMPLETE), ("watch", ERROR)))
    assert (relays[0].tallied, relays[0].errored) == (2, True)


def test_tally_reset_by_an_intercepted_type() -> None:
    """While responses are tracked, every completion, errors and ReadyForQuery are intercepted."""
    def make() -> MessageRelay:
        return MessageRelay(watch=b"SG", intercept=b"123tnTCIsEZ", tally=COMPLETIONS, error_type=ord("E"),
                            tally_reset=ord("Z"))

    stream = PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW + ERROR
    events = expected(("cut", PARSE_COMPLETE), ("cut", BIND_COMPLETE), ("fwd", DATA_ROW), ("cut", ERROR))
    relays = check_every_plan(make, stream, events)
    assert (relays[0].tallied, relays[0].errored) == (3, True)
    relays = check_every_plan(make, stream + READY + PARSE_COMPLETE,
                              [*events, as_message(READY), as_message(PARSE_COMPLETE)])
    assert (relays[0].tallied, relays[0].errored) == (1, False)


def test_tally_of_a_long_streamed_completion_counts_at_its_header() -> None:
    relay = server_relay()
    tag = msg(b"T", b"x" * 5000)
    relay.feed(tag[:5])
    assert relay.tallied == 1
    relay.feed(tag[5:100])
    relay.feed(tag[100:])
    assert relay.tallied == 1


def test_set_types_keeps_or_replaces_the_tally() -> None:
    relay = server_relay()
    relay.set_types(watch=b"SG")  # tally=None: unchanged
    run(relay, [PARSE_COMPLETE + BIND_COMPLETE])
    assert relay.tallied == 2
    relay.set_types(watch=b"SG", tally=b"")
    run(relay, [PARSE_COMPLETE])
    assert relay.tallied == 2


# --- the client relay hyperpool runs ------------------------------------------------------------


def client_relay(look: Callable[[bytes, int, int], bool] = worth_parsing) -> MessageRelay:
    """As hyperpool.session builds it."""
    return MessageRelay(count=b"QSF", intercept=b"X", settle=b"cf", through=b"d", valid=FRONTEND_TYPES,
                        checks=check_rules(look), record=True)


def test_check_rules_shape() -> None:
    rules = check_rules(worth_parsing)
    assert set(rules) == set(b"QPBDC")
    assert rules[ord("Q")] == ((b"",), worth_parsing)
    assert rules[ord("P")] == ((b"\x00",), worth_parsing)
    assert rules[ord("B")] == ((b"\x00\x00",), None)
    assert rules[ord("D")] == ((b"P", b"S\x00"), None)
    assert rules[ord("C")] == ((b"P", b"S\x00"), None)
    assert check_rules(worth_parsing_refusing)[ord("Q")][1] is worth_parsing_refusing


CLIENT_CASES = [
    pytest.param(parse(b"", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"), True, id="parse-unnamed"),
    pytest.param(parse(b"stmt1", b"SELECT 1"), False, id="parse-named"),
    pytest.param(parse(b"", b"SELECT pg_advisory_lock($1)"), False, id="parse-unnamed-advisory"),
    pytest.param(parse(b"", b"CREATE TEMP TABLE t (a int)"), False, id="parse-unnamed-temp"),
    pytest.param(bind(b"", b""), True, id="bind-unnamed"),
    pytest.param(bind(b"", b"stmt1"), False, id="bind-named-statement"),
    pytest.param(bind(b"c1", b""), False, id="bind-named-portal"),
    pytest.param(describe(b"P", b""), True, id="describe-unnamed-portal"),
    pytest.param(describe(b"P", b"c1"), True, id="describe-named-portal"),
    pytest.param(describe(b"S", b""), True, id="describe-unnamed-statement"),
    pytest.param(describe(b"S", b"stmt1"), False, id="describe-named-statement"),
    pytest.param(close(b"P", b""), True, id="close-unnamed-portal"),
    pytest.param(close(b"P", b"c1"), True, id="close-named-portal"),
    pytest.param(close(b"S", b""), True, id="close-unnamed-statement"),
    pytest.param(close(b"S", b"stmt1"), False, id="close-named-statement"),
    pytest.param(query(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"), True, id="query-plain"),
    pytest.param(query(b"SELECT pg_advisory_lock(1)"), False, id="query-advisory-lock"),
    pytest.param(query(b"discard all"), False, id="query-discard-all"),
    pytest.param(query(b"select set_config('a','b',false)"), False, id="query-set-config"),
    pytest.param(query(b"DEALLOCATE stmt1"), False, id="query-deallocate"),
    pytest.param(query(b"SELECT * INTO TEMP t FROM x"), False, id="query-select-into-temp"),
    pytest.param(query(b"LISTEN chan"), True, id="query-listen-allowed"),
    pytest.param(query(b"SET ROLE bob"), True, id="query-set-role-allowed"),
    pytest.param(EXECUTE, True, id="execute"),
    pytest.param(SYNC, True, id="sync"),
    pytest.param(FLUSH, True, id="flush"),
]


@pytest.mark.parametrize(("raw", "passes"), CLIENT_CASES)
def test_client_rules_one_message(raw: bytes, passes: bool) -> None:
    relays = check_every_plan(client_relay, raw, expected(("fwd" if passes else "cut", raw)))
    assert bytes(relays[0].seen) == (raw[:1] if passes else MARK)
    assert relays[0].counted == (1 if raw[:1] in (b"Q", b"S") else 0)


@pytest.mark.parametrize(
    ("sql", "passes_allowing", "passes_refusing"),
    [
        pytest.param(b"SELECT 1", True, True, id="plain"),
        pytest.param(b"LISTEN chan", True, False, id="listen"),
        pytest.param(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", True, False, id="hold-cursor"),
        pytest.param(b"SET ROLE bob", True, False, id="set-role"),
        pytest.param(b"SET SESSION AUTHORIZATION bob", True, False, id="session-authorization"),
        pytest.param(b"SELECT pg_advisory_lock(1)", False, False, id="advisory-lock"),
    ],
)
def test_client_rules_refusing(sql: bytes, passes_allowing: bool, passes_refusing: bool) -> None:
    for look, passes in ((worth_parsing, passes_allowing), (worth_parsing_refusing, passes_refusing)):
        for raw in (query(sql), parse(b"", sql)):
            relay = client_relay(look)
            assert run(relay, [raw]) == expected(("fwd" if passes else "cut", raw))


def test_client_rules_mixed_stream() -> None:
    """One realistic client stream: a pgbench-like transaction, a named prepared pipeline, COPY, Close, Terminate."""
    plain = query(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    unnamed_group = parse(b"", b"SELECT $1") + bind(b"", b"") + describe(b"P", b"") + EXECUTE + SYNC
    named_parse, named_bind, named_describe = parse(b"s1", b"SELECT $1"), bind(b"", b"s1"), describe(b"S", b"s1")
    copy = query(b"COPY t FROM STDIN") + msg(b"d", b"1\n") + msg(b"d", b"2\n") + msg(b"c")
    advisory = query(b"SELECT pg_advisory_lock(1)")
    portal_close, named_close = close(b"P", b""), close(b"S", b"s1")
    stream = (plain + unnamed_group + named_parse + named_bind + named_describe + EXECUTE + SYNC + copy + advisory
              + portal_close + FLUSH + named_close + SYNC + TERMINATE)
    events = expected(
        ("fwd", plain + unnamed_group), ("cut", named_parse), ("cut", named_bind), ("cut", named_describe),
        ("fwd", EXECUTE + SYNC + copy), ("cut", advisory), ("fwd", portal_close + FLUSH), ("cut", named_close),
        ("fwd", SYNC), ("cut", TERMINATE))
    relays = check_every_plan(client_relay, stream, events)
    relay = relays[0]
    assert bytes(relay.seen) == b"QPBDES" + MARK * 3 + b"ESQ" + MARK + b"CH" + MARK + b"S" + MARK
    assert relay.counted == 6  # 3 Queries (one intercepted) and 3 Syncs
    assert relay.last_counted == ord("S")
    assert not relay.tail
