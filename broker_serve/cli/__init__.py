"""The `broker-serve` command and what only it uses (the REST client)."""
