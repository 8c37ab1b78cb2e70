"""The wire protocol as an AsyncAPI 3.0.0 document: the queues of a cluster's deployments, what
a caller publishes to them and what comes back (`broker-serve asyncapi`).

It is the machine-readable form of docs/protocol.md, from a caller's point of view (the proxy,
a handle, a service in another language), built from the protocol's own schemas
(`schemas.py`). AMQP bindings are those of bindingVersion 0.3.0: a queue is a channel whose
address is its name (`is: queue`), published to through the default exchange; the cancel
broadcast and each deployment's exchange are fanout exchanges (`is: routingKey`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from yarl import URL

from . import messages, schemas
from .names import Names

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"

Document = dict[str, Any]


class Server(NamedTuple):
    """Where callers reach RabbitMQ: an AMQP URL without its credentials."""

    host: str  # host:port
    vhost: str = "/"
    protocol: str = "amqp"

    @classmethod
    def from_url(cls, url: str) -> Server:
        parsed = URL(url)
        port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
        return cls(f"{parsed.host or 'localhost'}:{port}", parsed.path.lstrip("/") or "/",
                   "amqps" if parsed.scheme == "amqps" else "amqp")


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


def _key(name: str) -> str:
    """`name` as part of a key of channels or operations: letters, digits, `_` and `-`."""
    return re.sub(r"[^\w\-]", "_", name)


# (component name, schema) of each message's payload and AMQP properties.
_SCHEMAS: dict[str, schemas.Schema] = {
    "HttpRequest": schemas.HTTP_REQUEST,
    "CallRequest": schemas.CALL_REQUEST,
    "GrpcRequest": schemas.GRPC_REQUEST,
    "WebSocketRequest": schemas.WEBSOCKET_REQUEST,
    "AcceptedEvent": schemas.ACCEPTED_EVENT,
    "StartEvent": schemas.START_EVENT,
    "BodyEvent": schemas.BODY_EVENT,
    "ResultEvent": schemas.RESULT_EVENT,
    "ErrorEvent": schemas.ERROR_EVENT,
    "WsAcceptEvent": schemas.WS_ACCEPT_EVENT,
    "WsSendEvent": schemas.WS_SEND_EVENT,
    "WsCloseEvent": schemas.WS_CLOSE_EVENT,
    "InboxBody": schemas.INBOX_BODY,
    "InboxDisconnect": schemas.INBOX_DISCONNECT,
    "InboxCredit": schemas.INBOX_CREDIT,
    "InboxWsReceive": schemas.INBOX_WS_RECEIVE,
    "InboxWsDisconnect": schemas.INBOX_WS_DISCONNECT,
    "Cancel": schemas.CANCEL,
    "RetryWait": schemas.RETRY_WAIT,
    "RequestProperties": schemas.REQUEST_PROPERTIES,
    "JobProperties": schemas.JOB_PROPERTIES,
    "ReplyProperties": schemas.REPLY_PROPERTIES,
    "InboxProperties": schemas.INBOX_PROPERTIES,
    "CancelProperties": schemas.CANCEL_PROPERTIES,
    "DeadLetterProperties": schemas.DEAD_LETTER_PROPERTIES,
}


class _Message(NamedTuple):
    amqp_type: str  # the AMQP `type` property
    payload: str  # component schema names
    properties: str
    summary: str


_REQUESTS = {
    "httpRequest": _Message(messages.KIND_HTTP, "HttpRequest", "RequestProperties",
                             "An HTTP request"),
    "callRequest": _Message(messages.KIND_CALL, "CallRequest", "RequestProperties",
                             "A handle call"),
    "grpcRequest": _Message(messages.KIND_GRPC, "GrpcRequest", "RequestProperties",
                             "A gRPC call"),
    "websocketRequest": _Message(messages.KIND_WEBSOCKET, "WebSocketRequest",
                                  "RequestProperties", "A WebSocket session"),
}
_JOBS = {
    "httpJob": _Message(messages.KIND_HTTP, "HttpRequest", "JobProperties",
                         "An HTTP request run as a job: its whole body, no reply_to"),
    "callJob": _Message(messages.KIND_CALL, "CallRequest", "JobProperties",
                         "A handle call run as a job: no reply_to"),
}
_REPLIES = {
    "accepted": _Message(messages.ACCEPTED, "AcceptedEvent", "ReplyProperties",
                               "Send the rest of the request body to the inbox"),
    "start": _Message(messages.START, "StartEvent", "ReplyProperties",
                            "The HTTP response starts"),
    "body": _Message(messages.BODY, "BodyEvent", "ReplyProperties",
                           "More of the HTTP response body"),
    "result": _Message(messages.RESULT, "ResultEvent", "ReplyProperties",
                             "A call's value, or one item of a stream"),
    "error": _Message(messages.ERROR, "ErrorEvent", "ReplyProperties",
                            "Terminal: the request failed"),
    "wsAccept": _Message(messages.WS_ACCEPT, "WsAcceptEvent", "ReplyProperties",
                                "The app accepted the WebSocket"),
    "wsSend": _Message(messages.WS_SEND, "WsSendEvent", "ReplyProperties",
                              "A frame for the client"),
    "wsClose": _Message(messages.WS_CLOSE, "WsCloseEvent", "ReplyProperties",
                               "Terminal: the app closed the WebSocket"),
}
_INBOX = {
    "inboxBody": _Message(messages.BODY, "InboxBody", "InboxProperties",
                           "The next chunk of the request body"),
    "disconnect": _Message(messages.DISCONNECT, "InboxDisconnect", "InboxProperties",
                                 "The caller gave up sending the request body"),
    "credit": _Message(messages.CREDIT, "InboxCredit", "InboxProperties",
                             "Flow control: more response bytes were passed on"),
    "wsReceive": _Message(messages.WS_RECEIVE, "InboxWsReceive", "InboxProperties",
                                 "A frame from the client"),
    "wsDisconnect": _Message(messages.WS_DISCONNECT, "InboxWsDisconnect",
                                    "InboxProperties", "The client went away"),
}
_CANCEL = {"cancel": _Message(messages.CANCEL, "Cancel", "CancelProperties",
                              "Cancel requests by id, queued or running")}


def _component_message(message: _Message) -> dict[str, Any]:
    return {
        "name": message.amqp_type,
        "summary": message.summary,
        "contentType": messages.CONTENT_TYPE,
        "headers": _ref("components", "schemas", message.properties),
        "payload": _ref("components", "schemas", message.payload),
        "correlationId": _ref("components", "correlationIds", "request"),
        "bindings": {"amqp": {"messageType": message.amqp_type,
                              "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": "deadLetter",
        "summary": "A message that could not be answered: a failed job (bs-dead-* headers) "
                   "or one RabbitMQ dead-lettered (x-death); its body is that of the message",
        "contentType": messages.CONTENT_TYPE,
        "headers": _ref("components", "schemas", "DeadLetterProperties"),
        "payload": {"oneOf": [_ref("components", "schemas", "HttpRequest"),
                              _ref("components", "schemas", "CallRequest"),
                              _ref("components", "schemas", "GrpcRequest"),
                              _ref("components", "schemas", "WebSocketRequest")]},
    }


def _queue(address: str, description: str, server: Server, *, durable: bool,
           exclusive: bool, messages_: Sequence[str],
           parameters: dict[str, str] | None = None) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {name: _ref("components", "messages", name) for name in messages_},
        "bindings": {"amqp": {
            "is": "queue",
            "queue": {"name": address, "durable": durable, "exclusive": exclusive,
                      "autoDelete": False, "vhost": server.vhost},
            "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if parameters:
        channel["parameters"] = {name: {"description": text} for name, text in parameters.items()}
    return channel


def _messages_of(channel: str, names: Sequence[str]) -> list[dict[str, str]]:
    return [_ref("channels", channel, "messages", name) for name in names]


def document(cluster: str, apps: Mapping[str, Sequence[str]], version: str,
             server: Server | None = None) -> Document:
    """The AsyncAPI 3.0.0 document of `cluster`'s applications (`apps`: app name -> its
    deployments' names), published as `version`."""
    server = server or Server("localhost:5672")
    names = Names(cluster)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    request_names, job_names = list(_REQUESTS), list(_JOBS)
    for app, deployments in sorted(apps.items()):
        for deployment in sorted(deployments):
            channel = f"{_key(app)}__{_key(deployment)}"
            channels[channel] = _queue(
                names.request_queue(app, deployment),
                f"The request queue of deployment {deployment!r} of application {app!r}: "
                "requests and jobs, through the default exchange. Declared by the controller; "
                "callers must not declare it.", server, durable=True, exclusive=False,
                messages_=[*request_names, *job_names])
            operations[f"sendRequest__{channel}"] = {
                "action": "send",
                "channel": _ref("channels", channel),
                "summary": f"Call {app}/{deployment}: the replica publishes its reply events "
                           "to the request's reply_to",
                "messages": _messages_of(channel, request_names),
                "reply": {
                    "address": {"location": "$message.header#/reply_to",
                                "description": "the caller's reply queue"},
                    "channel": _ref("channels", "replies"),
                    "messages": _messages_of("replies", list(_REPLIES)),
                },
            }
            exchange = f"{channel}__exchange"
            channels[exchange] = {
                "address": "",
                "description": f"The exchange of {app}/{deployment}: a fanout exchange bound "
                               "to its request queue alone, for callers whose RabbitMQ user "
                               "may publish to named deployments only (docs/security.md). "
                               "Declared by the controller.",
                "messages": {name: _ref("components", "messages", name)
                             for name in [*request_names, *job_names]},
                "bindings": {"amqp": {
                    "is": "routingKey",
                    "exchange": {"name": names.deployment_exchange(app, deployment),
                                 "type": "fanout", "durable": True, "autoDelete": False,
                                 "vhost": server.vhost},
                    "bindingVersion": AMQP_BINDING_VERSION}},
            }
            operations[f"sendRequestThroughExchange__{channel}"] = {
                "action": "send",
                "channel": _ref("channels", exchange),
                "summary": f"Call {app}/{deployment} through its exchange, as sendRequest",
                "messages": _messages_of(exchange, request_names),
                "reply": {
                    "address": {"location": "$message.header#/reply_to",
                                "description": "the caller's reply queue"},
                    "channel": _ref("channels", "replies"),
                    "messages": _messages_of("replies", list(_REPLIES)),
                },
            }
            operations[f"submitJob__{channel}"] = {
                "action": "send",
                "channel": _ref("channels", channel),
                "summary": f"Submit a job to {app}/{deployment}: persistent, confirmed, no "
                           f"reply_to; its result is kept in Redis ({names.job('<id>')})",
                "messages": _messages_of(channel, job_names),
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True,
                                      "bindingVersion": AMQP_BINDING_VERSION}},
            }
    channels["replies"] = _queue(
        names.reply_queue("{processId}"),
        "A caller's reply queue: any queue the caller owns (broker-serve's are named so). "
        "Events carry the request's correlation_id.", server, durable=False, exclusive=True,
        messages_=list(_REPLIES), parameters={"processId": "the caller process's id"})
    channels["inbox"] = _queue(
        names.inbox("{replicaId}"),
        "A replica's inbox, named by its accepted, start and ws.accept events: the rest of a "
        "request body, credits, WebSocket frames.", server, durable=False, exclusive=True,
        messages_=list(_INBOX), parameters={"replicaId": "the replica's id"})
    channels["cancel"] = {
        "address": "",
        "description": f"The cancel broadcast: fanout exchange {names.cancel_exchange}, "
                       "routing key \"\"; every replica receives each message.",
        "messages": {"cancel": _ref("components", "messages", "cancel")},
        "bindings": {"amqp": {
            "is": "routingKey",
            "exchange": {"name": names.cancel_exchange, "type": "fanout", "durable": True,
                         "autoDelete": False, "vhost": server.vhost},
            "bindingVersion": AMQP_BINDING_VERSION}},
    }
    channels["dead"] = _queue(
        names.dead_letters, "Every message that could not be answered: failed jobs, expired "
        "requests, requests without reply_to or whose replicas died with them.", server,
        durable=True, exclusive=False, messages_=["deadLetter"])
    operations.update({
        "receiveReplies": {
            "action": "receive", "channel": _ref("channels", "replies"),
            "summary": "Read reply events; a response ends with start/body of more_body "
                       "false, result of more false, error, or ws.close",
            "messages": _messages_of("replies", list(_REPLIES))},
        "sendInbox": {
            "action": "send", "channel": _ref("channels", "inbox"),
            "summary": "Send the rest of a request to the replica that took it",
            "messages": _messages_of("inbox", list(_INBOX))},
        "sendCancel": {
            "action": "send", "channel": _ref("channels", "cancel"),
            "summary": "Cancel requests or jobs by id",
            "messages": _messages_of("cancel", ["cancel"])},
        "receiveDeadLetters": {
            "action": "receive", "channel": _ref("channels", "dead"),
            "summary": "Read, replay or purge dead letters",
            "messages": _messages_of("dead", ["deadLetter"])},
    })
    component_messages = {name: _component_message(message) for name, message in
                          {**_REQUESTS, **_JOBS, **_REPLIES, **_INBOX, **_CANCEL}.items()}
    component_messages["deadLetter"] = _dead_letter_message()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"broker-serve cluster {cluster}",
            "version": version,
            "description": f"Wire protocol version {messages.VERSION} of broker-serve "
                           "(docs/protocol.md), from a caller's side: msgpack bodies, AMQP "
                           "0-9-1. A message's headers here are its AMQP properties; the "
                           "AMQP header table is their `headers`.",
        },
        "defaultContentType": messages.CONTENT_TYPE,
        "servers": {"rabbitmq": {
            "host": server.host,
            "protocol": server.protocol,
            "protocolVersion": "0.9.1",
            **({"pathname": "/" + server.vhost} if server.vhost != "/" else {}),
            "description": "RabbitMQ; job records and results are in Redis",
        }},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(_SCHEMAS),
            "messages": component_messages,
            "correlationIds": {"request": {
                "location": "$message.header#/correlation_id",
                "description": "the request id (a job's id): every reply carries it"}},
        },
    }
