"""Entries: canonical signing bytes, normalised values, size cap, field validation."""

import pytest

from kairos_core.identity import Identity
from kairos_core.ledger import Entry, LedgerError, Version, canonical_json
from kairos_core.ledger.entry import SIGNATURE_DOMAIN, normalize_value

ALICE = Identity.from_seed(b"\x01" * 32)


def make(signed_value=1, **changes) -> Entry:
    entry = Entry.signed(ALICE, "user", "k", signed_value, Version(1000, 0, ALICE.peer_id))
    fields = {**entry.__dict__, **changes}
    fields.pop("value_json", None)
    fields.pop("signing_bytes", None)
    return Entry(**fields)


def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2, "a": 3}, object(), b"bytes"])
def test_values_that_are_not_plain_json_are_refused(bad) -> None:
    with pytest.raises(LedgerError):
        normalize_value(bad)


def test_normalising_matches_what_peers_decode() -> None:
    assert normalize_value({"t": (1, 2)}) == {"t": [1, 2]}
    assert normalize_value({3: "x"}) == {"3": "x"}


def test_value_size_cap_is_a_clear_error() -> None:
    normalize_value("x" * 100, max_value_size=102)
    with pytest.raises(LedgerError, match="max_value_size=101"):
        normalize_value("x" * 100, max_value_size=101)


def test_signing_bytes_cover_every_signed_field() -> None:
    base = make()
    assert base.signing_bytes.startswith(SIGNATURE_DOMAIN)
    assert base.verify()
    for changes in ({"bucket": "other"}, {"key": "k2"}, {"value": 2},
                    {"version": Version(1001, 0, ALICE.peer_id)}, {"deleted": True, "value": None}):
        changed = make(**changes)
        assert changed.signing_bytes != base.signing_bytes
        assert not changed.verify()


def test_signing_bytes_do_not_depend_on_dict_order() -> None:
    a = Entry.signed(ALICE, "u", "k", {"x": 1, "y": 2}, Version(1, 0, ALICE.peer_id))
    b = Entry(a.bucket, a.key, {"y": 2, "x": 1}, a.owner, a.version, False, a.sig)
    assert b.verify()


@pytest.mark.parametrize("changes", [
    {"bucket": ""}, {"key": "x" * 513}, {"bucket": "a\x00b"}, {"owner": 5},
    {"version": Version(-1, 0, ALICE.peer_id)}, {"version": Version(1, 2**32, ALICE.peer_id)},
    {"version": Version(1, 0, "someone-else")}, {"version": (1.5, 0, ALICE.peer_id)},
    {"deleted": 1}, {"deleted": True}, {"sig": b"short"},
])
def test_validate_rejects_out_of_bounds_fields(changes) -> None:
    with pytest.raises(LedgerError):
        make(**changes).validate()


def test_validate_enforces_the_value_cap() -> None:
    entry = make("x" * 50)
    entry.validate(max_value_size=52)
    with pytest.raises(LedgerError):
        entry.validate(max_value_size=51)
