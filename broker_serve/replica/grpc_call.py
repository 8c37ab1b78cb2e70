"""Running one `grpc` request in a replica (docs/protocol.md, "`grpc` body").

The path's last segment names the ingress deployment's method. The request message is
decoded with the method's own deserializer, the method gets the message object (and a
`grpc_context` if it takes one, as in Ray), and each message it returns or yields goes back
serialized, one `result` event each. Errors take the shared path of `call`: the replica's
`_handle` turns a user exception into a 500 `error` event with its message.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ..context import _web
from ..exceptions import ProtocolError, UntrustedPayload
from ..protocol import messages as protocol
from ..protocol.grpc_methods import GrpcMethod, GrpcMethods
from . import multiplex
from .execution import ReplyStream, Servable
from .grpc_context import RayServegRPCContext

GRPC_CONTEXT_ARGUMENT = "grpc_context"


class GrpcResolver:
    """The cluster's `grpc_servicer_functions`, imported on the first `grpc` request, so that
    a replica that serves no gRPC never imports grpcio or the user's generated modules."""

    def __init__(self, servicer_functions: Sequence[str] = ()) -> None:
        self.servicer_functions = list(servicer_functions)
        # Why the stored grpc_options were refused, if they were: nothing of them is imported.
        self.refused: str | None = None
        self._methods: GrpcMethods | None = None

    def method(self, path: str) -> GrpcMethod:
        if self._methods is None:
            if self.refused is not None:
                raise UntrustedPayload(self.refused)
            if not self.servicer_functions:
                raise ProtocolError("this cluster has no grpc_servicer_functions "
                                    "(serve.start(grpc_options=...)), so no gRPC method is "
                                    "known", status=404, error="NoSuchMethod")
            try:
                self._methods = GrpcMethods(self.servicer_functions)
            except ValueError as exc:  # tried again on the next request: the code may appear
                raise ProtocolError(str(exc), status=500, error="GrpcServicerFunctions"
                                    ) from exc
        return self._methods.method(path)


async def run_grpc(servable: Servable, stream: ReplyStream, payload: dict[str, Any],
                   resolver: GrpcResolver) -> None:
    path, body = payload.get("method"), payload.get("body", b"")
    if not isinstance(path, str) or not isinstance(body, bytes):
        raise ProtocolError("a grpc body needs 'method' (str) and 'body' (bin)")
    method = resolver.method(path)
    fn = servable._resolve(method.name)
    _web.set(False)
    stream.method, stream.http = method.name, ("GRPC", path)  # metrics label, access log
    multiplex._set_model_id(str(payload.get("multiplexed_model_id") or ""))
    try:
        request = method.request_deserializer(body)
    except Exception as exc:  # protobuf raises DecodeError, and others for wrong types
        raise ProtocolError(f"the request is not a serialized request message of {path}: "
                            f"{exc}") from exc
    context = RayServegRPCContext(_metadata_pairs(payload.get("metadata")))
    kwargs = {GRPC_CONTEXT_ARGUMENT: context} if _takes_grpc_context(fn) else {}
    result = await servable.call(fn, request, **kwargs)
    if inspect.isasyncgen(result) or inspect.isgenerator(result):
        await _stream_replies(servable, stream, method, result)
        await stream.send(protocol.RESULT, {"more": False, **context.final_fields()},
                          final=True)
    else:
        await stream.send(protocol.RESULT, {"body": method.response_serializer(result),
                                            "more": False, **context.final_fields()},
                          final=True)


async def _stream_replies(servable: Servable, stream: ReplyStream, method: GrpcMethod,
                          replies: Any) -> None:
    """One `result` event per message. However it ends (the caller cancelled, the replica
    stopped), the generator is closed here, so its `finally` runs at once."""
    try:
        if inspect.isasyncgen(replies):
            async for reply in replies:
                await stream.send(protocol.RESULT, {"body": method.response_serializer(reply),
                                                    "more": True})
        else:
            sentinel = object()
            while (reply := await servable.threads.run(next, replies, sentinel)) \
                    is not sentinel:
                await stream.send(protocol.RESULT, {"body": method.response_serializer(reply),
                                                    "more": True})
    finally:
        if inspect.isasyncgen(replies):
            await replies.aclose()
        else:
            try:
                replies.close()
            except ValueError:  # still running in its thread: closed when that step returns
                pass          # and the generator is dropped


def _metadata_pairs(metadata: Any) -> list[tuple[str, str]]:
    if metadata is None:
        return []
    try:
        return [(str(key), str(value)) for key, value in metadata]
    except (TypeError, ValueError) as exc:
        raise ProtocolError("'metadata' must be a list of [key, value] pairs") from exc


def _takes_grpc_context(fn: Any) -> bool:
    try:
        return GRPC_CONTEXT_ARGUMENT in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
