"""The REST API's bearer token: `BROKER_SERVE_API_TOKEN`, or a file only the user can read.

A controller without the variable reuses `<state dir>/<cluster>/api-token` when that file is the
user's own with mode 0600, so that controllers on one host agree, and otherwise writes a new
token there. The CLI reads `--token`, then the variable, then that file.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from ..settings import Settings, state_dir

log = logging.getLogger("broker_serve.controller.rest")

ENV_VAR = "BROKER_SERVE_API_TOKEN"
FILE_NAME = "api-token"


def token_file(cluster: str) -> Path:
    return state_dir(cluster) / FILE_NAME


def server_token(cluster: str) -> str:
    """The token the controller accepts, creating the token file if needed."""
    from_env = Settings().api_token
    if from_env:
        return from_env
    path = token_file(cluster)
    existing = _read_private(path)
    if existing:
        return existing
    token = secrets.token_urlsafe(32)
    try:
        if not _create_private(path, token):  # another controller wrote it first: use theirs
            return _read_private(path) or token
    except OSError as exc:
        log.error("could not write the REST API token to %s (%s): set %s to use the API",
                  path, exc, ENV_VAR)
    else:
        log.info("REST API token written to %s", path)
    return token


def bearer_matches(authorization: str, token: bytes) -> bool:
    """Whether an `Authorization` header carries the token, compared in constant time."""
    scheme, _, credentials = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token)


def client_token(cluster: str, given: str | None = None) -> str | None:
    """The token a client sends: the given one, the variable, or the file's."""
    if given:
        return given.strip()
    return Settings().api_token or _read_private(token_file(cluster))


def _read_private(path: Path) -> str | None:
    """The file's token, if it is ours and no one else can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            log.warning("ignoring %s: it must be yours with mode 0600", path)
            return None
        return file.read().strip() or None


def _create_private(path: Path, token: str) -> bool:
    """Write the token file with mode 0600 unless it exists. Whole or not at all: the content
    goes to a temporary file first, which is then linked into place."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)
