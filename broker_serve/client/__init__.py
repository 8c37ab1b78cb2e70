"""The client side of a cluster: `serve.run` and friends, handles, the per-process runtime,
building applications, and starting a local cluster."""
