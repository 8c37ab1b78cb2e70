"""Metrics, logs and the latency statistics of `broker-serve stats`."""
