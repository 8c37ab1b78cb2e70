"""Ack batching against a model of RabbitMQ's rules, with random start, finish and reject orders.

RabbitMQ closes a channel whose ack or reject names a tag that is not unacked on it, and
`multiple=True` settles every unacked tag up to the one named. The model checks every
settlement against those rules, and that only finished deliveries are acked, only rejected ones
rejected, and nothing finished stays unacked after a flush.

`LedgerMachine` drives the pure decision logic. `SettlerMachine` drives the sender too, over
fake channels whose writes may stall (a full write queue), and replaces the channel mid-batch:
the old channel's late finishes must never reach the new one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pamqp.commands
import pamqp.frame
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker_serve.transport.acks import AckLedger, Settlement, Settler
from broker_serve.transport.aiormq_adapter import FrameWriter


@dataclass
class BrokerChannel:
    """RabbitMQ's view of one channel: which tags are unacked, and what settled them."""

    unacked: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    rejected: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)  # what RabbitMQ would close the channel for
    next_tag: int = 1

    def deliver(self) -> int:
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self.unacked.add(tag)
        return tag

    def apply(self, settlement: Settlement) -> None:
        if settlement.tag not in self.unacked:
            self.errors.append(f"PRECONDITION_FAILED - unknown delivery tag {settlement.tag}")
            return
        if settlement.reject:
            assert not settlement.multiple
            self.unacked.discard(settlement.tag)
            self.rejected.add(settlement.tag)
        elif settlement.multiple:
            settled = {tag for tag in self.unacked if tag <= settlement.tag}
            self.unacked -= settled
            self.acked |= settled
        else:
            self.unacked.discard(settlement.tag)
            self.acked.add(settlement.tag)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broker = BrokerChannel()
        self.ledger = AckLedger()
        self.running: list[int] = []
        self.finished: set[int] = set()
        self.rejected: set[int] = set()

    @rule(count=st.integers(1, 5))
    def deliver(self, count: int) -> None:
        for _ in range(count):
            tag = self.broker.deliver()
            self.ledger.delivered(tag, f"request-{tag}")
            self.running.append(tag)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        # Any running delivery: a long-running low tag finishes last when hypothesis says so.
        tag = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.ledger.finished(tag)
        self.finished.add(tag)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        tag = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        settlement = self.ledger.reject(tag)
        assert settlement == Settlement(tag, reject=True)
        self.broker.apply(settlement)
        self.rejected.add(tag)

    @rule()
    def flush(self) -> None:
        for settlement in self.ledger.flush():
            self.broker.apply(settlement)
        assert not (self.broker.unacked & self.finished), "a finished delivery stayed unacked"

    @invariant()
    def settles_only_what_it_should(self) -> None:
        assert not self.broker.errors
        assert self.broker.acked <= self.finished, "acked a delivery that had not finished"
        assert self.broker.rejected <= self.rejected
        assert set(self.running) <= self.broker.unacked, "settled a running delivery"
        assert len(self.ledger) == len(self.broker.unacked)

    def teardown(self) -> None:
        for tag in self.running:
            self.ledger.finished(tag)
            self.finished.add(tag)
        for settlement in self.ledger.flush():
            self.broker.apply(settlement)
        assert not self.broker.unacked
        assert len(self.ledger) == 0


LedgerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60,
                                           deadline=None)
test_ledger_keeps_rabbitmq_rules = LedgerMachine.TestCase


class Wire:
    """The connection's writer queue and the broker behind it. Frame sets are decoded and
    applied to the channel that had their number when they were handed over: one handed over
    for a channel already closed would reach the broker after the close, where its frames
    would be a connection error, or land on a channel that reuses the number."""

    def __init__(self, maxsize: int, stalls: list[int]) -> None:
        self.channels: dict[int, FakeChannel] = {}
        self.queue = _RecordingQueue(self, maxsize)
        self.closing: asyncio.Future[Any] = asyncio.get_event_loop().create_future()
        self.write_queue = self.queue
        self.stalls = stalls
        self.errors: list[str] = []
        self._reads = 0

    async def run(self) -> None:
        while True:
            frame, channels = await self.queue.get()
            self._reads += 1
            for _ in range(self.stalls[self._reads % len(self.stalls)]):
                await asyncio.sleep(0)
            self._apply(frame.payload, channels)
            frame.drain()

    def _apply(self, payload: bytes, channels: dict[int, tuple[FakeChannel, bool]]) -> None:
        while payload:
            size, number, method = pamqp.frame.unmarshal(payload)
            payload = payload[size:]
            channel, was_closed = channels.get(number, (None, True))
            if channel is None or was_closed:
                self.errors.append(f"a frame for channel {number}, closed when handed over")
                continue
            if channel.is_closed:
                continue  # closed since: the broker discards frames until the close completes
            if isinstance(method, pamqp.commands.Basic.Ack):
                channel.broker.apply(Settlement(method.delivery_tag, multiple=method.multiple))
            else:
                assert isinstance(method, pamqp.commands.Basic.Reject) and not method.requeue
                channel.broker.apply(Settlement(method.delivery_tag, reject=True))


class _RecordingQueue(asyncio.Queue[Any]):
    """aiormq's writer queue, noting which channel had each number at hand-over."""

    def __init__(self, wire: Wire, maxsize: int) -> None:
        super().__init__(maxsize)
        self._wire = wire

    def put_nowait(self, item: Any) -> None:
        channels = {n: (c, c.is_closed) for n, c in self._wire.channels.items()}
        super().put_nowait((item, channels))


@dataclass
class FakeChannel:
    number: int
    broker: BrokerChannel
    is_closed: bool = False


class SettlerMachine(RuleBasedStateMachine):
    """A replica's settler and its connection's real FrameWriter, over a writer queue of two
    slots whose reader stalls: hand-overs wait for room. Channels are replaced mid-batch and
    their numbers reused, as aiormq reuses a number once the broker confirmed the close."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.stalls: list[int] = [0]
        self.wire = Wire(maxsize=2, stalls=self.stalls)
        self.writer = FrameWriter(self.wire)  # type: ignore[arg-type]
        self.reader = self.loop.create_task(self.wire.run())
        self.generations: list[dict[str, Any]] = []
        self._new_channel()

    def _new_channel(self) -> None:
        if self.generations:
            # The broker requeues the old channel's unacked deliveries; its tags mean nothing
            # on the new channel, which may have the same number.
            self.generations[-1]["channel"].is_closed = True
        broker = BrokerChannel()
        channel = FakeChannel(number=1 + len(self.generations) % 2, broker=broker)
        self.wire.channels[channel.number] = channel
        self.generations.append({
            "broker": broker, "channel": channel, "running": [], "finished": set(),
            "rejected": set(),
            "settler": Settler(channel, self.writer, prefetch=8,  # type: ignore[arg-type]
                               window_s=0.0005),
        })

    @property
    def current(self) -> dict[str, Any]:
        return self.generations[-1]

    def _turn(self, turns: int = 1) -> None:
        for _ in range(turns):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(count=st.integers(1, 4))
    def deliver(self, count: int) -> None:
        gen = self.current
        for _ in range(count):
            tag = gen["broker"].deliver()
            gen["settler"].delivered(tag, f"request-{tag}")
            gen["running"].append(tag)

    @rule(data=st.data(), old=st.booleans())
    def finish(self, data: st.DataObject, old: bool) -> None:
        # A request of a replaced channel may still finish: its settlement must go nowhere.
        gen = self.generations[0 if old else -1]
        if not gen["running"]:
            return
        tag = gen["running"].pop(data.draw(st.integers(0, len(gen["running"]) - 1)))
        gen["finished"].add(tag)
        self.loop.run_until_complete(_call(gen["settler"].finished, tag))

    @rule(data=st.data())
    def finish_several_in_one_turn(self, data: st.DataObject) -> None:
        """Requests that end in the same loop turn: several flushes with no write between."""
        gen = self.current
        tags = data.draw(st.lists(st.sampled_from(gen["running"]), unique=True, max_size=4)
                         if gen["running"] else st.just([]))
        for tag in tags:
            gen["running"].remove(tag)
            gen["finished"].add(tag)

        async def finish_all() -> None:
            for tag in tags:
                gen["settler"].finished(tag)

        self.loop.run_until_complete(finish_all())

    @rule()
    def flush_now(self) -> None:
        """The window's timer fires."""
        self.loop.run_until_complete(_call(self.current["settler"].flush))

    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        gen = self.current
        if not gen["running"]:
            return
        tag = gen["running"].pop(data.draw(st.integers(0, len(gen["running"]) - 1)))
        gen["rejected"].add(tag)
        self.loop.run_until_complete(_call(gen["settler"].rejected, tag))

    @rule(stalls=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def stall_writes(self, stalls: list[int]) -> None:
        self.stalls[:] = stalls

    @rule(turns=st.integers(1, 4))
    def run_loop(self, turns: int) -> None:
        self._turn(turns)

    @rule()
    def wait_for_the_window(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0.001))
        self._turn(12)

    @rule()
    def replace_channel(self) -> None:
        self._new_channel()

    @invariant()
    def settles_only_what_it_should(self) -> None:
        assert not self.wire.errors
        for gen in self.generations:
            broker = gen["broker"]
            assert not broker.errors
            assert broker.acked <= gen["finished"]
            assert broker.rejected <= gen["rejected"]
            assert set(gen["running"]) <= broker.unacked

    def teardown(self) -> None:
        try:
            gen = self.current
            while gen["running"]:
                tag = gen["running"].pop()
                gen["finished"].add(tag)
                self.loop.run_until_complete(_call(gen["settler"].finished, tag))
            self.loop.run_until_complete(gen["settler"].drain())
            assert not gen["broker"].unacked, "drain left deliveries unacked"
            self.settles_only_what_it_should()
        finally:
            self.reader.cancel()
            self.loop.run_until_complete(_settle_tasks())
            self.loop.close()
            asyncio.set_event_loop(None)


async def _settle_tasks() -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*others, return_exceptions=True)


async def _call(function: Any, *args: Any) -> None:
    function(*args)  # the settler wants a running loop (timers, its sender task)


SettlerMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=100,
                                            deadline=None)
test_settler_sends_in_order_across_stalls_and_channel_changes = SettlerMachine.TestCase


def test_an_ack_above_a_running_tag_stays_ahead_of_the_multiple_ack_that_covers_it() -> None:
    """The first wave's bug: a single ack of 3 (above running 1 and 2) waited in a full write
    queue while a later `multiple` ack of 4 settled 1 to 4; the late ack of 3 then named an
    unknown tag and the broker closed the channel."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    wire = Wire(maxsize=1, stalls=[3])  # the reader waits 3 loop turns per frame set
    broker = BrokerChannel()
    channel = wire.channels[1] = FakeChannel(1, broker)
    settler = Settler(channel, FrameWriter(wire), prefetch=16)  # type: ignore[arg-type]

    async def scenario() -> None:
        reader = asyncio.ensure_future(wire.run())
        for _ in range(5):
            tag = broker.deliver()
            settler.delivered(tag, f"request-{tag}")
        settler.finished(3)
        settler.flush()  # ack 3 alone: 1 and 2 still run
        await asyncio.sleep(0)
        for tag in (1, 2, 4):
            settler.finished(tag)
        settler.flush()  # ack 4 multiple: settles 1 to 4
        settler.finished(5)
        await settler.drain()
        reader.cancel()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    assert not broker.errors and not wire.errors
    assert broker.acked == {1, 2, 3, 4, 5} and not broker.unacked
