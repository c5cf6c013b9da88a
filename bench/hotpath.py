#!/usr/bin/env python3
"""The Python cost of one pgbench -S transaction through hyperpool, without sockets.

    python bench/hotpath.py [--transactions 50000]

A ClientSession and a ServerConnection are wired to fake transports: the server "answers" each
client write synchronously with the bytes PostgreSQL would send. What is left is hyperpool's own
per-transaction work (relay scans, renaming, pool take/release, bookkeeping), which the socket
benchmark (compare.py) cannot separate from system calls and the noise of a shared machine.
Prints microseconds per transaction for the simple, extended and prepared protocols: with the query
cache off (the forwarding path), and answered from the cache (every transaction a hit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperpool.caching import Classifier
from hyperpool.config import parse_config
from hyperpool.server import ServerState
from hyperpool.session import ClientSession, Phase
from hyperpool.sql.catalog import Catalog, Operator, Relation
from hyperpool.upstream import ServerConnection

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


ROW = (msg(b"T", struct.pack("!h", 1) + cstr("abalance") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
       + msg(b"D", struct.pack("!hi", 1, 1) + b"0"))
DONE = msg(b"C", cstr("SELECT 1")) + msg(b"Z", b"I")


def bind(statement: str, aid: int) -> bytes:
    value = str(aid).encode()
    return msg(b"B", b"\0" + cstr(statement) + struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0))


EXECUTE = msg(b"E", b"\0" + struct.pack("!i", 0))
DESCRIBE_PORTAL = msg(b"D", b"P\0")
SYNC = msg(b"S")


def client_bytes(mode: str, aid: int) -> bytes:
    if mode == "simple":
        return msg(b"Q", cstr(SQL.replace("$1", str(aid))))
    if mode == "extended":
        return msg(b"P", b"\0" + cstr(SQL) + struct.pack("!h", 0)) + bind("", aid) + DESCRIBE_PORTAL + EXECUTE + SYNC
    return bind("P_1", aid) + DESCRIBE_PORTAL + EXECUTE + SYNC


def answer(mode: str, data: bytes) -> bytes:
    """What PostgreSQL answers to the requests in ``data``."""
    if mode == "prepared" and data[:1] == b"P":  # the prepare (under hyperpool's name for P_1)
        return msg(b"1") + msg(b"Z", b"I")
    if mode == "simple":
        return ROW + DONE
    return (msg(b"1") if mode == "extended" else b"") + msg(b"2") + ROW + DONE


class Transport(asyncio.Transport):
    def __init__(self, on_write: Any) -> None:
        super().__init__()
        self.on_write = on_write
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.on_write(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(mode: str, transactions: int, cache: bool) -> float:
    config = parse_config({"users": {"app": {"password": "x"}},
                           "databases": {"appdb": {"host": "127.0.0.1", "port": 5432, "user": "app",
                                                     "pool_size": 1, "cache": {"enabled": cache}}}}, os.environ)
    state = ServerState(config)
    database = state.databases["appdb"]
    if cache:  # the catalog hyperpool would read: the table is a plain one
        accounts = Relation("public", "pgbench_accounts", "r", "p")
        database.catalog = Catalog(relations={accounts.qualified: accounts}, schemas=frozenset({"public"}),
                                   operators={"=": (Operator("pg_catalog", "i"),)})
        database.classifier = Classifier(database.catalog, "app", '"$user", public')
    server = ServerConnection(database.config)
    server._setup = None  # logged in
    server.connection_made(Transport(lambda data: server.data_received(answer(mode, data))))
    database.pool.idle.append(server)
    session = ClientSession(state)
    session.transport = Transport(lambda data: None)
    session.database = database
    session._start_relay()
    assert session.phase is Phase.READY
    if mode == "prepared":
        session.data_received(msg(b"P", cstr("P_1") + cstr(SQL) + struct.pack("!h", 0)) + SYNC)
    chunks = [client_bytes(mode, aid) for aid in range(1, 1001)]
    started = time.perf_counter()
    for i in range(transactions):
        session.data_received(chunks[i % 1000])
    elapsed = time.perf_counter() - started
    assert session.server is None and server in database.pool.idle, "the server was not released"
    if cache:
        assert database.cache is not None and database.cache.stats.hits >= transactions - 1000, "no cache hits"
    return elapsed / transactions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=50000)
    args = parser.parse_args()
    for cache in (False, True):
        for mode in ("simple", "extended", "prepared"):
            cost = asyncio.run(run(mode, args.transactions, cache))
            what = "answered from the cache" if cache else "forwarded (cache off)"
            print(f"-M {mode:9s} {cost:6.1f} us of Python per transaction, {what}")


if __name__ == "__main__":
    main()
