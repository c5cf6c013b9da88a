"""hyperpool as a client of the database: md5 and cleartext authentication, and TLS per sslmode."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from hyperpool.embedded import EmbeddedPostgres
from tests.support import APPDB, OWNER, base_config, start_proxy, start_test_pg

HBA_PREFIX = """\
host all md5_user 127.0.0.1/32 md5
host all pw_user 127.0.0.1/32 password
hostnossl all tls_user 127.0.0.1/32 reject
hostssl all tls_user 127.0.0.1/32 scram-sha-256
"""


def _give_to_postgres(path: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="module")
def origin_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL with md5, password and TLS-only users, and ssl = on."""
    server = start_test_pg()
    try:
        data = server.data_dir
        cert, key = str(data / "server.crt"), str(data / "server.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-keyout", key, "-out", cert], check=True, capture_output=True)
        os.chmod(key, 0o600)
        for path in (cert, key):
            _give_to_postgres(path)
        hba = data / "pg_hba.conf"
        hba.write_text(HBA_PREFIX + hba.read_text())
        server.execute("set password_encryption = 'md5'; create user md5_user password 'md5pass';"
                       "reset password_encryption; create user pw_user password 'pwpass';"
                       "create user tls_user password 'tlspass';"
                       f"grant all on database {APPDB} to md5_user, pw_user, tls_user;"
                       "alter system set ssl = on; select pg_reload_conf();")
        yield server
    finally:
        server.cleanup()


def _through_proxy(pg: EmbeddedPostgres, sql: str, **db: object) -> object:
    proxy = start_proxy(base_config(pg.port, db={"min_pool_size": 0, **db}))
    try:
        with psycopg.connect(proxy.dsn()) as conn:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return row[0]
    finally:
        proxy.stop()


@pytest.mark.parametrize(("user", "password"), [("md5_user", "md5pass"), ("pw_user", "pwpass"), (OWNER, "ownerpass")],
                         ids=["md5", "cleartext", "scram"])
def test_upstream_auth_methods(origin_pg: EmbeddedPostgres, user: str, password: str) -> None:
    assert _through_proxy(origin_pg, "select current_user", user=user, password=password) == user


def test_upstream_wrong_md5_password_is_08006_for_the_client(origin_pg: EmbeddedPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="server login failed"):
        _through_proxy(origin_pg, "select 1", user="md5_user", password="wrong")


@pytest.mark.parametrize("sslmode", ["require", "prefer"])
def test_upstream_tls(origin_pg: EmbeddedPostgres, sslmode: str) -> None:
    in_use = _through_proxy(origin_pg, "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                            user="tls_user", password="tlspass", sslmode=sslmode)
    assert in_use is True


def test_upstream_without_tls_is_refused_by_a_tls_only_origin(origin_pg: EmbeddedPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="server login failed"):
        _through_proxy(origin_pg, "select 1", user="tls_user", password="tlspass", sslmode="disable")


def test_upstream_verify_full_checks_the_certificate(origin_pg: EmbeddedPostgres) -> None:
    cert = str(origin_pg.data_dir / "server.crt")
    # the certificate is for CN=localhost: connecting to 127.0.0.1 with verify-full must fail,
    # and verify-ca (chain only) must work
    assert _through_proxy(origin_pg, "select 1", user="tls_user", password="tlspass", sslmode="verify-ca",
                          sslrootcert=cert) == 1
    with pytest.raises(psycopg.OperationalError, match="could not connect"):
        _through_proxy(origin_pg, "select 1", user="tls_user", password="tlspass", sslmode="verify-full",
                       sslrootcert=cert)
