"""A test's own TLS services: a CA and certificates made per run, a RabbitMQ node with a TLS
listener that demands a client certificate, and a Redis that speaks TLS only.

The shared RabbitMQ and Redis are left alone. The RabbitMQ node is a one-node `RabbitCluster`
(tests/rabbit_cluster.py) with a TLS listener next to its plain one (which that module waits
on); the certificates live in a directory of user rabbitmq's, which this process (root) reads
too.

    with TlsServices() as services:
        services.amqps_url, services.rediss_url, services.certificates.ca
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import free_port
from .rabbit_cluster import (
    RABBITMQ_USER,
    TEMP_ROOT,
    RabbitCluster,
    RabbitClusterError,
    accepts_connections,
    wait_until,
)

# Every name a test connects to the services by: a certificate is checked against it.
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1",)
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate it signed (for localhost and 127.0.0.1), a client
    certificate it signed, and a second CA that signed nothing here (a wrong trust anchor)."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        ca_key, ca_cert = _authority("broker-serve test CA")
        _, other_ca_cert = _authority("another CA")
        server_key, server_cert = _signed("broker-serve test server", ca_key, ca_cert,
                                          ExtendedKeyUsageOID.SERVER_AUTH, server=True)
        client_key, client_cert = _signed("broker-serve test client", ca_key, ca_cert,
                                          ExtendedKeyUsageOID.CLIENT_AUTH, server=False)
        files = cls(directory, directory / "ca.pem", directory / "server.pem",
                    directory / "server.key", directory / "client.pem", directory / "client.key",
                    directory / "other-ca.pem")
        files.ca.write_bytes(_pem(ca_cert))
        files.other_ca.write_bytes(_pem(other_ca_cert))
        files.server_cert.write_bytes(_pem(server_cert))
        files.server_key.write_bytes(_key_pem(server_key))
        files.client_cert.write_bytes(_pem(client_cert))
        files.client_key.write_bytes(_key_pem(client_key))
        return files


class TlsServices:
    """The certificates, one RabbitMQ node and one Redis; also a context manager that stops
    both and removes every file."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bs-tls-", dir=TEMP_ROOT))
        self.certificates = Certificates.make(self.directory)
        self.amqps_port = free_port()
        self.rediss_port = free_port()
        self.rabbit = RabbitCluster(size=1, timeout=START_TIMEOUT_S, extra_config=(
            f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}",
            f"ssl_options.cacertfile = {self.certificates.ca}",
            f"ssl_options.certfile = {self.certificates.server_cert}",
            f"ssl_options.keyfile = {self.certificates.server_key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
        ))
        self.redis: subprocess.Popen[bytes] | None = None

    @property
    def amqps_url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.amqps_port}/"

    @property
    def rediss_url(self) -> str:
        return f"rediss://127.0.0.1:{self.rediss_port}/0"

    def __enter__(self) -> Self:
        try:
            for path in (self.directory, *self.directory.iterdir()):
                shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)  # the node reads its key
            self._start_redis()
            self.rabbit.start_all()
            wait_until(lambda: accepts_connections(self.amqps_port), START_TIMEOUT_S,
                       lambda: f"RabbitMQ's TLS listener did not open\n"
                               f"{self.rabbit.log_tail(0)}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self.rabbit.stop_all()
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(10)
            self.redis = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _start_redis(self) -> None:
        files = self.certificates
        log = (self.directory / "redis.log").open("ab")
        with log:
            # --port 0: no plain listener at all. tls-auth-clients is on by default: a client
            # without a certificate the CA signed is refused. --pdeathsig: no Redis outlives
            # an aborted run.
            self.redis = subprocess.Popen(
                ["setpriv", "--pdeathsig=KILL", "redis-server", "--port", "0",
                 "--tls-port", str(self.rediss_port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(files.server_cert),
                 "--tls-key-file", str(files.server_key),
                 "--tls-ca-cert-file", str(files.ca), "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        redis = self.redis

        def listening() -> bool:
            if redis.poll() is not None:
                raise RabbitClusterError(f"redis-server exited with {redis.returncode}: "
                                         f"{(self.directory / 'redis.log').read_text()}")
            return accepts_connections(self.rediss_port)

        wait_until(listening, START_TIMEOUT_S, lambda: "redis-server did not listen")


def _authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    return key, certificate


def _signed(name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
            usage: x509.ObjectIdentifier, server: bool
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [*(x509.DNSName(host) for host in SERVER_NAMES),
             *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_ADDRESSES)]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
