"""The REST API's bearer tokens: `BROKER_SERVE_API_TOKEN`, or a file only the user can read.

A controller without the variable reuses `<state dir>/<cluster>/api-token` when that file is the
user's own with mode 0600, so that controllers on one host agree, and otherwise writes a new
token there. The CLI reads `--token`, then the variable, then that file.

Each of them may list several tokens, separated by commas, so that one can be rotated without
downtime (docs/architecture.md, "Token rotation"): the controller accepts any listed token,
and a client sends the first.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

# The files only their user can read, shared with the cluster secret's.
from ..credentials import create_private as _create_private
from ..credentials import read_private as _read_private
from ..settings import Settings, state_dir

log = logging.getLogger("broker_serve.controller.rest")

ENV_VAR = "BROKER_SERVE_API_TOKEN"
FILE_NAME = "api-token"


def token_file(cluster: str) -> Path:
    return state_dir(cluster) / FILE_NAME


def split_tokens(value: str | None) -> list[str]:
    """The tokens a variable, option or file lists: one, or several separated by commas."""
    return [token for token in (part.strip() for part in (value or "").split(",")) if token]


def token_bytes(tokens: str | Sequence[str]) -> tuple[bytes, ...]:
    """The tokens to accept, from a list or one comma-separated string."""
    listed = split_tokens(tokens) if isinstance(tokens, str) else list(tokens)
    if not listed:
        raise ValueError("the REST API needs at least one token")
    return tuple(token.encode() for token in listed)


def server_tokens(cluster: str) -> list[str]:
    """The tokens the controller accepts, creating the token file if needed."""
    from_env = split_tokens(Settings().api_token)
    if from_env:
        return from_env
    path = token_file(cluster)
    existing = split_tokens(_read_private(path))
    if existing:
        return existing
    token = secrets.token_urlsafe(32)
    try:
        if not _create_private(path, token):  # another controller wrote it first: use theirs
            return split_tokens(_read_private(path)) or [token]
    except OSError as exc:
        log.error("could not write the REST API token to %s (%s): set %s to use the API",
                  path, exc, ENV_VAR)
    else:
        log.info("REST API token written to %s", path)
    return [token]


def token_matches(given: bytes, tokens: Sequence[bytes]) -> bool:
    """Whether `given` is one of the tokens. Each is compared in constant time, and all of
    them are, so the time taken does not tell which one matched."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token)
    return found


def presented(credentials: str) -> bytes:
    """The token a client presents. A client that sends a whole list (KEDA, reading the
    controllers' own Secret while it lists two) presents its first, as the CLI sends."""
    return credentials.partition(",")[0].strip().encode()


def bearer_matches(authorization: str, tokens: Sequence[bytes]) -> bool:
    """Whether an `Authorization` header carries one of the tokens."""
    scheme, _, credentials = authorization.partition(" ")
    return scheme.lower() == "bearer" and token_matches(presented(credentials), tokens)


def client_token(cluster: str, given: str | None = None) -> str | None:
    """The token a client sends: the first that the given value, the variable or the file
    lists."""
    listed = (split_tokens(given) or split_tokens(Settings().api_token)
              or split_tokens(_read_private(token_file(cluster))))
    return listed[0] if listed else None

