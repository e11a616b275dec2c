"""Signed grafts (peft_graft.signing): real adapters, real EC keys and certificates, real model-signing; no mocks."""

import datetime
import hashlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from peft import get_peft_model

from peft_graft import AdapterFileError, GraftConfig
from peft_graft.errors import GraftSignatureError
from peft_graft.signing import SIGNATURE_NAME, sign_graft, verify_graft_signature
from peft_graft.testing.keys import write_key_pair


@pytest.fixture(scope="module")
def saved_adapter(tiny_llama, tmp_path_factory) -> Path:
    """One saved graft adapter; tests sign and tamper with copies of it (`adapter`)."""
    path = tmp_path_factory.mktemp("saved") / "adapter"
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


@pytest.fixture
def adapter(saved_adapter, tmp_path) -> Path:
    return Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return write_key_pair(tmp_path_factory.mktemp("keys"))


def test_sign_then_verify_returns_the_digest_of_the_signature(adapter, keys):
    private, public = keys
    digest = sign_graft(adapter, private)
    assert digest == hashlib.sha256((adapter / SIGNATURE_NAME).read_bytes()).hexdigest()
    check = verify_graft_signature(adapter, public)
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert check.to_dict() == {"signature_sha256": digest, "key_sha256": hashlib.sha256(der).hexdigest()}


def _flip_byte(name: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 1
        (folder / name).write_bytes(bytes(data))

    return mutate


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (_flip_byte("adapter_model.safetensors"), "adapter_model.safetensors"),
        (_flip_byte("adapter_config.json"), "adapter_config.json"),
        (_flip_byte("graft_manifest.json"), "graft_manifest.json"),
        (lambda folder: (folder / "extra.safetensors").write_bytes(b"x"), "extra.safetensors"),
        (lambda folder: (folder / "graft_manifest.json").unlink(), "graft_manifest.json"),
    ],
    ids=["weights", "config", "manifest", "added-file", "removed-file"],
)
def test_any_change_to_a_signed_file_is_refused(adapter, keys, mutate, named):
    private, public = keys
    sign_graft(adapter, private)
    mutate(adapter)
    with pytest.raises(GraftSignatureError, match=named):
        verify_graft_signature(adapter, public)


def test_regenerated_and_hidden_files_are_not_signed(adapter, keys):
    private, public = keys
    digest = sign_graft(adapter, private)
    (adapter / "README.md").write_text("a Hub model card")
    (adapter / "graft_metadata.json").write_text("{}")
    (adapter / ".gitattributes").write_text("*.safetensors filter=lfs")
    (adapter / ".cache" / "huggingface").mkdir(parents=True)
    (adapter / ".cache" / "huggingface" / "adapter_model.safetensors.metadata").write_text("etag")
    assert verify_graft_signature(adapter, public).signature_sha256 == digest


def test_signing_again_replaces_the_signature(adapter, keys):
    private, public = keys
    sign_graft(adapter, private)
    second = sign_graft(adapter, private)
    assert verify_graft_signature(adapter, public).signature_sha256 == second
    assert sorted(p.name for p in adapter.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "graft_manifest.json", SIGNATURE_NAME]
    )  # no partial signature file left behind


def test_a_wrong_key_is_refused(adapter, keys, tmp_path):
    sign_graft(adapter, keys[0])
    _, other = write_key_pair(tmp_path, "other")
    with pytest.raises(GraftSignatureError, match="does not verify against"):
        verify_graft_signature(adapter, other)


def test_a_missing_signature_is_refused(adapter, keys):
    with pytest.raises(GraftSignatureError, match=f"no {SIGNATURE_NAME}.*peft-graft sign"):
        verify_graft_signature(adapter, keys[1])


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"[1]", lambda b: b"\xff" * 64],
                         ids=["truncated", "empty", "other-json", "binary"])
def test_a_damaged_signature_is_refused(adapter, keys, damage):
    sign_graft(adapter, keys[0])
    signature = adapter / SIGNATURE_NAME
    signature.write_bytes(damage(signature.read_bytes()))
    with pytest.raises(GraftSignatureError, match="does not verify against"):
        verify_graft_signature(adapter, keys[1])


def test_unusable_keys_are_typed_errors(adapter, keys, tmp_path):
    private = keys[0]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n")
    rsa_public = tmp_path / "rsa.pub.pem"
    rsa_public.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    with pytest.raises(GraftSignatureError, match="Cannot sign with"):
        sign_graft(adapter, garbage)
    assert not (adapter / SIGNATURE_NAME).exists()
    sign_graft(adapter, private)
    for key, reason in ((garbage, "Cannot read"), (private, "Cannot read"), (tmp_path / "none.pem", "Cannot read"),
                        (rsa_public, "elliptic-curve")):
        with pytest.raises(GraftSignatureError, match=reason):
            verify_graft_signature(adapter, key)


def test_an_encrypted_key_needs_its_password(adapter, tmp_path):
    private, public = write_key_pair(tmp_path, "locked", password=b"s3cret")
    with pytest.raises(GraftSignatureError, match="Cannot sign with"):
        sign_graft(adapter, private)
    sign_graft(adapter, private, password=b"s3cret")
    assert verify_graft_signature(adapter, public).key_sha256


def test_only_graft_adapters_are_signed(tmp_path, keys):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterFileError):
        sign_graft(tmp_path, keys[0])
    assert not (tmp_path / SIGNATURE_NAME).exists()


def test_without_model_signing_the_error_says_what_to_install(adapter, keys, monkeypatch):
    sign_graft(adapter, keys[0])
    monkeypatch.setitem(sys.modules, "model_signing", None)  # what `import model_signing` sees when not installed
    for call in (lambda: sign_graft(adapter, keys[0]), lambda: verify_graft_signature(adapter, keys[1])):
        with pytest.raises(GraftSignatureError, match=r"pip install 'peft-graft\[signing\]'"):
            call()


# ------------------------------------------------------------------ certificates from a local CA


def _certificate(subject: str, public_key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _write_ca(folder: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"{name}.crt"
    path.write_bytes(_certificate(name, key.public_key(), name, key, ca=True).public_bytes(serialization.Encoding.PEM))
    return path, key


def test_certificate_signing_with_a_local_ca(adapter, keys, tmp_path):
    private, public = keys
    ca, ca_key = _write_ca(tmp_path, "graft-ca")
    signer_key = serialization.load_pem_private_key(private.read_bytes(), None)
    certificate = tmp_path / "signer.crt"
    certificate.write_bytes(
        _certificate("signer", signer_key.public_key(), "graft-ca", ca_key, ca=False).public_bytes(serialization.Encoding.PEM)
    )
    digest = sign_graft(adapter, private, signing_certificate=certificate, certificate_chain=[ca])
    assert verify_graft_signature(adapter, public, certificate_chain=[ca]).signature_sha256 == digest

    other_ca, _ = _write_ca(tmp_path, "other-ca")
    _, other_key = write_key_pair(tmp_path, "other")
    for key, chain in ((public, [other_ca]), (other_key, [ca])):  # a CA that did not issue it; another signer's key
        with pytest.raises(GraftSignatureError, match="does not verify against"):
            verify_graft_signature(adapter, key, certificate_chain=chain)
    with pytest.raises(GraftSignatureError, match="together"):
        sign_graft(adapter, private, signing_certificate=certificate)
