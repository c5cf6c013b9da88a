#!/usr/bin/env python3
"""Side-by-side pgbench: PostgreSQL directly, PgBouncer and hyperpool, in one run.

    python bench/compare.py [--duration 15] [--clients 16] [--scale 1] [--rounds 1]
                            [--modes simple,extended,prepared] [--pool-size 20] [--json FILE]

Starts a throwaway PostgreSQL (hyperpool.embedded), PgBouncer 1.18 (if /usr/sbin/pgbouncer exists) and
hyperpool, both poolers in transaction pooling with the same pool size, then runs every scenario against
every target, interleaved round by round, and prints TPS medians and the ratios hyperpool/PgBouncer and
hyperpool/direct. Everything it starts is stopped and removed on exit, also on Ctrl-C or an error.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_servers import (  # noqa: E402
    DBNAME,
    HOST,
    LOG_TAIL_LINES,
    PASSWORD,
    PGBOUNCER_BIN,
    USER,
    BenchError,
    Hyperpool,
    PgBouncer,
    Pooler,
    client_env,
    first_line,
    machine_basics,
    run_as_owner,
    run_bench,
    tool,
)

from hyperpool.embedded import EmbeddedPostgres  # noqa: E402

WARMUP_SECONDS = 2
MODES = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class Scenario:
    name: str
    flags: tuple[str, ...]
    goal: float  # hyperpool/PgBouncer TPS ratio the issue asks for
    goal_label: str  # how the issue names the scenario


SCENARIOS = (Scenario("-S", ("-S",), 0.8, "-S"), Scenario("-S -C", ("-S", "-C"), 1.0, "-C"))


# ---------------------------------------------------------------------------------------------
# pgbench


@dataclass
class Run:
    tps: float | None
    tps_note: str  # what pgbench said in brackets after the tps number
    processed: int | None
    failed: int | None
    latency_ms: float | None
    exit_code: int | None
    seconds: float
    problems: list[str] = field(default_factory=list)
    output_tail: str = ""
    pooler_cpu_us: float | None = None  # the pooler's CPU (user + system) per processed transaction

    @property
    def ok(self) -> bool:
        return not self.problems


_TPS = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def _match(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.search(text)
    return found.group(1) if found else None


def parse_pgbench(text: str, exit_code: int | None, seconds: float) -> Run:
    """Read pgbench 15's summary; anything that is not a clean run goes into problems."""
    tps_match = _TPS.search(text)
    processed, failed, latency = _match(_PROCESSED, text), _match(_FAILED, text), _match(_LATENCY, text)
    run = Run(tps=float(tps_match.group(1)) if tps_match else None, tps_note=tps_match.group(2) if tps_match else "",
              processed=int(processed) if processed else None, failed=int(failed) if failed else None,
              latency_ms=float(latency) if latency else None, exit_code=exit_code, seconds=seconds)
    if exit_code != 0:
        run.problems.append(f"pgbench exit code {exit_code}")
    if run.tps is None:
        run.problems.append("no `tps = ...` line in pgbench output")
    if run.failed:
        run.problems.append(f"{run.failed} failed transactions")
    if not run.processed:
        run.problems.append("no transactions processed")
    aborted = [line for line in text.splitlines() if "aborted" in line or "error" in line.lower()]
    if aborted:
        run.problems.append(f"{len(aborted)} error/abort lines, first: {aborted[0].strip()}")
    if run.problems:
        run.output_tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
    return run


def pgbench(port: int, scenario: Scenario, mode: str, clients: int, duration: int) -> Run:
    return run_pgbench(port, [*scenario.flags, "-M", mode], clients, duration)


def run_pgbench(port: int, flags: Sequence[str], clients: int, duration: int) -> Run:
    """``pgbench -n FLAGS -c clients -j min(2, clients) -T duration`` against ``port``, parsed (a hang is killed)."""
    args = [tool("pgbench"), "-n", *flags, "-c", str(clients), "-j", str(min(2, clients)),
            "-T", str(duration), "-h", HOST, "-p", str(port), "-U", USER, DBNAME]
    started = time.monotonic()
    try:
        out = subprocess.run(args, capture_output=True, text=True, errors="replace", env=client_env(),
                             timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        text = "\n".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                         for part in (exc.stdout, exc.stderr))
        run = parse_pgbench(text, None, time.monotonic() - started)
        run.problems.insert(0, f"pgbench did not finish within {duration + 60} s (hang?); killed")
        run.output_tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
        return run
    return parse_pgbench(out.stdout + "\n" + out.stderr, out.returncode, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# The matrix


@dataclass
class Target:
    key: str  # direct, pgbouncer, hyperpool
    port: int
    pooler: Pooler | None = None
    skipped: str | None = None  # why this target does not run at all


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None
    pooler_log_tail: str = ""

    @property
    def median(self) -> float | None:
        values = [r.tps for r in self.runs if r.tps is not None]
        return statistics.median(values) if values else None

    @property
    def flagged(self) -> bool:
        return any(not r.ok for r in self.runs)

    @property
    def median_cpu_us(self) -> float | None:
        values = [r.pooler_cpu_us for r in self.runs if r.pooler_cpu_us is not None]
        return statistics.median(values) if values else None


@dataclass
class Row:
    scenario: Scenario
    mode: str
    cells: dict[str, Cell]

    def ratio(self, over: str) -> float | None:
        top, bottom = self.cells["hyperpool"].median, self.cells[over].median
        return top / bottom if top is not None and bottom else None

    @property
    def trustworthy(self) -> bool:
        return not any(c.flagged for c in self.cells.values())


def skip_reason(target: Target, mode: str) -> str | None:
    if target.skipped:
        return target.skipped
    if target.key == "pgbouncer" and mode == "prepared":
        return "PgBouncer 1.18 cannot run -M prepared in transaction pooling (named statements are per server)"
    return None


def measure(target: Target, scenario: Scenario, mode: str, args: argparse.Namespace, label: str) -> Run:
    dead = target.pooler.died() if target.pooler else None
    if dead:
        return Run(None, "", None, None, None, None, 0.0, problems=[dead])
    cpu_before = target.pooler.cpu_seconds() if target.pooler else None
    run = pgbench(target.port, scenario, mode, args.clients, args.duration)
    cpu_after = target.pooler.cpu_seconds() if target.pooler else None
    if cpu_before is not None and cpu_after is not None and run.processed:
        run.pooler_cpu_us = (cpu_after - cpu_before) * 1e6 / run.processed
    dead = target.pooler.died() if target.pooler else None
    if dead:
        run.problems.append(dead)
    shown = f"{run.tps:10.1f} tps" if run.tps is not None else "    no tps"
    print(f"  {label} {target.key:<9} {shown}{'  PROBLEM: ' + '; '.join(run.problems) if run.problems else ''}",
          file=sys.stderr, flush=True)
    return run


def run_row(targets: list[Target], scenario: Scenario, mode: str, args: argparse.Namespace) -> Row:
    cells = {t.key: Cell(skipped=skip_reason(t, mode)) for t in targets}
    active = [t for t in targets if cells[t.key].skipped is None]
    label = f"[{scenario.name} -M {mode}]"
    print(f"{label} warm-up {WARMUP_SECONDS} s per target", file=sys.stderr, flush=True)
    for target in active:
        pgbench(target.port, scenario, mode, args.clients, WARMUP_SECONDS)
    for number in range(args.rounds):
        order = active[number % len(active):] + active[:number % len(active)] if active else []
        for target in order:
            cells[target.key].runs.append(measure(target, scenario, mode, args, f"{label} round {number + 1}"))
    for target in active:
        if cells[target.key].flagged and target.pooler is not None:
            cells[target.key].pooler_log_tail = target.pooler.log_tail()
    return Row(scenario, mode, cells)


# ---------------------------------------------------------------------------------------------
# Report


def fmt_tps(cell: Cell) -> str:
    if cell.skipped:
        return "skipped"
    median = cell.median
    text = "n/a" if median is None else f"{median:,.0f}"
    return text + (" !" if cell.flagged else "")


def fmt_ratio(value: float | None, row: Row) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" + ("" if row.trustworthy else " !")


def goal_verdict(row: Row) -> tuple[str, str]:
    """("MET" | "MISSED" | "N/A", detail) for the issue's hyperpool/PgBouncer target of this row."""
    ratio = row.ratio("pgbouncer")
    if row.cells["pgbouncer"].skipped:
        return "N/A", str(row.cells["pgbouncer"].skipped)
    if ratio is None:
        return "MISSED", "no TPS to compare"
    if not row.trustworthy:
        return "MISSED", f"{ratio:.2f}x, but runs had errors: see PROBLEMS"
    return ("MET" if ratio >= row.scenario.goal else "MISSED"), f"{ratio:.2f}x"


def goal_line(row: Row) -> str:
    verdict, detail = goal_verdict(row)
    target = f"{row.scenario.goal_label}: hyperpool >= {row.scenario.goal:.1f}x PgBouncer"
    return f"{target}  {'(-M ' + row.mode + ')':<14} {verdict} ({detail})"


def print_table(rows: list[Row]) -> None:
    header = ("scenario", "mode", "direct TPS", "pgbouncer TPS", "hyperpool TPS", "hyperpool/pgbouncer",
              "hyperpool/direct")
    lines = [header] + [
        (row.scenario.name, row.mode, fmt_tps(row.cells["direct"]), fmt_tps(row.cells["pgbouncer"]),
         fmt_tps(row.cells["hyperpool"]), fmt_ratio(row.ratio("pgbouncer"), row),
         fmt_ratio(row.ratio("direct"), row))
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                                      strict=True))))
        if index == 0:
            print("-+-".join("-" * w for w in widths))


def print_cpu_table(rows: list[Row]) -> None:
    """Pooler CPU per transaction: steadier than TPS on a shared machine, and what the TPS gap comes from."""
    print("\npooler CPU per transaction (user + system, us; median over rounds)")
    for row in rows:
        values = []
        for key in ("pgbouncer", "hyperpool"):
            cpu = row.cells[key].median_cpu_us if key in row.cells else None
            values.append(f"{key} {cpu:8.1f}" if cpu is not None else f"{key}      n/a")
        print(f"  {row.scenario.name:<6} {row.mode:<9} " + "   ".join(values))


def print_problems(rows: list[Row]) -> None:
    for row in rows:
        for key, cell in row.cells.items():
            for number, run in enumerate(cell.runs, 1):
                if run.ok:
                    continue
                print(f"\n! {row.scenario.name} -M {row.mode} {key} round {number}: {'; '.join(run.problems)}")
                if run.output_tail:
                    print("  --- pgbench output (tail) ---\n" + indent(run.output_tail))
            if cell.pooler_log_tail:
                print(f"  {key} logs (tail):\n" + indent(cell.pooler_log_tail))


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def print_report(machine: dict[str, Any], rows: list[Row], targets: list[Target]) -> None:
    print("\n" + "=" * 100)
    for key, value in machine.items():
        print(f"{key:<18} {value}")
    for target in targets:
        if target.skipped:
            print(f"SKIPPED target     {target.key}: {target.skipped}")
    for row in rows:
        for key, cell in row.cells.items():
            if cell.skipped and not any(t.key == key and t.skipped for t in targets):
                print(f"SKIPPED            {row.scenario.name} -M {row.mode} on {key}: {cell.skipped}")
    print("TPS = median over rounds; '!' = at least one run had errors (see PROBLEMS); ratios > 1 favour hyperpool")
    print()
    print_table(rows)
    print_cpu_table(rows)
    print("\nTargets from the issue:")
    for row in rows:
        print("  " + goal_line(row))
    if any(not row.trustworthy for row in rows):
        print("\nPROBLEMS")
        print_problems(rows)


def to_json(machine: dict[str, Any], rows: list[Row], targets: list[Target]) -> dict[str, Any]:
    def cell_json(cell: Cell) -> dict[str, Any]:
        return {"skipped": cell.skipped, "median_tps": cell.median, "flagged": cell.flagged,
                "runs": [asdict(run) for run in cell.runs], "pooler_log_tail": cell.pooler_log_tail or None}

    def row_json(row: Row) -> dict[str, Any]:
        verdict, detail = goal_verdict(row)
        goal = {"hyperpool_over_pgbouncer_at_least": row.scenario.goal, "verdict": verdict, "detail": detail,
                "line": goal_line(row)}
        return {"scenario": row.scenario.name, "mode": row.mode,
                "targets": {key: cell_json(cell) for key, cell in row.cells.items()},
                "hyperpool_over_pgbouncer": row.ratio("pgbouncer"), "hyperpool_over_direct": row.ratio("direct"),
                "errors": not row.trustworthy, "goal": goal}

    return {"machine": machine, "skipped_targets": {t.key: t.skipped for t in targets if t.skipped},
            "results": [row_json(row) for row in rows]}


# ---------------------------------------------------------------------------------------------
# Setup and main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds per measured pgbench run (default 15)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i scale factor (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per target, interleaved; median reported")
    parser.add_argument("--modes", default="simple", help="comma-separated pgbench -M modes (simple,extended,prepared)")
    parser.add_argument("--scenarios", default="S,C",
                        help="comma-separated scenarios: S (pgbench -S) and C (-S -C, a new connection per "
                             "transaction); default both")
    parser.add_argument("--pool-size", type=int, default=20, help="server pool size of both poolers (default 20)")
    parser.add_argument("--pgbouncer-userlist", choices=("scram", "plain"), default="scram",
                        help="what PgBouncer's auth_file holds: the SCRAM secret copied from pg_authid (default; "
                             "what hyperpool derives once from its config) or the plain password (PgBouncer 1.18 "
                             "then runs PBKDF2 on every client login, which slows its -C numbers)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        parser.error(f"--modes: {', '.join(bad) or '(empty)'} not in {', '.join(MODES)}")
    for name in ("duration", "clients", "scale", "rounds", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def setup_postgres(pg: EmbeddedPostgres, scale: int) -> None:
    pg.start()
    pg.create_user(USER, PASSWORD)
    pg.create_database(DBNAME, USER)
    print(f"pgbench -i -s {scale} ...", file=sys.stderr, flush=True)
    args = [tool("pgbench"), "-i", "-q", "-s", str(scale), "-h", HOST, "-p", str(pg.port), "-U", USER, DBNAME]
    out = subprocess.run(args, capture_output=True, text=True, env=client_env(), timeout=1800, check=False)
    if out.returncode != 0:
        raise BenchError(f"pgbench -i failed (exit {out.returncode}):\n{out.stderr}")


def pgbouncer_secret(pg: EmbeddedPostgres, kind: str) -> str:
    if kind == "plain":
        return PASSWORD
    secret = pg.execute(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
    if not secret.startswith("SCRAM-SHA-256$"):
        raise BenchError(f"expected a SCRAM secret for {USER} in pg_authid, got {secret[:20]!r}")
    return secret


def machine_info(pg: EmbeddedPostgres, args: argparse.Namespace, bouncer: bool) -> dict[str, Any]:
    return {
        **machine_basics(pg.execute("show server_version")),
        "PgBouncer": first_line([str(PGBOUNCER_BIN), "--version"]) if bouncer else "absent",
        "pgbench": first_line([tool("pgbench"), "--version"]),
        "settings": (f"clients={args.clients} jobs={min(2, args.clients)} duration={args.duration}s "
                     f"rounds={args.rounds} scale={args.scale} pool_size={args.pool_size} "
                     f"warm-up={WARMUP_SECONDS}s modes={','.join(args.modes)}"),
        "auth": (f"scram-sha-256 everywhere; PgBouncer auth_file holds "
                 f"{'the SCRAM secret from pg_authid' if args.pgbouncer_userlist == 'scram' else 'the plain password'}"
                 f" (--pgbouncer-userlist), hyperpool's users has the plain password (verifier derived once)"),
        "note": f"pgbench, the poolers and PostgreSQL all share these {os.cpu_count()} CPUs",
    }


def start_targets(stack: contextlib.ExitStack, pg: EmbeddedPostgres, workdir: Path,
                  args: argparse.Namespace) -> list[Target]:
    targets = [Target("direct", pg.port)]
    if PGBOUNCER_BIN.is_file() and os.access(PGBOUNCER_BIN, os.X_OK):
        bouncer_dir = workdir / "pgbouncer"
        bouncer_dir.mkdir()
        bouncer = PgBouncer(bouncer_dir, pg.port, args.pool_size, pgbouncer_secret(pg, args.pgbouncer_userlist))
        stack.callback(bouncer.stop)
        print("starting PgBouncer ...", file=sys.stderr, flush=True)
        bouncer.start()
        targets.append(Target("pgbouncer", bouncer.port, bouncer))
    else:
        reason = f"{PGBOUNCER_BIN} not found (apt-get install pgbouncer)"
        print(f"SKIPPING PgBouncer: {reason}", file=sys.stderr, flush=True)
        targets.append(Target("pgbouncer", 0, skipped=reason))
    # the forwarding path, as PgBouncer has it: no query cache (bench/cache.py measures that)
    hyperpool = Hyperpool(workdir, pg.port, args.pool_size, {"cache": {"enabled": False}})
    stack.callback(hyperpool.stop)
    print("starting hyperpool ...", file=sys.stderr, flush=True)
    hyperpool.start()
    targets.append(Target("hyperpool", hyperpool.port, hyperpool))
    return targets


def bench(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    owner = run_as_owner()
    workdir = Path(tempfile.mkdtemp(prefix="hyperpool-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    if owner is not None:
        workdir.chmod(0o711)  # the postgres user must reach the pgbouncer/ subdirectory
    pg = EmbeddedPostgres(settings={"max_connections": "300"})
    stack.callback(pg.cleanup)
    print("starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    setup_postgres(pg, args.scale)
    targets = start_targets(stack, pg, workdir, args)
    machine = machine_info(pg, args, any(t.key == "pgbouncer" and not t.skipped for t in targets))
    wanted = {name.strip().upper() for name in args.scenarios.split(",")}
    scenarios = [sc for sc in SCENARIOS if sc.goal_label.lstrip("-") in wanted]
    rows = [run_row(targets, scenario, mode, args) for scenario in scenarios for mode in args.modes]
    print_report(machine, rows, targets)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(machine, rows, targets), indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0 if all(row.trustworthy for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
