"""The key-exchange decoder: whatever a peer sends on /kairos/vpn/keys/1.0.0 is a valid step or an
ExchangeError, never another exception (each would be a traceback per stream)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_plugin_tunvpn.keyexchange import MAX_MESSAGE, ExchangeError, Hello, decode, encode, new_ephemeral


def test_round_trip():
    _, hello = new_ephemeral()
    assert decode(encode("hello", hello)) == ("hello", hello)
    assert decode(encode("reply", hello)) == ("reply", hello)
    assert decode(encode("request")) == ("request", None)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * MAX_MESSAGE,  # RecursionError in json.loads
        b'{"op": "hello", "eph": ' + b"[" * 1000 + b"}",
        b"[" * 100 + b"]" * 100,  # parses: a list, not a message
        b'{"op": ' + b"1" * 5000 + b"}",  # ValueError: over 4300 digits
        b'{"op": "hello", "eph": NaN, "nonce": Infinity}',
        b'{"op": {"x": 1}}',
        b'{"op": ["hello"]}',
        b'"op"',
        b"5",
        b"null",
        b'{"op": "hello", "eph": "zz", "nonce": "00"}',
        b'{"op": "hello", "eph": "' + b"00" * 32 + b'", "nonce": 16}',
        b'{"op": "hello", "eph": "\\ud800", "nonce": "00"}',  # a lone surrogate
        b"\xff\xfe\x00",
        b"",
    ],
)
def test_malformed_messages_raise_exchange_error(data):
    with pytest.raises(ExchangeError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=MAX_MESSAGE),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["op", "eph", "nonce"]), inner, max_size=3)
            ),
            max_leaves=12,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_any_input_decodes_or_raises_exchange_error(data):
    try:
        op, hello = decode(data)
    except ExchangeError:
        return
    assert op in ("hello", "reply", "request") and (hello is None or isinstance(hello, Hello))
