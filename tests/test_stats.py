"""DatabaseStats helpers: histograms, SQLSTATE classes, close reasons, and SHOW STATS's period averages."""

from __future__ import annotations

from hyperpool.stats import STATS_PERIOD, DatabaseStats, Histogram, StatsWindow, close_category, error_class


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert abs(h.total - 3.65) < 1e-9


def test_error_class() -> None:
    assert error_class(b"SERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00\x00") == "22"
    assert error_class(b"C42P01\x00Mx\x00\x00") == "42"
    assert error_class(b"SERROR\x00Mno code\x00\x00") == "??"


def test_close_categories_are_bounded() -> None:
    assert close_category("server_idle_timeout") == "idle_timeout"
    assert close_category("server connection lost: [Errno 104] reset") == "server_gone"
    assert close_category("client disconnected mid-query") == "client_gone"
    assert close_category("RECONNECT from the admin console") == "admin"
    assert close_category("something new") == "other"


def test_window_averages_over_the_last_complete_period() -> None:
    stats = DatabaseStats()
    window = StatsWindow(stats, 0.0)
    assert window.averages() == (0, 0, 0, 0, 0, 0, 0)
    stats.transactions, stats.queries, stats.received, stats.sent = 30, 60, 1500, 3000
    stats.transaction_time, stats.query_time, stats.wait_time, stats.waits = 0.3, 0.6, 0.02, 2
    window.tick(stats, 5.0)  # the period is not over yet
    assert window.averages() == (0, 0, 0, 0, 0, 0, 0)
    window.tick(stats, STATS_PERIOD)
    assert window.averages() == (2, 4, 100, 200, 10_000, 10_000, 10_000)
    window.tick(stats, 2 * STATS_PERIOD)  # nothing happened in the next period
    assert window.averages() == (0, 0, 0, 0, 0, 0, 0)
