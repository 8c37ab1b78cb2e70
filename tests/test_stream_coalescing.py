"""How a replica turns ASGI body chunks into reply events (broker_serve/replica/execution.py)."""

import asyncio
import time

import pytest

from broker_serve.exceptions import ProtocolError
from broker_serve.protocol import messages
from broker_serve.replica.execution import COALESCE_S, HttpBridge, ReplyStream


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict, float]] = []

    async def publish(self, event: str, fields: dict) -> None:
        self.events.append((event, dict(fields), time.monotonic()))


def bridge(recorder: Recorder) -> HttpBridge:
    return HttpBridge(ReplyStream(recorder.publish), b"", False, None, 1 << 20, "inbox")


async def respond(ex: HttpBridge, chunks, pause: float | None) -> list[float]:
    sent = []
    await ex.send({"type": "http.response.start", "status": 200, "headers": []})
    for chunk in chunks:
        sent.append(time.monotonic())
        await ex.send({"type": "http.response.body", "body": chunk, "more_body": True})
        if pause is not None:
            await asyncio.sleep(pause)
    await ex.send({"type": "http.response.body", "body": b"", "more_body": False})
    return sent


def body_of(events) -> bytes:
    return b"".join(fields.get("body", b"") for _, fields, _ in events)


def chunks_of(events) -> list[bytes]:
    """The app's chunks as a caller reads them back from the events (`chunk_sizes`)."""
    return [chunk for _, fields, _ in events for chunk in messages.body_chunks(fields)]


def test_tight_loop_shares_messages_but_the_first_chunk_goes_alone():
    recorder = Recorder()
    chunks = [f"{i:05d}".encode() for i in range(5000)]
    asyncio.run(respond(bridge(recorder), chunks, pause=None))
    kinds = [kind for kind, _, _ in recorder.events]
    assert kinds[0] == messages.START and set(kinds[1:]) == {messages.BODY}
    assert recorder.events[0][1]["body"] == chunks[0]  # not held back for the rest
    assert body_of(recorder.events) == b"".join(chunks)  # everything, in order
    assert chunks_of(recorder.events) == chunks  # and where each chunk ends
    assert len(recorder.events) < len(chunks) / 10
    assert any(len(fields.get("chunk_sizes", ())) > 1 for _, fields, _ in recorder.events)
    assert [f["seq"] for _, f, _ in recorder.events] == list(range(len(recorder.events)))
    assert recorder.events[-1][1]["more_body"] is False


def test_spaced_chunks_each_leave_within_the_window():
    recorder = Recorder()
    chunks = [b"a", b"b", b"c", b"d"]
    sent = asyncio.run(respond(bridge(recorder), chunks, pause=0.02))
    bodies = [f["body"] for _, f, _ in recorder.events if f.get("body")]
    assert bodies == chunks  # one message per chunk: no joining across a quiet period
    published = [at for _, f, at in recorder.events if f.get("body")]
    for produced, left in zip(sent, published):
        assert left - produced < COALESCE_S + 0.005


def test_unary_response_is_one_start_event():
    recorder = Recorder()

    async def unary() -> None:
        ex = bridge(recorder)
        await ex.send({"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]})
        await ex.send({"type": "http.response.body", "body": b"done"})

    asyncio.run(unary())
    assert len(recorder.events) == 1
    kind, fields, _ = recorder.events[0]
    assert (kind, fields["status"], fields["body"], fields["more_body"]) == (
        messages.START, 201, b"done", False)
    assert fields["inbox"] == "inbox"


def test_empty_chunks_are_not_carried():
    recorder = Recorder()
    asyncio.run(respond(bridge(recorder), [b"a", b"", b"b", b""], pause=None))
    assert chunks_of(recorder.events) == [b"a", b"b"]


def test_body_events_keep_whole_chunks_together_up_to_the_limit():
    events = messages.body_events([b"aaa", b"bb", b"c", b"dddd"], True, limit=6)
    assert [(e["body"], e.get("chunk_sizes"), e["more_body"]) for e in events] == [
        (b"aaabbc", [3, 2, 1], True), (b"dddd", None, True)]
    assert messages.body_events([b"aaa"], False, limit=6) == [
        {"body": b"aaa", "more_body": False}]
    assert messages.body_events([], False, limit=6) == [{"body": b"", "more_body": False}]


def test_body_events_cut_a_chunk_over_the_limit_into_pieces():
    events = messages.body_events([b"x", b"y" * 10, b"z"], False, limit=4)
    assert [messages.body_chunks(e) for e in events] == [
        [b"x"], [b"yyyy"], [b"yyyy"], [b"yy", b"z"]]  # pieces of the limit, from its start
    assert [e["more_body"] for e in events] == [True, True, True, False]


@pytest.mark.parametrize("sizes", [[1, 1], [2, 2], [0, 3], [-1, 4], [1.5, 1.5], [True, 2], "3"])
def test_chunk_sizes_that_do_not_describe_the_body_are_refused(sizes):
    with pytest.raises(ProtocolError, match="chunk_sizes"):
        messages.body_chunks({"body": b"abc", "chunk_sizes": sizes})


def test_an_event_without_chunk_sizes_is_one_chunk():
    assert messages.body_chunks({"body": b"abc"}) == [b"abc"]
    assert messages.body_chunks({"body": b""}) == []
