"""An https:// ClickHouse DSN speaks TLS on any port (the client alone would decide by port number)."""

from __future__ import annotations

import socket
import threading

import pytest

from clickhouse_etl.clients.clickhouse import ClickHouseUnavailable, clickhouse_session

TLS_HANDSHAKE = 0x16


def first_byte_sent(dsn_scheme: str) -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def accept() -> None:
        connection, _ = listener.accept()
        listener.close()  # later attempts are refused, so the session gives up after its timeout
        with connection:
            received.append(connection.recv(1))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    with pytest.raises(ClickHouseUnavailable), clickhouse_session(f"{dsn_scheme}://user@127.0.0.1:{port}/", 1.0):
        pass
    thread.join(10)
    return received[0][0]


def test_https_dsn_on_a_non_tls_port_number_still_speaks_tls() -> None:
    assert first_byte_sent("https") == TLS_HANDSHAKE


def test_http_dsn_speaks_plain_http() -> None:
    assert first_byte_sent("http") != TLS_HANDSHAKE
