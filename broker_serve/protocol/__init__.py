"""The wire protocol (docs/protocol.md): messages, value codecs and the names of queues and keys.
Nothing here knows of connections."""
