"""Unit tests for hyperpool.config and the check-config / passwd commands: pure, table-driven, no PostgreSQL."""

from __future__ import annotations

import io
import itertools
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperpool import config as config_module
from hyperpool.cli import main
from hyperpool.config import DEFAULT_CONFIG_PATH, Config, PoolSettings, load_config, parse_config
from hyperpool.errors import ConfigError
from hyperpool.protocol import scram

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "hyperpool.yaml"
EXAMPLE_ENV = {"APP_DB_PASSWORD": "x"}
EXISTING_FILE = str(Path(__file__).resolve())  # stands in for a certificate file that exists

BASE: dict[str, Any] = {"users": {"app": "secret"}, "databases": {"appdb": {"user": "app"}}}
VERIFIER = str(scram.make_verifier("secret", salt=b"0123456789abcdef"))
MD5_HASH = scram.md5_hash("secret", "app")


def _doc(snippet: str) -> Any:
    """BASE with the snippet's top-level keys replacing BASE's (a snippet that is not a mapping is used as is)."""
    data = yaml.safe_load(snippet.replace("@EXISTING@", EXISTING_FILE))
    return {**BASE, **data} if isinstance(data, dict) else data


def _names_key(message: str, key: str) -> bool:
    """The message names exactly this key path (not merely a longer path ending in it)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


def _passwd(monkeypatch: pytest.MonkeyPatch, user: str, stdin: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["passwd", user])


# --- the example file -----------------------------------------------------------------------------------


def test_example_loads_with_the_values_it_shows() -> None:
    cfg = load_config(EXAMPLE, env=EXAMPLE_ENV)
    defaults = Config()
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 6432)
    for name in ("auth_type", "allow_cleartext_over_tcp", "shutdown_timeout", "max_packet_size",
                 "client_login_timeout", "log_level", "pool", "tls"):
        assert getattr(cfg, name) == getattr(defaults, name), name  # the example shows every default
    assert cfg.source == str(EXAMPLE)
    user = cfg.users["app"]
    assert user.plaintext == "change-me" and user.scram is not None
    assert set(cfg.databases) == {"appdb", "appdb_session"}
    appdb = cfg.databases["appdb"]
    assert (appdb.host, appdb.port, appdb.dbname, appdb.user) == ("127.0.0.1", 5432, "appdb", "app")
    assert (appdb.password, appdb.sslmode, appdb.sslrootcert) == ("x", "prefer", None)
    assert appdb.pool == replace(PoolSettings(), pool_size=10, min_pool_size=2, query_wait_timeout=30.0)
    assert appdb.connect_options == (("application_name", "hyperpool"), ("statement_timeout", "30s"))
    session = cfg.databases["appdb_session"]
    assert (session.dbname, session.user, session.password) == ("appdb", "app", "x")
    assert session.pool == replace(PoolSettings(), pool_mode="session", pool_size=5)


def test_example_uses_every_key() -> None:
    text = EXAMPLE.read_text()
    written = set(re.findall(r"^[ #]*([a-z_]+):", text, flags=re.MULTILINE))
    accepted = config_module._TOP_KEYS | config_module._DB_KEYS | {"host", "port", "cert", "key", "password", "users"}
    accepted |= config_module._CACHE_KEYS
    assert accepted - written == set()


def test_example_documents_every_key_line() -> None:
    lines = EXAMPLE.read_text().splitlines()
    undocumented = [
        line for previous, line in itertools.pairwise(lines)
        if re.match(r"\s*[A-Za-z_]+:", line) and not previous.lstrip().startswith("#") and "#" not in line
    ]
    assert undocumented == []


def test_example_default_comments_match_the_code() -> None:
    """Each "(default: X)" comment above a key shows the value written below it, and the code agrees."""
    cfg = parse_config(BASE, {})
    db = cfg.databases["appdb"]
    code_defaults: dict[tuple[int, str], Any] = {
        (0, name): getattr(cfg.pool if name in config_module.POOL_KEYS else cfg, name)
        for name in config_module._TOP_KEYS - {"listen", "users", "databases", "tls", "metrics", "admin", "cache"}
    }
    code_defaults |= {(2, "host"): cfg.listen_host, (2, "port"): cfg.listen_port}
    code_defaults |= {(2, name): getattr(cfg.cache, name) for name in config_module._CACHE_KEYS}
    code_defaults |= {(4, "host"): db.host, (4, "port"): db.port, (4, "sslmode"): db.sslmode}
    checked = set()
    for comment, line in itertools.pairwise(EXAMPLE.read_text().splitlines()):
        found = re.search(r"\(default: ([^)= ]+)", comment)
        key = re.fullmatch(r"( *)([a-z_]+): (\S+)", line)
        if found and key and (len(key[1]), key[2]) in code_defaults:
            written = yaml.safe_load(key[3])
            assert yaml.safe_load(found[1]) == written, line
            assert code_defaults[len(key[1]), key[2]] == written, line
            checked.add((len(key[1]), key[2]))
    assert checked == set(code_defaults)


def test_example_tls_block_works_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = re.search(r"^# tls:\n(?:#   .*\n)+", text, flags=re.MULTILINE)
    assert block is not None
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    enabled = re.sub(r"^#( ?)", "", block[0], flags=re.MULTILINE)
    enabled = enabled.replace("/etc/hyperpool/server.crt", str(cert)).replace("/etc/hyperpool/server.key", str(key))
    path = tmp_path / "hyperpool.yaml"
    path.write_text(text.replace(block[0], enabled))
    tls = load_config(path, env=EXAMPLE_ENV).tls
    assert tls is not None and (tls.cert, tls.key) == (str(cert), str(key))


def test_check_config_example(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("APP_DB_PASSWORD", "x")
    assert main(["check-config", "config/hyperpool.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "2 databases" in out and "2 users" in out and "127.0.0.1:6432" in out
    assert DEFAULT_CONFIG_PATH == "config/hyperpool.yaml"
    assert main(["check-config"]) == 0  # the default path is the example
    assert main(["--config", str(EXAMPLE), "check-config"]) == 0


def test_check_config_example_without_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("APP_DB_PASSWORD", raising=False)
    assert main(["check-config", "config/hyperpool.yaml"]) == 2
    captured = capsys.readouterr()
    assert "APP_DB_PASSWORD" in captured.err and "databases.appdb.password" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(("content", "expected"), [
    ("databases: {appdb: {user: app, port: abc}}\n", "databases.appdb.port"),
    ("databases: [\n", "invalid YAML"),
])
def test_check_config_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                   expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    assert main(["check-config", str(path)]) == 2
    assert f"{path}: cannot read" in capsys.readouterr().err


# --- defaults and expansion -----------------------------------------------------------------------------


def test_minimal_config_defaults() -> None:
    cfg = parse_config({"users": {"app": "secret"}, "databases": {"appdb": {"user": "app"}}}, {}, source="mem")
    assert (cfg.listen_host, cfg.listen_port, cfg.auth_type) == ("127.0.0.1", 6432, "scram-sha-256")
    assert cfg.pool == PoolSettings() and cfg.pool.pool_mode == "transaction"
    assert (cfg.allow_cleartext_over_tcp, cfg.tls, cfg.log_level, cfg.source) == (False, None, "info", "mem")
    assert (cfg.shutdown_timeout, cfg.max_packet_size, cfg.client_login_timeout) == (30.0, 256 << 20, 60.0)
    db = cfg.databases["appdb"]
    assert (db.name, db.host, db.port, db.dbname, db.user) == ("appdb", "127.0.0.1", 5432, "appdb", "app")
    assert (db.password, db.sslmode, db.sslrootcert, db.connect_options) == (None, "prefer", None, ())
    assert db.pool == cfg.pool


@pytest.mark.parametrize(("doc", "env", "check"), [
    ({"databases": {"appdb": {"user": "app", "password": "${PW}"}}}, {"PW": "s3"},
     lambda c: c.databases["appdb"].password == "s3"),
    ({"databases": {"appdb": {"user": "${U}", "host": "${H}.internal", "dbname": "${U}_${H}"}}},
     {"U": "app", "H": "db1"},
     lambda c: (c.databases["appdb"].user, c.databases["appdb"].host, c.databases["appdb"].dbname)
     == ("app", "db1.internal", "app_db1")),
    ({"databases": {"appdb": {"user": "app", "connect_options": {"application_name": "hp-${ZONE}"}}}},
     {"ZONE": "eu"}, lambda c: c.databases["appdb"].connect_options == (("application_name", "hp-eu"),)),
    ({"listen": {"host": "${LISTEN}"}}, {"LISTEN": "0.0.0.0"}, lambda c: c.listen_host == "0.0.0.0"),
    ({"users": {"app": {"password": "${APP_PW}"}}}, {"APP_PW": "pw"}, lambda c: c.users["app"].plaintext == "pw"),
    ({"users": {"app": "$APP_PW and $${x"}}, {}, lambda c: c.users["app"].plaintext == "$APP_PW and $${x"),
    ({"log_level": "${LEVEL}"}, {"LEVEL": "debug"}, lambda c: c.log_level == "debug"),
])
def test_env_expansion(doc: dict[str, Any], env: dict[str, str], check: Any) -> None:
    assert check(parse_config({**BASE, **doc}, env))


@pytest.mark.parametrize(("doc", "key", "var"), [
    ({"databases": {"appdb": {"user": "app", "password": "${APP_DB_PASSWORD}"}}},
     "databases.appdb.password", "APP_DB_PASSWORD"),
    ({"databases": {"appdb": {"user": "app", "connect_options": {"application_name": "x-${ZONE}"}}}},
     "databases.appdb.connect_options.application_name", "ZONE"),
    ({"users": {"app": {"password": "${APP_PW}"}}}, "users.app.password", "APP_PW"),
    ({"listen": {"host": "${SET}${UNSET}"}}, "listen.host", "UNSET"),
    ({"log_level": "${LEVEL}"}, "log_level", "LEVEL"),
])
def test_env_missing_variable(doc: dict[str, Any], key: str, var: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({**BASE, **doc}, {"SET": "x"})
    assert _names_key(str(excinfo.value), key) and var in str(excinfo.value)


def test_load_config_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("users: {app: secret}\ndatabases: {appdb: {user: app, password: '${HP_TEST_PW}'}}\n")
    monkeypatch.setenv("HP_TEST_PW", "from-env")
    assert load_config(path).databases["appdb"].password == "from-env"
    assert load_config(path, env={"HP_TEST_PW": "given"}).databases["appdb"].password == "given"


# --- invalid input --------------------------------------------------------------------------------------

INVALID = [
    # unknown keys
    ("bogus: 1", "bogus"),
    ("databases: {appdb: {user: app, hots: db}}", "databases.appdb.hots"),
    ("listen: {host: 0.0.0.0, prot: 6432}", "listen.prot"),
    ("tls: {cert: '@EXISTING@', key: '@EXISTING@', ca: x}", "tls.ca"),
    ("users: {app: {password: x, role: admin}}", "users.app.role"),
    # wrong types and ranges
    ("databases: {appdb: {user: app, port: abc}}", "databases.appdb.port"),
    ("databases: {appdb: {user: app, port: 0}}", "databases.appdb.port"),
    ("listen: {port: abc}", "listen.port"),
    ("listen: {port: 70000}", "listen.port"),
    ("listen: {host: [a, b]}", "listen.host"),
    ("pool_size: 0", "pool_size"),
    ("pool_size: true", "pool_size"),
    ("pool_size: 2.5", "pool_size"),
    ("max_client_conn: 0", "max_client_conn"),
    ("query_wait_timeout: -1", "query_wait_timeout"),
    ("server_lifetime: soon", "server_lifetime"),
    ("server_login_retry: false", "server_login_retry"),
    ("shutdown_timeout: -0.5", "shutdown_timeout"),
    ("client_login_timeout: '60'", "client_login_timeout"),
    ("databases: {appdb: {user: app, server_idle_timeout: -5}}", "databases.appdb.server_idle_timeout"),
    ("databases: {appdb: {user: app, pool_size: 0}}", "databases.appdb.pool_size"),
    ("allow_cleartext_over_tcp: 'yes'", "allow_cleartext_over_tcp"),
    ("max_packet_size: 10", "max_packet_size"),
    ("databases: {appdb: {user: [app]}}", "databases.appdb.user"),
    ("databases: {appdb: {user: app, password: true}}", "databases.appdb.password"),
    ("databases: {appdb: {user: app, connect_options: {jit: off}}}", "databases.appdb.connect_options.jit"),
    ("users: {app: {password: [x]}}", "users.app.password"),
    ("users: {app: {password: null}}", "users.app.password"),
    # choices
    ("auth_type: kerberos", "auth_type"),
    ("auth_type: SCRAM-SHA-256", "auth_type"),
    ("pool_mode: statement", "pool_mode"),
    ("databases: {appdb: {user: app, pool_mode: statement}}", "databases.appdb.pool_mode"),
    ("databases: {appdb: {user: app, sslmode: strict}}", "databases.appdb.sslmode"),
    ("log_level: verbose", "log_level"),
    # min_pool_size > pool_size
    ("min_pool_size: 30", "min_pool_size"),
    ("{pool_size: 5, min_pool_size: 6}", "min_pool_size"),
    ("databases: {appdb: {user: app, pool_size: 2, min_pool_size: 3}}", "databases.appdb.min_pool_size"),
    ("{min_pool_size: 5, databases: {appdb: {user: app, pool_size: 2}}}", "databases.appdb.min_pool_size"),
    # required keys and files
    ("databases: {appdb: {host: db}}", "databases.appdb.user"),
    ("databases: {appdb: {user: app, sslmode: verify-full}}", "databases.appdb.sslrootcert"),
    ("databases: {appdb: {user: app, sslmode: verify-ca}}", "databases.appdb.sslrootcert"),
    ("databases: {appdb: {user: app, sslmode: verify-full, sslrootcert: /nonexistent/ca.pem}}",
     "databases.appdb.sslrootcert"),
    ("databases: {appdb: {user: app, sslrootcert: /nonexistent/ca.pem}}", "databases.appdb.sslrootcert"),
    ("tls: {cert: /nonexistent/server.crt, key: /nonexistent/server.key}", "tls.cert"),
    ("tls: {cert: '@EXISTING@', key: /nonexistent/server.key}", "tls.key"),
    ("tls: {cert: '@EXISTING@'}", "tls.key"),
    ("tls: {key: '@EXISTING@'}", "tls.cert"),
    ("users: {app: {}}", "users.app.password"),
    ("users: {app: null}", "users.app.password"),
    # passwords that do not fit auth_type
    (f"users: {{app: {MD5_HASH}}}", "users.app.password"),
    (f"{{auth_type: scram-sha-256, users: {{ops: secret, app: {{password: {MD5_HASH}}}}}}}", "users.app.password"),
    # sections that are not mappings
    ("users: [app]", "users"),
    ("users: {app: [secret]}", "users.app"),
    ("databases: appdb", "databases"),
    ("databases: {appdb: 'postgresql://app@db/appdb'}", "databases.appdb"),
    ("databases: {appdb: {user: app, connect_options: [jit=off]}}", "databases.appdb.connect_options"),
    ("listen: 6432", "listen"),
    ("tls: /etc/server.pem", "tls"),
    ("- users\n- databases", "<top level>"),
    ("just text", "<top level>"),
]


@pytest.mark.parametrize(("snippet", "key"), INVALID)
def test_invalid(snippet: str, key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(_doc(snippet), {})
    assert _names_key(str(excinfo.value), key), str(excinfo.value)


@pytest.mark.parametrize("snippet", [
    "databases: {appdb: {user: app, sslmode: verify-full, sslrootcert: '@EXISTING@'}}",
    "tls: {cert: '@EXISTING@', key: '@EXISTING@'}",
    "{pool_size: 5, min_pool_size: 5}",
    "listen: {port: 0}",
    "{}",
])
def test_valid_edges(snippet: str) -> None:
    parse_config(_doc(snippet), {})


@pytest.mark.parametrize(("content", "expected"), [
    (b"databases: {appdb: [\n", "invalid YAML"),
    (b"users:\n\tapp: secret\n", "invalid YAML"),
    (b"users: {app: secret}\nusers: !!python/object:os.system {}\n", "invalid YAML"),
])
def test_load_invalid_yaml(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert str(path) in str(excinfo.value) and expected in str(excinfo.value)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"users: {app: s\xe9cret}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("name", ["absent.yaml", "."])
def test_load_unreadable(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert str(excinfo.value).startswith(f"{path}: cannot read")


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    cfg = load_config(path, env={})
    assert (cfg.users, cfg.databases, cfg.source) == ({}, {}, str(path))


# --- pool inheritance -----------------------------------------------------------------------------------


def test_database_pool_inherits_global_settings() -> None:
    cfg = parse_config({
        "query_wait_timeout": 5, "pool_mode": "session", "min_pool_size": 1,
        "users": {"app": "secret"},
        "databases": {"a": {"user": "app", "pool_size": 3}, "b": {"user": "app", "pool_mode": "transaction"}},
    }, {})
    glob = replace(PoolSettings(), query_wait_timeout=5.0, pool_mode="session", min_pool_size=1)
    assert cfg.pool == glob
    assert cfg.databases["a"].pool == replace(glob, pool_size=3)
    assert cfg.databases["b"].pool == replace(glob, pool_mode="transaction")
    assert cfg.pool.pool_size == 20


# --- users ----------------------------------------------------------------------------------------------


def test_user_plain_text_gets_a_verifier() -> None:
    user = parse_config({**BASE, "users": {"app": {"password": "s3cret"}}}, {}).users["app"]
    assert (user.name, user.password, user.plaintext) == ("app", "s3cret", "s3cret")
    assert user.scram is not None
    derived = scram.make_verifier("s3cret", user.scram.salt, user.scram.iterations)
    assert derived.stored_key == user.scram.stored_key and derived.server_key == user.scram.server_key


@pytest.mark.parametrize("users", [{"app": VERIFIER}, {"app": {"password": VERIFIER}}])
def test_user_scram_verifier(users: dict[str, Any]) -> None:
    user = parse_config({**BASE, "users": users}, {}).users["app"]
    assert user.scram == scram.parse_verifier(VERIFIER)
    assert (user.password, user.plaintext) == (VERIFIER, None)


@pytest.mark.parametrize("auth_type", ["md5", "password", "trust"])
def test_user_md5_hash(auth_type: str) -> None:
    cfg = parse_config({**BASE, "auth_type": auth_type, "users": {"app": {"password": MD5_HASH}}}, {})
    user = cfg.users["app"]
    assert (cfg.auth_type, user.password, user.scram, user.plaintext) == (auth_type, MD5_HASH, None, None)


def test_md5_auth_accepts_scram_verifier_users() -> None:
    """Like PostgreSQL, auth_type md5 upgrades users stored as SCRAM verifiers to SCRAM."""
    cfg = parse_config({**BASE, "auth_type": "md5", "users": {"app": VERIFIER, "ops": "pw"}}, {})
    assert cfg.users["app"].scram is not None and cfg.users["ops"].plaintext == "pw"


MALFORMED_VERIFIERS = [
    pytest.param(VERIFIER[:-8], id="truncated"),
    pytest.param(VERIFIER.replace("$4096:", "$0:"), id="zero-iterations"),
    pytest.param("SCRAM-SHA-256$4096:!!!!$AAAA:BBBB", id="bad-base64"),
    pytest.param("SCRAM-SHA-256$4096:c2FsdA==$c2hvcnQ=:c2hvcnQ=", id="short-keys"),
]


@pytest.mark.parametrize("verifier", MALFORMED_VERIFIERS)
def test_user_malformed_scram_verifier(verifier: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({**BASE, "users": {"app": verifier}}, {})
    assert _names_key(str(excinfo.value), "users.app.password")


def test_user_empty_password() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({**BASE, "users": {"app": "${EMPTY}"}}, {"EMPTY": ""})
    assert _names_key(str(excinfo.value), "users.app.password")


# --- passwd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stdin", "password"), [
    ("s3cret\n", "s3cret"),
    ("s3cret\r\n", "s3cret"),
    ("no newline", "no newline"),
    ('quote " hash # dollar ${X}\n', 'quote " hash # dollar ${X}'),
    ("pässwörd\n", "pässwörd"),
])
def test_passwd_prints_a_user_entry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    stdin: str, password: str) -> None:
    assert _passwd(monkeypatch, "app", stdin) == 0
    out = capsys.readouterr().out
    fragment = yaml.safe_load(out)
    assert list(fragment) == ["app"]
    user = parse_config({**BASE, "users": fragment}, {}).users["app"]
    assert user.plaintext is None and user.scram is not None
    stored = user.scram
    assert scram.make_verifier(password, stored.salt, stored.iterations).stored_key == stored.stored_key
    assert scram.make_verifier(password, stored.salt, stored.iterations).server_key == stored.server_key
    assert scram.make_verifier(password + "x", stored.salt, stored.iterations).stored_key != stored.stored_key
    assert password not in out


def test_passwd_salts_each_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for _ in range(2):
        assert _passwd(monkeypatch, "app", "same\n") == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_passwd_empty(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str) -> None:
    assert _passwd(monkeypatch, "app", stdin) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "empty password" in captured.err


@pytest.mark.parametrize("name", ["on", "null", "#ops", "team: a"])
def test_passwd_user_names_needing_quotes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          name: str) -> None:
    assert _passwd(monkeypatch, name, "s3cret\n") == 0
    fragment = yaml.safe_load(capsys.readouterr().out)
    assert list(fragment) == [name]


def test_metrics_admin_and_logging_keys() -> None:
    cfg = parse_config(BASE, {})
    assert (cfg.metrics, cfg.admin_users, cfg.log_format, cfg.log_slow_query_ms) == (None, (), "text", 0.0)
    users = {"app": {"password": "x"}, "ops": {"password": "y"}}
    cfg = parse_config({**BASE, "users": users, "metrics": {"host": "0.0.0.0"}, "admin": {"users": ["ops"]},
                        "log_format": "json", "log_slow_query_ms": 250}, {})
    assert cfg.metrics is not None and (cfg.metrics.host, cfg.metrics.port) == ("0.0.0.0", 9930)
    assert (cfg.admin_users, cfg.log_format, cfg.log_slow_query_ms) == (("ops",), "json", 250.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"admin": {"users": ["nobody"]}}, "admin.users: 'nobody' is not in users"),
    ({"admin": {"users": "app"}}, "admin.users: expected a list"),
    ({"admin": {"roles": []}}, "admin"),
    ({"metrics": {"port": 70000}}, "metrics.port"),
    ({"metrics": {"path": "/x"}}, "metrics"),
    ({"log_format": "xml"}, "log_format"),
    ({"log_slow_query_ms": -1}, "log_slow_query_ms"),
])
def test_metrics_admin_and_logging_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**BASE, **change}, {})


@pytest.mark.parametrize("name", ["hyperpool", "pgbouncer"])
def test_admin_database_names_are_reserved(name: str) -> None:
    databases = {name: {"host": "127.0.0.1", "user": "app"}}
    with pytest.raises(ConfigError, match=f"databases.{name}: reserved"):
        parse_config({**BASE, "databases": databases}, {})


def test_cache_settings_top_level_and_per_database() -> None:
    cfg = parse_config({**BASE, "cache": {"max_age": 30, "max_bytes": 1000},
                        "databases": {"appdb": {"user": "app", "cache": {"enabled": False, "max_age": 5}},
                                      "other": {"user": "app"}}}, {})
    assert (cfg.cache.max_age, cfg.cache.max_bytes, cfg.cache.enabled) == (30.0, 1000, True)
    appdb, other = cfg.databases["appdb"].cache, cfg.databases["other"].cache
    assert (appdb.enabled, appdb.max_age, appdb.max_bytes) == (False, 5.0, 1000)  # over the top-level section
    assert other == cfg.cache
    for bad, message in [({"cache": {"ttl": 1}}, "cache"), ({"cache": {"max_age": -1}}, "cache.max_age"),
                         ({"cache": {"enabled": "yes"}}, "cache.enabled")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**BASE, **bad}, {})


# --- scram_iterations -----------------------------------------------------------------------------------


def test_scram_iterations_default_top_level_and_per_user() -> None:
    cfg = parse_config(BASE, {})
    assert cfg.scram_iterations == scram.DEFAULT_ITERATIONS
    assert cfg.users["app"].scram is not None and cfg.users["app"].scram.iterations == scram.DEFAULT_ITERATIONS
    users = {"app": "secret", "svc": {"password": "x" * 32, "scram_iterations": 16},
             "pinned": {"password": str(scram.make_verifier("p", iterations=2048))}}
    cfg = parse_config({**BASE, "users": users, "scram_iterations": 512}, {})
    assert cfg.scram_iterations == 512
    got = {name: user.scram.iterations for name, user in cfg.users.items() if user.scram is not None}
    assert got == {"app": 512, "svc": 16, "pinned": 2048}
    svc = cfg.users["svc"].scram
    assert svc is not None and scram.make_verifier("x" * 32, svc.salt, 16).stored_key == svc.stored_key


@pytest.mark.parametrize(("patch", "key"), [
    ({"scram_iterations": 0}, "scram_iterations"),
    ({"scram_iterations": "4096"}, "scram_iterations"),
    ({"scram_iterations": scram.MAX_ITERATIONS + 1}, "scram_iterations"),
    ({"users": {"app": {"password": "p", "scram_iterations": 0}}}, "users.app.scram_iterations"),
    ({"users": {"app": {"password": "p", "scram_iterations": True}}}, "users.app.scram_iterations"),
    ({"users": {"app": {"password": str(scram.make_verifier("p")), "scram_iterations": 16}}},
     "users.app.scram_iterations"),
    ({"auth_type": "md5", "users": {"app": {"password": scram.md5_hash("p", "app"), "scram_iterations": 16}}},
     "users.app.scram_iterations"),
])
def test_scram_iterations_rejected(patch: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **patch}, {})
    assert _names_key(str(info.value), key), str(info.value)


def test_passwd_iterations(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert main(["passwd", "--iterations", "64", "app"]) == 0
    user = parse_config({**BASE, "users": yaml.safe_load(capsys.readouterr().out)}, {}).users["app"]
    assert user.scram is not None and user.scram.iterations == 64
    assert scram.make_verifier("s3cret", user.scram.salt, 64).stored_key == user.scram.stored_key
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert main(["passwd", "--iterations", "0", "app"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--iterations" in captured.err
