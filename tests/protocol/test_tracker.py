"""Unit tests for hyperpool.protocol.tracker: which server response answers which request (sans-I/O)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from hyperpool.protocol.tracker import (
    FAIL,
    FAKE,
    SWALLOW_CLOSE,
    SWALLOW_PARSE,
    TERMINATORS,
    Outcome,
    ResponseTracker,
    split_groups,
)


def msg(type_byte: bytes, payload: bytes = b"") -> bytes:
    """Hand-built typed message: type byte + int32 length + payload."""
    return type_byte + struct.pack("!i", len(payload) + 4) + payload


# Requests (frontend type bytes, as ints).
PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY, FUNCTION_CALL = b"PBCDESQF"

# Responses (backend messages, whole bytes).
PARSE_COMPLETE = msg(b"1")
BIND_COMPLETE = msg(b"2")
CLOSE_COMPLETE = msg(b"3")
PARAM_DESC = msg(b"t", struct.pack("!hi", 1, 23))
ROW_DESC = msg(b"T", struct.pack("!h", 1) + b"a\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
NO_DATA = msg(b"n")
DATA_ROW = msg(b"D", struct.pack("!hi", 1, 1) + b"1")
SELECT_1 = msg(b"C", b"SELECT 1\x00")
INSERT = msg(b"C", b"INSERT 0 1\x00")
EMPTY_QUERY = msg(b"I")
SUSPENDED = msg(b"s")
ERROR = msg(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00")
OTHER_ERROR = msg(b"E", b"SERROR\x00C23505\x00Mduplicate key\x00\x00")
READY = msg(b"Z", b"I")
READY_TX = msg(b"Z", b"T")
NOTICE = msg(b"N", b"SNOTICE\x00Mhello\x00\x00")
PARAM_STATUS = msg(b"S", b"TimeZone\x00UTC\x00")
NOTIFICATION = msg(b"A", struct.pack("!i", 42) + b"chan\x00payload\x00")
FUNCTION_RESULT = msg(b"V", struct.pack("!i", 1) + b"x")
COPY_IN = msg(b"G", b"\x00" + struct.pack("!h", 0))
# hyperpool's own answers
FAKE_PARSE_COMPLETE = msg(b"1")
FAIL_ERROR = msg(b"E", b"SERROR\x00C42P05\x00Mprepared statement \"s1\" already exists\x00\x00")


def respond(tracker: ResponseTracker, *responses: bytes) -> list[bytes]:
    """Route server responses through the tracker; what the client gets."""
    out: list[bytes] = []
    for raw in responses:
        tracker.on_response(raw[0], raw, out)
    return out


def kinds(tracker: ResponseTracker) -> bytes:
    return bytes(kind for kind, _, _ in tracker.entries)


class Outcomes:
    """Records every outcome call as (name, ok), in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, name: str) -> Outcome:
        def record(ok: bool) -> None:
            self.calls.append((name, ok))

        return record

    def assert_each_once(self) -> None:
        names = [name for name, _ in self.calls]
        assert len(names) == len(set(names)), self.calls


# --- split_groups -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pending", "groups"),
    [
        pytest.param(b"", [], id="empty"),
        pytest.param(b"S", [b"S"], id="sync"),
        pytest.param(b"PBES", [b"PBES"], id="one-group"),
        pytest.param(b"PBESPBES", [b"PBES", b"PBES"], id="two-groups"),
        pytest.param(b"PBESQPB", [b"PBES", b"Q", b"PB"], id="open-last-group"),
        pytest.param(b"QQF", [b"Q", b"Q", b"F"], id="query-and-function-call"),
        pytest.param(b"PBEH", [b"PBEH"], id="flush-only"),
        pytest.param(bytearray(b"QPBES"), [b"Q", b"PBES"], id="bytearray"),
    ],
)
def test_split_groups(pending: bytes | bytearray, groups: list[bytes]) -> None:
    result = split_groups(pending)
    assert result == groups
    assert all(type(group) is bytes for group in result)


def test_terminators() -> None:
    assert frozenset(b"SQF") == TERMINATORS


# --- plain requests, each answered in order -----------------------------------------------------


def test_empty_tracker_forwards_everything() -> None:
    tracker = ResponseTracker()
    assert not tracker
    assert tracker.answer_now()
    assert respond(tracker, NOTICE, ERROR, READY, PARSE_COMPLETE) == [NOTICE, ERROR, READY, PARSE_COMPLETE]
    assert not tracker
    assert not tracker.skipping


def test_push_requests_skips_requests_without_an_answer_of_their_own() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PBHDdcfES")  # Flush, CopyData, CopyDone, CopyFail have no completion
    assert kinds(tracker) == b"PBDES"
    assert all(data == b"" and outcome is None for _, data, outcome in tracker.entries)
    assert tracker
    assert not tracker.answer_now()


def test_extended_group_with_portal_describe() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PBDES")
    steps = [
        (PARSE_COMPLETE, b"BDES"),
        (BIND_COMPLETE, b"DES"),
        (ROW_DESC, b"ES"),  # Describe of a portal: RowDescription alone
        (DATA_ROW, b"ES"),
        (SELECT_1, b"S"),
        (READY, b""),
    ]
    for response, left in steps:
        assert respond(tracker, response) == [response]
        assert kinds(tracker) == left
    assert not tracker


@pytest.mark.parametrize("answer", [ROW_DESC, NO_DATA], ids=["RowDescription", "NoData"])
def test_statement_describe_ends_with_row_description_or_no_data(answer: bytes) -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PDS")
    assert respond(tracker, PARSE_COMPLETE) == [PARSE_COMPLETE]
    assert respond(tracker, PARAM_DESC) == [PARAM_DESC]
    assert kinds(tracker) == b"DS"  # ParameterDescription is only part of the answer
    assert respond(tracker, answer) == [answer]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


@pytest.mark.parametrize("answer", [SELECT_1, EMPTY_QUERY, SUSPENDED],
                         ids=["CommandComplete", "EmptyQueryResponse", "PortalSuspended"])
def test_execute_completions(answer: bytes) -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"BES")
    assert respond(tracker, BIND_COMPLETE, DATA_ROW) == [BIND_COMPLETE, DATA_ROW]
    assert kinds(tracker) == b"ES"
    assert respond(tracker, answer) == [answer]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


def test_suspended_portal_executed_again() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"BEEEH")  # Execute with a row limit, twice more, then Flush
    assert kinds(tracker) == b"BEEE"
    assert respond(tracker, BIND_COMPLETE, DATA_ROW, SUSPENDED, DATA_ROW, SUSPENDED) == [
        BIND_COMPLETE, DATA_ROW, SUSPENDED, DATA_ROW, SUSPENDED]
    assert kinds(tracker) == b"E"
    assert respond(tracker, SELECT_1) == [SELECT_1]
    assert not tracker
    assert not tracker.skipping


def test_close_complete() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"CS")
    assert respond(tracker, CLOSE_COMPLETE) == [CLOSE_COMPLETE]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


def test_query_takes_everything_until_ready_for_query() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"QPBES")
    # a multi-statement Query: nothing but its ReadyForQuery ends it, even messages that would
    # complete an extended-protocol request at the front
    query_answers = [ROW_DESC, DATA_ROW, SELECT_1, EMPTY_QUERY, NOTICE, ROW_DESC, SELECT_1]
    for response in query_answers:
        assert respond(tracker, response) == [response]
        assert kinds(tracker) == b"QPBES"
    assert respond(tracker, READY) == [READY]
    assert kinds(tracker) == b"PBES"
    assert respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY) == [
        PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY]
    assert not tracker


def test_function_call_until_ready_for_query() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"FQ")
    assert respond(tracker, FUNCTION_RESULT) == [FUNCTION_RESULT]
    assert kinds(tracker) == b"FQ"
    assert respond(tracker, READY) == [READY]
    assert kinds(tracker) == b"Q"
    assert respond(tracker, SELECT_1, READY) == [SELECT_1, READY]
    assert not tracker


def test_asynchronous_messages_do_not_answer_anything() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PBES")
    for response in (NOTICE, PARAM_STATUS, NOTIFICATION):
        assert respond(tracker, response) == [response]
        assert kinds(tracker) == b"PBES"


def test_completion_of_another_kind_than_the_front_is_passed_on() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"BES")
    # a ParseComplete / CloseComplete / RowDescription does not answer a Bind
    assert respond(tracker, PARSE_COMPLETE, CLOSE_COMPLETE, ROW_DESC) == [PARSE_COMPLETE, CLOSE_COMPLETE, ROW_DESC]
    assert kinds(tracker) == b"BES"


# --- requests hyperpool added: answers swallowed ------------------------------------------------


def test_swallowed_parse_before_a_bind() -> None:
    """A Bind of a statement the server lacks: hyperpool prepares it first, the client never sees that."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SWALLOW_PARSE, b"", outcomes("prepare"))
    tracker.push_requests(b"BES")
    assert respond(tracker, PARSE_COMPLETE) == []
    assert outcomes.calls == [("prepare", True)]
    assert respond(tracker, BIND_COMPLETE, DATA_ROW, SELECT_1, READY) == [BIND_COMPLETE, DATA_ROW, SELECT_1, READY]
    assert not tracker
    assert outcomes.calls == [("prepare", True)]


def test_swallowed_close_then_client_parse_and_client_close() -> None:
    """Eviction: hyperpool's Close is swallowed; the client's own Parse and Close are not."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SWALLOW_CLOSE, b"", outcomes("evict"))
    tracker.push(PARSE, b"", outcomes("parse"))
    tracker.push_requests(b"BECS")
    assert kinds(tracker) == bytes([SWALLOW_CLOSE]) + b"PBECS"
    out = respond(tracker, CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, INSERT, CLOSE_COMPLETE, READY)
    assert out == [PARSE_COMPLETE, BIND_COMPLETE, INSERT, CLOSE_COMPLETE, READY]
    assert outcomes.calls == [("evict", True), ("parse", True)]
    assert not tracker


def test_two_swallowed_parses_in_a_row() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SWALLOW_PARSE, b"", outcomes("a"))
    tracker.push_requests(b"B")
    tracker.push(SWALLOW_PARSE, b"", outcomes("b"))
    tracker.push_requests(b"BES")
    out = respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY)
    assert out == [BIND_COMPLETE, BIND_COMPLETE, SELECT_1, READY]
    assert outcomes.calls == [("a", True), ("b", True)]


# --- requests hyperpool answers itself ----------------------------------------------------------


def test_fake_at_the_front_is_answered_by_ready_fakes() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    assert tracker.answer_now()
    tracker.push(FAKE, FAKE_PARSE_COMPLETE, outcomes("fake"))
    assert not tracker.answer_now()
    assert outcomes.calls == []  # not before it is emitted
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == [FAKE_PARSE_COMPLETE]
    assert outcomes.calls == [("fake", True)]
    assert not tracker
    assert tracker.answer_now()
    tracker.ready_fakes(out)  # nothing more is due
    assert out == [FAKE_PARSE_COMPLETE]


def test_consecutive_fakes_at_the_front_all_go_out() -> None:
    tracker = ResponseTracker()
    tracker.push(FAKE, b"one")
    tracker.push(FAKE, b"two")
    tracker.push_requests(b"BES")
    tracker.push(FAKE, b"three")
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == [b"one", b"two"]
    assert kinds(tracker) == b"BES" + bytes([FAKE])


def test_fake_behind_pending_requests_waits_for_their_answers() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PBES")
    tracker.push(FAKE, b"<fake close complete>")
    tracker.push_requests(b"S")
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == []
    assert respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1) == [PARSE_COMPLETE, BIND_COMPLETE, SELECT_1]
    assert respond(tracker, READY) == [READY, b"<fake close complete>"]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


def test_fake_in_the_middle_of_a_group_follows_the_answer_before_it() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"P")
    tracker.push(FAKE, FAKE_PARSE_COMPLETE)  # a second Parse, of a statement the server has
    tracker.push_requests(b"BES")
    assert respond(tracker, PARSE_COMPLETE) == [PARSE_COMPLETE, FAKE_PARSE_COMPLETE]
    assert kinds(tracker) == b"BES"


def test_fake_answer_is_computed_when_emitted() -> None:
    """A fake ReadyForQuery shows the transaction status of its turn, not of when it was pushed."""
    status = [b"T"]
    calls: list[int] = []

    def answer() -> bytes:
        calls.append(1)
        return msg(b"C", b"DEALLOCATE\x00") + msg(b"Z", status[0])

    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push_requests(b"Q")
    tracker.push(FAKE, answer, outcomes("deallocate"))
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == [] and calls == []
    status[0] = b"I"  # the Query commits
    assert respond(tracker, SELECT_1, READY) == [SELECT_1, READY, msg(b"C", b"DEALLOCATE\x00") + msg(b"Z", b"I")]
    assert calls == [1]
    assert outcomes.calls == [("deallocate", True)]
    assert not tracker


# --- the failing request that replaces the server's ErrorResponse --------------------------------


def test_fail_replaces_the_servers_error_and_skips_to_sync() -> None:
    """A Parse of a client name that exists: hyperpool makes the server fail and shows its own error."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SWALLOW_PARSE, b"", outcomes("prepare"))
    tracker.push(FAIL, FAIL_ERROR, outcomes("fail"))
    tracker.push_requests(b"BE")
    tracker.push(FAKE, b"<never>", outcomes("fake"))
    tracker.push_requests(b"S")
    assert respond(tracker, PARSE_COMPLETE) == []
    assert respond(tracker, ERROR) == [FAIL_ERROR]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert outcomes.calls == [("prepare", True), ("fail", False), ("fake", False)]
    assert not tracker


def test_an_error_for_another_request_is_not_replaced() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"BE")
    tracker.push(FAIL, FAIL_ERROR)
    tracker.push_requests(b"S")
    assert respond(tracker, BIND_COMPLETE, OTHER_ERROR) == [BIND_COMPLETE, OTHER_ERROR]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


def test_fail_request_that_unexpectedly_succeeds_passes_parse_complete() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(FAIL, FAIL_ERROR, outcomes("fail"))
    tracker.push_requests(b"S")
    assert respond(tracker, PARSE_COMPLETE) == [PARSE_COMPLETE]
    assert outcomes.calls == [("fail", True)]
    assert kinds(tracker) == b"S"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answered", "failing"),
    [
        pytest.param([], "parse", id="parse-fails"),
        pytest.param([PARSE_COMPLETE], "bind", id="bind-fails"),
        pytest.param([PARSE_COMPLETE, BIND_COMPLETE], "describe", id="describe-fails"),
        pytest.param([PARSE_COMPLETE, BIND_COMPLETE, ROW_DESC, DATA_ROW], "execute", id="execute-fails"),
    ],
)
def test_error_completes_the_failing_request_and_skips_to_sync(answered: list[bytes], failing: str) -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    names = ["parse", "bind", "describe", "execute"]
    for name, kind in zip(names, b"PBDE", strict=True):
        tracker.push(kind, b"", outcomes(name))
    tracker.push_requests(b"S")
    assert respond(tracker, *answered) == answered
    assert respond(tracker, ERROR) == [ERROR]
    assert kinds(tracker) == b"S"
    assert not tracker.skipping
    assert respond(tracker, READY) == [READY]
    assert not tracker
    index = names.index(failing)
    assert outcomes.calls == [(name, True) for name in names[:index]] + [(name, False) for name in names[index:]]


def test_error_drops_fakes_and_swallowed_requests_up_to_the_sync_only() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(PARSE, b"", outcomes("parse"))
    tracker.push(FAKE, b"<dropped>", outcomes("fake-dropped"))
    tracker.push(SWALLOW_PARSE, b"", outcomes("swallow-dropped"))
    tracker.push_requests(b"BES")
    tracker.push(FAKE, b"<kept>", outcomes("fake-kept"))
    tracker.push(SWALLOW_CLOSE, b"", outcomes("close-kept"))
    tracker.push_requests(b"S")
    assert respond(tracker, ERROR) == [ERROR]
    assert outcomes.calls == [("parse", False), ("fake-dropped", False), ("swallow-dropped", False)]
    assert kinds(tracker) == bytes([SYNC, FAKE, SWALLOW_CLOSE, SYNC])
    assert respond(tracker, READY) == [READY, b"<kept>"]
    assert respond(tracker, CLOSE_COMPLETE, READY) == [READY]
    assert outcomes.calls[3:] == [("fake-kept", True), ("close-kept", True)]
    outcomes.assert_each_once()
    assert not tracker


def test_error_without_a_pending_sync_skips_later_requests_until_one_comes() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(PARSE, b"", outcomes("parse"))
    tracker.push_requests(b"BEH")  # Flush, no Sync yet
    assert respond(tracker, ERROR) == [ERROR]
    assert outcomes.calls == [("parse", False)]
    assert tracker.skipping
    assert not tracker.entries
    assert tracker  # still tracking: the server skips what comes next
    assert not tracker.answer_now()
    # requests the client pipelines now are skipped by the server as well
    tracker.push(BIND, b"", outcomes("bind"))
    tracker.push(FAKE, b"<never>", outcomes("fake"))
    tracker.push(SWALLOW_PARSE, b"", outcomes("swallow"))
    tracker.push_requests(b"DE")
    assert not tracker.entries
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == []
    assert outcomes.calls == [("parse", False), ("bind", False), ("fake", False), ("swallow", False)]
    tracker.push_requests(b"S")
    assert not tracker.skipping
    assert kinds(tracker) == b"S"
    tracker.push_requests(b"PBES")  # after the Sync: tracked again
    assert kinds(tracker) == b"SPBES"
    assert respond(tracker, READY, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY) == [
        READY, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY]
    assert not tracker
    outcomes.assert_each_once()


@pytest.mark.parametrize("terminator", b"QF", ids=["query", "function-call"])
def test_query_or_function_call_pushed_while_skipping_is_skipped_too(terminator: int) -> None:
    """Only a Sync ends PostgreSQL's skipping after an extended-protocol error: a Query or FunctionCall
    that reaches the server meanwhile is discarded (no ReadyForQuery), so it must not end ``skipping``."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push_requests(b"PB")
    respond(tracker, ERROR)
    assert tracker.skipping
    tracker.push(terminator, b"", outcomes("skipped"))
    assert tracker.skipping
    assert kinds(tracker) == b""
    assert outcomes.calls == [("skipped", False)]


def test_error_during_a_query_is_passed_on_without_popping() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"QPBES")
    assert respond(tracker, ROW_DESC, ERROR) == [ROW_DESC, ERROR]
    assert kinds(tracker) == b"QPBES"
    assert not tracker.skipping
    assert respond(tracker, READY) == [READY]
    assert kinds(tracker) == b"PBES"  # the extended group after it runs normally
    assert respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY) == [
        PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY]
    assert not tracker


def test_error_at_a_sync_is_passed_on_without_popping() -> None:
    """An implicit transaction's commit fails at the Sync (a deferred constraint)."""
    tracker = ResponseTracker()
    tracker.push_requests(b"BESBES")
    respond(tracker, BIND_COMPLETE, INSERT)
    assert respond(tracker, OTHER_ERROR) == [OTHER_ERROR]
    assert kinds(tracker) == b"SBES"
    assert not tracker.skipping
    assert respond(tracker, READY) == [READY]
    assert kinds(tracker) == b"BES"


def test_error_in_a_function_call_is_passed_on_without_popping() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"F")
    tracker.push(FAKE, b"<after>")
    assert respond(tracker, ERROR) == [ERROR]
    assert kinds(tracker) == bytes([FUNCTION_CALL, FAKE])
    assert respond(tracker, READY) == [READY, b"<after>"]
    assert not tracker


def test_ready_for_query_pops_through_the_first_terminator() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(PARSE, b"", outcomes("parse"))
    tracker.push(FAKE, b"<dropped>", outcomes("fake"))
    tracker.push_requests(b"BS")
    tracker.push(FAKE, b"<after>", outcomes("after"))
    tracker.push(PARSE, b"", outcomes("next"))
    tracker.push_requests(b"S")
    # a ReadyForQuery while requests before the Sync are unanswered: they never happened
    assert respond(tracker, READY) == [READY, b"<after>"]
    assert outcomes.calls == [("parse", False), ("fake", False), ("after", True)]
    assert kinds(tracker) == b"PS"


# --- the scenarios a pipelining client produces ---------------------------------------------------


def two_groups(outcomes: Outcomes) -> ResponseTracker:
    """Parse/Bind/Execute/Sync twice; the second Parse names a statement the server already has."""
    tracker = ResponseTracker()
    tracker.push(PARSE, b"", outcomes("parse-1"))
    tracker.push_requests(b"BES")
    tracker.push(FAKE, FAKE_PARSE_COMPLETE, outcomes("parse-2"))
    tracker.push_requests(b"BES")
    out: list[bytes] = []
    tracker.ready_fakes(out)
    assert out == []
    return tracker


def test_pipeline_without_error() -> None:
    outcomes = Outcomes()
    tracker = two_groups(outcomes)
    first = respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW, SELECT_1)
    assert first == [PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW, SELECT_1]
    assert outcomes.calls == [("parse-1", True)]
    assert respond(tracker, READY) == [READY, FAKE_PARSE_COMPLETE]
    assert outcomes.calls == [("parse-1", True), ("parse-2", True)]
    second = respond(tracker, BIND_COMPLETE, DATA_ROW, SELECT_1, READY)
    assert second == [BIND_COMPLETE, DATA_ROW, SELECT_1, READY]
    assert not tracker


def test_pipeline_error_in_first_execute() -> None:
    outcomes = Outcomes()
    tracker = two_groups(outcomes)
    out = respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, ERROR, READY, BIND_COMPLETE, DATA_ROW, SELECT_1, READY)
    assert out == [PARSE_COMPLETE, BIND_COMPLETE, ERROR, READY, FAKE_PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW,
                   SELECT_1, READY]
    assert outcomes.calls == [("parse-1", True), ("parse-2", True)]
    assert not tracker


def test_pipeline_error_in_first_parse() -> None:
    outcomes = Outcomes()
    tracker = two_groups(outcomes)
    assert respond(tracker, ERROR) == [ERROR]
    assert outcomes.calls == [("parse-1", False)]
    assert kinds(tracker) == bytes([SYNC, FAKE, BIND, EXECUTE, SYNC])
    out = respond(tracker, READY, BIND_COMPLETE, DATA_ROW, SELECT_1, READY)
    assert out == [READY, FAKE_PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW, SELECT_1, READY]
    assert outcomes.calls == [("parse-1", False), ("parse-2", True)]
    assert not tracker


def test_pipeline_error_before_a_fake_in_the_same_group() -> None:
    """Without a Sync between them, the server would have skipped the faked Parse: it is not answered."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(PARSE, b"", outcomes("parse-1"))
    tracker.push_requests(b"BE")
    tracker.push(FAKE, FAKE_PARSE_COMPLETE, outcomes("parse-2"))
    tracker.push_requests(b"BES")
    out = respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, ERROR, READY)
    assert out == [PARSE_COMPLETE, BIND_COMPLETE, ERROR, READY]
    assert FAKE_PARSE_COMPLETE not in out[1:]
    assert outcomes.calls == [("parse-1", True), ("parse-2", False)]
    assert not tracker


def test_pipeline_swallowed_parse_fails() -> None:
    """hyperpool's own Parse fails (the table is gone): the client sees the error in its Bind's place."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SWALLOW_PARSE, b"", outcomes("prepare"))
    tracker.push_requests(b"BES")
    tracker.push(SWALLOW_PARSE, b"", outcomes("prepare-2"))
    tracker.push_requests(b"BES")
    assert respond(tracker, ERROR, READY) == [ERROR, READY]
    assert outcomes.calls == [("prepare", False)]
    assert respond(tracker, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY) == [BIND_COMPLETE, SELECT_1, READY]
    assert outcomes.calls == [("prepare", False), ("prepare-2", True)]
    assert not tracker


def test_every_outcome_is_called_exactly_once_in_a_long_pipeline() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    plan: list[tuple[int, bytes, str | None]] = [
        (SWALLOW_CLOSE, b"", "evict"), (PARSE, b"", "p1"), (BIND, b"", None), (EXECUTE, b"", None),
        (FAKE, b"<fake-1>", "f1"), (SYNC, b"", None),
        (SWALLOW_PARSE, b"", "p2"), (BIND, b"", None), (EXECUTE, b"", None), (FAKE, b"<fake-2>", "f2"),
        (SYNC, b"", None),
        (FAIL, FAIL_ERROR, "fail"), (BIND, b"", None), (SYNC, b"", None),
        (FAKE, b"<fake-3>", "f3"),
    ]
    for kind, data, name in plan:
        tracker.push(kind, data, outcomes(name) if name else None)
    responses = [CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY,
                 PARSE_COMPLETE, BIND_COMPLETE, ERROR, READY,
                 ERROR, READY]
    out = respond(tracker, *responses)
    assert out == [PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, b"<fake-1>", READY,
                   BIND_COMPLETE, ERROR, READY,
                   FAIL_ERROR, READY, b"<fake-3>"]
    assert sorted(outcomes.calls) == sorted([("evict", True), ("p1", True), ("f1", True), ("p2", True),
                                             ("f2", False), ("fail", False), ("f3", True)])
    outcomes.assert_each_once()
    assert not tracker


def test_outcome_of_a_terminator_is_called_at_its_ready_for_query() -> None:
    """The Outcome contract: called once per request that carries one (True: the server did it).

    hyperpool itself never gives a Sync an outcome today; the tracker accepts one but never calls it."""
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.push(SYNC, b"", outcomes("sync"))
    assert respond(tracker, READY) == [READY]
    assert not tracker
    assert outcomes.calls == [("sync", True)]


def test_query_pipelined_after_a_failed_extended_request_is_skipped_by_the_server() -> None:
    """PostgreSQL discards *every* message until a Sync after an extended-protocol error (postgres.c:
    ``if (ignore_till_sync && firstchar != EOF) continue;``), a simple Query included: that Query gets no
    ReadyForQuery, only the Sync does."""
    tracker = ResponseTracker()
    tracker.push_requests(b"PBEQS")
    tracker.push(FAKE, FAKE_PARSE_COMPLETE)
    tracker.push_requests(b"BES")
    # the server: ErrorResponse for the Parse, skips Bind, Execute and the Query, ReadyForQuery for the Sync
    assert respond(tracker, ERROR, READY) == [ERROR, READY, FAKE_PARSE_COMPLETE]
    assert kinds(tracker) == b"BES"


# --- taking over from the fast path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pending", "done", "errored", "entries", "skipping"),
    [
        pytest.param(b"", 0, False, b"", False, id="nothing-pending"),
        pytest.param(b"PBES", 0, False, b"PBES", False, id="nothing-answered"),
        pytest.param(b"PBES", 2, False, b"ES", False, id="parse-and-bind-answered"),
        pytest.param(b"PBDES", 4, False, b"S", False, id="all-but-sync-answered"),
        pytest.param(b"PBE", 9, False, b"", False, id="more-done-than-requests"),
        pytest.param(b"PBESPBES", 3, False, b"SPBES", False, id="done-counts-the-oldest-group-only"),
        pytest.param(b"PBHES", 2, False, b"ES", False, id="flush-has-no-answer"),
        pytest.param(b"BEdcS", 1, False, b"ES", False, id="copy-messages-have-no-answer"),
        pytest.param(b"Q", 2, False, b"Q", False, id="query-half-answered"),
        pytest.param(b"QPBES", 3, False, b"QPBES", False, id="query-then-group"),
        pytest.param(b"FS", 0, False, b"FS", False, id="function-call"),
        pytest.param(b"PBES", 1, True, b"S", False, id="errored-group-keeps-its-sync"),
        pytest.param(b"PBESPBES", 2, True, b"SPBES", False, id="errored-first-group-of-two"),
        pytest.param(b"PBE", 1, True, b"", True, id="errored-without-sync-skips"),
        pytest.param(b"PBEH", 0, True, b"", True, id="errored-after-flush-skips"),
        pytest.param(b"Q", 2, True, b"Q", False, id="errored-query"),
    ],
)
def test_start_rebuilds_entries(pending: bytes, done: int, errored: bool, entries: bytes, skipping: bool) -> None:
    tracker = ResponseTracker()
    tracker.start(bytearray(pending), done, errored)
    assert kinds(tracker) == entries
    assert tracker.skipping is skipping
    assert all(data == b"" and outcome is None for _, data, outcome in tracker.entries)
    assert bool(tracker) is (bool(entries) or skipping)


def test_start_replaces_previous_state() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"PB")
    respond(tracker, ERROR)
    assert tracker.skipping
    tracker.start(b"BES", 1, False)
    assert not tracker.skipping
    assert kinds(tracker) == b"ES"


def test_start_then_answers_and_edits() -> None:
    """Tracking starts when a client's Parse needs an edit while two groups are in flight."""
    tracker = ResponseTracker()
    tracker.start(b"PBDESBES", 2, False)  # ParseComplete, BindComplete already relayed
    tracker.push(FAKE, FAKE_PARSE_COMPLETE)
    tracker.push_requests(b"BES")
    out = respond(tracker, ROW_DESC, DATA_ROW, SELECT_1, READY, BIND_COMPLETE, INSERT, READY,
                  BIND_COMPLETE, SELECT_1, READY)
    assert out == [ROW_DESC, DATA_ROW, SELECT_1, READY, BIND_COMPLETE, INSERT, READY,
                   FAKE_PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY]
    assert not tracker


def test_start_after_an_error_without_sync_then_sync() -> None:
    outcomes = Outcomes()
    tracker = ResponseTracker()
    tracker.start(b"PBE", 1, True)
    tracker.push(FAKE, b"<skipped>", outcomes("fake"))
    assert outcomes.calls == [("fake", False)]
    tracker.push_requests(b"S")
    tracker.push(FAKE, b"<after sync>", outcomes("after"))
    assert respond(tracker, READY) == [READY, b"<after sync>"]
    assert outcomes.calls == [("fake", False), ("after", True)]
    assert not tracker


# --- COPY FROM STDIN through the extended protocol ------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(b"ES", b"E", id="execute-sync"),
        pytest.param(b"ESPBES", b"EPBES", id="only-the-first-sync"),
        pytest.param(b"S", b"S", id="front-sync-kept"),
        pytest.param(b"E", b"E", id="no-sync"),
        pytest.param(b"", b"", id="empty"),
    ],
)
def test_drop_sync_after_copy_start(before: bytes, after: bytes) -> None:
    tracker = ResponseTracker()
    tracker.push_requests(before)
    tracker.drop_sync_after_copy_start()
    assert kinds(tracker) == after


def test_drop_sync_after_copy_start_keeps_other_entries() -> None:
    tracker = ResponseTracker()
    tracker.push_requests(b"E")
    tracker.push(FAKE, b"<fake>")
    tracker.push_requests(b"SS")
    tracker.drop_sync_after_copy_start()
    assert kinds(tracker) == bytes([EXECUTE, FAKE, SYNC])


def test_extended_copy_in_flow() -> None:
    """Bind/Execute/Sync of COPY FROM STDIN: the Sync is ignored by the server; the client's later one counts."""
    tracker = ResponseTracker()
    tracker.push_requests(b"BES")
    assert respond(tracker, BIND_COMPLETE, COPY_IN) == [BIND_COMPLETE, COPY_IN]
    assert kinds(tracker) == b"ES"
    tracker.drop_sync_after_copy_start()
    tracker.push_requests(b"ddcS")
    assert kinds(tracker) == b"ES"
    assert respond(tracker, msg(b"C", b"COPY 2\x00")) == [msg(b"C", b"COPY 2\x00")]
    assert kinds(tracker) == b"S"
    assert respond(tracker, READY) == [READY]
    assert not tracker


# --- bool / answer_now ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "truthy"),
    [
        pytest.param(lambda t: None, False, id="fresh"),
        pytest.param(lambda t: t.push_requests(b"H"), False, id="flush-only"),
        pytest.param(lambda t: t.push_requests(b"S"), True, id="sync"),
        pytest.param(lambda t: setattr(t, "skipping", True), True, id="skipping"),
    ],
)
def test_truthiness(setup: Callable[[ResponseTracker], None], truthy: bool) -> None:
    tracker = ResponseTracker()
    setup(tracker)
    assert bool(tracker) is truthy
    assert tracker.answer_now() is not truthy
