"""The canary split and the preview token, as pure functions: shares, stickiness, seeds,
client keys behind proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from switcher.model import CANARY_BUCKETS, Canary, Color
from switcher.router.split import TOKEN, Preview, Split, bucket, client_key, seed_key

CLIENTS = [f"10.{i // 250}.{i % 250}.7".encode() for i in range(4000)]


def on_canary(percent: int, seed: str = "deploy-1") -> set[bytes]:
    split = Split(Canary(Color.green, percent, 1, seed), "green")
    return {c for c in CLIENTS if split.takes(c)}


def test_each_share_takes_that_share_of_clients() -> None:
    for percent in (1, 5, 10, 25, 50, 99):
        share = 100 * len(on_canary(percent)) / len(CLIENTS)
        assert abs(share - percent) < 2.5, (percent, share)


def test_a_client_that_moved_stays_moved_as_the_share_grows() -> None:
    steps = [on_canary(p) for p in (5, 25, 50)]
    assert steps[0] < steps[1] < steps[2]  # strictly: each step moved more clients


def test_another_seed_moves_another_first_share() -> None:
    first, second = on_canary(10, "deploy-1"), on_canary(10, "deploy-2")
    overlap = len(first & second) / len(first)
    assert overlap < 0.25, overlap  # independent draws: about 10 % in common


def test_buckets_are_stable_and_in_range() -> None:
    key = seed_key("d")
    assert bucket(key, b"1.2.3.4") == bucket(seed_key("d"), b"1.2.3.4")
    assert all(0 <= bucket(key, c) < CANARY_BUCKETS for c in CLIENTS[:500])
    assert len(seed_key("x" * 500)) == 32  # a seed longer than blake2b's key limit


def trusts(*networks: str) -> Callable[[str], bool]:
    nets = [ipaddress.ip_network(n) for n in networks]

    def check(host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in n for n in nets)
    return check


def test_client_key_is_the_peer_without_forwarded_hops() -> None:
    assert client_key("127.0.0.9", None, trusts("127.0.0.0/8")) == b"127.0.0.9"


def test_client_key_is_the_rightmost_hop_no_trusted_proxy_wrote() -> None:
    check = trusts("127.0.0.0/8", "10.9.0.0/16")
    assert client_key("127.0.0.1", b"6.6.6.6, 1.1.1.1, 10.9.0.5", check) == b"1.1.1.1"
    assert client_key("127.0.0.1", b"1.1.1.1:5555,10.9.0.5:80", check) == b"1.1.1.1:5555"
    assert client_key("127.0.0.1", b"[2001:db8::1]:443", check) == b"[2001:db8::1]:443"


def test_client_key_is_the_leftmost_hop_when_every_hop_is_trusted() -> None:
    check = trusts("127.0.0.0/8", "10.9.0.0/16")
    assert client_key("127.0.0.1", b"10.9.0.1, 10.9.0.5", check) == b"10.9.0.1"
    assert client_key("127.0.0.1", b"[10.9.0.1]:1, 10.9.0.5:2", check) == b"[10.9.0.1]:1"


def test_a_hop_that_is_no_address_is_the_clients_own_claim() -> None:
    check = trusts("127.0.0.0/8")
    assert client_key("127.0.0.1", b"unknown, 127.0.0.2", check) == b"unknown"


def test_preview_matches_only_its_token_and_never_shows_it() -> None:
    token = "A" * 20 + "-_9"
    assert TOKEN.fullmatch(token)
    preview = Preview(token, "green")
    assert preview.matches(token.encode())
    assert preview.matches(b" " + token.encode() + b" ")  # the value as llhttp hands it
    assert not preview.matches(token.encode()[:-1])
    assert not preview.matches(b"")
    assert not preview.matches(None)
    assert token not in repr(preview)
    for bad in ("short", "x" * 129, "A" * 20 + "!", "A" * 20 + "\n"):
        assert TOKEN.fullmatch(bad) is None, bad
