"""TLS between machines: a cluster CA, node certificates, and gRPC credentials from them.

Every gRPC link (agent -> head, agent -> agent) is mutual TLS against the cluster's own
CA: a peer without a certificate that CA signed never gets past the handshake, so not
one byte of its frames is parsed (let alone unpickled). The cluster token stays as a
second factor, checked in the first call.

Certificates name one fixed SAN, ``strato-node``, that clients expect through
``grpc.ssl_target_name_override``: nodes are known by the CA that signed them, not by
their addresses (which NAT, address maps and replacements change).

A node's credentials are three PEM files in its TLS dir (``ca.crt``, ``node.crt``,
``node.key``, 0600); a head that may issue more (for a join bundle) also has ``ca.key``.
A *join bundle* is one JSON file (0600) carrying the head's address, the token, the CA
certificate and a CA-signed key/certificate: all a machine needs to join by hand.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

from strato.localfiles import write_secret

SAN = "strato-node"
CA_FILE, CERT_FILE, KEY_FILE, CA_KEY_FILE = "ca.crt", "node.crt", "node.key", "ca.key"
CERT_DAYS = 3650


@dataclass(frozen=True)
class Credentials:
    """One node's TLS material (PEM bytes)."""

    ca_cert: bytes
    cert: bytes
    key: bytes
    ca_key: bytes | None = None    # only where new certificates are issued (the head)

    def server(self):
        import grpc
        return grpc.ssl_server_credentials([(self.key, self.cert)],
                                           root_certificates=self.ca_cert,
                                           require_client_auth=True)

    def channel(self):
        import grpc
        return grpc.ssl_channel_credentials(self.ca_cert, self.key, self.cert)

    def to_json(self, *, with_ca_key: bool = False) -> dict:
        out = {"ca_cert": self.ca_cert.decode(), "cert": self.cert.decode(),
               "key": self.key.decode()}
        if with_ca_key and self.ca_key:
            out["ca_key"] = self.ca_key.decode()
        return out

    @classmethod
    def from_json(cls, data: dict) -> Credentials:
        try:
            return cls(data["ca_cert"].encode(), data["cert"].encode(), data["key"].encode(),
                       data["ca_key"].encode() if data.get("ca_key") else None)
        except (KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"TLS credentials lack {exc}") from None


# gRPC channel options for every client-side link (the SAN every node certificate has)
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", SAN)]


# ---------------------------------------------------------------------- issuing
def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(cluster: str) -> tuple[bytes, bytes]:
    """A new cluster CA: (key PEM, certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(f"strato cluster CA {cluster}"[:64])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


def issue(ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str) -> Credentials:
    """A node certificate (server and client use, SAN ``strato-node``) signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name[:64]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SAN)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Credentials(ca_cert_pem, cert.public_bytes(serialization.Encoding.PEM),
                       key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


def new_cluster(cluster: str, common_name: str = "strato head") -> Credentials:
    """A fresh CA and a node certificate from it (the CA key kept, for issuing more)."""
    ca_key, ca_cert = make_ca(cluster)
    node = issue(ca_key, ca_cert, common_name)
    return Credentials(ca_cert, node.cert, node.key, ca_key)


# ---------------------------------------------------------------------- files
def save(directory: str, creds: Credentials) -> None:
    """Write ``creds`` into a node's TLS dir (0700), every file 0600 from creation."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name, data in ((CA_FILE, creds.ca_cert), (CERT_FILE, creds.cert),
                       (KEY_FILE, creds.key), (CA_KEY_FILE, creds.ca_key)):
        path = os.path.join(directory, name)
        if data is None:
            if os.path.exists(path):
                os.unlink(path)
            continue
        write_secret(path, data)


def load(directory: str) -> Credentials | None:
    """A node's TLS material from its dir; None when it has none (yet)."""
    parts = {}
    for name in (CA_FILE, CERT_FILE, KEY_FILE, CA_KEY_FILE):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                parts[name] = f.read()
        except FileNotFoundError:
            if name != CA_KEY_FILE:
                return None
    return Credentials(parts[CA_FILE], parts[CERT_FILE], parts[KEY_FILE], parts.get(CA_KEY_FILE))


def write_join_bundle(path: str, *, address: str, token: str, creds: Credentials) -> None:
    """A join bundle: a fresh CA-signed key/cert, the CA cert, the token and the address."""
    if creds.ca_key is None:
        raise ValueError("only a node holding the CA key can write a join bundle")
    joiner = issue(creds.ca_key, creds.ca_cert, "strato joined node")
    write_secret(path, json.dumps({"address": address, "token": token,
                                   **joiner.to_json()}, indent=1))


def read_join_bundle(path: str) -> tuple[str | None, str | None, Credentials]:
    """(address, token, credentials) from a join bundle file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the join bundle {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a strato join bundle")
    return data.get("address"), data.get("token"), Credentials.from_json(data)
