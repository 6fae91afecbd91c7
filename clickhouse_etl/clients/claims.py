"""Redis claims of dedup keys, pipelined as raw RESP: `SET <key> <position> NX GET EX <ttl>` per key.

The commands of a whole batch are built column-wise with polars and streamed on one connection while the
replies are parsed by hiredis, so Python does no per-id work and Redis does one plain SET per id (no script).
Every key is a separate command, so the same stream works against any single Redis node.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import hiredis
import polars as pl

CHUNK = 100_000


class ClaimsUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error: the claims are not known (fail closed)."""


def _bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _command(*parts: str) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


def claim_commands(keys: pl.Series, positions: pl.Series, ttl_seconds: int) -> bytes:
    """The RESP bytes of `SET key position NX GET EX ttl` for every (key, position)."""
    tail = f"\r\n$2\r\nNX\r\n$3\r\nGET\r\n$2\r\nEX\r\n${len(str(ttl_seconds))}\r\n{ttl_seconds}\r\n"
    frame = pl.DataFrame({"key": keys, "position": positions})
    commands = frame.select(
        pl.concat_str(
            [
                pl.lit("*7\r\n$3\r\nSET\r\n$"),
                pl.col("key").str.len_bytes().cast(pl.String),
                pl.lit("\r\n"),
                pl.col("key"),
                pl.lit("\r\n$"),
                pl.col("position").str.len_bytes().cast(pl.String),
                pl.lit("\r\n"),
                pl.col("position"),
                pl.lit(tail),
            ]
        ).str.join("")
    ).item()
    return commands.encode() if commands else b""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    unix_path: str | None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        db = int(parts.path.lstrip("/") or 0) if parts.scheme != "unix" else 0
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
            unix_path=parts.path if parts.scheme == "unix" else None,
        )


class ClaimConnection:
    """One connection that streams claim commands and reads their replies."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        address = RedisAddress.parse(url)
        try:
            if address.unix_path:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(address.unix_path)
            else:
                self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
                if address.tls:
                    self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=address.host)
        except OSError as error:
            raise ClaimsUnavailable(f"Redis at {address.host}:{address.port} is unreachable: {error}") from error
        setup = []
        if address.password:
            setup.append(_command("AUTH", *([address.username] if address.username else []), address.password))
        if address.db:
            setup.append(_command("SELECT", str(address.db)))
        if setup:
            for reply in self.exchange(b"".join(setup), len(setup)):
                if reply != b"OK":
                    raise ClaimsUnavailable(f"Redis refused the connection set-up: {reply!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ClaimConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def exchange(self, commands: bytes | Iterable[bytes], expected: int) -> list[bytes | None]:
        """Send the commands (bytes, or chunks built lazily while sending) and read `expected` replies."""
        chunks = [commands] if isinstance(commands, bytes) else commands
        send_error: list[BaseException] = []

        def send() -> None:
            try:
                for chunk in chunks:
                    self.sock.sendall(chunk)
            except BaseException as error:  # surfaced by the reader below
                send_error.append(error)

        # Replies are read while commands are still being sent, so neither side's buffer fills up.
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reader = hiredis.Reader()
        replies: list[bytes | None] = []
        try:
            while len(replies) < expected:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ClaimsUnavailable("Redis closed the connection during the claims")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise ClaimsUnavailable(f"Redis answered an error: {reply}")
                    replies.append(reply)
        except OSError as error:
            raise ClaimsUnavailable(f"Redis failed during the claims: {error}") from error
        finally:
            sender.join(timeout=5)
        if send_error:
            raise ClaimsUnavailable(f"sending claims to Redis failed: {send_error[0]}")
        return replies


def claim(url: str, keys: pl.Series, positions: pl.Series, ttl_seconds: int) -> pl.Series:
    """The previous owner of each key (null where this call made the claim)."""
    if keys.len() == 0:
        return pl.Series("owner", [], dtype=pl.String)
    chunks = (
        claim_commands(keys.slice(first, CHUNK), positions.slice(first, CHUNK), ttl_seconds)
        for first in range(0, keys.len(), CHUNK)
    )
    with ClaimConnection(url) as connection:
        replies = connection.exchange(chunks, keys.len())
    return pl.Series("owner", replies, dtype=pl.Binary).cast(pl.String)
