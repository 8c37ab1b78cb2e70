"""Benchmarks of broker-serve against a plain uvicorn + Starlette ceiling: `python -m bench`.

See bench/README.md.
"""
