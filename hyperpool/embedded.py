"""Start and stop a throwaway PostgreSQL server from the machine's own binaries.

Used by ``hyperpool demo`` and by the test suite::

    with EmbeddedPostgres() as pg:
        pg.create_user("app", "secret")
        pg.create_database("appdb", owner="app")
        psycopg.connect(pg.dsn("appdb", "app", "secret"))

The cluster lives in a private temporary directory. Unix-socket connections are trusted (that is
how :meth:`EmbeddedPostgres.execute` runs SQL through ``psql``); TCP connections must authenticate
with SCRAM-SHA-256, so the auth paths a proxy exercises are real. PostgreSQL refuses to run as
root, so when we are root every server command runs as the ``postgres`` system user through
``runuser``. Durability is switched off (``fsync``, ``full_page_writes``, ``initdb --no-sync``)
because the data is thrown away.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

INSTALL_HINT = "install the PostgreSQL server package, e.g. `apt-get install postgresql` on Debian/Ubuntu"

_BINDIR_ENV = "HYPERPOOL_PG_BINDIR"
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_SERVER_BINARIES = ("initdb", "pg_ctl")
_RUN_AS_USER = "postgres"
_PG_CTL_WAIT_SECONDS = 60
_COMMAND_TIMEOUT_SECONDS = 120.0
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL
_PORT_IN_USE_MARKERS = ("Address already in use", "could not bind", "could not create any TCP/IP sockets")
_PSQL_FLAGS = ("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-")
_INITDB_FLAGS = ("--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_HBA = """\
# written by hyperpool.embedded
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
host all all samehost scram-sha-256
"""


class EmbeddedPostgresError(RuntimeError):
    """The throwaway PostgreSQL server could not be found, created, started, stopped or queried."""


class _StartFailure(EmbeddedPostgresError):
    def __init__(self, message: str, *, port_in_use: bool) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


# ---------------------------------------------------------------------------------------------
# Locating the binaries


def find_pg_bindir() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Order: ``$HYPERPOOL_PG_BINDIR``; ``pg_config --bindir`` if it holds initdb; the highest version
    under ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu); ``initdb`` on ``PATH``.
    """
    override = os.environ.get(_BINDIR_ENV)
    if override:
        path = Path(override).expanduser()
        if _has_server_binaries(path):
            return path
        raise EmbeddedPostgresError(
            f"{_BINDIR_ENV}={override!r} does not contain initdb and pg_ctl; point it at the bin "
            f"directory of a PostgreSQL server installation, or {INSTALL_HINT}"
        )
    finders: tuple[Callable[[], Path | None], ...] = (_pg_config_bindir, _debian_bindir, _path_bindir)
    for finder in finders:
        candidate = finder()
        if candidate is not None and _has_server_binaries(candidate):
            return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found via "
        f"{_BINDIR_ENV}, `pg_config --bindir`, {_DEBIAN_ROOT}/*/bin or PATH; {INSTALL_HINT}"
    )


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) and (bindir / name).is_file() for name in _SERVER_BINARIES)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    output = result.stdout.strip()
    return Path(output) if result.returncode == 0 and output else None


def _version_key(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return None


def _debian_bindir() -> Path | None:
    found: list[tuple[tuple[int, ...], Path]] = []
    for bindir in _DEBIAN_ROOT.glob("*/bin"):
        key = _version_key(bindir.parent.name)
        if key is not None and _has_server_binaries(bindir):
            found.append((key, bindir))
    return max(found)[1] if found else None


def _path_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is None:
        return None
    resolved = Path(initdb).resolve().parent  # /usr/local/bin/initdb may be a symlink into the real bindir
    return resolved if _has_server_binaries(resolved) else Path(initdb).parent


# ---------------------------------------------------------------------------------------------
# Process and filesystem helpers (module-level so the finalizer never holds the instance)


def _server_owner() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root; None when we can run it ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_RUN_AS_USER)
    except KeyError:
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root and there is no `{_RUN_AS_USER}` system user to run it "
            f"as; create an unprivileged user (e.g. `useradd --system --user-group {_RUN_AS_USER}`) "
            "or run as a non-root user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _command_prefix(owner: tuple[int, int] | None) -> tuple[str, ...]:
    if owner is None:
        return ()
    runuser = shutil.which("runuser") or ("/usr/sbin/runuser" if Path("/usr/sbin/runuser").exists() else None)
    if runuser is None:
        raise EmbeddedPostgresError("running as root needs `runuser` (util-linux) to start PostgreSQL")
    return (runuser, "-u", _RUN_AS_USER, "--")


def _child_env() -> dict[str, str]:
    """Our environment minus PG* variables, which would redirect psql/pg_ctl elsewhere."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCLIENTENCODING"] = "UTF8"
    return env


def _run(
    prefix: Sequence[str], args: Sequence[str], *, cwd: Path | None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    command = [*prefix, *args]
    try:
        return subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            cwd=cwd,
            env=_child_env(),
            timeout=_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedPostgresError(f"{args[0]} timed out after {exc.timeout:.0f}s") from None
    except OSError as exc:
        raise EmbeddedPostgresError(f"could not run {command[0]}: {exc}") from exc


def _postmaster_alive(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _teardown(prefix: tuple[str, ...], pg_ctl: str, data_dir: Path, dirs: tuple[Path, ...]) -> None:
    """Stop the server (fast, then immediate) and delete every directory we made. Never raises."""
    for mode in ("fast", "immediate"):
        if not _postmaster_alive(data_dir):
            break
        with contextlib.suppress(EmbeddedPostgresError):
            _run(prefix, [pg_ctl, "-D", str(data_dir), "-m", mode, "-w", "stop"], cwd=None)
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    os.chown(root, *owner)
    for parent, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(parent, name), *owner, follow_symlinks=False)


def _write_private(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, *owner)


def _traversable(path: Path, owner: tuple[int, int]) -> bool:
    uid, gid = owner
    for part in (path, *path.parents):
        try:
            st = part.stat()
        except OSError:
            return False
        if not (
            st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100) or (st.st_gid == gid and st.st_mode & 0o010)
        ):
            return False
    return True


def _temp_parent(owner: tuple[int, int] | None) -> str | None:
    """Where to make the temp dir: the default, unless the server user cannot reach it."""
    if owner is None:
        return None
    for candidate in (tempfile.gettempdir(), "/tmp"):
        if _traversable(Path(candidate), owner):
            return candidate
    raise EmbeddedPostgresError(f"no temporary directory is reachable by the `{_RUN_AS_USER}` user")


def _free_port(host: str) -> int:
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


def _quote_conf(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise EmbeddedPostgresError(f"setting value {value!r} contains a newline")
    return "'" + value.replace("'", "''") + "'"


def _check_settings(settings: dict[str, str]) -> None:
    bad = [name for name in settings if not _SETTING_NAME.match(name)]
    if bad:
        raise EmbeddedPostgresError(f"invalid setting name(s): {', '.join(map(repr, bad))}")
    for value in settings.values():
        _quote_conf(value)


def _quote_ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on)."""
    return "'" + value.replace("'", "''") + "'"


def _log_tail(log_file: Path, offset: int) -> str:
    try:
        with log_file.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(could not read {log_file}: {exc})"
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass(eq=False)
class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster in a temp dir. ``start()``/``cleanup()`` or use ``with``."""

    superuser: str = "postgres"
    password: str = "postgres"  # superuser password; TCP connections require scram-sha-256
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start()
    settings: dict[str, str] = field(default_factory=dict)  # extra postgresql.conf settings
    bindir: Path | None = None  # None: find_pg_bindir() at start()
    _base_dir: Path | None = field(default=None, init=False, repr=False)
    _socket_dir: Path | None = field(default=None, init=False, repr=False)
    _owner: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _prefix: tuple[str, ...] = field(default=(), init=False, repr=False)
    _finalizer: Callable[[], object] | None = field(default=None, init=False, repr=False)

    # -- paths ---------------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """The temp dir holding everything (data dir, socket dir, log file)."""
        if self._base_dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL has not been started")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL has not been started")
        return self._socket_dir

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgresql.log"

    @property
    def running(self) -> bool:
        return self._base_dir is not None and _postmaster_alive(self.data_dir)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        """Create the cluster (once) and start it; returns self. On failure nothing is left behind."""
        if self.running:
            return self
        _check_settings(self.settings)
        if self._base_dir is not None and (self.data_dir / "PG_VERSION").exists():
            self._start_picking_ports()
            return self
        try:
            self._create_cluster()
            self._start_picking_ports()
        except BaseException:
            self.cleanup()
            raise
        return self

    def start_server(self) -> None:
        """Start the existing cluster again (after stop()) on the same port."""
        if not (self._base_dir is not None and (self.data_dir / "PG_VERSION").exists()):
            raise EmbeddedPostgresError("no cluster to start: call start() first")
        if self.running:
            return
        failure = self._launch()
        if failure is not None:
            raise failure

    def stop(self) -> None:
        """Stop the server (fast mode), keeping the data dir. A server that is not running is fine."""
        if self._base_dir is None or not self.data_dir.is_dir():
            return
        result = self._pg_ctl("-m", "fast", "stop")
        if result.returncode != 0 and self.running:
            raise EmbeddedPostgresError(f"pg_ctl stop failed: {(result.stderr or result.stdout).strip()}")

    def cleanup(self) -> None:
        """Stop the server if running and remove the temp dir. Idempotent; never raises."""
        if self._finalizer is not None:
            self._finalizer()  # weakref.finalize runs its callback at most once

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- SQL -----------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """libpq URI over TCP. Without ``user``: the superuser, with its password."""
        if self.port == 0:
            raise EmbeddedPostgresError("no port yet: call start() first")
        if user is None:
            user = self.superuser
            password = self.password if password is None else password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{quote(dbname, safe='')}"

    def execute(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql over the unix socket as the superuser; return its unaligned output."""
        socket_args = ("-h", str(self.socket_dir), "-p", str(self.port))
        args = ["psql", *_PSQL_FLAGS, *socket_args, "-U", self.superuser, "-d", dbname]
        result = self._pg(args, stdin=sql)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout.rstrip("\n")

    def create_user(self, name: str, password: str, *, superuser: bool = False) -> None:
        role = "SUPERUSER" if superuser else "NOSUPERUSER"
        self.execute(f"CREATE ROLE {_quote_ident(name)} LOGIN {role} PASSWORD {_quote_literal(password)}")

    def create_database(self, name: str, owner: str) -> None:
        self.execute(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)}")

    # -- internals -----------------------------------------------------------------------------

    def _pg(self, args: Sequence[str], *, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run a binary from bindir (as the server user when we are root)."""
        if self.bindir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL has not been started")
        binary = self.bindir / args[0]
        if not binary.is_file():
            raise EmbeddedPostgresError(f"{args[0]} not found in {self.bindir}; {INSTALL_HINT}")
        return _run(self._prefix, [str(binary), *args[1:]], cwd=self._base_dir, stdin=stdin)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        wait = ("-w", "-t", str(_PG_CTL_WAIT_SECONDS))
        return self._pg(["pg_ctl", "-D", str(self.data_dir), *wait, *args])

    def _create_cluster(self) -> None:
        self.bindir = self.bindir or find_pg_bindir()
        self._owner = _server_owner()
        self._prefix = _command_prefix(self._owner)
        base = Path(tempfile.mkdtemp(prefix="hyperpool-pg-", dir=_temp_parent(self._owner)))
        self._base_dir = base
        self._socket_dir = self._make_socket_dir(base)
        dirs = (base,) if self._socket_dir.parent == base else (base, self._socket_dir)
        self._finalizer = weakref.finalize(
            self, _teardown, self._prefix, str(self.bindir / "pg_ctl"), base / "data", dirs
        )
        pwfile = base / "pwfile"
        _write_private(pwfile, self.password + "\n", None)
        if self._owner is not None:
            for path in dirs:
                _chown_tree(path, self._owner)
        self._initdb(pwfile)
        pwfile.unlink()
        _write_private(self.data_dir / "pg_hba.conf", _HBA, self._owner)
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# added by hyperpool.embedded\ninclude_if_exists 'hyperpool.conf'\n")

    @staticmethod
    def _make_socket_dir(base: Path) -> Path:
        socket_dir = base / "sock"
        if len(str(socket_dir)) <= _MAX_SOCKET_PATH - len("/.s.PGSQL.65535"):
            socket_dir.mkdir(mode=0o700)
            return socket_dir
        return Path(tempfile.mkdtemp(prefix="hppg-", dir="/tmp"))  # long TMPDIR: keep sun_path short

    def _initdb(self, pwfile: Path) -> None:
        user_args = ("-U", self.superuser, f"--pwfile={pwfile}")
        result = self._pg(["initdb", "-D", str(self.data_dir), *_INITDB_FLAGS, *user_args])
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
            )

    def _conf_text(self) -> str:
        _check_settings(self.settings)
        conf = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "password_encryption": "scram-sha-256",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
            **self.settings,
        }
        return "".join(f"{name} = {_quote_conf(value)}\n" for name, value in conf.items())

    def _start_picking_ports(self) -> None:
        auto_port = self.port == 0
        for attempt in range(_START_ATTEMPTS):
            if auto_port:
                self.port = _free_port(self.host)
            failure = self._launch()
            if failure is None:
                return
            if not (auto_port and failure.port_in_use and attempt + 1 < _START_ATTEMPTS):
                if auto_port:
                    self.port = 0
                raise failure

    def _launch(self) -> _StartFailure | None:
        _write_private(self.data_dir / "hyperpool.conf", self._conf_text(), self._owner)
        offset = _file_size(self.log_file)
        result = self._pg_ctl("-l", str(self.log_file), "start")
        if result.returncode == 0:
            return None
        tail = _log_tail(self.log_file, offset)
        message = (
            f"PostgreSQL did not start on {self.host}:{self.port} (pg_ctl exit {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()})\n--- tail of {self.log_file} ---\n{tail}"
        )
        return _StartFailure(message, port_in_use=any(m in tail for m in _PORT_IN_USE_MARKERS))
