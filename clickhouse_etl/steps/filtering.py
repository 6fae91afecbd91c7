"""Filter: drop events from configured networks (IPv4 and IPv6 CIDRs) or matching SQL conditions, vectorized."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import polars as pl

from clickhouse_etl.core.pipeline.columns import sql_expression
from clickhouse_etl.core.pipeline.model import Filter


@dataclass(frozen=True)
class NetworkRules:
    ipv4: tuple[ipaddress.IPv4Network, ...]
    ipv6: tuple[ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, cidrs: list[str]) -> NetworkRules:
        networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
        return cls(
            ipv4=tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network)),
            ipv6=tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network)),
        )

    def blocks_ipv6(self, address: str) -> bool:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address))
        if value >> 32 == 0xFFFF:  # IPv4-mapped (::ffff:a.b.c.d): the IPv4 rules apply
            mapped = value & 0xFFFF_FFFF
            if any(mapped & int(n.netmask) == int(n.network_address) for n in self.ipv4):
                return True
        return any(value & int(n.netmask) == int(n.network_address) for n in self.ipv6)


def _ipv4_alternatives(network: ipaddress.IPv4Network) -> list[str]:
    """Regex alternatives matching the canonical dotted quads of `network` from their start: its whole octets as
    text, then each value its partial octet may take (at most 128)."""
    octets = str(network.network_address).split(".")
    whole, partial_bits = divmod(network.prefixlen, 8)
    head = "".join(f"{octet}\\." for octet in octets[:whole])
    if whole == 4:
        return [head.removesuffix("\\.") + "$"]
    if partial_bits == 0:
        return [head]
    first = int(octets[whole])
    end = "\\." if whole < 3 else "$"
    return [f"{head}{value}{end}" for value in range(first, first + 2 ** (8 - partial_bits))]


def ipv4_pattern(networks: tuple[ipaddress.IPv4Network, ...]) -> str:
    """A regex true for canonical dotted quads (no leading zeros, as decode accepts them) in any of `networks`:
    one pass of text matching instead of parsing four octets per address."""
    return "^(?:" + "|".join(alternative for network in networks for alternative in _ipv4_alternatives(network)) + ")"


def blocked_mask(events: pl.DataFrame, rules: NetworkRules, field: str = "ip_address") -> pl.Series:
    """True for events whose address in `field` lies in one of the rule networks (addresses validated by decode)."""
    addresses = events[field]
    is_v6 = addresses.str.contains(":").fill_null(False)
    blocked = pl.repeat(False, events.height, dtype=pl.Boolean, eager=True)
    if rules.ipv4:
        blocked = addresses.str.contains(ipv4_pattern(rules.ipv4)).fill_null(False) & ~is_v6
    # IPv6 addresses go through the C library's parser, once per distinct address. With IPv4 rules alone, only
    # IPv4-mapped ones (::ffff:a.b.c.d) can match, and their text always holds the group ffff.
    v6 = addresses.filter(is_v6)
    if not rules.ipv6:
        v6 = v6.filter(v6.str.contains("(?i)ffff")) if rules.ipv4 else v6.clear()
    blocked_v6 = [address for address in v6.unique().to_list() if rules.blocks_ipv6(address)]
    if blocked_v6:
        blocked = blocked | addresses.is_in(blocked_v6).fill_null(False)
    return blocked.alias("blocked")


def dropped_mask(events: pl.DataFrame, rules: Filter) -> pl.Series:
    """True for events a network rule or a `drop_when` condition drops (a NULL condition drops nothing)."""
    dropped = pl.repeat(False, events.height, dtype=pl.Boolean, eager=True)
    for rule in rules.drop_networks:
        dropped = dropped | blocked_mask(events, NetworkRules.parse(rule.cidrs), rule.field)
    if rules.drop_when:
        conditions = pl.any_horizontal([sql_expression(sql).fill_null(False) for sql in rules.drop_when])
        dropped = dropped | events.select(conditions).to_series()
    return dropped.alias("dropped")
