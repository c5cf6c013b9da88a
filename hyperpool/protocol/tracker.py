"""Which response answers which request: what lets hyperpool edit a server's response stream.

Sans-I/O. A server answers the requests on one connection strictly in order, and in the extended
query protocol every request but Flush ends in exactly one "completion" message:

    Parse -> ParseComplete '1'      Bind -> BindComplete '2'       Close -> CloseComplete '3'
    Describe -> RowDescription 'T' or NoData 'n' (after ParameterDescription 't' for a statement)
    Execute -> CommandComplete 'C', EmptyQueryResponse 'I' or PortalSuspended 's'
    Sync, Query, FunctionCall -> everything up to ReadyForQuery 'Z'

An ErrorResponse 'E' completes the failing request, and the server then skips every request up to
the next Sync. Knowing that, hyperpool can add requests of its own to a client's stream (a Parse
the server connection lacks, a Close to evict an old statement) and swallow their answers, and
answer some client requests itself (a Parse of a statement the server already has, a Close of a
client's statement) in the right place among the server's answers.

Tracking costs a decoded message per response, so a server connection runs without it until a
client's request needs an edit: :meth:`ResponseTracker.start` then rebuilds the pending requests
from what the fast path kept (the request types sent and not yet answered by a ReadyForQuery, and how
many completions and whether an error arrived since the last ReadyForQuery).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# Request kinds are the frontend type bytes; these are hyperpool's own.
SWALLOW_PARSE = 0x01  # a Parse hyperpool added: its ParseComplete is not the client's
SWALLOW_CLOSE = 0x02  # a Close hyperpool added (eviction): its CloseComplete is not the client's
FAKE = 0x03  # hyperpool answers a client request itself with the entry's bytes
FAIL = 0x04  # a request sent to make the server fail (and skip to Sync): its ErrorResponse is replaced

TERMINATORS = frozenset(b"SQF")  # answered by ReadyForQuery
_SYNC = 0x53  # after an error the server skips everything, Query and FunctionCall too, up to a Sync
_NOT_ANSWERED = frozenset(b"Hdcf")  # Flush, CopyData, CopyDone, CopyFail: no completion of their own
_PARSE, _BIND, _CLOSE, _DESCRIBE, _EXECUTE = b"PBCDE"
_Z, _E, _T, _N, _CC, _EMPTY, _SUSPENDED = b"ZETnCIs"
_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE = b"123"

# Called once per request that carries one: True when the server did what it asked, False when an
# error (its own, or an earlier one that made the server skip it) meant it never happened.
Outcome = Callable[[bool], None]
# A FAKE entry's answer may be computed when its turn comes (a ReadyForQuery shows the status then).
Answer = bytes | Callable[[], bytes]
Entry = tuple[int, Answer, "Outcome | None"]


def split_groups(pending: bytes | bytearray) -> list[bytes]:
    """Request types split after each terminator (the last group may have none yet)."""
    groups: list[bytes] = []
    start = 0
    for i, kind in enumerate(pending):
        if kind in TERMINATORS:
            groups.append(bytes(pending[start : i + 1]))
            start = i + 1
    if start < len(pending):
        groups.append(bytes(pending[start:]))
    return groups


class ResponseTracker:
    """The requests a server connection has not fully answered, and what to do with each answer."""

    __slots__ = ("entries", "skipping")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.skipping = False  # the server is skipping requests until the next Sync (after an error)

    def __bool__(self) -> bool:
        return bool(self.entries) or self.skipping

    def start(self, pending: bytes | bytearray, done: int, errored: bool) -> None:
        """Take over from the fast path: ``pending`` request types not yet answered by a ReadyForQuery,
        ``done`` completions (and whether an error) received since the last ReadyForQuery."""
        self.entries.clear()
        self.skipping = False
        for index, group in enumerate(split_groups(pending)):
            body = bytes(k for k in group if k not in TERMINATORS and k not in _NOT_ANSWERED)
            terminator = group[-1:] if group[-1] in TERMINATORS else b""
            if index == 0:
                if errored:
                    body = b""
                    self.skipping = not terminator
                else:
                    body = body[done:]
            for kind in body + terminator:
                self.entries.append((kind, b"", None))

    def push_requests(self, kinds: bytes | bytearray) -> None:
        """Requests forwarded unchanged, by type byte, in order."""
        for kind in kinds:
            if kind not in _NOT_ANSWERED:
                self.push(kind)

    def push(self, kind: int, data: Answer = b"", outcome: Outcome | None = None) -> None:
        if self.skipping:
            if kind != _SYNC:
                if outcome is not None:
                    outcome(False)  # the server skips it (or would have): it never happens
                return
            self.skipping = False
        self.entries.append((kind, data, outcome))

    def answer_now(self) -> bool:
        """Whether a request pushed now would be the next one answered (nothing pending before it)."""
        return not self.entries and not self.skipping

    def on_response(self, msg_type: int, raw: bytes, out: list[bytes]) -> None:
        """Route one response message (``raw`` = its whole bytes): append what the client gets to ``out``."""
        entries = self.entries
        self.ready_fakes(out)
        if not entries:
            out.append(raw)
            return
        front = entries[0][0]
        if msg_type == _Z:
            while entries:
                kind, _, outcome = entries.popleft()
                if kind in TERMINATORS:
                    if outcome is not None:
                        outcome(True)
                    break
                if outcome is not None:
                    outcome(False)  # skipped after an error
            out.append(raw)
        elif msg_type == _E:
            out.append(entries[0][1] if front == FAIL else raw)  # type: ignore[arg-type]
            if front not in TERMINATORS:
                self._finish(False)  # the failing request
                while entries and entries[0][0] != _SYNC:
                    self._finish(False)  # skipped up to the Sync
                self.skipping = not entries
        elif msg_type == _PARSE_COMPLETE and front in (_PARSE, SWALLOW_PARSE, FAIL):
            if self._finish(True) != SWALLOW_PARSE:
                out.append(raw)
        elif msg_type == _CLOSE_COMPLETE and front in (_CLOSE, SWALLOW_CLOSE):
            if self._finish(True) != SWALLOW_CLOSE:
                out.append(raw)
        elif (msg_type == _BIND_COMPLETE and front == _BIND) or \
                (msg_type in (_T, _N) and front == _DESCRIBE) or \
                (msg_type in (_CC, _EMPTY, _SUSPENDED) and front == _EXECUTE):
            self._finish(True)
            out.append(raw)
        else:  # part of a longer answer (rows, a Query's results, ParameterDescription, copy)
            out.append(raw)
        self.ready_fakes(out)

    def _finish(self, ok: bool) -> int:
        kind, _, outcome = self.entries.popleft()
        if outcome is not None:
            outcome(ok)
        return kind

    def ready_fakes(self, out: list[bytes]) -> None:
        """Append the answers hyperpool gives itself that are due now (nothing pending before them)."""
        entries = self.entries
        while entries and entries[0][0] == FAKE:
            _, data, outcome = entries.popleft()
            out.append(data if isinstance(data, bytes) else data())
            if outcome is not None:
                outcome(True)

    def drop_sync_after_copy_start(self) -> None:
        """PostgreSQL ignores a Sync that reaches it during COPY FROM STDIN: forget the one that
        followed the Execute which started the copy (sent before the server said so)."""
        entries = self.entries
        for i, (kind, _, _) in enumerate(entries):
            if i > 0 and kind == 0x53:  # 'S'
                del entries[i]
                return
