"""TLS for a shared network (docs/security.md, "TLS"): the files a process trusts and shows.

Two sides, each configured once for every process of a cluster:

- `ClientTls` is how a process checks the servers it connects to, and proves who it is: the CA
  bundle that signed the cluster's certificates, and an optional client certificate and key. It
  applies to every `amqps://` and `rediss://` connection, and to the HTTPS clients of the REST
  API and the proxies. One CA file serves them all (a bundle may hold several CAs); a URL's own
  options (`?cafile=` on an AMQP URL, `?ssl_ca_certs=` on a Redis URL) win over it for that
  service, so a broker and a Redis with different CAs each get theirs.
- `ServerTls` is the certificate and key the REST API and the HTTP proxies serve HTTPS with,
  and the proxies' gRPC ingress serves TLS with: one certificate for a proxy's every port.

Every file is read when the settings are: a missing or unreadable file, a key without its
certificate, or a certificate its key does not match fails the process at start-up with the
setting's name, rather than as a handshake that fails (or retries) later.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REDIS_TLS_SCHEMES = ("rediss", "rediss+sentinel")
# One PEM block, its label captured: CERTIFICATE, PRIVATE KEY, EC PRIVATE KEY...
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


class TlsSettingError(ValueError):
    """A TLS setting names a file that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ClientTls:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def check(self, prefix: str) -> None:
        """Load every file once, so a bad one fails now; `prefix` names the settings."""
        _check_pair(prefix, self.cert_file, self.key_file)
        if self.ca_file is not None:
            _load(f"{prefix}_CA_FILE", self.ca_file,
                  lambda context: context.load_verify_locations(cafile=self.ca_file))

    def amqp_context(self, url: str) -> ssl.SSLContext | None:
        """The context for an AMQP URL: None for `amqp://`. For `amqps://`, the URL's own
        `cafile`, `certfile`, `keyfile` and `no_verify_ssl` (aiormq's names) win over ours."""
        parts = urlsplit(url)
        if parts.scheme != "amqps":
            return None
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        ca_file = query.get("cafile") or self.ca_file
        cert_file = query.get("certfile") or self.cert_file
        key_file = query.get("keyfile") or self.key_file
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file,
                                                 capath=query.get("capath"))
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSettingError(f"cannot load the TLS files for {parts.scheme}://"
                                  f"{parts.hostname}: {exc}") from exc
        if query.get("no_verify_ssl", "0") != "0":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def redis_options(self, url: str) -> dict[str, Any]:
        """redis-py's connection options for a Redis URL: none for `redis://`; the URL's own
        `ssl_*` query options win over them (redis-py lets the query win)."""
        if url.partition("://")[0] not in REDIS_TLS_SCHEMES:
            return {}
        options = {"ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file,
                   "ssl_keyfile": self.key_file}
        return {name: str(path) for name, path in options.items() if path is not None}

    def verify(self) -> str | bool:
        """What `requests` verifies an HTTPS server with: the CA file, or the system's."""
        return str(self.ca_file) if self.ca_file is not None else True


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"

    def check(self, prefix: str) -> None:
        _check_pair(prefix, self.cert_file, self.key_file)

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's options: HTTPS with the certificate (whose file may hold the key
        too), or nothing."""
        if self.cert_file is None:
            return {}
        return {"ssl_certfile": str(self.cert_file),
                **({"ssl_keyfile": str(self.key_file)} if self.key_file else {})}

    def key_and_chain(self) -> tuple[bytes, bytes]:
        """The private key and the certificate chain, PEM, apart: grpcio's
        `ssl_server_credentials` takes them so, while the certificate's file may hold the key
        too (as uvicorn accepts)."""
        if self.cert_file is None:
            raise TlsSettingError("BROKER_SERVE_HTTPS_CERT_FILE is not set")
        try:
            certificate = self.cert_file.read_bytes()
            key = certificate if self.key_file is None else self.key_file.read_bytes()
        except OSError as exc:
            raise TlsSettingError(f"cannot read the HTTPS certificate or key: {exc}") from exc
        keys = [block[0] for block in _PEM_BLOCK.finditer(key)
                if block[1].endswith(b"PRIVATE KEY")]
        chain = [block[0] for block in _PEM_BLOCK.finditer(certificate)
                 if block[1] == b"CERTIFICATE"]
        if len(keys) != 1 or not chain:
            raise TlsSettingError(f"{self.key_file or self.cert_file} must hold one PEM "
                                  f"private key, and {self.cert_file} its certificate")
        return keys[0] + b"\n", b"\n".join(chain) + b"\n"


def _check_pair(prefix: str, cert_file: Path | None, key_file: Path | None) -> None:
    if key_file is not None and cert_file is None:
        raise TlsSettingError(f"{prefix}_KEY_FILE is set but {prefix}_CERT_FILE is not: a key "
                              "is used with its certificate")
    if key_file is not None:
        _readable(f"{prefix}_KEY_FILE", key_file)
    if cert_file is not None:
        _load(f"{prefix}_CERT_FILE", cert_file,
              lambda context: context.load_cert_chain(cert_file, key_file))


def _readable(setting: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsSettingError(f"{setting}: cannot read {path}: {exc.strerror}") from exc


def _load(setting: str, path: Path, load: Callable[[ssl.SSLContext], object]) -> None:
    _readable(setting, path)
    try:
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except ssl.SSLError as exc:
        raise TlsSettingError(f"{setting}: cannot use {path} ({exc.reason or exc}): it must "
                              "be PEM, and a certificate must match its key") from exc
