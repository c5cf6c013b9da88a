"""The servers the benches run against: helpers to start, probe and stop them.

PgBouncer, pgpool-II, hyperpool and latency relays run as our children, each in its own process group,
logging to files in a temp dir; stop() signals the group (PgBouncer and pgpool run under ``runuser`` when
we are root).

Run as a script, this module is the latency relay's process (bench/regional.py starts it through
:class:`LatencyRelayProcess`)::

    python bench/bench_servers.py relay --listen-port P --target-port T --delay-ms 25
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
USER = DBNAME = PASSWORD = "bench"
PGBOUNCER_BIN = Path("/usr/sbin/pgbouncer")
PGPOOL_BIN = Path("/usr/sbin/pgpool")
RUN_AS = "postgres"
START_TIMEOUT = 30.0
LOG_TAIL_LINES = 30


class BenchError(RuntimeError):
    """Something the bench needs could not be set up."""



# ---------------------------------------------------------------------------------------------
# Small process helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def client_env() -> dict[str, str]:
    """Our environment without PG* variables, plus the bench password for pgbench/psql."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="10")
    return env


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        raise BenchError(f"{name} not found (install postgresql-client)")
    return path


def first_line(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def psql_select_1(port: int) -> str | None:
    """None when `select 1` works on HOST:port as the bench user, else what psql said."""
    args = [tool("psql"), "-X", "-At", "-h", HOST, "-p", str(port), "-U", USER, "-d", DBNAME, "-c", "select 1"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, env=client_env(), check=False)
    except subprocess.TimeoutExpired:
        return "psql timed out after 30 s"
    return None if out.returncode == 0 and out.stdout.strip() == "1" else (out.stderr or out.stdout).strip()


def run_psql(port: int, sql: str, dbname: str = DBNAME, timeout: float = 300.0) -> tuple[bool, str]:
    """Run ``sql`` (one or more statements) on HOST:port as the bench user.

    Returns (True, stdout: unaligned, ``|``-separated, with a header line) or (False, what psql said).
    """
    args = [tool("psql"), "-X", "-q", "-A", "-F", "|", "-P", "footer=off", "-v", "ON_ERROR_STOP=1",
            "-h", HOST, "-p", str(port), "-U", USER, "-d", dbname, "-f", "-"]
    try:
        out = subprocess.run(args, input=sql, capture_output=True, text=True, errors="replace", timeout=timeout,
                             env=client_env(), check=False)
    except subprocess.TimeoutExpired:
        return False, f"psql timed out after {timeout:.0f} s"
    if out.returncode != 0:
        return False, (out.stderr or out.stdout).strip() or f"psql exit code {out.returncode}"
    return True, out.stdout


def stop_group(proc: subprocess.Popen[bytes], first: signal.Signals) -> None:
    """Stop a child started with start_new_session=True: `first`, then SIGTERM, then SIGKILL.

    Signals go to the child's process group (so runuser's child gets them too), and only while the
    child is not yet reaped, so its pid, and with it the group id, cannot have been reused.
    """
    for sig in (first, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


class Pooler(Protocol):
    name: str
    port: int

    def died(self) -> str | None: ...

    def log_tail(self) -> str: ...

    def cpu_seconds(self) -> float | None: ...


class ManagedProcess:
    """A pooler running as our child in its own process group, logging to a file."""

    name = "pooler"
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.output_file = workdir / f"{self.name}.out"  # its stdout and stderr
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files for self.port."""

    def popen_options(self) -> dict[str, Any]:
        return {}

    def log_tail(self) -> str:
        return f"--- {self.output_file} ---\n{tail(self.output_file)}"

    def start(self) -> None:
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            self.prepare()
            with self.output_file.open("ab") as out:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             **self.popen_options())
            if self._wait_ready():
                problem = psql_select_1(self.port)
                if problem is None:
                    return
                raise BenchError(f"{self.name} is up on port {self.port} but `select 1` through it failed: "
                                 f"{problem}\n{self.log_tail()}")
        raise BenchError(f"{self.name} did not start\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if port_open(self.port):
                return True
            time.sleep(0.1)
        self.stop()
        return False

    def cpu_seconds(self) -> float | None:
        """User + system CPU of every process in the pooler's process group (runuser and its child too)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process went away meanwhile
            if int(fields[2]) == self.proc.pid:  # pgrp: start_new_session made the pooler a group leader
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def died(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"{self.name} exited with code {self.proc.returncode}\n{self.log_tail()}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, self.stop_signal)


def _private_to_owner(workdir: Path, secrets: Sequence[Path]) -> None:
    """Files holding passwords readable by their owner only; as root, the workdir and everything in it handed
    to the user the pooler runs as (PgBouncer and pgpool-II refuse to run as root)."""
    for path in secrets:
        path.chmod(0o600)
    owner = run_as_owner()
    if owner is not None:
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, *owner)


def _as_owner() -> list[str]:
    """The command prefix that runs a pooler as that user when we are root (none otherwise)."""
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []


class PgBouncer(ManagedProcess):
    name = "pgbouncer"
    stop_signal = signal.SIGINT  # safe shutdown; stop_group follows with SIGTERM (immediate) and SIGKILL

    def __init__(self, workdir: Path, pg_port: int, pool_size: int, secret: str) -> None:
        super().__init__(workdir)
        self.pg_port = pg_port
        self.pool_size = pool_size
        self.secret = secret  # the plain password, or the SCRAM secret PostgreSQL stores for the user
        self.ini = workdir / "pgbouncer.ini"
        self.log_file = workdir / "pgbouncer.log"  # its own logfile; it writes the same lines to stderr (.out)

    def prepare(self) -> None:
        userlist = self.workdir / "userlist.txt"
        userlist.write_text(f'"{USER}" "{self.secret}"\n')
        self.ini.write_text(
            "[databases]\n"
            f"{DBNAME} = host={HOST} port={self.pg_port} dbname={DBNAME}\n\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
            f"pool_mode = transaction\ndefault_pool_size = {self.pool_size}\nmin_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\nserver_tls_sslmode = disable\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.log_file}\n"
            "log_connections = 0\nlog_disconnections = 0\n"  # hyperpool at log_level warning logs neither
        )
        _private_to_owner(self.workdir, (self.ini, userlist))

    def command(self) -> list[str]:
        return [*_as_owner(), str(PGBOUNCER_BIN), str(self.ini)]


class Hyperpool(ManagedProcess):
    name = "hyperpool"

    def __init__(self, workdir: Path, pg_port: int, pool_size: int, extra: dict[str, Any] | None = None,
                 name: str | None = None) -> None:
        if name is not None:
            self.name = name  # several instances in one bench (bench/regional.py: "edge", "pool")
        super().__init__(workdir)
        self.pg_port = pg_port
        self.pool_size = pool_size
        self.extra = dict(extra or {})  # more top-level config keys (e.g. cache, admin), over the defaults below
        self.config = workdir / "hyperpool.yaml"

    def prepare(self) -> None:
        database = {"host": HOST, "port": self.pg_port, "user": USER, "password": PASSWORD, "sslmode": "disable",
                    "pool_size": self.pool_size, "min_pool_size": self.pool_size}
        config = {"listen": {"host": HOST, "port": self.port}, "auth_type": "scram-sha-256",
                  "pool_mode": "transaction", "max_client_conn": 1000, "shutdown_timeout": 5,
                  "log_level": "warning", "users": {USER: {"password": PASSWORD}}, "databases": {DBNAME: database}}
        config.update(self.extra)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config.chmod(0o600)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hyperpool", "--config", str(self.config)]

    def popen_options(self) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return {"env": env, "cwd": REPO}


class PgPool(ManagedProcess):
    """pgpool-II 4.3 in raw mode with one backend, connection caching and its shared-memory query cache.

    Clients authenticate with scram-sha-256 (pool_hba.conf) against a pool_passwd holding the plain
    password (``TEXT`` prefix), which pgpool also uses for its own SCRAM login to PostgreSQL. It runs in
    the foreground (``-n``) with every socket, pid, status and oid file in ``workdir``.
    """

    name = "pgpool"
    stop_signal = signal.SIGINT  # fast shutdown; stop_group follows with SIGTERM and SIGKILL

    def __init__(self, workdir: Path, pg_port: int, children: int, cache_expire: int) -> None:
        super().__init__(workdir)
        self.pg_port = pg_port
        self.children = children  # num_init_children: pgpool serves one client per child process
        self.cache_expire = cache_expire  # memqcache_expire, seconds (0 = until a write invalidates)
        self.conf = workdir / "pgpool.conf"
        self.hba = workdir / "pool_hba.conf"
        self.pcp = workdir / "pcp.conf"
        self.passwd = workdir / "pool_passwd"

    def settings(self) -> dict[str, str]:
        d = self.workdir
        return {
            "backend_clustering_mode": "'raw'", "listen_addresses": f"'{HOST}'", "port": str(self.port),
            "socket_dir": f"'{d}'", "pcp_listen_addresses": "''", "pcp_socket_dir": f"'{d}'",
            "wd_ipc_socket_dir": f"'{d}'", "pid_file_name": f"'{d}/pgpool.pid'", "logdir": f"'{d}'",
            "backend_hostname0": f"'{HOST}'", "backend_port0": str(self.pg_port), "backend_weight0": "1",
            "backend_flag0": "'DISALLOW_TO_FAILOVER'", "enable_pool_hba": "on", "pool_passwd": f"'{self.passwd}'",
            "num_init_children": str(self.children), "max_pool": "1", "child_life_time": "0",
            "connection_cache": "on", "load_balance_mode": "off", "health_check_period": "0",
            "sr_check_period": "0", "failover_on_backend_error": "off", "use_watchdog": "off",
            "log_destination": "'stderr'", "log_min_messages": "warning", "log_connections": "off",
            "log_disconnections": "off", "log_statement": "off", "log_per_node_statement": "off",
            "memory_cache_enabled": "on", "memqcache_method": "'shmem'", "memqcache_total_size": "64MB",
            "memqcache_max_num_cache": "1000000", "memqcache_expire": str(self.cache_expire),
            "memqcache_auto_cache_invalidation": "on", "memqcache_maxcache": "400kB",
            "memqcache_cache_block_size": "1MB", "memqcache_oiddir": f"'{d}/oiddir'",
        }

    def prepare(self) -> None:
        self.conf.write_text("".join(f"{key} = {value}\n" for key, value in self.settings().items()))
        self.hba.write_text(f"local all all trust\nhost all all {HOST}/32 scram-sha-256\n")
        self.passwd.write_text(f"{USER}:TEXT{PASSWORD}\n")
        self.pcp.write_text("")  # no pcp users: the bench never uses pcp
        (self.workdir / "oiddir").mkdir(exist_ok=True)
        _private_to_owner(self.workdir, (self.conf, self.hba, self.passwd, self.pcp))

    def command(self) -> list[str]:
        return [*_as_owner(), str(PGPOOL_BIN), "-n", "-D", "-f", str(self.conf), "-a", str(self.hba),
                "-F", str(self.pcp)]


class LatencyRelayProcess(ManagedProcess):
    """tests/latency_relay.py's LatencyRelay in a process of its own (this module run as a script), so that
    its timers do not share a GIL with the client or a server: HOST:port -> HOST:target_port, each direction
    delayed by ``delay_ms``, a new connection's setup by one round trip."""

    name = "relay"

    def __init__(self, workdir: Path, target_port: int, delay_ms: float, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        super().__init__(workdir)
        self.target_port = target_port
        self.delay_ms = delay_ms

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "relay", "--listen-port", str(self.port),
                "--target-port", str(self.target_port), "--delay-ms", str(self.delay_ms)]

    def popen_options(self) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return {"env": env, "cwd": REPO}


def write_self_signed_cert(directory: Path, owner: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """A throwaway ECDSA P-256 certificate for 127.0.0.1/localhost, valid for a day: (cert.pem, key.pem).

    The key is 0600 and, when ``owner`` is given (we are root and PostgreSQL runs as ``postgres``), owned by
    it: PostgreSQL refuses a key file that others can read or that belongs to another non-root user.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.chmod(0o644)
    if owner is not None:
        for path in (directory, cert_path, key_path):
            os.chown(path, *owner)
    return cert_path, key_path


def run_as_owner() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(RUN_AS)
    return entry.pw_uid, entry.pw_gid


# ---------------------------------------------------------------------------------------------
# The latency relay's process


def relay_main(argv: Sequence[str]) -> int:
    """Serve one LatencyRelay until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="bench_servers.py relay",
                                     description="a loopback TCP relay delaying each direction "
                                                 "(tests/latency_relay.py)")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, milliseconds")
    parser.add_argument("--max-connections", type=int, default=256)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.latency_relay import LatencyRelay

    async def serve() -> None:
        relay = LatencyRelay(HOST, args.target_port, args.delay_ms / 1000.0, listen_host=HOST,
                             max_connections=args.max_connections)
        relay.port = args.listen_port  # LatencyRelay listens on .port (0: any free one)
        await relay.start()
        print(f"relay {HOST}:{relay.port} -> {HOST}:{args.target_port}, one-way delay {args.delay_ms:g} ms "
              f"(pid {os.getpid()})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await relay.stop()
        print(f"relay stopped ({relay.refused} connections refused over max_connections)", flush=True)

    asyncio.run(serve())
    return 0



def machine_basics(server_version: str) -> dict[str, Any]:
    """What every bench prints first about the machine: host, CPUs, load, PostgreSQL and hyperpool versions."""
    import platform

    from hyperpool import __version__, build

    cpu = "unknown"
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "machine": f"{platform.node()} {platform.system()} {platform.release()} {platform.machine()}",
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg (start)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "PostgreSQL": server_version,
        "hyperpool": f"{__version__}, {build()} (python {platform.python_version()}, {sys.executable})",
    }


# ---------------------------------------------------------------------------------------------
# The benches' entry point


def _terminate(signum: int, _frame: object) -> None:
    print(f"\n{signal.Signals(signum).name} received; cleaning up", file=sys.stderr)
    raise SystemExit(128 + signum)


def run_bench(bench: Callable[[contextlib.ExitStack, Any], int], args: Any) -> int:
    """Run ``bench(stack, args)``; exit status 2 when the setup failed, 130/143 on Ctrl-C/SIGTERM, and
    everything on the stack stopped in every case (a second signal cannot cut the cleanup short)."""
    from hyperpool.embedded import EmbeddedPostgresError

    signal.signal(signal.SIGTERM, _terminate)
    stack = contextlib.ExitStack()
    try:
        return bench(stack, args)
    except (BenchError, EmbeddedPostgresError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()

if __name__ == "__main__":
    if sys.argv[1:2] != ["relay"]:
        sys.exit("usage: python bench/bench_servers.py relay --listen-port P --target-port T --delay-ms D")
    sys.exit(relay_main(sys.argv[2:]))
