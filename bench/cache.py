#!/usr/bin/env python3
"""Query-cache pgbench: PostgreSQL direct, PgBouncer, pgpool-II's query cache and hyperpool's, in one run.

    python bench/cache.py [--duration 10] [--clients 16] [--rounds 1] [--workloads hot,heavy]
                          [--pool-size 20] [--cache-max-age 60] [--json FILE]

Starts a throwaway PostgreSQL (hyperpool.embedded) with two read workloads' tables, PgBouncer (transaction
pooling, no cache), pgpool-II (connection caching plus its shared-memory query cache) and hyperpool (query
cache on), then runs each workload's pgbench script against every target, interleaved round by round, and
prints TPS medians, the ratios hyperpool/direct, /pgpool and /PgBouncer, the issue's targets and the caches'
hit counts. A pooler whose binary is absent is `skipped`. Everything it starts is stopped and removed on
exit, also on Ctrl-C or an error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_servers import (  # noqa: E402
    DBNAME,
    PASSWORD,
    PGBOUNCER_BIN,
    PGPOOL_BIN,
    USER,
    BenchError,
    Hyperpool,
    ManagedProcess,
    PgBouncer,
    PgPool,
    first_line,
    machine_basics,
    run_as_owner,
    run_bench,
    run_psql,
    tool,
)
from compare import Cell, Run, Target, indent, pgbouncer_secret, run_pgbench  # noqa: E402

from hyperpool.embedded import EmbeddedPostgres  # noqa: E402

WARMUP_SECONDS = 2
TARGET_KEYS = ("direct", "pgbouncer", "pgpool", "hyperpool")
HEAVY_MIN_MS = 3.0  # below this the heavy query is not heavy enough for its 20x target to mean much
EXPLAIN_RUNS = 5


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Goal:
    over: str  # target key the hyperpool TPS is divided by
    at_least: float


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    setup_sql: str
    script: str  # the pgbench -f script
    check_sql: str  # one instance of the script's query: every target must answer it as direct does
    goals: tuple[Goal, ...]


HOT_SETUP = """
CREATE TABLE hot(id int PRIMARY KEY, payload text NOT NULL);
INSERT INTO hot SELECT i, rpad(md5(i::text), 200, md5((-i)::text)) FROM generate_series(1, 1000) i;
ANALYZE hot;
"""

HEAVY_SETUP = """
CREATE TABLE heavy_dim(id int PRIMARY KEY, category int NOT NULL, name text NOT NULL);
INSERT INTO heavy_dim SELECT i, i % 20 + 1, 'item-' || i FROM generate_series(1, 10000) i;
CREATE TABLE heavy_fact(id int PRIMARY KEY, dim_id int NOT NULL, amount int NOT NULL, note text NOT NULL);
INSERT INTO heavy_fact SELECT i, (i * 7919) % 10000 + 1, (i * 31) % 1000, md5(i::text)
  FROM generate_series(1, 100000) i;
ANALYZE heavy_dim, heavy_fact;
"""

HEAVY_QUERY = ("SELECT d.name, count(*) AS orders, sum(f.amount) AS total "
               "FROM heavy_fact f JOIN heavy_dim d ON d.id = f.dim_id WHERE d.category = {k} "
               "GROUP BY d.name ORDER BY total DESC, d.name LIMIT 10;")
HOT_QUERY = "SELECT id, payload FROM hot WHERE id = {id};"

WORKLOADS = (
    Workload("hot", "hot-set: 1,000 rows of ~200 bytes, point SELECT by random id",
             HOT_SETUP, "\\set id random(1, 1000)\n" + HOT_QUERY.format(id=":id") + "\n",
             HOT_QUERY.format(id=421), (Goal("pgpool", 1.5), Goal("direct", 1.0))),
    Workload("heavy", "heavy read: 100k x 10k join, GROUP BY / ORDER BY / LIMIT 10, over 20 parameter values",
             HEAVY_SETUP, "\\set k random(1, 20)\n" + HEAVY_QUERY.format(k=":k") + "\n",
             HEAVY_QUERY.format(k=7), (Goal("direct", 20.0),)),
)


def workload_named(name: str) -> Workload | None:
    return next((w for w in WORKLOADS if w.key == name), None)


# ---------------------------------------------------------------------------------------------
# pgbench


def pgbench_script(port: int, script: Path, clients: int, duration: int) -> Run:
    return run_pgbench(port, ["-f", str(script), "-M", "simple"], clients, duration)


def pooler_died(target: Target) -> str | None:
    return target.pooler.died() if target.pooler else None


def pooler_cpu(target: Target) -> float | None:
    return target.pooler.cpu_seconds() if target.pooler else None


def measure(target: Target, script: Path, args: argparse.Namespace, label: str) -> Run:
    dead = pooler_died(target)
    if dead:
        return Run(None, "", None, None, None, None, 0.0, problems=[dead])
    cpu_before = pooler_cpu(target)
    run = pgbench_script(target.port, script, args.clients, args.duration)
    cpu_after = pooler_cpu(target)
    if cpu_before is not None and cpu_after is not None and run.processed:
        run.pooler_cpu_us = (cpu_after - cpu_before) * 1e6 / run.processed
    dead = pooler_died(target)
    if dead:
        run.problems.append(dead)
    shown = f"{run.tps:10.1f} tps" if run.tps is not None else "    no tps"
    print(f"  {label} {target.key:<9} {shown}{'  PROBLEM: ' + '; '.join(run.problems) if run.problems else ''}",
          file=sys.stderr, flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# Cache statistics: pgpool's SHOW pool_cache, hyperpool's admin SHOW CACHE (if it exists yet)


def parse_table(text: str) -> list[dict[str, str]]:
    """psql's unaligned output (header line, `|`-separated) as one dict per row."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"), strict=False)) for line in lines[1:]]


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def table_delta(before: list[dict[str, str]], after: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Row by row (matched on the first column), `after` with its numeric columns minus `before`'s."""
    def key(row: dict[str, str]) -> str:
        return next(iter(row.values()), "")

    old = {key(row): row for row in before}
    delta = []
    for row in after:
        prev = old.get(key(row), {})
        changed: dict[str, Any] = {}
        for column, value in row.items():
            now, was = number(value), number(prev.get(column, ""))
            changed[column] = value if now is None or was is None else round(now - was, 6)
        delta.append(changed)
    return delta


@dataclass
class CacheStats:
    """One pooler's cache counters around one workload (warm-up plus measured rounds)."""

    source: str  # the command that produced them
    before: list[dict[str, str]] = field(default_factory=list)
    after: list[dict[str, str]] = field(default_factory=list)
    unavailable: str | None = None

    @property
    def delta(self) -> list[dict[str, Any]]:
        return table_delta(self.before, self.after)


def read_stats(port: int, sql: str, dbname: str) -> tuple[list[dict[str, str]], str | None]:
    ok, text = run_psql(port, sql, dbname=dbname, timeout=30)
    return (parse_table(text), None) if ok else ([], first_text_line(text))


def first_text_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "(no output)")


STAT_QUERIES = {"pgpool": ("SHOW pool_cache;", DBNAME), "hyperpool": ("SHOW CACHE;", "hyperpool")}


def snapshot(targets: list[Target], stats: dict[str, CacheStats] | None) -> dict[str, CacheStats]:
    """Counters of every running caching pooler: fills `before` (stats None) or `after` of `stats`."""
    result = stats if stats is not None else {}
    for target in targets:
        if target.key not in STAT_QUERIES or target.skipped:
            continue
        sql, dbname = STAT_QUERIES[target.key]
        entry = result.setdefault(target.key, CacheStats(f"psql -d {dbname} -c '{sql}'"))
        rows, problem = read_stats(target.port, sql, dbname)
        if stats is None:
            entry.before = rows
        else:
            entry.after = rows
        entry.unavailable = entry.unavailable or problem
    return result


# ---------------------------------------------------------------------------------------------
# One workload against every target


@dataclass
class Row:
    workload: Workload
    cells: dict[str, Cell]
    cache: dict[str, CacheStats] = field(default_factory=dict)
    wrong_answers: dict[str, str] = field(default_factory=dict)  # target -> how its answer differed

    def ratio(self, over: str) -> float | None:
        top, bottom = self.cells["hyperpool"].median, self.cells[over].median
        return top / bottom if top is not None and bottom else None

    @property
    def trustworthy(self) -> bool:
        return not self.wrong_answers and not any(c.flagged for c in self.cells.values())


def rotated(active: list[Target], number: int) -> list[Target]:
    """The targets' order in round `number`: a noisy moment must not always hit the same one."""
    if not active:
        return []
    shift = number % len(active)
    return active[shift:] + active[:shift]


def check_answers(active: list[Target], sql: str) -> dict[str, str]:
    """Run `sql` twice through every target (the second time a cache may answer); differences from direct."""
    expected: str | None = None
    wrong: dict[str, str] = {}
    for target in active:
        for attempt in (1, 2):
            ok, text = run_psql(target.port, sql, timeout=60)
            if not ok:
                wrong[target.key] = f"query {attempt} failed: {first_text_line(text)}"
            elif expected is None:
                expected = text
            elif text != expected:
                wrong[target.key] = f"answer {attempt} differs from direct's: {first_text_line(text)[:80]}"
    return wrong


def run_workload(targets: list[Target], workload: Workload, workdir: Path, args: argparse.Namespace) -> Row:
    script = workdir / f"{workload.key}.sql"
    script.write_text(workload.script)
    cells = {t.key: Cell(skipped=t.skipped) for t in targets}
    active = [t for t in targets if not t.skipped]
    label = f"[{workload.key}]"
    stats = snapshot(targets, None)
    print(f"{label} warm-up {WARMUP_SECONDS} s per target (fills the caches)", file=sys.stderr, flush=True)
    for target in active:
        pgbench_script(target.port, script, args.clients, WARMUP_SECONDS)
    for number in range(args.rounds):
        for target in rotated(active, number):
            cells[target.key].runs.append(measure(target, script, args, f"{label} round {number + 1}"))
    snapshot(targets, stats)
    for target in active:
        if cells[target.key].flagged and target.pooler is not None:
            cells[target.key].pooler_log_tail = target.pooler.log_tail()
    return Row(workload, cells, stats, check_answers(active, workload.check_sql))


# ---------------------------------------------------------------------------------------------
# The heavy query's direct cost


@dataclass
class Explain:
    sql: str
    execution_ms: list[float]  # "Execution Time" of EXPLAIN (ANALYZE, TIMING OFF), one k per run
    plan: str  # EXPLAIN (ANALYZE, TIMING ON) of `sql`: per-node times (their clock reads add overhead)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.execution_ms) if self.execution_ms else 0.0


def explain_text(pg_port: int, sql: str, timing: bool) -> str:
    ok, text = run_psql(pg_port, f"EXPLAIN (ANALYZE, TIMING {'ON' if timing else 'OFF'}) {sql}")
    if not ok:
        raise BenchError(f"EXPLAIN ANALYZE of the heavy query failed: {text}")
    return "\n".join(line for line in text.splitlines()[1:] if line.strip())  # without the header line


def execution_ms(plan: str) -> float | None:
    found = [line for line in plan.splitlines() if line.startswith("Execution Time:")]
    return float(found[0].split(":", 1)[1].split()[0]) if found else None


def explain_heavy(pg_port: int) -> Explain:
    """The heavy query's cost directly on PostgreSQL, one idle connection, EXPLAIN_RUNS values of k."""
    times = [execution_ms(explain_text(pg_port, HEAVY_QUERY.format(k=k), timing=False))
             for k in range(1, EXPLAIN_RUNS + 1)]
    sql = HEAVY_QUERY.format(k=EXPLAIN_RUNS)
    return Explain(sql, [t for t in times if t is not None], explain_text(pg_port, sql, timing=True))


def print_explain(explain: Explain) -> None:
    shown = ", ".join(f"{ms:.1f}" for ms in explain.execution_ms)
    print(f"\nheavy query, directly on an idle PostgreSQL: EXPLAIN (ANALYZE, TIMING OFF) execution time median "
          f"{explain.median_ms:.1f} ms (k = 1..{EXPLAIN_RUNS}: {shown} ms); with TIMING ON for k = {EXPLAIN_RUNS}:")
    print(indent(explain.plan))
    if explain.median_ms < HEAVY_MIN_MS:
        print(f"WARNING: the heavy query costs less than {HEAVY_MIN_MS:.0f} ms directly; its 20x target means little")


# ---------------------------------------------------------------------------------------------
# Report


def fmt_tps(cell: Cell) -> str:
    if cell.skipped:
        return "skipped"
    median = cell.median
    return ("n/a" if median is None else f"{median:,.0f}") + (" !" if cell.flagged else "")


def fmt_ratio(row: Row, over: str) -> str:
    if row.cells[over].skipped:
        return "skipped"
    value = row.ratio(over)
    return "n/a" if value is None else f"{value:.2f}x" + ("" if row.trustworthy else " !")


def print_table(rows: list[Row]) -> None:
    header = ("workload", *(f"{key} TPS" for key in TARGET_KEYS), "hyperpool/direct", "hyperpool/pgpool",
              "hyperpool/pgbouncer")
    lines = [header] + [(row.workload.key, *(fmt_tps(row.cells[key]) for key in TARGET_KEYS),
                         fmt_ratio(row, "direct"), fmt_ratio(row, "pgpool"), fmt_ratio(row, "pgbouncer"))
                        for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                             strict=True))))
        if index == 0:
            print("-+-".join("-" * w for w in widths))


def print_cpu_table(rows: list[Row]) -> None:
    print("\npooler CPU per transaction (user + system of its process group, us; median over rounds)")
    for row in rows:
        values = []
        for key in TARGET_KEYS[1:]:
            cpu = row.cells[key].median_cpu_us
            values.append(f"{key} {cpu:8.1f}" if cpu is not None else f"{key}      n/a")
        print(f"  {row.workload.key:<6} " + "   ".join(values))


def goal_verdict(row: Row, goal: Goal) -> tuple[str, str]:
    """("met" | "MISSED" | "n/a", detail)."""
    if row.cells[goal.over].skipped or row.cells["hyperpool"].skipped:
        return "n/a", "target skipped"
    ratio = row.ratio(goal.over)
    if ratio is None:
        return "MISSED", "no TPS to compare"
    if not row.trustworthy:
        return "MISSED", f"{ratio:.2f}x, but runs had errors or wrong answers: see PROBLEMS"
    return ("met" if ratio >= goal.at_least else "MISSED"), f"{ratio:.2f}x"


def goal_line(row: Row, goal: Goal) -> str:
    verdict, detail = goal_verdict(row, goal)
    return f"{row.workload.key + ':':<7} hyperpool >= {goal.at_least:4.1f}x {goal.over:<9} {verdict} ({detail})"


def pgpool_summary(stats: CacheStats) -> str:
    """pgpool's counters over the workload; its hit ratio is hits / (hits + selects sent to PostgreSQL)."""
    delta = stats.delta
    if not delta:
        return "no counters"
    hits, selects = number(str(delta[0].get("num_cache_hits", ""))), number(str(delta[0].get("num_selects", "")))
    if hits is None or selects is None:
        return f"unexpected columns: {delta[0]}"
    ratio = hits / (hits + selects) if hits + selects else 0.0
    return (f"{hits:,.0f} cache hits, {selects:,.0f} SELECTs sent to PostgreSQL, hit ratio {ratio:.4f} "
            f"(cumulative since start: {stats.after[0].get('cache_hit_ratio', '?')})")


HYPERPOOL_COUNTERS = ("hits", "stale", "misses", "stored", "too_big", "evictions", "invalidations",
                      "discarded_fills")
HYPERPOOL_GAUGES = ("entries", "bytes")


def hyperpool_row_summary(changed: dict[str, Any], after: dict[str, str]) -> str:
    """One database's SHOW CACHE row: counter changes over the workload, sizes at its end."""
    counters = {c: changed[c] for c in HYPERPOOL_COUNTERS if isinstance(changed.get(c), float)}
    if not counters:
        return str(after)  # columns we do not know (yet): show the row as it is
    parts = [f"{name} +{value:,.0f}" for name, value in counters.items()]
    served, misses = counters.get("hits", 0.0) + counters.get("stale", 0.0), counters.get("misses")
    if misses is not None and served + misses:
        parts.append(f"served from cache {served / (served + misses):.4f}")
    parts += [f"{g} {after[g]}" for g in HYPERPOOL_GAUGES if g in after]
    if after.get("not_cacheable"):
        parts.append(f"not_cacheable {after['not_cacheable']}")
    return ", ".join(parts)


def cache_lines(key: str, stats: CacheStats) -> list[str]:
    if stats.unavailable and not stats.after:
        return [f"{key}: not available ({stats.unavailable})"]
    if key == "pgpool":
        return [f"pgpool: {pgpool_summary(stats)}"]
    lines = [f"{key} ({stats.source}):"]
    for changed, after in zip(stats.delta, stats.after, strict=True):
        name = next(iter(after.values()), "?")
        lines.append(f"    {name}: {hyperpool_row_summary(changed, after)}")
    return lines if stats.after else [*lines, "    (no rows)"]


def print_cache_stats(rows: list[Row]) -> None:
    print("\nCache counters over each workload (warm-up + measured rounds):")
    for row in rows:
        print(f"  [{row.workload.key}]")
        for key, stats in row.cache.items():
            for line in cache_lines(key, stats):
                print(f"    {line}")


def print_problems(rows: list[Row]) -> None:
    for row in rows:
        for key, reason in row.wrong_answers.items():
            print(f"\n! {row.workload.key} {key}: wrong answer to `{row.workload.check_sql}`: {reason}")
        for key, cell in row.cells.items():
            for number_, run in enumerate(cell.runs, 1):
                if run.ok:
                    continue
                print(f"\n! {row.workload.key} {key} round {number_}: {'; '.join(run.problems)}")
                if run.output_tail:
                    print("  --- pgbench output (tail) ---\n" + indent(run.output_tail))
            if cell.pooler_log_tail:
                print(f"  {key} logs (tail):\n" + indent(cell.pooler_log_tail))


def print_report(machine: dict[str, Any], rows: list[Row], targets: list[Target], explain: Explain | None) -> None:
    print("\n" + "=" * 100)
    for key, value in machine.items():
        print(f"{key:<18} {value}")
    for target in targets:
        if target.skipped:
            print(f"SKIPPED target     {target.key}: {target.skipped}")
    if explain is not None:
        print_explain(explain)
    print("\nTPS = median over rounds; '!' = at least one run had errors (see PROBLEMS); ratios > 1 favour hyperpool")
    for row in rows:
        print(f"  {row.workload.key:<6} {row.workload.title}")
    print()
    print_table(rows)
    print_cpu_table(rows)
    print_cache_stats(rows)
    print("\nTargets from the issue:")
    for row in rows:
        for goal in row.workload.goals:
            print("  " + goal_line(row, goal))
    if any(not row.trustworthy for row in rows):
        print("\nPROBLEMS")
        print_problems(rows)


def to_json(machine: dict[str, Any], rows: list[Row], targets: list[Target], explain: Explain | None) -> dict[str, Any]:
    def cell_json(cell: Cell) -> dict[str, Any]:
        return {"skipped": cell.skipped, "median_tps": cell.median, "flagged": cell.flagged,
                "median_pooler_cpu_us": cell.median_cpu_us, "runs": [asdict(run) for run in cell.runs],
                "pooler_log_tail": cell.pooler_log_tail or None}

    def row_json(row: Row) -> dict[str, Any]:
        goals = [{"hyperpool_over": g.over, "at_least": g.at_least, "verdict": goal_verdict(row, g)[0],
                  "detail": goal_verdict(row, g)[1], "line": goal_line(row, g)} for g in row.workload.goals]
        cache = {key: {"source": s.source, "before": s.before, "after": s.after, "delta": s.delta,
                       "unavailable": s.unavailable} for key, s in row.cache.items()}
        return {"workload": row.workload.key, "title": row.workload.title, "script": row.workload.script,
                "targets": {key: cell_json(cell) for key, cell in row.cells.items()},
                **{f"hyperpool_over_{key}": row.ratio(key) for key in TARGET_KEYS[:3]},
                "wrong_answers": row.wrong_answers, "errors": not row.trustworthy, "goals": goals, "cache": cache}

    return {"machine": machine, "skipped_targets": {t.key: t.skipped for t in targets if t.skipped},
            "heavy_explain": asdict(explain) if explain else None, "results": [row_json(row) for row in rows]}


# ---------------------------------------------------------------------------------------------
# Setup and main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured pgbench run (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per target, interleaved; median reported")
    parser.add_argument("--workloads", default="hot,heavy", help="comma-separated: hot, heavy (default both)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="server pool of PgBouncer and hyperpool (default 20); pgpool gets clients + 2 children")
    parser.add_argument("--cache-max-age", type=int, default=60,
                        help="seconds a cached result stays fresh: hyperpool cache.max_age and pgpool "
                             "memqcache_expire (default 60)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    bad = [name for name in names if workload_named(name) is None]
    if bad or not names:
        parser.error(f"--workloads: {', '.join(bad) or '(empty)'} not in {', '.join(w.key for w in WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if w.key in names]
    for name in ("duration", "clients", "rounds", "pool_size", "cache_max_age"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def setup_postgres(pg: EmbeddedPostgres, workloads: Sequence[Workload]) -> None:
    pg.start()
    pg.create_user(USER, PASSWORD)
    pg.create_database(DBNAME, USER)
    for workload in workloads:
        print(f"loading the {workload.key} tables ...", file=sys.stderr, flush=True)
        ok, text = run_psql(pg.port, workload.setup_sql)
        if not ok:
            raise BenchError(f"setting up the {workload.key} tables failed: {text}")


def hyperpool_extra(args: argparse.Namespace) -> dict[str, Any]:
    cache = {"enabled": True, "max_age": args.cache_max_age, "stale_while_revalidate": 15,
             "max_bytes": 64 * 1024 * 1024, "max_entry_bytes": 1024 * 1024}
    return {"cache": cache, "admin": {"users": [USER]}}  # admin: to read SHOW CACHE


def usable(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def start_pooler(stack: contextlib.ExitStack, key: str, binary: Path | None,
                 make: Callable[[], ManagedProcess]) -> Target:
    """Start one pooler, or a skipped Target when its binary is absent."""
    if binary is not None and not usable(binary):
        reason = f"{binary} not found (apt-get install {key if key == 'pgbouncer' else 'pgpool2'})"
        print(f"SKIPPING {key}: {reason}", file=sys.stderr, flush=True)
        return Target(key, 0, skipped=reason)
    pooler = make()
    stack.callback(pooler.stop)
    print(f"starting {key} ...", file=sys.stderr, flush=True)
    pooler.start()
    return Target(key, pooler.port, pooler)


def subdir(workdir: Path, name: str) -> Path:
    path = workdir / name
    path.mkdir()
    return path


def start_targets(stack: contextlib.ExitStack, pg: EmbeddedPostgres, workdir: Path,
                  args: argparse.Namespace) -> list[Target]:
    bouncer = start_pooler(stack, "pgbouncer", PGBOUNCER_BIN, lambda: PgBouncer(
        subdir(workdir, "pgbouncer"), pg.port, args.pool_size, pgbouncer_secret(pg, "scram")))
    pgpool = start_pooler(stack, "pgpool", PGPOOL_BIN, lambda: PgPool(
        subdir(workdir, "pgpool"), pg.port, args.clients + 2, args.cache_max_age))
    hyperpool = start_pooler(stack, "hyperpool", None, lambda: Hyperpool(
        subdir(workdir, "hyperpool"), pg.port, args.pool_size, hyperpool_extra(args)))
    return [Target("direct", pg.port), bouncer, pgpool, hyperpool]


def machine_info(pg: EmbeddedPostgres, args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    running = {t.key for t in targets if not t.skipped}
    return {
        **machine_basics(pg.execute("show server_version")),
        "PgBouncer": first_line([str(PGBOUNCER_BIN), "--version"]) if "pgbouncer" in running else "absent",
        "pgpool-II": first_line([str(PGPOOL_BIN), "--version"]) if "pgpool" in running else "absent",
        "pgbench": first_line([tool("pgbench"), "--version"]),
        "settings": (f"pgbench -n -f SCRIPT -M simple -c {args.clients} -j {min(2, args.clients)} "
                     f"-T {args.duration}; rounds={args.rounds} warm-up={WARMUP_SECONDS}s "
                     f"pool_size={args.pool_size} pgpool num_init_children={args.clients + 2} max_pool=1 "
                     f"cache max_age/memqcache_expire={args.cache_max_age}s"),
        "auth": ("scram-sha-256 everywhere; PgBouncer auth_file holds the SCRAM secret from pg_authid, "
                 "pgpool's pool_passwd and hyperpool's users the plain password"),
        "note": f"pgbench, the poolers and PostgreSQL all share these {os.cpu_count()} CPUs",
    }


def make_workdir(stack: contextlib.ExitStack) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="hyperpool-cache-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    if run_as_owner() is not None:
        workdir.chmod(0o711)  # the postgres user must reach the pgbouncer/ and pgpool/ subdirectories
    return workdir


def bench(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    workdir = make_workdir(stack)
    pg = EmbeddedPostgres(settings={"max_connections": "300"})
    stack.callback(pg.cleanup)
    print("starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    setup_postgres(pg, args.workloads)
    explain = explain_heavy(pg.port) if any(w.key == "heavy" for w in args.workloads) else None
    targets = start_targets(stack, pg, workdir, args)
    machine = machine_info(pg, args, targets)
    rows = [run_workload(targets, workload, workdir, args) for workload in args.workloads]
    print_report(machine, rows, targets, explain)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(machine, rows, targets, explain), indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0 if all(row.trustworthy for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
