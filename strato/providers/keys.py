"""SSH key files the cloud providers share: read a private key's public half, or make a
key pair for a cluster that brought none."""

from __future__ import annotations

import os
from pathlib import Path

from strato.exceptions import ConfigError
from strato.localfiles import write_secret


def public_key_from_private(private_key_path: str | os.PathLike[str]) -> str:
    """OpenSSH public key line for a PEM or OpenSSH private key (``<path>.pub`` if present)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(private_key_path).expanduser()
    pub = path.with_name(path.name + ".pub")
    if pub.exists():
        return pub.read_text().strip()
    data = path.read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"auth.ssh_private_key: cannot read {path}: {e}; "
                          "give auth.ssh_public_key too") from e
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def ensure_key_pair(path: Path) -> str:
    """Create an ed25519 key pair at ``path`` (0600) unless it exists; return the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        return public_key_from_private(path)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    public = f"{public} strato"
    write_secret(path, private)
    path.with_name(path.name + ".pub").write_text(public + "\n")
    return public
