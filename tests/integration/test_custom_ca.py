"""A private CA (``SSL_CERT_FILE``), and HTTPS through a proxy's ``CONNECT`` tunnel, as behind a corporate egress.

The emulator is served over TLS with a certificate from a CA made for this test; only a client that
trusts that CA (through the standard variable) gets an answer, and the answer comes through the proxy.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port
from tests.forward_proxy import running_proxy
from tests.integration.test_proxy import PROXY_VARIABLES
from worker import authn, checks, emulator, errors, wire


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA certificate, and a server certificate and key for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("session-sync test CA"))
        .issuer_name(_name("session-sync test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        pass


@pytest.fixture
def tls_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """The emulator on https://127.0.0.1:<port> with a certificate of a private CA; yields its URL and the CA file."""
    for name in (*PROXY_VARIABLES, "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    port = free_port()
    app = emulator.create_app(service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_CLIENT_TOKEN)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(cert_file),
        ssl_keyfile=str(key_file),
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "TLS emulator did not start"
        time.sleep(0.01)
    yield f"https://127.0.0.1:{port}", ca_file
    server.should_exit = True
    thread.join(timeout=10)


async def probe(base_url: str) -> wire.Verdict:
    async with authn.AuthnClient(base_url=base_url, token=emulator.DEFAULT_SERVICE_TOKEN, retries=0) as client:
        return (await client.check_token(checks.PROBE_TOKEN)).verdict


async def test_a_private_ca_is_trusted_through_ssl_cert_file(
    tls_emulator: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, ca_file = tls_emulator
    # Given no CA configured, Pangea's certificate is not trusted: no answer, never a verdict
    with pytest.raises(errors.AuthnUnavailable):
        await probe(base_url)
    # When the operator points SSL_CERT_FILE at the private CA
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    # Then Pangea answers
    assert await probe(base_url) is wire.Verdict.INVALID


async def test_https_goes_through_the_proxys_connect_tunnel(
    tls_emulator: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, ca_file = tls_emulator
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    with running_proxy(tmp_path) as proxy:
        # Given HTTPS_PROXY, as behind a corporate egress
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        # When the client talks to Pangea over TLS
        assert await probe(base_url) is wire.Verdict.INVALID
        # Then it went through the proxy's tunnel (TLS end to end with Pangea)
        assert proxy.requests() == [f"CONNECT {base_url.removeprefix('https://')}"]
