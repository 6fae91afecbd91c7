"""Unit tests of clickhouse_etl.steps.filtering, checked against Python's ipaddress module."""

from __future__ import annotations

import ipaddress
import random

import polars as pl
import pytest

from clickhouse_etl.steps.filtering import NetworkRules, blocked_mask


def frame(addresses: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"ip_address": addresses}, schema={"ip_address": pl.String})


def blocked(addresses: list[str], cidrs: list[str]) -> list[bool]:
    mask = blocked_mask(frame(addresses), NetworkRules.parse(cidrs))
    assert mask.dtype == pl.Boolean
    assert mask.len() == len(addresses)
    assert mask.null_count() == 0
    return mask.to_list()


def reference(address: str, cidrs: list[str]) -> bool:
    ip = ipaddress.ip_address(address)
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if mapped is not None and any(mapped in n for n in networks if n.version == 4):
        return True
    return any(ip in n for n in networks if n.version == ip.version)


def test_parse_splits_ipv4_and_ipv6_and_is_not_strict():
    rules = NetworkRules.parse(["10.0.0.0/8", "2001:db8::/32", "192.168.1.77/24"])
    assert rules.ipv4 == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24"))
    assert rules.ipv6 == (ipaddress.ip_network("2001:db8::/32"),)


def test_parse_rejects_malformed_cidr():
    with pytest.raises(ValueError):
        NetworkRules.parse(["10.0.0.0/33"])


def test_default_network():
    addresses = ["192.168.1.0", "192.168.1.255", "192.168.1.42", "192.168.2.1", "192.168.10.1", "192.168.0.255"]
    assert blocked(addresses, ["192.168.1.0/24"]) == [True, True, True, False, False, False]


def test_several_ipv4_networks_including_host_and_everything():
    addresses = ["10.1.2.3", "172.16.0.1", "172.32.0.1", "8.8.8.8", "8.8.8.9", "1.1.1.1"]
    assert blocked(addresses, ["10.0.0.0/8", "172.16.0.0/12", "8.8.8.8/32"]) == [
        True,
        True,
        False,
        True,
        False,
        False,
    ]
    assert blocked([*addresses, "255.255.255.255", "0.0.0.0"], ["0.0.0.0/0"]) == [True] * 8


def test_ipv4_everything_rule_blocks_ipv4_mapped_but_not_plain_ipv6():
    assert blocked(["::ffff:8.8.8.8", "2001:db8::1", "::1"], ["0.0.0.0/0"]) == [True, False, False]


def test_ipv6_network():
    addresses = ["2001:db8::1", "2001:db8:ffff:ffff::1", "2001:db9::1", "2001:db7::1", "::1", "10.0.0.1"]
    assert blocked(addresses, ["2001:db8::/32"]) == [True, True, False, False, False, False]


def test_ipv6_written_in_different_forms():
    addresses = ["2001:0db8:0000:0000:0000:0000:0000:0001", "2001:DB8::1", "2001:db8:0:0::1"]
    assert blocked(addresses, ["2001:db8::1/128"]) == [True, True, True]


def test_ipv4_mapped_ipv6_is_blocked_by_the_ipv4_rule():
    addresses = ["::ffff:192.168.1.7", "::ffff:192.168.2.7", "::ffff:c0a8:107", "192.168.1.7"]
    assert blocked(addresses, ["192.168.1.0/24"]) == [True, False, True, True]


def test_no_rules_block_nothing():
    addresses = ["192.168.1.1", "2001:db8::1", "::ffff:192.168.1.7", "0.0.0.0"]
    assert blocked(addresses, []) == [False] * 4


def test_empty_events():
    assert blocked([], ["192.168.1.0/24", "2001:db8::/32"]) == []


def test_duplicates_are_all_blocked():
    addresses = ["2001:db8::5", "192.168.1.9", "2001:db8::5", "192.168.1.9", "1.2.3.4"]
    assert blocked(addresses, ["192.168.1.0/24", "2001:db8::/32"]) == [True, True, True, True, False]


def random_address(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    if kind < 0.55:  # near the interesting networks
        return f"{rng.choice(['10', '172', '192'])}.{rng.choice([16, 31, 168, 0, 255])}.{rng.randrange(3)}." + str(
            rng.randrange(256)
        )
    if kind < 0.70:
        return f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}"
    if kind < 0.85:
        prefix = rng.choice([0x20010DB8, 0x20010DB9, 0xFE800000, 0x20010DB8])
        return str(ipaddress.IPv6Address((prefix << 96) | rng.getrandbits(96)))
    return str(ipaddress.IPv6Address(rng.getrandbits(128)))


@pytest.mark.parametrize(
    "cidrs",
    [
        ["192.168.1.0/24"],
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "8.8.8.8/32"],
        ["2001:db8::/32", "fe80::/10"],
        ["192.168.1.0/24", "2001:db8::/32", "100.64.0.0/10", "::ffff:0:0/96"],
        ["0.0.0.0/1"],
        ["128.0.0.0/1", "::/1"],
        ["0.0.0.0/0"],
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_python_ipaddress_on_random_addresses(cidrs, seed):
    rng = random.Random(seed * 1_000 + len(cidrs))
    addresses = [random_address(rng) for _ in range(400)]
    expected = [reference(a, cidrs) for a in addresses]
    assert blocked(addresses, cidrs) == expected
    assert any(expected) and not all(expected)  # the sample exercises both outcomes


@pytest.mark.parametrize("prefix_length", range(33))
def test_ipv4_networks_of_every_prefix_length_match_as_text(prefix_length):
    rng = random.Random(prefix_length)
    network = ipaddress.IPv4Network((rng.getrandbits(32), prefix_length), strict=False)
    inside = [network.network_address + rng.randrange(network.num_addresses) for _ in range(200)]
    near = [ipaddress.IPv4Address((int(network.network_address) + d) % 2**32) for d in (-1, network.num_addresses)]
    addresses = [str(a) for a in inside + near] + [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(200)]
    addresses += [f"::ffff:{a}" for a in addresses[:50]] + [f"::FFFF:{a}" for a in addresses[-50:]]
    cidrs = [str(network)]
    assert blocked(addresses, cidrs) == [reference(a, cidrs) for a in addresses]
