"""Pydantic models and numpy arrays through handle calls between real processes, without pickle."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import broker_serve.client.handle
from broker_serve import RayServeException, serve
from broker_serve.protocol import typed_values

from .values_models import Reading, Report, Span

np = pytest.importorskip("numpy")


@serve.deployment
class Summarizer:
    def summarize(self, reading: Reading, samples: Any) -> tuple[Report, Any]:
        assert type(reading) is Reading and type(samples) is np.ndarray, (reading, samples)
        samples[0, 0] = -1  # a decoded array is writable
        report = Report(reading=reading, peak=float(samples.max()), samples=samples[::2])
        return report, samples.astype(np.float32) * 2


@serve.deployment
class Front:
    """Forwards to Summarizer, so values also cross from one replica to another."""

    def __init__(self, summarizer: Any) -> None:
        self.summarizer = summarizer

    async def summarize(self, reading: Reading, samples: Any) -> tuple[Report, Any, Span]:
        report, doubled = await self.summarizer.summarize.remote(reading, samples)
        assert type(report) is Report and type(report.reading) is Reading, report
        return report, doubled, Span(0, len(doubled))


def test_models_and_arrays_round_trip_typed(cluster, monkeypatch):
    sent: list[set[str]] = []
    received: list[set[str]] = []
    real_pack_call, real_unpack_value = broker_serve.client.handle.pack_call, broker_serve.client.handle.unpack_value

    def pack_call(*args: Any) -> dict[str, Any]:
        payload = real_pack_call(*args)
        sent.append(set(payload))
        return payload

    def unpack_value(event: dict[str, Any], secret: bytes) -> Any:
        received.append(set(event))
        return real_unpack_value(event, secret)

    handle = serve.run(Front.bind(Summarizer.bind()))
    monkeypatch.setattr(broker_serve.client.handle, "pack_call", pack_call)
    monkeypatch.setattr(broker_serve.client.handle, "unpack_value", unpack_value)
    reading = Reading(sensor="s1", window=(0, 8), threshold=0.5, tags={"site": ["a"]})
    samples = np.arange(8, dtype=np.int64).reshape(2, 4)

    report, doubled, span = handle.summarize.remote(reading, samples).result(timeout_s=60)

    assert type(report) is Report and type(report.reading) is Reading
    assert report.reading == reading and report.peak == 7.0
    assert type(report.samples) is np.ndarray
    assert np.array_equal(report.samples, [[-1, 1, 2, 3]])
    assert doubled.dtype == np.float32
    assert np.array_equal(doubled, [[-2, 2, 4, 6], [8, 10, 12, 14]])
    assert span == Span(0, 2)
    assert samples[0, 0] == 0  # the caller's array is its own
    # typed both ways; the call names classes, so it is signed too
    assert sent == [{"data", "sig"}]
    assert len(received) == 1 and {"data", "sig"} <= received[0]
    assert "pickled" not in received[0]


def test_a_value_the_replica_cannot_decode_is_answered_400(cluster, monkeypatch):
    handle = serve.run(Summarizer.bind())
    fields = {"sensor": "s1", "window": [0, 8], "threshold": -1.0}  # threshold must be >= 0
    forged = msgpack.ExtType(typed_values.PYDANTIC_MODEL, msgpack.packb(
        ["tests.values_models:Reading", fields, []], use_bin_type=True))
    data = msgpack.packb([[forged, None], {}], use_bin_type=True)
    monkeypatch.setattr(broker_serve.client.handle, "pack_call", lambda *_: {"data": data})

    with pytest.raises(RayServeException) as info:
        handle.summarize.remote().result(timeout_s=60)
    assert info.value.error_type == "UndecodableValue"
    assert "threshold" in str(info.value)
