"""`python -m broker_serve.replica`: the replica process a worker node starts."""

from .replica import main

main()
