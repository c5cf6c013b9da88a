"""Command line: run the proxy, check a config, make a password verifier, or run a demo."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence

from hyperpool import __version__, logs
from hyperpool.config import DEFAULT_CONFIG_PATH, Config, load_config, parse_config
from hyperpool.errors import ConfigError
from hyperpool.protocol import scram
from hyperpool.server import Server

DEMO_USER = "app"
DEMO_PASSWORD = "apppass"
DEMO_DB = "appdb"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperpool", description="PostgreSQL connection pooler and query cache")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, help="config file (YAML)")
    parser.add_argument("--version", action="version", version=f"hyperpool {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the proxy (the default)")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", help="config file (default: --config)")
    passwd = sub.add_parser("passwd", help="read a password on stdin, print a SCRAM-SHA-256 verifier")
    passwd.add_argument("user")
    passwd.add_argument("--iterations", type=int, default=scram.DEFAULT_ITERATIONS,
                        help="PBKDF2 iterations each login costs the client (default %(default)s)")
    demo = sub.add_parser("demo", help="start a throwaway PostgreSQL with hyperpool in front of it")
    demo.add_argument("--port", type=int, default=6432, help="port for hyperpool (0 = any free port)")
    return parser


def _run_server(config: Config, config_path: str | None) -> int:
    import uvloop

    logs.setup(config.log_level, config.log_format)
    server = Server(config, config_path)
    try:
        uvloop.run(server.run())
    except OSError as exc:  # e.g. the listen port is taken
        print(f"hyperpool: cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


def cmd_run(config_path: str) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"hyperpool: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return _run_server(config, config_path)


def cmd_check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({len(config.databases)} databases, {len(config.users)} users, "
          f"listening on {config.listen_host}:{config.listen_port})")
    return 0


def cmd_passwd(user: str, iterations: int = scram.DEFAULT_ITERATIONS) -> int:
    if not 1 <= iterations <= scram.MAX_ITERATIONS:
        print(f"hyperpool passwd: --iterations must be between 1 and {scram.MAX_ITERATIONS}", file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {user}: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("hyperpool passwd: empty password", file=sys.stderr)
        return 2
    verifier = scram.make_verifier(password, iterations=iterations)
    print(f'{json.dumps(user)}: {{password: "{verifier}"}}')
    return 0


def demo_config(pg_port: int, port: int) -> Config:
    return parse_config({
        "listen": {"host": "127.0.0.1", "port": port},
        "users": {DEMO_USER: {"password": DEMO_PASSWORD}},
        "databases": {DEMO_DB: {"host": "127.0.0.1", "port": pg_port, "user": DEMO_USER,
                                "password": DEMO_PASSWORD, "sslmode": "disable",
                                "pool_size": 10, "min_pool_size": 2}},
    }, os.environ, source="<demo>")


def cmd_demo(port: int) -> int:
    from hyperpool.embedded import EmbeddedPostgres, EmbeddedPostgresError

    pg = EmbeddedPostgres()
    try:
        print("starting a throwaway PostgreSQL ...", file=sys.stderr)
        pg.start()
        pg.create_user(DEMO_USER, DEMO_PASSWORD)
        pg.create_database(DEMO_DB, DEMO_USER)
        config = demo_config(pg.port, port)
        server = Server(config)

        async def main() -> None:
            await server.start()
            server.install_signal_handlers()
            url = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{server.port}/{DEMO_DB}"
            print(f"\nhyperpool is up. Connect with:\n\n    psql \"{url}\"\n\n"
                  f"(PostgreSQL itself is on port {pg.port}; press Ctrl-C to stop and remove it)\n",
                  flush=True)
            await server.wait_stopped()

        logs.setup("info", "text")
        import uvloop

        uvloop.run(main())
        return 0
    except EmbeddedPostgresError as exc:
        print(f"hyperpool demo: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hyperpool demo: cannot listen on 127.0.0.1:{port}: {exc.strerror} (try --port 0)", file=sys.stderr)
        return 1
    finally:
        pg.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args.file or args.config)
    if args.command == "passwd":
        return cmd_passwd(args.user, args.iterations)
    if args.command == "demo":
        return cmd_demo(args.port)
    return cmd_run(args.config)
