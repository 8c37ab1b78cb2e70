"""What a process is given that Redis and RabbitMQ never hold: the cluster secret, and the
files of this host that only their user can read (the secret's, the REST API token's).

The cluster secret signs pickles, typed values that name a module, and the specs of
deployments (protocol/call_values.py). Every process that signs or verifies takes it from the
operator, in this order:

1. `BROKER_SERVE_CLUSTER_SECRET`, the value;
2. `BROKER_SERVE_CLUSTER_SECRET_FILE`, a file holding it (a mounted Kubernetes or Compose
   secret), read as it is mounted;
3. `<state dir>/<cluster>/cluster-secret`, if it is the user's own with mode 0600: the secret a
   local cluster generates (`local_secret_file`), so that drivers, `broker-serve start` and
   the processes they start on this host agree.

A process that finds none has no secret (b""): signing raises `ClusterSecretMissing`, and
nothing signed verifies (docs/architecture.md, "Trust").
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from .exceptions import ClusterSecretMissing
from .settings import Settings

log = logging.getLogger("broker_serve.credentials")

SECRET_FILE_NAME = "cluster-secret"
# 32 characters: `openssl rand -hex 32` gives 64; what older versions kept in Redis had 64.
MIN_SECRET_LENGTH = 32
HOW_TO_SET = ("set BROKER_SERVE_CLUSTER_SECRET_FILE (a file holding the secret, e.g. made with "
              "`openssl rand -hex 32`) or BROKER_SERVE_CLUSTER_SECRET, the same for every process "
              "of the cluster")


def cluster_secret(settings: Settings) -> bytes:
    """This process's cluster secret, or b"" if it has none. Raises ClusterSecretMissing if
    the operator named one that cannot be read or is too short."""
    if settings.cluster_secret is not None:
        return _checked(settings.cluster_secret.get_secret_value(), "BROKER_SERVE_CLUSTER_SECRET")
    path = settings.cluster_secret_file
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ClusterSecretMissing(
                f"cannot read BROKER_SERVE_CLUSTER_SECRET_FILE {str(path)!r}: "
                f"{exc.strerror or exc}") from exc
        return _checked(text, f"BROKER_SERVE_CLUSTER_SECRET_FILE {str(path)!r}")
    local = read_private(secret_file(settings))
    return _checked(local, f"{secret_file(settings)}") if local else b""


def local_secret_file(settings: Settings) -> Path | None:
    """For a cluster this process starts on this host: the secret file its processes share,
    generated with mode 0600 unless it exists; None if the operator set a secret, which the
    processes inherit with the environment instead."""
    if settings.cluster_secret is not None or settings.cluster_secret_file is not None:
        return None
    path = secret_file(settings)
    if read_private(path):
        return path
    try:
        created = create_private(path, secrets.token_hex(32))
    except OSError as exc:
        raise ClusterSecretMissing(f"cannot write the local cluster's secret to {path} "
                                   f"({exc.strerror or exc}): {HOW_TO_SET}") from exc
    if created:
        log.info("cluster secret generated into %s", path)
    elif not read_private(path):  # there, but not private: it may have been read by others
        raise ClusterSecretMissing(f"{path} must be yours with mode 0600: remove it to have a "
                                   f"new secret generated, or {HOW_TO_SET}")
    return path


def secret_file(settings: Settings) -> Path:
    return settings.state_dir / settings.cluster / SECRET_FILE_NAME


def _checked(value: str, source: str) -> bytes:
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH:
        raise ClusterSecretMissing(f"the cluster secret in {source} is shorter than "
                                   f"{MIN_SECRET_LENGTH} characters")
    return value.encode()


# private files -------------------------------------------------------------------------------
def read_private(path: Path) -> str | None:
    """The file's content, stripped, if it is ours and no one else can read it."""
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


def create_private(path: Path, content: str) -> bool:
    """Write the file with mode 0600 unless it exists. Whole or not at all: the content goes
    to a temporary file first, which is then linked into place. False if it existed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)
