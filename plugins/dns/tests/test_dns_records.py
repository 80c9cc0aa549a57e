"""The zone (precedence, members' VIPs), the bucket's policy, the cache and the rate limiter, in memory."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from kairos_plugin_dns.records import RecordsPolicy, build_zone, entry_problem, member_vips, qualify
from kairos_plugin_dns.server import Cache, RateLimiter, is_self, parse_hostport


def rec(*values: str, ttl: int = 30) -> dict:
    return {"values": list(values), "ttl": ttl}


def test_member_beats_exact_beats_longer_wildcard_beats_shorter():
    records = {
        "*.kairos./A": rec("10.0.0.1"),
        "*.apps.kairos./A": rec("10.0.0.2"),
        "db.apps.kairos./A": rec("10.0.0.3"),
        "node1.kairos./TXT": rec("pinned"),
    }
    vpn = {"P1": {"vip": "10.1.0.5", "claimed": [1, 0]}}
    zone = build_zone("kairos.", 60, records, vpn, {"P1": "node1"})
    assert zone.lookup("db.apps.kairos.").records["A"][0] == ("10.0.0.3",)
    assert zone.lookup("x.apps.kairos.").source == "wildcard *.apps.kairos."
    assert zone.lookup("a.b.apps.kairos.").records["A"][0] == ("10.0.0.2",)
    assert zone.lookup("other.kairos.").records["A"][0] == ("10.0.0.1",)
    # a member's name beats a record of that name (any member may write records: none takes
    # another member's name), and holds only its VIP's type
    assert zone.lookup("NODE1.kairos.").source == "member"
    assert zone.lookup("node1.kairos.").records == {"A": (("10.1.0.5",), 60)}
    assert zone.lookup("kairos.") is None and zone.in_domain("kairos.") and not zone.in_domain("example.com.")
    assert zone.lookup("example.com.") is None


def test_the_order_entries_arrive_in_does_not_change_the_answer():
    items = [("*.a.kairos./A", rec("10.0.0.1")), ("*.b.a.kairos./A", rec("10.0.0.2")), ("*.kairos./A", rec("10.0.0.3"))]
    answers = {
        build_zone("kairos.", 60, dict(order), {}, {}).lookup("x.b.a.kairos.").records["A"][0]
        for order in (items, items[::-1], items[1:] + items[:1])
    }
    assert answers == {("10.0.0.2",)}


def test_member_vips_skip_lapsed_claims_dead_members_and_the_loser_of_a_conflict():
    vpn = {
        "P1": {"vip": "10.1.0.5", "claimed": [5, 0]},
        "P2": {"vip": "10.1.0.5", "claimed": [3, 0]},
        "P3": {"vip": "10.1.0.7", "claimed": [1, 0], "expires": 1000},
        "P4": {"vip": "10.1.0.8", "claimed": [1, 0]},
        "P1/links": {"x": 1},
        "P5": {"vip": "not an ip"},
        "P6": {"vip": "fd00::6", "claimed": [1, 1]},
    }
    assert member_vips(vpn, {"P1", "P2", "P3", "P5", "P6"}, now_ms=2000) == {"P2": "10.1.0.5", "P6": "fd00::6"}
    zone = build_zone("kairos.", 60, {}, vpn, {"P2": "Node2.lan", "P6": "six", "P1": "node1"}, now_ms=2000)
    assert zone.lookup("node2.kairos.").records == {"A": (("10.1.0.5",), 60)}
    assert zone.lookup("six.kairos.").records == {"AAAA": (("fd00::6",), 60)}
    assert zone.lookup("node1.kairos.") is None


def test_policy_accepts_records_only():
    class E:
        def __init__(self, key, value, deleted=False):
            self.key, self.value, self.deleted = key, value, deleted

    policy = RecordsPolicy()
    assert policy.allows(E("web.kairos./A", rec("10.0.0.1")), None, 0)
    assert policy.allows(E("*.apps.kairos./TXT", rec("hello")), None, 0)
    assert policy.allows(E("web.kairos./A", None, deleted=True), None, 0)
    for key, value in [
        ("web.kairos./A", rec("10.0.0.300")),
        ("web.kairos./A", rec("fd00::1")),
        ("web.kairos/A", rec("10.0.0.1")),
        ("web.kairos./MX", rec("x")),
        ("a.*.kairos./A", rec("10.0.0.1")),
        ("web.kairos./A", {"values": ["10.0.0.1"]}),
        ("web.kairos./A", rec("10.0.0.1", ttl=-1)),
        ("web.kairos./A", rec()),
        ("web.kairos./A", rec("10.0.0.1", "10.0.0.1")),
        ("web.kairos./TXT", rec("bad\x00")),
        ("web.kairos./A", "10.0.0.1"),
    ]:
        assert not policy.allows(E(key, value), None, 0), (key, value)
        assert entry_problem(key, value)
    assert qualify("Web", "kairos.") == "web.kairos." and qualify("a.example.com", "kairos.") == "a.example.com."
    assert qualify("*.apps", "kairos.") == "*.apps.kairos."


def test_cache_respects_ttls_negative_bounds_and_size():
    cache = Cache(size=2, max_ttl=100, negative_ttl=30)
    query = dns.message.make_query("a.example.", "A")
    positive = dns.message.make_response(query)
    positive.answer.append(dns.rrset.from_text("a.example.", 10, "IN", "A", "192.0.2.1"))
    cache.put(("a.example.", 1, 1), positive, now=0)
    assert cache.get(("a.example.", 1, 1), now=9.9) is not None
    assert cache.get(("a.example.", 1, 1), now=10.0) is None
    negative = dns.message.make_response(query)
    negative.set_rcode(3)
    negative.authority.append(dns.rrset.from_text("example.", 3600, "IN", "SOA", "ns. host. 1 2 3 4 3600"))
    assert cache.ttl_of(negative) == 30
    servfail = dns.message.make_response(query)
    servfail.set_rcode(2)
    assert cache.ttl_of(servfail) == 0
    for index in range(3):
        cache.put((f"n{index}.", 1, 1), positive, now=0)
    assert len(cache) == 2 and cache.get(("n0.", 1, 1), now=1) is None


def test_rate_limiter_and_loop_detection():
    limiter = RateLimiter(rate=10, burst=5)
    assert sum(limiter.allow("192.0.2.1", 0.0) for _ in range(20)) == 5
    assert limiter.allow("192.0.2.2", 0.0)
    assert limiter.allow("192.0.2.1", 0.5)  # refilled
    assert is_self(("127.0.0.1", 53), ("127.0.0.1", 53)) and is_self(("10.0.0.1", 5353), ("0.0.0.0", 5353))
    assert not is_self(("127.0.0.53", 53), ("127.0.0.1", 53))  # systemd-resolved's stub is another socket
    assert not is_self(("127.0.0.1", 53), ("127.0.0.1", 5353))
    assert parse_hostport("[::1]:54") == ("::1", 54) and parse_hostport("192.0.2.1") == ("192.0.2.1", 53)


def test_the_rendered_answer_of_a_plain_query_is_reused_only_within_one_zone():
    import struct

    from kairos_plugin_dns.server import DNSServer, Settings

    zones = [build_zone("kairos.", 60, {"web.kairos./A": rec("10.0.0.1")}, {}, {})]
    server = DNSServer(Settings(("127.0.0.1", 0), (), 4096, 0, 1, 10, 60, 60, 1.0, 4, 4, 1.0), lambda: zones[-1], lambda n: None)
    query = bytearray(dns.message.make_query("web.kairos.", "A", use_edns=False).to_wire())
    answers = []
    for ident in (1, 2):
        struct.pack_into("!H", query, 0, ident)
        answers.append(dns.message.from_wire(server.receive(bytes(query), "127.0.0.1", tcp=False)))
    assert [a.id for a in answers] == [1, 2]
    assert [a.answer[0][0].address for a in answers] == ["10.0.0.1", "10.0.0.1"]
    zones.append(build_zone("kairos.", 60, {"web.kairos./A": rec("10.0.0.2")}, {}, {}))
    again = dns.message.from_wire(server.receive(bytes(query), "127.0.0.1", tcp=False))
    assert again.answer[0][0].address == "10.0.0.2"


async def test_a_query_from_an_upstream_is_not_forwarded_back_to_it():
    from kairos_plugin_dns.server import DNSServer, Settings

    zone = build_zone("kairos.", 60, {}, {}, {})
    counted: list[str] = []
    server = DNSServer(
        Settings(("0.0.0.0", 5300), (("192.0.2.7", 53),), 4096, 0, 1, 10, 60, 60, 1.0, 4, 4, 1.0), lambda: zone, counted.append
    )
    query = dns.message.make_query("elsewhere.example.", "A")
    reply = dns.message.from_wire(server.receive(query.to_wire(), "192.0.2.7", tcp=False))
    assert reply.rcode() == dns.rcode.REFUSED and "dns_refused" in counted


def test_a_cached_forwarded_answer_counts_its_ttl_down_on_the_fast_path_too():
    import time

    import dns.rrset

    from kairos_plugin_dns.server import DNSServer, Settings

    zone = build_zone("kairos.", 60, {}, {}, {})
    counted: list[str] = []
    server = DNSServer(
        Settings(("127.0.0.1", 0), (("192.0.2.7", 53),), 4096, 0, 1, 10, 3600, 60, 1.0, 4, 4, 1.0), lambda: zone, counted.append
    )
    query = dns.message.make_query("a.example.", "A", use_edns=False)
    upstream = dns.message.make_response(query)
    upstream.answer.append(dns.rrset.from_text("a.example.", 300, "IN", "A", "192.0.2.1"))
    server.cache.put(("a.example.", 1, 1), upstream, now=time.monotonic() - 5.5)

    def ask() -> int:
        reply = dns.message.from_wire(server.receive(query.to_wire(), "127.0.0.1", tcp=False))
        assert reply.id == query.id and reply.answer[0][0].address == "192.0.2.1"
        return reply.answer[0].ttl

    first = [ask(), ask()]
    assert first[0] == first[1] and first[0] in (295, 294)  # 5.5 s old (a second may turn meanwhile)
    assert counted.count("dns_cache_hits") >= 2
    server.cache.get(("a.example.", 1, 1), time.monotonic()).stored -= 10  # ten seconds older
    assert ask() in (first[0] - 10, first[0] - 11)


def test_an_answer_too_large_for_udp_is_truncated_and_whole_over_tcp():
    from kairos_plugin_dns.server import DNSServer, Settings

    values = [f"{i:02d}" + "x" * 198 for i in range(16)]
    zone = build_zone("kairos.", 60, {"big.kairos./TXT": rec(*values)}, {}, {})
    server = DNSServer(Settings(("127.0.0.1", 0), (), 4096, 0, 1, 10, 60, 60, 1.0, 4, 4, 1.0), lambda: zone, lambda n: None)
    query = dns.message.make_query("big.kairos.", "TXT", use_edns=False).to_wire()
    udp = dns.message.from_wire(server.receive(query, "127.0.0.1", tcp=False))
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(server.receive(query, "127.0.0.1", tcp=True))
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 16
