"""Signed grafts: an OpenSSF model-signing signature (``graft.sig``) over a saved adapter folder, with offline keys.

The manifest (`peft_graft.tuners.graft.integrity`) proves a folder is unchanged since it was saved; a signature also
proves who saved it. Signing and verifying use `model_signing` (the ``signing`` extra) with a local elliptic-curve key
pair (P-256/384/521 PEM files), or with a certificate issued by a local CA; nothing goes over the network.

Signed: every file under the folder, except ``graft.sig`` itself, hidden files and folders (``.cache`` of a Hub
download, ``.gitattributes``) and the top-level ``README.md`` and ``graft_metadata.json``: pushing a graft to the Hub
regenerates those two, and neither is loaded with the weights. They are protected by other means: the model card is
prose, and ``graft_metadata.json`` is a copy of the registry record, whose audit chain is the authority on it; a
verified signature says nothing about them. Any other change of one byte, or a file added or removed, fails
verification.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import GraftSignatureError
from .manifest import file_sha256


SIGNATURE_NAME = "graft.sig"
_UNSIGNED_NAMES = (SIGNATURE_NAME, "README.md", "graft_metadata.json")
_INSTALL_HINT = "pip install 'peft-graft[signing]'"

PathLike = str | os.PathLike


@dataclass(frozen=True)
class SignatureCheck:
    """A verified signature: the digest of ``graft.sig`` and of the key it verified against, for audit records."""

    signature_sha256: str  # sha256 of graft.sig's bytes, as `sign_graft` returned it
    key_sha256: str  # sha256 of the trusted public key's DER SubjectPublicKeyInfo

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _model_signing() -> ModuleType:
    """`model_signing`, imported on first use: it is an optional extra and takes ~0.5 s to import."""
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as err:
        raise GraftSignatureError(
            f"Signing grafts needs OpenSSF model-signing, which is not installed ({err}); run {_INSTALL_HINT}."
        ) from err
    return model_signing


def _reason(err: Exception) -> str:
    """The first line of a library error (pydantic's run to many lines; cryptography's InvalidSignature has none)."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _hashing_config(ms: ModuleType, folder: Path) -> Any:
    """What model_signing hashes: everything but the unsigned names and hidden entries found now.

    Hidden entries are listed afresh at verification too, so a ``.cache`` that a later download adds is not an
    extra file.
    """
    hidden = []
    for root, dirs, files in os.walk(folder):
        hidden += [os.path.relpath(os.path.join(root, name), folder) for name in dirs + files if name.startswith(".")]
        dirs[:] = [name for name in dirs if not name.startswith(".")]
    return ms.hashing.Config().set_ignored_paths(paths=[*_UNSIGNED_NAMES, *hidden])


def sign_graft(
    adapter_dir: PathLike,
    private_key: PathLike,
    *,
    password: bytes | None = None,
    certificate_chain: Sequence[PathLike] | None = None,
    signing_certificate: PathLike | None = None,
) -> str:
    """Sign the graft adapter saved in ``adapter_dir``; write ``graft.sig`` beside it and return its sha256.

    ``private_key`` is a PEM elliptic-curve private key (``password`` if it is encrypted). With
    ``signing_certificate`` (PEM, for that key) and ``certificate_chain`` (the PEM certificates up to a local CA)
    the signature carries the certificate chain instead of a key hint; model-signing 1.1 cannot read an encrypted key
    in that mode. The folder is verified first (`peft_graft.artifacts.verify_adapter`), so a damaged adapter is never
    signed. ``graft.sig`` is replaced atomically; the returned digest is what a registry records.
    """
    folder = Path(adapter_dir)
    from .artifacts import verify_adapter  # torch: only when signing

    verify_adapter(folder)  # AdapterFileError / AdapterIntegrityError ... for a folder that is no intact graft
    if (signing_certificate is None) != (not certificate_chain):
        raise GraftSignatureError(
            "Give signing_certificate and certificate_chain together (certificate signing), or neither (key signing)."
        )
    if signing_certificate is not None and password is not None:
        raise GraftSignatureError(
            f"model-signing's certificate signer cannot read an encrypted key; decrypt {private_key} into a "
            "protected file, or sign with the key alone."
        )
    ms = _model_signing()
    config = ms.signing.Config().set_hashing_config(_hashing_config(ms, folder))
    try:
        if signing_certificate is None:
            config.use_elliptic_key_signer(private_key=private_key, password=password)
        else:
            config.use_certificate_signer(
                private_key=private_key, signing_certificate=signing_certificate, certificate_chain=certificate_chain
            )
    except Exception as err:  # cryptography's and model_signing's own errors for unreadable keys and certificates
        raise GraftSignatureError(
            f"Cannot sign with {private_key}: {_reason(err)}. It must be a PEM elliptic-curve private key (P-256, "
            "P-384 or P-521; with its password if encrypted) matching the signing certificate, if one is given."
        ) from err
    # model_signing hashes the folder before it writes the signature, so this name is not hashed, and it is hidden.
    partial = folder / f".{SIGNATURE_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        config.sign(folder, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, folder / SIGNATURE_NAME)
    except (OSError, ValueError) as err:  # model_signing refuses symlinks and special files
        raise GraftSignatureError(
            f"Cannot sign {folder}: {_reason(err)}. The folder must be writable and hold regular files only."
        ) from err
    finally:
        partial.unlink(missing_ok=True)
    return file_sha256(folder / SIGNATURE_NAME)


def _load_public_key(path: PathLike) -> Any:
    """The trusted key as a cryptography object, or `GraftSignatureError` saying what the file is not."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise GraftSignatureError(f"Cannot read the trusted key {path}: {_reason(err)}.") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise GraftSignatureError(
            f"The trusted key {path} is a {type(key).__name__}; model-signing verifies elliptic-curve keys (P-256, "
            "P-384, P-521). Use the public half of the key the graft was signed with."
        )
    return key


def _key_sha256(key: Any) -> str:
    """sha256 of a public key's DER SubjectPublicKeyInfo: the same key gives the same digest in any PEM wrapping."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _certificate_key(signature: Path) -> Any:
    """Public key of the signing certificate (first of the chain) carried in a certificate-signed ``graft.sig``."""
    from cryptography import x509

    bundle = json.loads(signature.read_text(encoding="utf-8"))
    leaf = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"]
    return x509.load_der_x509_certificate(base64.b64decode(leaf)).public_key()


def verify_graft_signature(
    adapter_dir: PathLike, trusted_key: PathLike, *, certificate_chain: Sequence[PathLike] | None = None
) -> SignatureCheck:
    """Check ``graft.sig`` in ``adapter_dir`` against the PEM public key ``trusted_key``; raise `GraftSignatureError`.

    Fails when the signature is missing or damaged, was made with another key, or any signed file changed, appeared
    or disappeared (see the module docstring for what is not signed). With ``certificate_chain`` (the PEM CA
    certificates of a certificate-signed graft) the signing certificate must also chain to them, and its key must
    be ``trusted_key``: the CA vouches for the certificate, the pinned key for the signer.
    """
    folder = Path(adapter_dir)
    signature = folder / SIGNATURE_NAME
    if not signature.is_file():
        raise GraftSignatureError(
            f"{folder} has no {SIGNATURE_NAME}: it was never signed, or the signature was removed. Sign it with "
            f"`peft-graft sign {folder} --key PRIVATE.pem`, or get a signed copy."
        )
    ms = _model_signing()  # before any cryptography import: model-signing brings cryptography with it
    key = _load_public_key(trusted_key)
    config = ms.verifying.Config().set_hashing_config(_hashing_config(ms, folder))
    try:
        if certificate_chain:
            config.use_certificate_verifier(certificate_chain=certificate_chain)
            if _certificate_key(signature) != key:
                raise ValueError(f"the signing certificate is not for the key {trusted_key}")
        else:
            config.use_elliptic_key_verifier(public_key=trusted_key)
        config.verify(folder, signature)
    # A damaged graft.sig surfaces as whatever its parsers hit (JSON, pydantic, Key/Index/AttributeError, OpenSSL's
    # and cryptography's InvalidSignature); every one of them means: this folder is not what the key holder signed.
    except Exception as err:
        raise GraftSignatureError(
            f"{signature} does not verify against {trusted_key}: {_reason(err)}. If a file changed since signing, "
            "restore the folder from a good copy (or sign it again if the change is intended); otherwise the key is "
            "not the signer's or the signature is damaged."
        ) from err
    return SignatureCheck(signature_sha256=file_sha256(signature), key_sha256=_key_sha256(key))
