"""Placement: which location a database's traffic goes to, from measurements alone.

An edge instance may reach a database through several *locations*: other hyperpool instances that pool to
it from close by, and optionally ``local`` (pool directly from here). Every ``probe_interval`` the caller
probes each location and hands the results of that *round* to :meth:`Placement.observe`; connection failures
seen between rounds go to :meth:`Placement.report_failure`. Both return a :class:`Decision`.

This module is pure on purpose: no sockets, no asyncio, no clock. Time arrives as plain floats, so tests
replay any history of delays and failures in microseconds and never sleep to see a hysteresis expire.

Rules (each decision carries its reason as text, for logs and ``SHOW PLACEMENT``):

* Expected query latency of a location = its median edge->location RTT + its median location->origin RTT
  (medians of the last ``samples`` successful probes, so one slow sample moves nothing). For ``local`` the
  edge's own RTT to the origin is the whole of it.
* ``auto``: go to the healthy location with the lowest expected latency. Hysteresis: leave the current
  location only when another one beats it by the margin, ``max(switch_margin_ms, switch_margin_fraction *
  current)``, in ``switch_rounds`` consecutive rounds. Noise inside the margin never moves traffic, and a
  one-round spike resets nothing but that location's streak.
* Health: a failed probe or a reported connection failure takes a location out *at once* (no hysteresis
  when the current choice is down: traffic goes to the next best in the same call). It is healthy again
  after ``recover_rounds`` successful probes in a row, and then competes like any other location: it gets
  traffic back only by beating the current choice by the margin for ``switch_rounds`` rounds. A location
  that has never been probed becomes healthy on its first successful probe (no recovery wait at start).
* ``fixed``: always the configured location while it is healthy. When it is down, traffic must keep
  flowing, so the decision *falls back* to the best healthy location and the reason says so; the fixed
  location gets traffic back as soon as it is healthy again (an operator's choice needs no hysteresis).
* No healthy location at all: ``chosen`` is ``None`` and the reason lists why; the caller fails new
  transactions fast until a location recovers.

Units: RTTs are seconds (as measured with ``time.monotonic``); ``SHOW PLACEMENT`` rows show milliseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from statistics import median

LOCAL = "local"
AUTO = "auto"
FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """``placement:`` for one database. Defaults suit locations tens of milliseconds apart."""

    mode: str = AUTO                     # "auto" or "fixed"
    location: str | None = None          # fixed mode: the location to use while it is healthy
    probe_interval: float = 5.0          # seconds between probe rounds (the caller's timer)
    samples: int = 5                     # medians over the last N successful samples
    switch_margin_ms: float = 5.0        # a challenger must be better by at least this ...
    switch_margin_fraction: float = 0.2  # ... or this fraction of the current expected latency, whichever is larger
    switch_rounds: int = 3               # ... in this many rounds in a row (K)
    recover_rounds: int = 3              # good probes in a row before a failed location is healthy again (M)
    history: int = 100                   # decisions kept for SHOW PLACEMENT

    def __post_init__(self) -> None:
        if self.mode not in (AUTO, FIXED):
            raise ValueError(f"placement.mode must be 'auto' or 'fixed', not {self.mode!r}")
        if self.mode == FIXED and not self.location:
            raise ValueError("placement.location is required when placement.mode is 'fixed'")
        if self.probe_interval <= 0:
            raise ValueError("placement.probe_interval must be positive")
        if self.switch_margin_ms < 0 or self.switch_margin_fraction < 0:
            raise ValueError("placement switch margins must not be negative")
        for key in ("samples", "switch_rounds", "recover_rounds", "history"):
            if getattr(self, key) < 1:
                raise ValueError(f"placement.{key} must be at least 1")

    def margin(self, current: float) -> float:
        """How much better (seconds) a challenger must be than ``current`` to count a round."""
        return max(self.switch_margin_ms / 1000.0, self.switch_margin_fraction * current)


@dataclass(frozen=True, slots=True)
class Probe:
    """One location's result in one probe round.

    ``edge_rtt``: this round's samples of the edge's RTT to the location (TCP connect and/or a trivial
    query), seconds; for ``local``, the edge's RTT to the origin. ``origin_rtt``: the location's own
    reported (median) RTT to the origin; required for remote locations, ignored for ``local``.
    """

    edge_rtt: tuple[float, ...] = ()
    origin_rtt: float | None = None
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Probe:
        return cls(error=error)

    def problem(self, local: bool) -> str | None:
        """Why this probe counts as a failure, or None when it succeeded."""
        if self.error is not None:
            return self.error
        if not self.edge_rtt:
            return "probe returned no RTT sample"
        if not local and self.origin_rtt is None:
            return "location did not report its RTT to the origin"
        return None


class Status(Enum):
    UNPROBED = "unprobed"  # no probe yet: the first success makes it healthy
    UP = "up"
    DOWN = "down"          # failed: healthy again after recover_rounds good probes


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the traffic goes after a round or a failure report, and why."""

    at: float
    chosen: str | None
    previous: str | None
    reason: str
    expected: float | None  # the chosen location's expected latency, seconds

    @property
    def switched(self) -> bool:
        return self.chosen != self.previous


class LocationState:
    """Measurements and health of one location (mutable; owned by one Placement)."""

    __slots__ = ("better_rounds", "edge", "failures", "good_probes", "last_error", "last_probe_at", "local",
                 "name", "origin", "status")

    def __init__(self, name: str, samples: int) -> None:
        self.name = name
        self.local = name == LOCAL
        self.edge: deque[float] = deque(maxlen=samples)
        self.origin: deque[float] = deque(maxlen=samples)
        self.status = Status.UNPROBED
        self.good_probes = 0     # successful probes in a row
        self.better_rounds = 0   # rounds in a row this location beat the current choice by the margin
        self.failures = 0
        self.last_error = ""
        self.last_probe_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.status is Status.UP

    def edge_rtt(self) -> float | None:
        return median(self.edge) if self.edge else None

    def origin_rtt(self) -> float | None:
        if self.local:
            return 0.0
        return median(self.origin) if self.origin else None

    def expected(self) -> float | None:
        edge, origin = self.edge_rtt(), self.origin_rtt()
        return None if edge is None or origin is None else edge + origin

    def succeed(self, probe: Probe, recover_rounds: int) -> str | None:
        """Record a good probe; returns a note when this made the location healthy again."""
        self.edge.extend(probe.edge_rtt)
        if not self.local and probe.origin_rtt is not None:
            self.origin.append(probe.origin_rtt)
        self.good_probes += 1
        if self.status is Status.UNPROBED:
            self.status = Status.UP
        elif self.status is Status.DOWN and self.good_probes >= recover_rounds:
            self.status = Status.UP
            return f"{self.name} healthy again after {self.good_probes} good probes"
        return None

    def fail(self, error: str) -> str | None:
        """Take the location out; returns a note when it was healthy (or unprobed) until now.

        Samples are dropped: after an outage the path may be different, and recovery refills them.
        """
        was = self.status
        self.status = Status.DOWN
        self.good_probes = 0
        self.better_rounds = 0
        self.failures += 1
        self.last_error = error
        self.edge.clear()
        self.origin.clear()
        return None if was is Status.DOWN else f"{self.name} down: {error}"


SNAPSHOT_COLUMNS = ("database", "location", "chosen", "status", "edge_rtt_ms", "origin_rtt_ms", "expected_ms",
                    "samples", "good_probes", "better_rounds", "failures", "last_error", "switches")
DECISION_COLUMNS = ("database", "at", "chosen", "previous", "switched", "reason")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _fmt(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000.0:.1f} ms"


class Placement:
    """The placement of one database's traffic among its locations."""

    def __init__(self, database: str, locations: Sequence[str], config: PlacementConfig) -> None:
        if not locations:
            raise ValueError(f"database {database!r}: placement needs at least one location")
        if len(set(locations)) != len(locations):
            raise ValueError(f"database {database!r}: location names must be unique")
        if config.mode == FIXED and config.location not in locations:
            raise ValueError(f"database {database!r}: fixed placement names unknown location {config.location!r}")
        self.database = database
        self.config = config
        self.locations = {name: LocationState(name, config.samples) for name in locations}
        self.chosen: str | None = None
        self.switches = 0
        self.rounds = 0
        self.last: Decision | None = None
        self.decisions: deque[Decision] = deque(maxlen=config.history)

    # --- inputs -------------------------------------------------------------------------------------------

    def observe(self, now: float, probes: Mapping[str, Probe]) -> Decision:
        """One probe round: every location's result (a missing one counts as a failed probe)."""
        unknown = set(probes) - set(self.locations)
        if unknown:
            raise KeyError(f"unknown placement locations: {sorted(unknown)}")
        self.rounds += 1
        notes = []
        for loc in self.locations.values():
            probe = probes.get(loc.name) or Probe.failed("no probe result this round")
            loc.last_probe_at = now
            problem = probe.problem(loc.local)
            note = loc.fail(problem) if problem else loc.succeed(probe, self.config.recover_rounds)
            if note:
                notes.append(note)
        self._count_better_rounds()
        return self._decide(now, notes)

    def report_failure(self, location: str, now: float, reason: str = "connections failed") -> Decision:
        """The caller saw connections to ``location`` fail: take it out now, without waiting for a probe."""
        note = self.locations[location].fail(reason)
        return self._decide(now, [note] if note else [])

    # --- the decision -------------------------------------------------------------------------------------

    def _healthy(self) -> list[LocationState]:
        """Healthy locations with a measurement, best first (ties broken by name, so results are stable)."""
        ranked = [(e, loc.name, loc) for loc in self.locations.values() if loc.healthy
                  and (e := loc.expected()) is not None]
        return [loc for _, _, loc in sorted(ranked, key=lambda t: (t[0], t[1]))]

    def _current(self) -> LocationState | None:
        loc = self.locations.get(self.chosen) if self.chosen is not None else None
        return loc if loc is not None and loc.healthy and loc.expected() is not None else None

    def _count_better_rounds(self) -> None:
        """Once per round: extend or reset each challenger's streak of beating the current choice by the margin."""
        current = self._current()
        cur = current.expected() if current else None
        for loc in self.locations.values():
            e = loc.expected()
            beats = (cur is not None and loc is not current and loc.healthy and e is not None
                     and cur - e > self.config.margin(cur))
            loc.better_rounds = loc.better_rounds + 1 if beats else 0

    def _decide(self, now: float, notes: list[str]) -> Decision:
        ranked = self._healthy()
        if not ranked:
            chosen, why = None, self._nobody()
        elif self.config.mode == FIXED:
            chosen, why = self._fixed(ranked)
        else:
            chosen, why = self._auto(ranked)
        return self._record(now, chosen, "; ".join([*notes, why]))

    def _nobody(self) -> str:
        parts = (f"{loc.name}: {loc.last_error or loc.status.value}" for loc in self.locations.values())
        return "no healthy location (" + ", ".join(parts) + ")"

    def _fixed(self, ranked: list[LocationState]) -> tuple[str, str]:
        target = self.locations[self.config.location or ""]
        if target in ranked:
            return target.name, f"fixed location {target.name} ({_fmt(target.expected())})"
        current = self._current()
        fallback = current if current is not None else ranked[0]
        state = target.last_error or target.status.value
        return fallback.name, (f"fixed location {target.name} is not healthy ({state}); falling back to "
                               f"{fallback.name} ({_fmt(fallback.expected())})")

    def _auto(self, ranked: list[LocationState]) -> tuple[str, str]:
        best = ranked[0]
        current = self._current()
        if current is None:
            if self.chosen is None:
                return best.name, f"{best.name} has the lowest expected latency ({_fmt(best.expected())})"
            return best.name, (f"{self.chosen} is not available; next best is {best.name} "
                               f"({_fmt(best.expected())})")
        k = self.config.switch_rounds
        ready = [loc for loc in ranked if loc is not current and loc.better_rounds >= k]
        if ready:
            new = ready[0]
            return new.name, (f"{new.name} ({_fmt(new.expected())}) beat {current.name} "
                              f"({_fmt(current.expected())}) by more than the margin for {k} rounds")
        if best is current:
            return current.name, f"{current.name} has the lowest expected latency ({_fmt(current.expected())})"
        counting = [loc for loc in ranked if loc.better_rounds > 0]
        if counting:
            lead = max(counting, key=lambda loc: loc.better_rounds)
            return current.name, (f"staying on {current.name} ({_fmt(current.expected())}): {lead.name} "
                                  f"({_fmt(lead.expected())}) better by the margin for {lead.better_rounds}/{k} rounds")
        return current.name, (f"staying on {current.name} ({_fmt(current.expected())}): {best.name} "
                              f"({_fmt(best.expected())}) is within the margin")

    def _record(self, now: float, chosen: str | None, reason: str) -> Decision:
        decision = Decision(now, chosen, self.chosen, reason, self.locations[chosen].expected() if chosen else None)
        if decision.switched:
            for loc in self.locations.values():
                loc.better_rounds = 0
            if decision.previous is not None:
                self.switches += 1
        self.chosen = chosen
        # Keep the history readable: a round that changes nothing and says the same thing is not an event.
        if self.last is None or decision.switched or decision.reason != self.last.reason:
            self.decisions.append(decision)
        self.last = decision
        return decision

    # --- reporting ----------------------------------------------------------------------------------------

    def snapshot(self) -> list[tuple[object, ...]]:
        """One row per location, columns SNAPSHOT_COLUMNS, RTTs in milliseconds (SHOW PLACEMENT, metrics)."""
        return [(self.database, loc.name, loc.name == self.chosen, loc.status.value, _ms(loc.edge_rtt()),
                 _ms(loc.origin_rtt()), _ms(loc.expected()), len(loc.edge), loc.good_probes, loc.better_rounds,
                 loc.failures, loc.last_error, self.switches) for loc in self.locations.values()]

    def history(self) -> Iterable[tuple[object, ...]]:
        """The recorded decisions, oldest first, columns DECISION_COLUMNS."""
        return [(self.database, d.at, d.chosen, d.previous, d.switched, d.reason) for d in self.decisions]
