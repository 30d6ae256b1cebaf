"""Host keys in keys_dir: made on first start with mode 0600, never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.core.authorized_keys import PublicKey, parse_line

HOST_KEY_NAMES = ("ssh_host_ed25519_key", "ssh_host_rsa_key")


def _new_private_key(kind: str) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def write_key_pair(path: Path, kind: str, comment: str) -> bool:
    """Write an OpenSSH private key at `path` (0600) and `path.pub`, unless `path` exists.
    Returns whether a key was made. O_EXCL makes "never overwritten" hold even when two
    processes start at once."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    key = _new_private_key(kind)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(path.name + ".pub").write_bytes(public + f" {comment}\n".encode())
    return True


def ensure_host_keys(keys_dir: Path) -> list[Path]:
    """The host key files, making any that are missing."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in HOST_KEY_NAMES:
        path = keys_dir / name
        write_key_pair(path, name.split("_")[2], "gateway-host-key")
        paths.append(path)
    return paths


def public_key(path: Path) -> PublicKey:
    """The public half of a key pair written by write_key_pair (or ssh-keygen)."""
    return parse_line(path.with_name(path.name + ".pub").read_text())
