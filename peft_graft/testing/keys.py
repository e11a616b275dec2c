"""Throw-away signing keys for tests and benchmarks of signed grafts (`peft_graft.signing`)."""

from __future__ import annotations

from pathlib import Path


def write_key_pair(folder: Path, name: str = "key", password: bytes | None = None) -> tuple[Path, Path]:
    """A fresh P-256 key pair as PEM files ``<name>.pem`` (private, PKCS#8) and ``<name>.pub.pem``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public
