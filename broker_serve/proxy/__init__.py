"""The HTTP proxy: each HTTP request or WebSocket session becomes messages on request queues."""
