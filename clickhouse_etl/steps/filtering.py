"""Filter: drop clicks from configured networks (IPv4 and IPv6 CIDRs), matched vectorized."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import polars as pl


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


def _ipv4_as_int() -> pl.Expr:
    octets = pl.col("ip_address").str.split_exact(".", 3)
    return (
        octets.struct.field("field_0").cast(pl.UInt32, strict=False) * (1 << 24)
        + octets.struct.field("field_1").cast(pl.UInt32, strict=False) * (1 << 16)
        + octets.struct.field("field_2").cast(pl.UInt32, strict=False) * (1 << 8)
        + octets.struct.field("field_3").cast(pl.UInt32, strict=False)
    )


def blocked_mask(events: pl.DataFrame, rules: NetworkRules) -> pl.Series:
    """True for events whose ip_address lies in one of the rule networks (addresses are pre-validated)."""
    is_v6 = events["ip_address"].str.contains(":")
    blocked = pl.Series("blocked", [False] * events.height, dtype=pl.Boolean)
    if rules.ipv4:
        as_int = events.select(pl.when(~is_v6).then(_ipv4_as_int()).cast(pl.UInt32)).to_series()
        for network in rules.ipv4:
            mask = int(network.netmask)
            in_network = ((as_int.cast(pl.Int64) & mask) == int(network.network_address)).fill_null(False)
            blocked = blocked | in_network
    if is_v6.any() and (rules.ipv6 or rules.ipv4):
        v6_addresses = events["ip_address"].filter(is_v6).unique().to_list()
        blocked_v6 = [address for address in v6_addresses if rules.blocks_ipv6(address)]
        if blocked_v6:
            blocked = blocked | events["ip_address"].is_in(blocked_v6)
    return blocked.alias("blocked")
