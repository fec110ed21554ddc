"""TLS and mTLS from the gateway to the internal services (a fake encoder here)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress

import grpc
import pytest

from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.errors import Unavailable
from gateway.encoder import EncoderClient
from gateway.deadline import Deadline
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeEncoder

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, san: list | None = None):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipsearch test CA")])
    ca = _cert("clipsearch test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for name, san in (("server", [x509.DNSName("encoder.internal"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca_name, ca_key, san=san)
        files[f"{name}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{name}-key.pem"] = _pem_key(key)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


async def _serve_tls(pki, require_client_cert: bool):
    server = grpc.aio.server()
    encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server(FakeEncoder(), server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server-key.pem").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_tls_and_mtls_to_the_encoder(pki):
    async def scenario():
        server, address = await _serve_tls(pki, require_client_cert=True)
        try:
            mtls = GatewaySettings(encoder=address, internal_tls_ca=str(pki / "ca.pem"),
                                   internal_tls_cert=str(pki / "client.pem"),
                                   internal_tls_key=str(pki / "client-key.pem"),
                                   internal_tls_server_name="encoder.internal", internal_retries=0).validate()
            client = EncoderClient(mtls)
            assert (await client.model_info(Deadline.after(5))).fingerprint == "fake-model"
            await client.close()

            no_client_cert = GatewaySettings(encoder=address, internal_tls_ca=str(pki / "ca.pem"),
                                             internal_retries=0).validate()
            client = EncoderClient(no_client_cert)
            with pytest.raises(Unavailable):
                await client.model_info(Deadline.after(5))
            await client.close()

            plaintext = EncoderClient(GatewaySettings(encoder=address, internal_retries=0))
            with pytest.raises(Unavailable):
                await plaintext.model_info(Deadline.after(5))
            await plaintext.close()
        finally:
            await server.stop(None)

    asyncio.run(scenario())
