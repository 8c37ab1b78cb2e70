"""JSON Schemas of the wire protocol (docs/protocol.md): every message body, the AMQP header
table of each kind of message, and its AMQP properties.

They are draft-07 schemas, which is what AsyncAPI's Schema Object accepts, so `asyncapi.py`
publishes them unchanged; tests/test_asyncapi.py validates the messages broker-serve's own
encoders build against them, so that the two cannot drift apart.

Conventions:

- **Bytes.** msgpack tells `bin` from `str`; JSON Schema has strings only. A `bin` value is
  described as ``{"type": "string", "contentEncoding": "binary"}``, a `str` value as a plain
  string. To validate a decoded message, first turn each `bytes` into a `str`, one character
  per byte (latin-1), so that lengths still count bytes (a `sig` is 32 long).
- **Open maps.** No schema here sets ``additionalProperties: false``: within a version, new
  optional fields may be added and readers ignore those they do not know (docs/protocol.md,
  "Versioning").
- **Properties and headers.** An AMQP message has basic properties (`type`, `correlation_id`,
  `reply_to`, ...), one of which is the header table (`headers`: `bs-version`, `bs-job`, ...).
  The `*_PROPERTIES` schemas describe the properties, with the header table as their
  `headers` property; AsyncAPI's message `headers` are these, so a runtime expression such as
  ``$message.header#/reply_to`` names a property and ``$message.header#/headers/bs-job`` a
  header.
"""

from __future__ import annotations

from typing import Any

from . import jobs, messages, priorities

Schema = dict[str, Any]

BYTES: Schema = {"type": "string", "contentEncoding": "binary"}
_REQUEST_ID: Schema = {"type": "string", "minLength": 1, "maxLength": messages.MAX_ID_LENGTH}
_UNIX_MS: Schema = {"type": "integer", "description": "Unix time in milliseconds"}
_BYTE_PAIRS: Schema = {"type": "array", "items": {
    "type": "array", "items": [BYTES, BYTES], "minItems": 2, "maxItems": 2}}
_TEXT_PAIRS: Schema = {"type": "array", "items": {
    "type": "array", "items": [{"type": "string"}, {"type": "string"}],
    "minItems": 2, "maxItems": 2}}
_ADDRESS: Schema = {"type": ["array", "null"], "minItems": 2, "maxItems": 2,
                    "items": [{"type": "string"}, {"type": ["integer", "null"]}]}


def _object(properties: dict[str, Schema], required: list[str], description: str = "",
            **more: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "required": required, **more}
    if description:
        schema["description"] = description
    return schema


def _one_of_fields(*forms: tuple[str, list[str]], optional: bool = False) -> list[Schema]:
    """`oneOf` branches for maps that carry exactly one of several sets of fields (`forms`:
    (title, fields), a name ending in `?` optional), or, with `optional`, none of them."""
    every = sorted({name.rstrip("?") for _, fields in forms for name in fields})
    branches: list[Schema] = []
    for title, fields in forms:
        own = [name.rstrip("?") for name in fields]
        others = [name for name in every if name not in own]
        branches.append({"title": title, "required": [f for f in fields if not f.endswith("?")],
                         "not": {"anyOf": [{"required": [name]} for name in others]}})
    if optional:
        branches.append({"title": "none",
                         "not": {"anyOf": [{"required": [name]} for name in every]}})
    return branches


# values of a call: its arguments, a result, an exception's arguments -------------------------
_VALUE_FIELDS: dict[str, Schema] = {
    "value": {"description": "plain msgpack data, carried unchanged"},
    "data": {**BYTES, "description": "msgpack with extension types (docs/protocol.md, "
                                     "\"Typed values\")"},
    "pickled": {**BYTES, "description": "cloudpickle, loaded only if `sig` verifies"},
    "sig": {**BYTES, "minLength": 32, "maxLength": 32,
            "description": "HMAC-SHA256 of `data` or `pickled` under the cluster secret"},
}
_VALUE_FORMS = (("value", ["value"]), ("data", ["data", "sig?"]), ("pickled", ["pickled", "sig"]))
PACKED_VALUE: Schema = _object(_VALUE_FIELDS, [], "A value as `call_values.pack_value` packs it",
                               oneOf=_one_of_fields(*_VALUE_FORMS))

# request bodies ----------------------------------------------------------------------------
_SCOPE_FIELDS: dict[str, Schema] = {
    "path": {"type": "string", "pattern": "^/",
             "description": "the full path, percent-decoded, root_path included"},
    "raw_path": {"anyOf": [BYTES, {"type": "null"}], "description": "default: path encoded"},
    "query_string": BYTES,
    "headers": {**_BYTE_PAIRS, "description": "[name, value] pairs, names lower-case"},
    "root_path": {"type": "string", "description": "the matched route prefix, \"\" for \"/\""},
    "http_version": {"type": "string", "default": "1.1"},
    "scheme": {"type": "string", "default": "http"},
    "client": _ADDRESS,
    "server": _ADDRESS,
}
HTTP_SCOPE: Schema = _object({"method": {"type": "string"}, **_SCOPE_FIELDS}, ["method", "path"],
                             "The fields of an ASGI HTTP scope")
WEBSOCKET_SCOPE: Schema = _object(
    {**_SCOPE_FIELDS, "subprotocols": {"type": "array", "items": {"type": "string"}}}, ["path"],
    "The fields of an ASGI WebSocket scope")

HTTP_REQUEST: Schema = _object({
    "scope": HTTP_SCOPE,
    "body": {**BYTES, "description": "the first chunk of the request body, may be empty"},
    "more_body": {"type": "boolean", "description": "more chunks follow, to the inbox"},
    "window": {"type": "integer", "minimum": 1,
               "description": "bytes the replica may send ahead of the caller's credits"},
}, ["scope", "body", "more_body"], "An HTTP request (`type` http)")

_CALL_FIELDS: dict[str, Schema] = {
    "method": {"type": "string", "description": "the deployment's method; not private"},
    "args": {"type": "array"},
    "kwargs": {"type": "object"},
    "data": {**BYTES, "description": "msgpack of [args, kwargs], with extension types"},
    "pickled": {**BYTES, "description": "cloudpickle of (args, kwargs)"},
    "sig": _VALUE_FIELDS["sig"],
    "multiplexed_model_id": {"type": "string"},
}
CALL_REQUEST: Schema = _object(
    _CALL_FIELDS, ["method"], "A handle call (`type` call): its arguments as plain values, "
    "typed `data`, or a signed pickle",
    oneOf=_one_of_fields(("values", ["args", "kwargs"]), ("data", ["data", "sig?"]),
                         ("pickled", ["pickled", "sig"])))

GRPC_REQUEST: Schema = _object({
    "method": {"type": "string", "pattern": "^/", "description": "the full gRPC method path"},
    "body": {**BYTES, "description": "the request message, serialized"},
    "streaming": {"type": "boolean", "description": "the method is server-streaming"},
    "metadata": {**_TEXT_PAIRS, "description": "the client's ASCII metadata"},
    "multiplexed_model_id": {"type": "string"},
}, ["method", "body"], "A gRPC call (`type` grpc)")

WEBSOCKET_REQUEST: Schema = _object({"scope": WEBSOCKET_SCOPE}, ["scope"],
                                    "A WebSocket session (`type` websocket)")

# reply events ------------------------------------------------------------------------------
_EVENT_FIELDS: dict[str, Schema] = {
    "seq": {"type": "integer", "minimum": 0,
            "description": "counts from 0 for each delivery of the request"},
    "replica": {"type": "string", "description": "the replica's id"},
    "models": {"type": "array", "items": {"type": "string"},
               "description": "multiplexed deployments, first event: the models it holds"},
    "capacity": {"type": "integer", "description": "multiplexed deployments, first event: "
                                                   "its max_ongoing_requests"},
}
_CHUNKS: dict[str, Schema] = {
    "body": BYTES,
    "more_body": {"type": "boolean", "description": "false ends the response"},
    "chunk_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1},
                    "description": "the lengths of the application's chunks in `body`"},
}
_INBOX: Schema = {"type": "string", "description": "the replica's inbox queue"}


def _event(fields: dict[str, Schema], required: list[str], description: str,
           **more: Any) -> Schema:
    return _object({**fields, **_EVENT_FIELDS}, [*required, "seq", "replica"], description,
                   **more)


ACCEPTED_EVENT = _event({"inbox": _INBOX}, ["inbox"],
                        "Send the rest of the request body to `inbox`")
START_EVENT = _event({
    "inbox": _INBOX, "status": {"type": "integer"}, "headers": _BYTE_PAIRS, **_CHUNKS},
    ["inbox", "status", "headers", "body", "more_body"], "The HTTP response starts")
BODY_EVENT = _event(_CHUNKS, ["body", "more_body"], "The next bytes of the response body")
RESULT_EVENT = _event({
    **_VALUE_FIELDS,
    "more": {"type": "boolean", "description": "true: one item of a stream; false ends it"},
    "body": {**BYTES, "description": "gRPC: a response message, serialized"},
    "code": {"type": "integer", "description": "gRPC, final event: the status code"},
    "details": {"type": "string", "description": "gRPC, final event: the status details"},
    "trailing_metadata": _TEXT_PAIRS,
}, ["more"], "The return value of a call, or one item of a stream",
    oneOf=_one_of_fields(*_VALUE_FORMS, optional=True))
ERROR_EVENT = _event({
    "status": {"type": "integer", "description": "an HTTP status code"},
    "error": {"type": "string", "description": "the exception's type name"},
    "message": {"type": "string"},
    "module": {"type": "string", "description": "a call's exception class: __module__"},
    "qualname": {"type": "string", "description": "a call's exception class: __qualname__"},
    "args": {**PACKED_VALUE, "description": "[args, attributes] that rebuild the exception"},
}, ["status", "error", "message"], "Terminal: the request failed")
WS_ACCEPT_EVENT = _event({
    "inbox": _INBOX, "subprotocol": {"type": ["string", "null"]}, "headers": _BYTE_PAIRS},
    ["inbox"], "The app accepted the WebSocket; send the client's frames to `inbox`")
_FRAME: dict[str, Schema] = {"text": {"type": "string"}, "bytes": BYTES}
_FRAME_FORMS = _one_of_fields(("text", ["text"]), ("bytes", ["bytes"]))
WS_SEND_EVENT = _event(_FRAME, [], "A frame for the client", oneOf=_FRAME_FORMS)
WS_CLOSE_EVENT = _event({"code": {"type": "integer"}, "reason": {"type": "string"}},
                        ["code"], "Terminal: the app closed the WebSocket")

REPLY_EVENTS: dict[str, Schema] = {
    messages.ACCEPTED: ACCEPTED_EVENT, messages.START: START_EVENT,
    messages.BODY: BODY_EVENT, messages.RESULT: RESULT_EVENT, messages.ERROR: ERROR_EVENT,
    messages.WS_ACCEPT: WS_ACCEPT_EVENT, messages.WS_SEND: WS_SEND_EVENT,
    messages.WS_CLOSE: WS_CLOSE_EVENT,
}

# caller -> replica inbox, and the cancel broadcast -------------------------------------------
INBOX_BODY: Schema = _object({"body": BYTES, "more_body": {"type": "boolean"}},
                             ["body", "more_body"], "The next chunk of the request body")
INBOX_DISCONNECT: Schema = _object({}, [], "The caller gave up sending the request body")
INBOX_CREDIT: Schema = _object({"bytes": {"type": "integer", "minimum": 0}}, ["bytes"],
                               "The caller passed on `bytes` more bytes of the response")
INBOX_WS_RECEIVE: Schema = _object(_FRAME, [], "A frame from the client", oneOf=_FRAME_FORMS)
INBOX_WS_DISCONNECT: Schema = _object({"code": {"type": "integer"}}, ["code"],
                                      "The client went away")
INBOX_MESSAGES: dict[str, Schema] = {
    messages.BODY: INBOX_BODY, messages.DISCONNECT: INBOX_DISCONNECT,
    messages.CREDIT: INBOX_CREDIT, messages.WS_RECEIVE: INBOX_WS_RECEIVE,
    messages.WS_DISCONNECT: INBOX_WS_DISCONNECT,
}

CANCEL: Schema = _object({
    "ids": {"type": "array", "items": _REQUEST_ID, "minItems": 1},
    "expires": {**_UNIX_MS, "description": "until when replicas remember the ids (Unix ms)"},
}, ["ids", "expires"], "Cancel these requests, queued or running")

# header tables -------------------------------------------------------------------------------
_REQUEST_HEADER_FIELDS: dict[str, Schema] = {
    messages.HEADER_VERSION: {"const": messages.VERSION, "description": "protocol version"},
    messages.HEADER_DEADLINE: {**_UNIX_MS, "description": "not run after this (Unix ms)"},
    messages.HEADER_PUBLISHED: {"type": "integer",
                                "description": "when it was published (Unix microseconds)"},
    messages.HEADER_REQUEST_ID: {**_REQUEST_ID,
                                 "description": "the client request it serves, for logs"},
    messages.HEADER_TRACEPARENT: {
        "type": "string", "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C Trace Context: the publisher's span, parent of the replica's"},
    messages.HEADER_TRACESTATE: {"type": "string",
                                 "description": "W3C Trace Context: the vendors' state"},
}
REQUEST_HEADERS: Schema = _object(_REQUEST_HEADER_FIELDS, [messages.HEADER_VERSION],
                                  "The header table of a request")

RETRY_WAIT: Schema = _object({
    "wait": {"enum": ["fixed", "exponential", "random_exponential", "incrementing", "none"],
             "default": "exponential"},
    **{name: {"type": "number", "minimum": 0}
       for name in ("seconds", "multiplier", "min", "max", "start", "increment")},
    "exp_base": {"type": "number", "exclusiveMinimum": 1},
}, [], "A tenacity wait strategy and its arguments, in seconds")
_JOB_HEADER_FIELDS: dict[str, Schema] = {
    jobs.HEADER_JOB: {"type": "integer", "minimum": 1, "maximum": jobs.MAX_TTL_S,
                      "description": "marks a job: the seconds its record and result are kept"},
    jobs.HEADER_MAX_RETRIES: {"type": "integer", "minimum": 0, "maximum": jobs.MAX_RETRIES},
    jobs.HEADER_RETRY_WAIT: {"type": "string", "contentMediaType": "application/json",
                             "description": "JSON of a RetryWait (components.schemas)"},
}
JOB_HEADERS: Schema = _object({**_REQUEST_HEADER_FIELDS, **_JOB_HEADER_FIELDS},
                              [messages.HEADER_VERSION, jobs.HEADER_JOB],
                              "The header table of a job")

DEAD_LETTER_HEADERS: Schema = _object({
    **_REQUEST_HEADER_FIELDS, **_JOB_HEADER_FIELDS,
    jobs.HEADER_DEAD_QUEUE: {"type": "string", "description": "the queue it came from"},
    jobs.HEADER_DEAD_REASON: {"enum": [reason.value for reason in jobs.DeadReason]},
    jobs.HEADER_DEAD_ERROR: {"type": "string", "description": "the last failure's type name"},
    jobs.HEADER_DEAD_MESSAGE: {"type": "string", "description": "the last failure's text"},
    jobs.HEADER_DEAD_AT: _UNIX_MS,
    jobs.HEADER_ATTEMPT: {"type": "integer", "minimum": 0},
    "x-death": {"type": "array", "items": {"type": "object"},
                "description": "RabbitMQ's, on what it dead-lettered itself"},
}, [], "The header table of a dead letter: a failed job's (bs-dead-*) or RabbitMQ's (x-death)")

# AMQP properties -----------------------------------------------------------------------------
_CONTENT_TYPE: Schema = {"const": messages.CONTENT_TYPE}
_KINDS = [messages.KIND_HTTP, messages.KIND_CALL, messages.KIND_GRPC, messages.KIND_WEBSOCKET]
_REQUEST_PROPERTY_FIELDS: dict[str, Schema] = {
    "content_type": _CONTENT_TYPE,
    "type": {"enum": _KINDS, "description": "the kind of request"},
    "message_id": {**_REQUEST_ID, "description": "the request id"},
    "correlation_id": {**_REQUEST_ID, "description": "the request id; every reply carries it"},
    "reply_to": {"type": "string", "description": "the caller's reply queue"},
    "expiration": {"type": "string", "pattern": "^[0-9]+$",
                   "description": "milliseconds it may wait in the queue"},
    "priority": {"type": "integer", "minimum": 0, "maximum": priorities.MAX_PRIORITY},
    "delivery_mode": {"enum": [1, 2], "description": "2 (persistent) to a durable queue"},
    "headers": REQUEST_HEADERS,
}
REQUEST_PROPERTIES: Schema = _object(
    _REQUEST_PROPERTY_FIELDS, ["content_type", "type", "correlation_id", "reply_to", "headers"],
    "The AMQP properties of a request")
JOB_PROPERTIES: Schema = _object({
    **_REQUEST_PROPERTY_FIELDS,
    "type": {"enum": [messages.KIND_HTTP, messages.KIND_CALL]},
    "message_id": {**_REQUEST_ID, "description": "the job id"},
    "correlation_id": {**_REQUEST_ID, "description": "the job id"},
    "delivery_mode": {"const": 2},
    "headers": JOB_HEADERS,
}, ["content_type", "type", "message_id", "correlation_id", "headers"],
    "The AMQP properties of a job: no reply_to, persistent",
    **{"not": {"required": ["reply_to"]}})
DEAD_LETTER_PROPERTIES: Schema = _object({
    **_REQUEST_PROPERTY_FIELDS, "headers": DEAD_LETTER_HEADERS}, ["headers"],
    "The AMQP properties of a dead letter: those of the message that died")


def _typed(kinds: list[str], description: str, headers: Schema | None = None) -> Schema:
    fields: dict[str, Schema] = {
        "content_type": _CONTENT_TYPE,
        "type": {"enum": kinds},
        "correlation_id": {**_REQUEST_ID, "description": "the request's id"},
    }
    if headers is not None:
        fields["headers"] = headers
    return _object(fields, ["type", "correlation_id"], description)


REPLY_PROPERTIES = _typed(list(REPLY_EVENTS), "The AMQP properties of a reply event")
INBOX_PROPERTIES = _typed(list(INBOX_MESSAGES), "The AMQP properties of an inbox message")
CANCEL_PROPERTIES = _typed(
    [messages.CANCEL], "The AMQP properties of a cancel broadcast",
    _object({messages.HEADER_VERSION: {"const": messages.VERSION}}, [messages.HEADER_VERSION]))
