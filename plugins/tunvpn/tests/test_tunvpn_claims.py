"""VIP claims lapse: ``expires`` in the claim, refreshed by its live owner, ignored once past.

Unit tests of :mod:`kairos_plugin_tunvpn.addressing` and of the VPN's own-claim decisions (on a
stub node with a settable wall clock), then in-process nodes (LocalNetwork, fake TUNs) with a
claim TTL of a few seconds.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from typing import Any

import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core.errors import ConfigError
from kairos_core.ledger.clock import wall_clock_ms
from kairos_plugin_tunvpn.addressing import (
    Claim,
    choose_address,
    decode_claim,
    holders,
    parse_claim,
    read_claims,
    vip_map,
)
from kairos_plugin_tunvpn.plugin import TunVPNPlugin
from kairos_plugin_tunvpn.vpn import DEFAULTS, VPN, VPNConfigError, VPNSettings
from tunvpn_nodes import vpn_config

NET = ipaddress.IPv4Network("10.1.0.0/24")
SMALL = ipaddress.IPv4Network("10.1.0.0/30")  # two host addresses: .1 and .2
NOW = 1_700_000_000_000
TTL = 3.0  # seconds: short, so that the node tests see claims lapse


def claim_value(vip: str = "10.1.0.7", claimed: tuple[int, int] = (NOW - 5000, 0), **extra: Any) -> dict[str, Any]:
    return {"vip": vip, "udp_port": 51820, "claimed": list(claimed), "static": False, **extra}


# ----- parsing ------------------------------------------------------------------------------------


def test_a_claim_is_alive_until_it_expires():
    value = claim_value(expires=NOW + 1000)
    claim = parse_claim("p", value, NET, NOW)
    assert claim is not None and claim.expires == NOW + 1000
    assert parse_claim("p", value, NET, NOW + 999) == claim
    assert parse_claim("p", value, NET, NOW + 1000) is None  # lapses at `expires`
    assert parse_claim("p", value, NET, NOW + 86_400_000) is None
    # decode_claim reads it all the same (a node looking at its own, lapsed claim)
    assert decode_claim("p", value, NET) == claim
    assert claim.to_value() == value


def test_a_claim_without_expires_never_lapses():
    value = claim_value()  # as written by versions before claims expired
    claim = parse_claim("p", value, NET, 2**53 - 1)
    assert claim is not None and claim.expires is None
    assert "expires" not in claim.to_value()


@pytest.mark.parametrize("expires", [True, False, -1, 1.5, "1700000000000", [NOW], {"at": NOW}])
def test_a_malformed_expires_rejects_the_claim(expires):
    value = claim_value(expires=expires)
    assert decode_claim("p", value, NET) is None
    assert parse_claim("p", value, NET, 0) is None
    assert read_claims({"p": value, "q": claim_value("10.1.0.8")}, NET, NOW).keys() == {"q"}


def test_parse_claim_defaults_to_the_wall_clock():
    assert parse_claim("p", claim_value(expires=wall_clock_ms() - 1), NET) is None
    assert parse_claim("p", claim_value(expires=wall_clock_ms() + 60_000), NET) is not None


def test_read_claims_leaves_lapsed_claims_out():
    bucket = {
        "alive": claim_value("10.1.0.1", expires=NOW + 1),
        "lapsed": claim_value("10.1.0.2", expires=NOW - 1),
        "old-version": claim_value("10.1.0.3"),
        "alive/links": {"x": {"path": "udp"}},
    }
    assert read_claims(bucket, NET, NOW).keys() == {"alive", "old-version"}
    assert read_claims(bucket, NET, NOW - 2).keys() == {"alive", "lapsed", "old-version"}
    assert read_claims(bucket, NET).keys() == {"old-version"}  # default: now, long after NOW


def test_a_lapsed_claim_neither_holds_nor_takes_its_address():
    # the lapsed claim ranks first (older), and still loses its address to the live one
    bucket = {
        "gone": claim_value("10.1.0.2", claimed=(NOW - 90_000, 0), expires=NOW - 1),
        "newcomer": claim_value("10.1.0.2", claimed=(NOW - 1000, 0), expires=NOW + 60_000),
        "other": claim_value("10.1.0.1", claimed=(NOW - 1000, 0), expires=NOW + 60_000),
    }
    claims = read_claims(bucket, SMALL, NOW)
    assert vip_map(claims.values()) == {"newcomer": ipaddress.IPv4Address("10.1.0.2"), "other": ipaddress.IPv4Address("10.1.0.1")}
    # without the newcomer, the address of the node gone for good is free for a third one
    del bucket["newcomer"]
    claims = read_claims(bucket, SMALL, NOW)
    assert ipaddress.IPv4Address("10.1.0.2") not in holders(claims.values())
    taken = {c.vip for c in claims.values()}
    assert choose_address("third", SMALL, taken) == ipaddress.IPv4Address("10.1.0.2")
    # before it lapsed, the CIDR was full
    assert choose_address("third", SMALL, {c.vip for c in read_claims(bucket, SMALL, NOW - 2).values()}) is None


# ----- the VPN's own claim, on a fake node --------------------------------------------------------


class SetClock:
    """A wall clock the test sets (ms), for claim expiry and the node's HLC alike."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def stub(now_ms: int = NOW, ttl: float = 100.0) -> tuple[VPN, SetClock, list[Any]]:
    """A VPN on the test kit's fake node; the clock the test sets, and the ledger writes so far."""
    settings = VPNSettings.from_config({**DEFAULTS, "cidr": str(SMALL), "claim_ttl": ttl})
    clock = SetClock(now_ms)
    node = FakeNode(now_ms=clock)
    writes: list[Any] = []
    node.ledger.add_listener(writes.append)
    return VPN(node, settings, wall_clock=clock), clock, writes


def stub_vpn(now_ms: int = NOW, ttl: float = 100.0) -> VPN:
    return stub(now_ms, ttl)[0]


def test_a_live_own_claim_is_reused_at_start():
    vpn = stub_vpn()
    previous = Claim(vpn.peer_id, ipaddress.IPv4Address("10.1.0.2"), 4000, (NOW - 90_000, 3), False, NOW + 1)
    assert vpn._initial_claim({vpn.peer_id: previous}, previous) == previous


def test_a_lapsed_own_claim_is_made_anew_on_its_old_address_when_free():
    vpn = stub_vpn()
    previous = Claim(vpn.peer_id, ipaddress.IPv4Address("10.1.0.2"), 4000, (NOW - 90_000, 3), False, NOW)
    claim = vpn._initial_claim({}, previous)
    assert claim.vip == previous.vip
    assert claim.claimed > previous.claimed and claim.claimed[0] == NOW  # a new HLC time


def test_a_lapsed_own_claim_does_not_take_back_an_address_now_held():
    vpn = stub_vpn()
    previous = Claim(vpn.peer_id, ipaddress.IPv4Address("10.1.0.2"), 4000, (NOW - 90_000, 3), False, NOW - 1)
    newcomer = Claim("newcomer", previous.vip, 4001, (NOW - 5000, 0), False, NOW + 60_000)
    claim = vpn._initial_claim({"newcomer": newcomer}, previous)
    assert claim.vip == ipaddress.IPv4Address("10.1.0.1")
    assert claim.claimed[0] == NOW


def test_the_own_claim_is_refreshed_every_quarter_ttl_with_the_same_vip_and_claimed():
    vpn, clock, writes = stub(ttl=100.0)
    ledger = vpn.node.ledger
    vpn._publish_claim(Claim(vpn.peer_id, ipaddress.IPv4Address("10.1.0.1"), 4000, (NOW - 1, 0)))
    first = vpn.claim
    assert first.expires == NOW + 100_000 and len(writes) == 1
    vpn._refresh_claim()  # not due yet
    assert len(writes) == 1
    clock.now_ms = NOW + 25_000  # a quarter TTL later by the wall clock
    vpn._refresh_claim()
    assert len(writes) == 2
    value = ledger.get("vpn", vpn.peer_id)
    assert value["expires"] == NOW + 125_000
    assert (value["vip"], value["claimed"]) == ("10.1.0.1", [NOW - 1, 0])
    vpn._refresh_at = 0.0  # a quarter TTL later by the monotonic clock (wall clock stepped back)
    vpn._refresh_claim()
    assert len(writes) == 3 and vpn.claim.claimed == first.claimed


def test_a_claim_that_lapsed_while_running_is_made_anew():
    vpn, clock, _ = stub(ttl=100.0)
    vpn._publish_claim(Claim(vpn.peer_id, ipaddress.IPv4Address("10.1.0.1"), 4000, (NOW - 1, 0)))
    clock.now_ms = NOW + 200_000  # the machine slept through its refreshes
    vpn._refresh_claim()
    assert vpn.claim.vip == ipaddress.IPv4Address("10.1.0.1")
    assert vpn.claim.claimed[0] == NOW + 200_000  # ranks after whoever took the address meanwhile
    assert vpn.claim.expires == NOW + 300_000
    assert vpn.counters["vpn_claim_lapses"] == 1


# ----- config ---------------------------------------------------------------------------------------


def test_claim_ttl_defaults_to_a_day():
    assert VPNSettings.from_config(dict(DEFAULTS)).claim_ttl == 86400.0


@pytest.mark.parametrize("ttl", [2, 2.0, 600, 30 * 86400])
def test_claim_ttl_within_range_is_accepted(ttl):
    assert VPNSettings.from_config({**DEFAULTS, "claim_ttl": ttl}).claim_ttl == float(ttl)


@pytest.mark.parametrize("ttl", [0, 1.9, -5, 30 * 86400 + 1])
def test_claim_ttl_out_of_range_is_refused(ttl):
    # the schema's bound (vpn.SECTION), in its message form, for configs built by hand too
    with pytest.raises(VPNConfigError, match=rf"^vpn\.claim_ttl: must be between 2 and 2592000, not {float(ttl)}$"):
        VPNSettings.from_config({**DEFAULTS, "claim_ttl": ttl})


@pytest.mark.parametrize("ttl", [True, "1d", None])
def test_claim_ttl_of_another_type_is_refused(ttl):
    with pytest.raises(VPNConfigError, match=r"^vpn\.claim_ttl: expected a number, got "):
        VPNSettings.from_config({**DEFAULTS, "claim_ttl": ttl})


async def test_a_bad_claim_ttl_is_refused_with_the_config(network):
    with pytest.raises(ConfigError) as info:
        await network.add_node(plugins=[TunVPNPlugin()], overrides={"vpn": {"claim_ttl": 1}})
    assert info.value.problems == ["vpn.claim_ttl: must be between 2 and 2592000, not 1.0"]


def test_config_check_names_what_is_wrong_with_the_vpn_section(tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text("vpn:\n  cidr: 10.1.0.0/24\n  address: 10.2.0.5/24\n")
    result = subprocess.run(
        [sys.executable, "-m", "kairos_core", "config", "check", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"{config}: vpn.address: 10.2.0.5 is not a host address of vpn.cidr 10.1.0.0/24"


# ----- nodes ----------------------------------------------------------------------------------------


def live_claims(node) -> dict[str, Claim]:
    return read_claims(node.ledger.items("vpn"), SMALL, node.ledger.clock.now_ms())


async def two_nodes_in_small(network, plugin, names=("a", "x")):
    """Two nodes filling the two addresses of SMALL, agreed by both."""
    config = vpn_config(cidr=str(SMALL), claim_ttl=TTL)
    nodes = [await network.add_node(plugins=[plugin], overrides=config, name=name) for name in names]
    vpns = [plugin.vpn_of(n) for n in nodes]
    assert all(v is not None for v in vpns)
    await network.wait_for(
        lambda: (
            vpns[0].vips.get(nodes[1].peer_id) == vpns[1].address.ip and vpns[1].vips.get(nodes[0].peer_id) == vpns[0].address.ip
        ),
        timeout=30,
    )
    assert vpns[0].address.ip != vpns[1].address.ip
    return nodes, vpns


async def test_the_address_of_a_node_gone_for_good_is_free_after_the_ttl(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    (a, x), (va, vx) = await two_nodes_in_small(network, plugin)
    await network.wait_for(lambda: x.peer_id in va.links, timeout=20)
    old = vx.address.ip
    await x.stop()
    await network.wait_for(lambda: x.peer_id not in live_claims(a), timeout=TTL + 20)
    # still in the ledger (only its owner could delete it), but ignored: no VIP, no session
    assert a.ledger.get("vpn", x.peer_id)["vip"] == str(old)
    await network.wait_for(lambda: x.peer_id not in va.vips and x.peer_id not in va.links, timeout=10)
    assert not va.plane.has_peer(x.peer_id)
    # the CIDR has two addresses: a newcomer can only get the one of the node gone for good
    z = await network.add_node(plugins=[plugin], overrides=vpn_config(cidr=str(SMALL), claim_ttl=TTL), name="z")
    vz = plugin.vpn_of(z)
    assert vz is not None
    await network.wait_for(lambda: vz.address.ip == old and va.vips.get(z.peer_id) == old, timeout=30)
    assert va.address.ip != old


async def test_refresh_keeps_a_live_claim_beyond_one_ttl(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    (a, b), (va, vb) = await two_nodes_in_small(network, plugin, names=("a", "b"))
    first = decode_claim(b.peer_id, a.ledger.get("vpn", b.peer_id), SMALL)
    assert first is not None and first.expires is not None
    await network.wait_for(lambda: a.ledger.clock.now_ms() > first.expires + 1000, timeout=TTL + 10)
    later = live_claims(a).get(b.peer_id)
    assert later is not None  # refreshed: alive although its first `expires` is past
    assert (later.vip, later.claimed) == (first.vip, first.claimed)
    assert later.expires > first.expires
    assert va.vips.get(b.peer_id) == first.vip and b.peer_id in va.links


async def test_a_node_back_after_its_claim_lapsed_does_not_take_its_old_address_back(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    config = vpn_config(cidr=str(SMALL), claim_ttl=TTL)
    (a, x), (va, vx) = await two_nodes_in_small(network, plugin)
    address_a, address_x = va.address.ip, vx.address.ip
    old_claim = vx.claim
    await x.stop()
    await network.wait_for(lambda: x.peer_id not in live_claims(a), timeout=TTL + 20)
    # a newcomer takes the address x left behind (the only free one)...
    z = await network.add_node(plugins=[plugin], overrides=config, name="z")
    vz = plugin.vpn_of(z)
    await network.wait_for(lambda: vz.address.ip == address_x and va.vips.get(z.peer_id) == address_x, timeout=30)
    # ...and a leaves too, so that one address is free when x comes back
    await a.stop()
    await network.wait_for(lambda: a.peer_id not in live_claims(z), timeout=TTL + 20)
    x2 = await network.add_node(plugins=[plugin], overrides=config, name="x")
    assert x2.peer_id == x.peer_id  # the same node: same state dir, same identity and ledger
    vx2 = plugin.vpn_of(x2)
    assert vx2 is not None
    await network.wait_for(
        lambda: vx2.address.ip == address_a and vz.vips.get(x2.peer_id) == address_a and vx2.vips.get(z.peer_id) == address_x,
        timeout=30,
    )
    assert vz.address.ip == address_x  # the newcomer kept the address
    assert vx2.claim.claimed > vz.claim.claimed > old_claim.claimed


async def test_a_restart_within_the_ttl_keeps_the_vip_and_its_rank(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    node = await network.add_node(plugins=[plugin], overrides=vpn_config(), name="keeper")
    before = plugin.vpn_of(node).claim
    assert before.expires is not None
    await node.stop()
    again = await network.add_node(plugins=[plugin], overrides=vpn_config(), name="keeper")
    after = plugin.vpn_of(again).claim
    assert (after.vip, after.claimed) == (before.vip, before.claimed)
    assert after.expires >= before.expires
    assert again.ledger.get("vpn", again.peer_id)["expires"] == after.expires
