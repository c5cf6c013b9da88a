"""Placement: measurements in, decision out, time injected (no sockets, no sleeping)."""

from __future__ import annotations

import pytest

from hyperpool.placement import (
    DECISION_COLUMNS,
    FIXED,
    LOCAL,
    SNAPSHOT_COLUMNS,
    Decision,
    Placement,
    PlacementConfig,
    Probe,
)

MS = 0.001
CONFIG = PlacementConfig(samples=3, switch_margin_ms=5, switch_margin_fraction=0.1, switch_rounds=3,
                         recover_rounds=2)


def probe(edge_ms: float, origin_ms: float = 0.0) -> Probe:
    return Probe(edge_rtt=(edge_ms * MS,), origin_rtt=origin_ms * MS)


class World:
    """Three locations whose RTTs the test sets; each round() is one probe round at an injected time."""

    def __init__(self, config: PlacementConfig = CONFIG, **rtts: tuple[float, float]) -> None:
        self.rtts = rtts or {"east": (10.0, 40.0), "west": (30.0, 5.0), "north": (50.0, 30.0)}
        self.placement = Placement("appdb", list(self.rtts), config)
        self.now = 0.0
        self.down: set[str] = set()

    def round(self) -> Decision:
        self.now += 5.0
        probes = {name: Probe.failed("connect timeout") if name in self.down else probe(*rtt)
                  for name, rtt in self.rtts.items()}
        decision = self.placement.observe(self.now, probes)
        assert decision.reason
        return decision

    def rounds(self, n: int) -> list[Decision]:
        return [self.round() for _ in range(n)]


def test_picks_the_lowest_expected_latency_at_once() -> None:
    world = World()
    decision = world.round()
    assert decision.chosen == "west"  # 35 ms against 50 and 80
    assert decision.previous is None and decision.switched
    assert decision.expected == pytest.approx(35 * MS)
    assert "lowest expected latency" in decision.reason
    assert world.placement.switches == 0  # the first choice is not a switch


def test_follows_a_change_only_after_k_rounds() -> None:
    world = World()
    world.rounds(3)
    world.rtts["east"] = (5.0, 5.0)  # now 10 ms against west's 35
    # samples=3: the median moves with the second new sample; from then on K=3 rounds of being better.
    decisions = world.rounds(4)
    assert [d.chosen for d in decisions] == ["west", "west", "west", "east"]
    assert "within the margin" not in decisions[0].reason and "1/3 rounds" not in decisions[0].reason
    assert "1/3 rounds" in decisions[1].reason and "2/3 rounds" in decisions[2].reason
    assert "for 3 rounds" in decisions[3].reason and decisions[3].switched
    assert world.placement.switches == 1
    assert world.round().chosen == "east"


def test_a_one_round_dip_resets_the_streak() -> None:
    world = World(PlacementConfig(samples=1, switch_rounds=3))
    world.round()
    world.rtts["east"] = (5.0, 5.0)
    world.rounds(2)
    world.rtts["east"] = (10.0, 40.0)
    assert world.round().chosen == "west"
    world.rtts["east"] = (5.0, 5.0)
    assert [d.chosen for d in world.rounds(3)] == ["west", "west", "east"]


def test_noise_within_the_margin_never_switches() -> None:
    world = World(PlacementConfig(samples=1, switch_margin_ms=5, switch_margin_fraction=0, switch_rounds=2),
                  a=(20.0, 0.0), b=(22.0, 0.0))
    assert world.round().chosen == "a"
    for i in range(40):  # b wobbles up to 4.9 ms below a: never by the 5 ms margin
        world.rtts["b"] = (15.1 + (i % 7), 0.0)
        assert world.round().chosen == "a"
    assert world.placement.switches == 0
    assert "within the margin" in world.placement.last.reason  # type: ignore[union-attr]


def test_relative_margin_applies_when_larger() -> None:
    config = PlacementConfig(samples=1, switch_margin_ms=1, switch_margin_fraction=0.5, switch_rounds=1)
    assert config.margin(0.100) == pytest.approx(0.050)
    assert config.margin(0.001) == pytest.approx(0.001)
    world = World(config, a=(100.0, 0.0), b=(200.0, 0.0))
    world.round()
    world.rtts["b"] = (60.0, 0.0)  # 40 ms better: under half of 100
    assert world.round().chosen == "a"
    world.rtts["b"] = (40.0, 0.0)
    assert world.round().chosen == "b"


def test_median_ignores_one_slow_sample() -> None:
    world = World(PlacementConfig(samples=5, switch_rounds=1), a=(20.0, 0.0), b=(40.0, 0.0))
    world.rounds(3)
    world.rtts["a"] = (500.0, 0.0)
    assert world.round().chosen == "a"
    row = next(r for r in world.placement.snapshot() if r[1] == "a")
    assert row[SNAPSHOT_COLUMNS.index("edge_rtt_ms")] == pytest.approx(20.0)


def test_failed_choice_is_dropped_at_once_and_comes_back_by_the_rules() -> None:
    world = World()
    world.rounds(2)
    world.down.add("west")
    decision = world.round()
    assert decision.chosen == "east" and decision.previous == "west"
    assert "west down: connect timeout" in decision.reason and "next best is east" in decision.reason
    world.down.clear()
    first = world.round()  # one good probe: still out (M=2)
    assert first.chosen == "east"
    assert world.placement.locations["west"].status.value == "down"
    back = world.round()
    assert "west healthy again after 2 good probes" in back.reason
    # Healthy, but it must win by the margin for K rounds first (this round is the first of them).
    assert back.chosen == "east" and "1/3 rounds" in back.reason
    decisions = world.rounds(2)
    assert [d.chosen for d in decisions] == ["east", "west"]
    assert world.placement.switches == 2


def test_recovered_location_not_better_by_the_margin_stays_out() -> None:
    world = World(a=(20.0, 0.0), b=(22.0, 0.0))
    world.round()
    world.down.add("a")
    assert world.round().chosen == "b"
    world.down.clear()
    assert {d.chosen for d in world.rounds(10)} == {"b"}


def test_report_failure_takes_the_location_out_between_rounds() -> None:
    world = World()
    world.round()
    decision = world.placement.report_failure("west", world.now + 1, "connection refused")
    assert decision.chosen == "east" and decision.at == world.now + 1
    assert "west down: connection refused" in decision.reason
    # A failure of a location that is not chosen changes nothing but its health.
    other = world.placement.report_failure("north", world.now + 2)
    assert other.chosen == "east" and not other.switched and "north down" in other.reason


def test_missing_probe_counts_as_failure_and_all_down_chooses_nobody() -> None:
    world = World()
    world.round()
    decision = world.placement.observe(world.now + 5, {"east": probe(10, 40)})
    assert decision.chosen == "east" and "no probe result" in decision.reason
    world.down.update(world.rtts)
    nobody = world.round()
    assert nobody.chosen is None and nobody.expected is None
    assert nobody.reason.endswith(")") and "no healthy location" in nobody.reason
    world.down.clear()
    world.round()
    assert world.round().chosen == "west"  # recovered (M=2): the best is taken at once when nothing is chosen


def test_remote_probe_without_origin_rtt_is_a_failure() -> None:
    placement = Placement("appdb", ["remote"], CONFIG)
    decision = placement.observe(1.0, {"remote": Probe(edge_rtt=(0.01,))})
    assert decision.chosen is None and "did not report its RTT to the origin" in decision.reason


def test_local_location_uses_only_the_edges_own_rtt() -> None:
    world = World(local=(60.0, 999.0), near=(5.0, 50.0))  # local's reported origin RTT is ignored
    decision = world.round()
    assert decision.chosen == "near"  # 55 < 60
    assert world.placement.locations[LOCAL].expected() == pytest.approx(60 * MS)
    world.rtts[LOCAL] = (20.0, 0.0)
    assert [d.chosen for d in world.rounds(5)][-1] == LOCAL


def test_fixed_mode_keeps_its_location_and_falls_back_while_it_is_down() -> None:
    world = World(PlacementConfig(mode=FIXED, location="north", recover_rounds=2))
    assert world.round().chosen == "north"  # the slowest, but fixed
    world.down.add("north")
    fallback = world.round()
    assert fallback.chosen == "west"
    assert "fixed location north is not healthy (connect timeout); falling back to west" in fallback.reason
    world.down.clear()
    assert world.round().chosen == "west"
    back = world.round()
    assert back.chosen == "north" and back.switched  # no hysteresis back to the operator's choice


def test_config_and_location_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        PlacementConfig(mode="closest")
    with pytest.raises(ValueError, match="location is required"):
        PlacementConfig(mode=FIXED)
    with pytest.raises(ValueError, match="switch_rounds"):
        PlacementConfig(switch_rounds=0)
    with pytest.raises(ValueError, match="unknown location"):
        Placement("appdb", ["a"], PlacementConfig(mode=FIXED, location="b"))
    with pytest.raises(ValueError, match="unique"):
        Placement("appdb", ["a", "a"], CONFIG)
    with pytest.raises(KeyError):
        Placement("appdb", ["a"], CONFIG).observe(0.0, {"b": probe(1)})


def test_snapshot_rows_and_decision_history() -> None:
    world = World()
    world.rounds(3)  # same reason three times: one event
    world.down.add("west")
    world.round()
    rows = {row[1]: dict(zip(SNAPSHOT_COLUMNS, row, strict=True)) for row in world.placement.snapshot()}
    assert rows["east"]["chosen"] is True and rows["west"]["chosen"] is False
    assert rows["east"]["edge_rtt_ms"] == pytest.approx(10.0)
    assert rows["east"]["origin_rtt_ms"] == pytest.approx(40.0)
    assert rows["east"]["expected_ms"] == pytest.approx(50.0)
    assert rows["west"]["status"] == "down" and rows["west"]["expected_ms"] is None
    assert rows["west"]["failures"] == 1 and rows["west"]["last_error"] == "connect timeout"
    assert {r["switches"] for r in rows.values()} == {1}
    history = [dict(zip(DECISION_COLUMNS, row, strict=True)) for row in world.placement.history()]
    assert [(h["chosen"], h["switched"]) for h in history] == [("west", True), ("east", True)]
    assert all(h["reason"] and h["database"] == "appdb" for h in history)


def test_history_is_bounded() -> None:
    world = World(PlacementConfig(samples=1, history=4, switch_rounds=1), a=(10.0, 0.0), b=(50.0, 0.0))
    for i in range(20):
        world.rtts["b"] = (50.0 if i % 2 else 1.0, 0.0)
        world.round()
    assert len(list(world.placement.history())) == 4
