"""Real certificates for the TLS tests: a self-signed CA, a server certificate for 127.0.0.1/localhost and a
client certificate, both signed by it (``cryptography``; no openssl binary needed).

Example:
    >>> certs = make_certs(Path(tempfile.mkdtemp()))  # doctest: +SKIP
    >>> httpx.get("https://127.0.0.1:8443/health", verify=certs.ssl_context(client=True))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA's certificate: what clients trust, and ssl_ca_certs (it signs the client certificate)
    server_cert: Path  # CN/SAN 127.0.0.1, ::1 and localhost
    server_key: Path
    client_cert: Path
    client_key: Path
    server_key_encrypted: Path  # the server key under the passphrase ``password``

    def ssl_context(self, client: bool = False, trust: bool = True) -> ssl.SSLContext:
        """A client context: trusting the CA (``trust``), presenting the client certificate (``client``)."""
        ctx = ssl.create_default_context(cafile=str(self.ca) if trust else None)
        if client:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelfleet tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)  # as a real key would be kept
    return path


def _pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_certs(folder: Path, days: int = 2) -> Certs:
    """Write the CA, server and client certificates and keys into ``folder``; their paths."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate a little clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("modelfleet test CA")).issuer_name(_name("modelfleet test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("localhost")])
    client, client_key = leaf("modelfleet test client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    return Certs(
        ca=_write(folder / "ca.pem", ca.public_bytes(pem)),
        server_cert=_write(folder / "server.pem", server.public_bytes(pem)),
        server_key=_write(folder / "server.key", _pem(server_key)),
        client_cert=_write(folder / "client.pem", client.public_bytes(pem)),
        client_key=_write(folder / "client.key", _pem(client_key)),
        server_key_encrypted=_write(folder / "server-encrypted.key", _pem(server_key, b"password")))
