"""Raw RESP on one socket: a stream of commands sent while hiredis parses the replies, and what a reply means.

Claims are sent this way instead of through redis-py's pipeline so that no Python object is made per
command: the commands of a whole batch are built column-wise by polars (see clickhouse_etl.clients.claims),
and only the replies cross into Python, read in bulk.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

import hiredis
import polars as pl

# A Redis that does not answer for this long within one exchange is treated as gone (and retried).
SOCKET_TIMEOUT_SECONDS = 30.0

# Replies that say "not now" rather than "no": Redis is loading its dataset (a restart), a replica was asked
# while the primary is away, a cluster is reconfiguring. Anything else (OOM, NOPERM, WRONGTYPE…) is final.
TRANSIENT_ERRORS = frozenset({"LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN"})


class ClaimsUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error: the claims are not known (fail closed)."""


class TransientRedisError(ClaimsUnavailable):
    """An outage that usually ends by itself (a restart, a failover): worth waiting for, within a bound."""


def error_code(reply: hiredis.ReplyError | str) -> str:
    """The first word of an error reply: `MOVED`, `ASK`, `LOADING`, `OOM`…"""
    return str(reply).split(" ", 1)[0]


def raise_for_error(reply: hiredis.ReplyError, where: str) -> None:
    """Raise the error reply as a transient outage or as a final failure, by its code."""
    kind = TransientRedisError if error_code(reply) in TRANSIENT_ERRORS else ClaimsUnavailable
    raise kind(f"Redis {where} answered an error: {reply}")


def bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*parts: str) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(bulk(part) for part in parts)


@dataclass(frozen=True)
class RedisAddress:
    """Where one Redis server listens and how to log in to it."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    unix_path: str | None = None

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

    def at(self, host: str, port: int) -> RedisAddress:
        """Another server with the same credentials and TLS (a node of the same cluster)."""
        return replace(self, host=host, port=port, db=0, unix_path=None)

    @property
    def label(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


class RespConnection:
    """One connection that streams commands and reads their replies."""

    def __init__(self, address: RedisAddress, timeout: float = SOCKET_TIMEOUT_SECONDS) -> None:
        self.address = address
        try:
            if address.unix_path:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(address.unix_path)
            else:
                self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if address.tls:
                    self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=address.host)
        except OSError as error:
            # Refused or timed out: a Redis restarting or failing over looks exactly like this for a moment.
            raise TransientRedisError(f"Redis at {address.label} is unreachable: {error}") from error
        setup = []
        if address.password:
            setup.append(command("AUTH", *([address.username] if address.username else []), address.password))
        if address.db:
            setup.append(command("SELECT", str(address.db)))
        if setup:
            for reply in self.exchange(b"".join(setup), len(setup)):
                if isinstance(reply, hiredis.ReplyError):
                    self.close()
                    raise_for_error(reply, f"at {address.label} refused the connection set-up:")
                if reply != b"OK":
                    self.close()
                    raise ClaimsUnavailable(f"Redis at {address.label} refused the connection set-up: {reply!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RespConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def exchange(self, commands: bytes | Iterable[bytes], expected: int) -> list:
        """Send the commands (bytes, or chunks built lazily while sending) and read `expected` replies.

        Error replies come back in place as `hiredis.ReplyError` values: in a cluster some keys of a stream
        may be redirected while the others are claimed. Losing the connection raises TransientRedisError.
        """
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
        replies: list = []
        try:
            while len(replies) < expected:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise TransientRedisError(f"Redis at {self.address.label} closed the connection")
                reader.feed(data)
                # Every complete reply at once, without a Python statement per reply.
                replies.extend(iter(reader.gets, False))
        except OSError as error:
            raise TransientRedisError(f"Redis at {self.address.label} failed during the claims: {error}") from error
        finally:
            if send_error or len(replies) < expected:
                self.close()  # unblocks a sender stuck on a full socket buffer
            sender.join(timeout=5)
        if send_error:
            raise TransientRedisError(f"sending claims to Redis at {self.address.label} failed: {send_error[0]}")
        return replies


def owners_of(replies: list) -> tuple[pl.Series, list[tuple[int, hiredis.ReplyError]]]:
    """The replies of `SET … GET` as a Binary series, and the error replies among them with their index.

    Errors are rare, so they are looked for only when the series cannot be built: the common case does no
    Python work per reply. Where an error was, the series holds null.
    """
    try:
        return pl.Series("owner", replies, dtype=pl.Binary), []
    except (TypeError, ValueError):
        errors = [(i, reply) for i, reply in enumerate(replies) if isinstance(reply, hiredis.ReplyError)]
        if not errors:
            raise ClaimsUnavailable(f"Redis answered something else than a claim: {replies[:3]!r}…") from None
        cleaned = list(replies)
        for i, _ in errors:
            cleaned[i] = None
        return pl.Series("owner", cleaned, dtype=pl.Binary), errors


@dataclass
class Patience:
    """How long one claim call waits out a transient outage before it gives up and fails closed.

    Backoff doubles from 50 ms to 2 s (with jitter, so workers do not come back in step): a Redis that is
    back within a second costs about that second, one that loads its dataset for a minute is polled
    every 2 s.
    """

    wait_seconds: float
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0

    def pause(self, error: Exception) -> None:
        """Sleep before the next attempt, or raise ClaimsUnavailable once the wait is used up."""
        remaining = self.started + self.wait_seconds - time.monotonic()
        if remaining <= 0:
            raise ClaimsUnavailable(
                f"Redis claims still unavailable after {self.wait_seconds:g} s ({self.attempts + 1} attempts): {error}"
            ) from error
        delay = min(2.0, 0.05 * 2**self.attempts) * random.uniform(0.8, 1.2)
        self.attempts += 1
        time.sleep(min(delay, remaining))
