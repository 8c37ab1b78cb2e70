"""Unit tests of the wire format helpers (docs/protocol.md)."""

import pytest

from broker_serve.exceptions import ProtocolError, UntrustedPayload
from broker_serve.protocol import messages
from broker_serve.protocol.call_values import (
    dumps_signed,
    loads_signed,
    pack_call,
    unpack_call,
)


def test_minimal_scope_gets_asgi_defaults():
    scope = messages.http_scope({"scope": {"method": "get", "path": "/x",
                                           "headers": [["X-A", "1"]]}})
    assert scope["method"] == "GET"
    assert scope["headers"] == [(b"x-a", b"1")]
    assert scope["query_string"] == b"" and scope["root_path"] == ""
    assert scope["type"] == "http" and scope["http_version"] == "1.1"


@pytest.mark.parametrize("payload", [
    {}, {"scope": []}, {"scope": {"method": "GET"}}, {"scope": {"method": "GET", "path": "x"}},
    {"scope": {"method": "GET", "path": "/", "headers": [[1, 2]]}},
])
def test_bad_scopes_are_protocol_errors(payload):
    with pytest.raises(ProtocolError):
        messages.http_scope(payload)


def test_version_header_is_required():
    messages.check_version({"bs-version": 1})
    for headers in (None, {}, {"bs-version": 2}, {"bs-version": "1"}):
        with pytest.raises(ProtocolError) as info:
            messages.check_version(headers)
        assert info.value.error == "UnsupportedProtocolVersion"


def test_non_map_bodies_are_refused():
    with pytest.raises(ProtocolError):
        messages.decode_map(b"\xc1")
    with pytest.raises(ProtocolError):
        messages.decode_map(messages.pack([1, 2]))


def test_plain_arguments_travel_as_msgpack_typed_ones_typed_and_others_signed():
    secret = b"k" * 32
    assert pack_call((1, "a"), {"b": [1.5]}, secret) == {"args": [1, "a"], "kwargs": {"b": [1.5]}}
    typed = pack_call(((1, 2),), {}, secret)  # a tuple would come back a list as plain data
    assert set(typed) == {"data"}
    assert unpack_call(typed, secret) == (((1, 2),), {})
    signed = pack_call(({1, 2},), {}, secret)  # a set has no typed form
    assert set(signed) == {"pickled", "sig"}
    assert unpack_call(signed, secret) == (({1, 2},), {})


def test_tampered_or_unsigned_pickles_are_never_loaded():
    data, sig = dumps_signed({"x": 1}, b"right")
    assert loads_signed(data, sig, b"right") == {"x": 1}
    with pytest.raises(UntrustedPayload):
        loads_signed(data, sig, b"wrong")
    with pytest.raises(UntrustedPayload):
        loads_signed(data + b".", sig, b"right")
    with pytest.raises(UntrustedPayload):
        loads_signed(data, None, b"right")
