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
    for changes in (
        {"bucket": "other"},
        {"key": "k2"},
        {"value": 2},
        {"version": Version(1001, 0, ALICE.peer_id)},
        {"deleted": True, "value": None},
    ):
        changed = make(**changes)
        assert changed.signing_bytes != base.signing_bytes
        assert not changed.verify()


def test_signing_bytes_do_not_depend_on_dict_order() -> None:
    a = Entry.signed(ALICE, "u", "k", {"x": 1, "y": 2}, Version(1, 0, ALICE.peer_id))
    b = Entry(a.bucket, a.key, {"y": 2, "x": 1}, a.owner, a.version, False, a.sig)
    assert b.verify()


@pytest.mark.parametrize(
    "changes",
    [
        {"bucket": ""},
        {"key": "x" * 513},
        {"bucket": "a\x00b"},
        {"owner": 5},
        {"version": Version(-1, 0, ALICE.peer_id)},
        {"version": Version(1, 2**32, ALICE.peer_id)},
        {"version": Version(1, 0, "someone-else")},
        {"version": (1.5, 0, ALICE.peer_id)},
        {"deleted": 1},
        {"deleted": True},
        {"sig": b"short"},
    ],
)
def test_validate_rejects_out_of_bounds_fields(changes) -> None:
    with pytest.raises(LedgerError):
        make(**changes).validate()


def test_validate_enforces_the_value_cap() -> None:
    entry = make("x" * 50)
    entry.validate(max_value_size=52)
    with pytest.raises(LedgerError):
        entry.validate(max_value_size=51)


def nested(depth: int):
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_values_nested_deeper_than_the_bound_are_refused() -> None:
    from kairos_core.ledger.entry import MAX_VALUE_DEPTH

    assert normalize_value(nested(MAX_VALUE_DEPTH)) == nested(MAX_VALUE_DEPTH)
    make(nested(MAX_VALUE_DEPTH)).validate()
    # Deeper values used to be stored (up to ~990 levels, where json gives up), and then every
    # watch and `dataclasses.asdict` of the update died of RecursionError at ~500.
    for depth in (MAX_VALUE_DEPTH + 1, 600, 5000):
        with pytest.raises(LedgerError, match=f"nested more than {MAX_VALUE_DEPTH} levels"):
            normalize_value(nested(depth))
    entry = Entry(
        *[getattr(make(), name) for name in ("bucket", "key")],
        nested(600),
        ALICE.peer_id,
        Version(1000, 0, ALICE.peer_id),
        False,
        b"\x00" * 64,
    )
    with pytest.raises(LedgerError, match="nested more than"):
        entry.validate()
