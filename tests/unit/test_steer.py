"""The sk_lookup program and its maps, loaded for real, each test in a fresh network namespace
(the program is attached to a namespace: on the host's it would steer the host's ports)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest

from switcher.errors import SteerError
from switcher.model import Color
from switcher.router import steer
from tests.netns import Netns, linked

# A fresh namespace has every port free: fixed ports cannot collide with anything.
PUBLIC, BLUE, GREEN = 20100, 20101, 20102
LOOPBACK = steer.Target(socket.AF_INET, PUBLIC, "127.0.0.1")


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns("steer")
    yield ns
    ns.delete()


def listen(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    sock.settimeout(2)
    return sock


def arrival(listeners: dict[str, socket.socket], address: tuple[str, int]) -> str:
    """Connect to ``address``; the name of the listener whose queue the connection reached."""
    with socket.create_connection(address, timeout=2):
        pass
    for name, sock in listeners.items():
        sock.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            sock.accept()[0].close()
            return name
    raise AssertionError("the connection reached none of the listeners")


@contextlib.contextmanager
def three() -> Iterator[dict[str, socket.socket]]:
    socks = {"public": listen(PUBLIC), "blue": listen(BLUE), "green": listen(GREEN)}
    try:
        yield socks
    finally:
        for sock in socks.values():
            sock.close()


@contextlib.contextmanager
def steering(socks: dict[str, socket.socket],
             target: steer.Target = LOOPBACK) -> Iterator[steer.Steering]:
    s = steer.Steering(target)
    try:
        s.insert(Color.blue, socks["blue"])
        s.insert(Color.green, socks["green"])
        yield s
    finally:
        s.close()


# -- pure --------------------------------------------------------------------------------------

def test_assemble_resolves_the_label_to_an_offset() -> None:
    code = steer.assemble([steer.skip_if_zero(0), steer.mov_imm(0, 2), steer.OUT,
                           steer.exit_()])
    assert struct.unpack("<BBhi", code[:8]) == (0x15, 0, 1, 0)
    assert len(code) == 24


def test_an_address_above_2_31_is_compared_as_32_bits() -> None:
    insn = steer.skip_unless_word(2, 0xFF00007F)
    assert insn.code == 0x56 and insn.imm == 0xFF00007F - (1 << 32)


def test_target_never_widens_what_the_color_accepts() -> None:
    assert steer.target("0.0.0.0", 9000, "127.0.0.1") == steer.Target(
        socket.AF_INET, 9000, "127.0.0.1")
    assert steer.target("10.0.0.1", 9000, "127.0.0.1") is None
    assert steer.target("10.0.0.1", 9000, "0.0.0.0") == steer.Target(
        socket.AF_INET, 9000, "10.0.0.1")
    assert steer.target("", 9000, "0.0.0.0") == steer.Target(socket.AF_INET, 9000, None)
    assert steer.target("[::1]", 9000, "::1") == steer.Target(socket.AF_INET6, 9000, "::1")
    assert steer.target("::1", 9000, "127.0.0.1") is None


def test_the_address_is_compared_as_the_context_holds_it() -> None:
    assert LOOPBACK.words() == [int.from_bytes(bytes([127, 0, 0, 1]), "little")]
    assert len(steer.Target(socket.AF_INET6, 1, "::1").words()) == 4


# -- loaded ------------------------------------------------------------------------------------

def _steers_to_each_color() -> list[str]:
    with three() as socks, steering(socks) as s:
        seen = []
        for color in (Color.green, Color.blue):
            s.select(color)
            seen.append(arrival(socks, ("127.0.0.1", PUBLIC)))
        return seen


def test_each_color_in_turn_by_one_update(netns: Netns) -> None:
    assert netns.run(_steers_to_each_color) == ["green", "blue"]


def _nothing_selected() -> str:
    with three() as socks, steering(socks):
        return arrival(socks, ("127.0.0.1", PUBLIC))


def test_nothing_selected_leaves_the_public_socket(netns: Netns) -> None:
    assert netns.run(_nothing_selected) == "public"


def _after_close() -> tuple[str, str]:
    with three() as socks:
        with steering(socks) as s:
            s.select(Color.green)
            steered = arrival(socks, ("127.0.0.1", PUBLIC))
        return steered, arrival(socks, ("127.0.0.1", PUBLIC))


def test_closing_the_link_sends_connections_to_the_public_socket(netns: Netns) -> None:
    assert netns.run(_after_close) == ("green", "public")


def _other_port() -> str:
    with three() as socks, listen(PUBLIC + 10) as other, steering(socks) as s:
        s.select(Color.green)
        return arrival({**socks, "other": other}, ("127.0.0.1", PUBLIC + 10))


def test_another_port_is_not_steered(netns: Netns) -> None:
    assert netns.run(_other_port) == "other"


def _other_local_address() -> str:
    with (listen(PUBLIC, "0.0.0.0") as public, listen(BLUE) as blue,
          listen(GREEN) as green):
        socks = {"public": public, "blue": blue, "green": green}
        with steering(socks) as s:
            s.select(Color.green)
            return arrival(socks, ("127.0.0.2", PUBLIC))  # not the target's 127.0.0.1


def test_another_local_address_is_not_steered(netns: Netns) -> None:
    assert netns.run(_other_local_address) == "public"


def _counted() -> tuple[dict[Color, int], bool, bool]:
    with three() as socks, steering(socks) as s:
        unsteered = asyncio.run(s.probe())
        s.select(Color.green)
        for _ in range(3):
            arrival(socks, ("127.0.0.1", PUBLIC))
        steered = asyncio.run(s.probe())
        return s.steered(), unsteered, steered


def test_the_program_counts_what_it_steered_and_the_probe_measures_it(netns: Netns) -> None:
    counts, unsteered, steered = netns.run(_counted)
    assert counts == {Color.blue: 0, Color.green: 4}  # three and the probe
    assert (unsteered, steered) == (False, True)


def _second_program() -> tuple[bool, bool, str]:
    with three() as socks, steering(socks) as first, steering(socks) as second:
        first.select(Color.blue)
        second.select(Color.green)
        return (asyncio.run(first.probe()), asyncio.run(second.probe()),
                arrival(socks, ("127.0.0.1", PUBLIC)))


def test_a_second_program_for_the_same_port_is_ignored_and_its_probe_says_so(
        netns: Netns) -> None:
    assert netns.run(_second_program) == (True, False, "blue")


def _dead_listener(keep_copy: bool) -> tuple[str, bool]:
    """The green app's listener dies; whether its port can be bound again, and where a new
    connection goes."""
    with listen(PUBLIC) as public, listen(BLUE) as blue:
        green = listen(GREEN)
        copy = green.dup() if keep_copy else None
        try:
            with steering({"blue": blue, "green": green}) as s:
                s.select(Color.green)
                green.close()  # the app exits: only a copy would keep the socket alive
                rebound = True
                try:
                    listen(GREEN).close()
                except OSError:
                    rebound = False
                socks = {"public": public, **({"green": copy} if copy else {})}
                return arrival(socks, ("127.0.0.1", PUBLIC)), rebound
        finally:
            if copy is not None:
                copy.close()


def test_a_dead_listener_leaves_the_map_and_its_port_is_free(netns: Netns) -> None:
    assert netns.run(_dead_listener, False) == ("public", True)


def test_negative_control_a_held_copy_keeps_a_dead_colors_port(netns: Netns) -> None:
    assert netns.run(_dead_listener, True) == ("green", False)


def _from_outside(client: Netns, color_host: str, address: str) -> str:
    with (listen(PUBLIC, "0.0.0.0") as public, listen(BLUE, color_host) as blue,
          listen(GREEN, color_host) as green):
        socks = {"public": public, "blue": blue, "green": green}
        target = steer.target("0.0.0.0", PUBLIC, color_host)
        assert target is not None
        with steering(socks, target) as s:
            s.select(Color.green)
            outcome: list[str] = []

            def connect() -> None:
                with socket.create_connection((address, PUBLIC), timeout=2):
                    outcome.append("connected")

            client.run(connect)
            assert outcome == ["connected"]
            return arrival_of(socks)


def arrival_of(listeners: dict[str, socket.socket]) -> str:
    for name, sock in listeners.items():
        sock.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            sock.accept()[0].close()
            return name
    raise AssertionError("the connection reached none of the listeners")


@pytest.fixture
def outside(netns: Netns) -> Iterator[Netns]:
    client = Netns("client")
    linked(netns, client, "10.99.0.1", "10.99.0.2")
    yield client
    client.delete()


def test_a_loopback_color_is_not_reachable_from_another_namespace(
        netns: Netns, outside: Netns) -> None:
    assert netns.run(_from_outside, outside, "127.0.0.1", "10.99.0.1") == "public"


def test_control_a_wildcard_color_is_steered_from_another_namespace(
        netns: Netns, outside: Netns) -> None:
    assert netns.run(_from_outside, outside, "0.0.0.0", "10.99.0.1") == "green"


def _six() -> str:
    with (listen(PUBLIC, "::1") as public, listen(BLUE, "::1") as blue,
          listen(GREEN, "::1") as green):
        socks = {"public": public, "blue": blue, "green": green}
        target = steer.target("::1", PUBLIC, "::1")
        assert target is not None
        with steering(socks, target) as s:
            s.select(Color.blue)
            return arrival(socks, ("::1", PUBLIC))


def test_ipv6(netns: Netns) -> None:
    assert netns.run(_six) == "blue"


def test_a_refused_program_carries_the_verifiers_log() -> None:
    # Reads the context past its end: refused on any kernel, with a log saying why.
    code = steer.assemble([steer.load_word(0, 1, 4096), steer.mov_imm(0, 1), steer.exit_()])
    refused = r"(?s)verifier log:\n.*invalid bpf_context access"
    with pytest.raises(SteerError, match=refused) as caught:
        steer.load_program(code)
    assert 'mode = "tcp"' in str(caught.value)
