"""The proxy's half of a WebSocket session (docs/protocol.md, `websocket`).

The session is pinned to the replica that accepted it: client frames go to that replica's
inbox, and the app's frames arrive as reply events. The session ends when either side closes,
or with 1011 when the replica is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..protocol import messages
from ..transport.broker import Broker, ReplyEvents

# The close code uvicorn's WebSocket server ends a session with when a client's message is
# over `ws_max_size` (http_options.max_websocket_message_bytes).
MESSAGE_TOO_BIG = 1009


class WebSocketSession:
    """The proxy's half of one WebSocket session (docs/protocol.md, `websocket`)."""

    def __init__(self, broker: Broker, request_id: str, receive: Any, send: Any,
                 refused: Callable[[str], None] | None = None) -> None:
        self.broker = broker
        self.refused = refused  # counts a session ended at the message size limit
        self.request_id = request_id
        self.receive = receive
        self.send = send
        self.replica: str | None = None
        self.inbox: str | None = None
        self.accepted = False
        self.closed = False
        self._from_client: asyncio.Task[None] | None = None
        self._events: ReplyEvents | None = None

    async def relay(self, events: ReplyEvents) -> None:
        self._events = events
        while not self.closed:
            kind, event = await events.get()
            if self.replica is not None and event.get("replica", self.replica) != self.replica:
                # Redelivered after its replica died: the session cannot move. Close the client
                # and tell the new replica the client is gone, so no half-dead session stays.
                if event.get("inbox"):
                    await self._to_replica(event["inbox"], messages.WS_DISCONNECT, {"code": 1011})
                await self.close(1011)
                return
            self.replica = event.get("replica", self.replica)
            if kind == messages.WS_ACCEPT:
                self.inbox, self.accepted = event["inbox"], True
                await self.send({"type": "websocket.accept",
                                 "subprotocol": event.get("subprotocol"),
                                 "headers": [tuple(h) for h in event.get("headers") or ()]})
                self._from_client = asyncio.ensure_future(self._client_to_replica())
            elif kind == messages.WS_SEND:
                if event.get("bytes") is not None:
                    await self.send({"type": "websocket.send", "bytes": event["bytes"]})
                else:
                    await self.send({"type": "websocket.send", "text": event.get("text", "")})
            elif kind == messages.WS_CLOSE:
                await self.close(int(event.get("code", 1000)), str(event.get("reason", "")))
            elif kind == messages.ERROR:
                await self.close(1011)

    async def _client_to_replica(self) -> None:
        assert self.inbox is not None
        while True:
            message = await self.receive()
            if message["type"] == "websocket.receive":
                data = message.get("bytes")
                fields = {"bytes": data} if data is not None else {"text": message.get("text")}
                await self._to_replica(self.inbox, messages.WS_RECEIVE, fields)
            elif message["type"] == "websocket.disconnect":
                self.closed = True
                if message.get("code") == MESSAGE_TOO_BIG and self.refused is not None:
                    self.refused("websocket_message_too_large")
                await self._to_replica(self.inbox, messages.WS_DISCONNECT,
                                       {"code": message.get("code", 1000)})
                if self._events is not None:  # wake the relay: nothing left to wait for
                    self._events.put_nowait(("client.gone", {}))
                return

    async def _to_replica(self, inbox: str, kind: str, fields: dict[str, Any]) -> None:
        # mandatory: if the replica (and so its inbox) is gone, the frame comes back as an
        # error event and the session is closed with 1011.
        await self.broker.publish(inbox, messages.pack(fields), type=kind,
                                  correlation_id=self.request_id, mandatory=True)

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
            except (OSError, RuntimeError):  # gone already: uvicorn's ClientDisconnected, or
                pass  # "Unexpected ASGI message" for a session it closed

    async def stop(self) -> None:
        if self._from_client is not None and not self._from_client.done():
            self._from_client.cancel()
            await asyncio.gather(self._from_client, return_exceptions=True)
        if not self.closed and self.inbox is not None:
            await self._to_replica(self.inbox, messages.WS_DISCONNECT, {"code": 1001})
