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


def _ipv4_as_int(field: str) -> pl.Expr:
    octets = pl.col(field).str.split_exact(".", 3)
    return (
        octets.struct.field("field_0").cast(pl.UInt32, strict=False) * (1 << 24)
        + octets.struct.field("field_1").cast(pl.UInt32, strict=False) * (1 << 16)
        + octets.struct.field("field_2").cast(pl.UInt32, strict=False) * (1 << 8)
        + octets.struct.field("field_3").cast(pl.UInt32, strict=False)
    )


def blocked_mask(events: pl.DataFrame, rules: NetworkRules, field: str = "ip_address") -> pl.Series:
    """True for events whose address in `field` lies in one of the rule networks (addresses are pre-validated)."""
    is_v6 = events[field].str.contains(":").fill_null(False)
    blocked = pl.Series("blocked", [False] * events.height, dtype=pl.Boolean)
    if rules.ipv4:
        as_int = events.select(pl.when(~is_v6).then(_ipv4_as_int(field)).cast(pl.UInt32)).to_series()
        for network in rules.ipv4:
            mask = int(network.netmask)
            in_network = ((as_int.cast(pl.Int64) & mask) == int(network.network_address)).fill_null(False)
            blocked = blocked | in_network
    if is_v6.any() and (rules.ipv6 or rules.ipv4):
        v6_addresses = events[field].filter(is_v6).unique().to_list()
        blocked_v6 = [address for address in v6_addresses if rules.blocks_ipv6(address)]
        if blocked_v6:
            blocked = blocked | events[field].is_in(blocked_v6).fill_null(False)
    return blocked.alias("blocked")


def dropped_mask(events: pl.DataFrame, rules: Filter) -> pl.Series:
    """True for events a network rule or a `drop_when` condition drops (a NULL condition drops nothing)."""
    dropped = pl.Series("dropped", [False] * events.height, dtype=pl.Boolean)
    for rule in rules.drop_networks:
        dropped = dropped | blocked_mask(events, NetworkRules.parse(rule.cidrs), rule.field)
    if rules.drop_when:
        conditions = pl.any_horizontal([sql_expression(sql).fill_null(False) for sql in rules.drop_when])
        dropped = dropped | events.select(conditions).to_series()
    return dropped.alias("dropped")
