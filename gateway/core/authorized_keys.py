"""OpenSSH public key lines (`ssh-ed25519 AAAA... comment`) and their SHA256 fingerprints."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


class BadKey(ValueError):
    """A line that is not a usable public key; the message says why."""


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    blob: bytes
    comment: str

    @property
    def fingerprint(self) -> str:
        """OpenSSH's `SHA256:...` form, as `ssh-keygen -l` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def line(self) -> str:
        text = f"{self.key_type} {base64.b64encode(self.blob).decode()}"
        return f"{text} {self.comment}" if self.comment else text


def parse_line(line: str) -> PublicKey:
    """Parse one public key line. Lines with authorized_keys options are refused, since
    ignoring a `from=` or `command=` would grant more than the file says."""
    fields = line.strip().split(None, 2)
    if not fields:
        raise BadKey("empty line")
    if fields[0] not in KEY_TYPES:
        if any(f in KEY_TYPES for f in line.split()):
            raise BadKey("authorized_keys options are not supported; give the bare key")
        raise BadKey(f"unknown key type {fields[0][:40]!r}")
    if len(fields) < 2:
        raise BadKey("no key data after the key type")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadKey("key data is not base64") from None
    if len(blob) < 4:
        raise BadKey("key data is truncated")
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != fields[0].encode():
        raise BadKey("key data does not match its key type")
    return PublicKey(fields[0], blob, fields[2].strip() if len(fields) > 2 else "")


# First lines of private key files: OpenSSH's, PEM (PKCS#1, PKCS#8, EC, DSA), PuTTY's.
_PRIVATE_KEY_STARTS = ("-----BEGIN OPENSSH PRIVATE KEY-----", "PuTTY-User-Key-File-")


def _is_private_key(line: str) -> bool:
    line = line.strip()
    return line.startswith(_PRIVATE_KEY_STARTS) or (
        line.startswith("-----BEGIN ") and line.endswith("PRIVATE KEY-----")
    )


def parse_text(text: str) -> list[PublicKey]:
    """Every key in a public key file or an authorized_keys file (comments skipped).
    A private key is refused as such, so the user reaches for the `.pub` file."""
    if any(_is_private_key(line) for line in text.splitlines()):
        raise BadKey(
            "this is a private key, which never leaves its owner: give the public key "
            "(the .pub file next to it, or the output of `ssh-keygen -y -f KEYFILE`)"
        )
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(parse_line(line))
        except BadKey as exc:
            raise BadKey(f"line {number}: {exc}") from None
    if not keys:
        raise BadKey("no public key found")
    return keys
