"""CMS EnvelopedData (KMS ``CiphertextForRecipient``): vectors, round trips, openssl interop, malformed
input with specific errors, and a fuzz test that nothing but CmsError escapes."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.aws.cms import (
    MAX_CMS_BYTES,
    CmsError,
    decrypt_enveloped_data,
    encrypt_for_recipient,
    parse_enveloped_data,
)
from sidecar.recipient import RecipientKey
from tests.conftest import SHARED

KMS = SHARED / "vectors" / "kms"
ENCLAVER = KMS / "enclaver_kms_CiphertextForRecipient.ber"
ENCLAVER_KEY = KMS / "enclaver_kms_recipient_rsa2048_private_key.pkcs8.der"
KMS_CHUNKED = KMS / "kms_cms_envelopeddata_input_ber.ber"
KMS_PRIMITIVE = KMS / "kms_cms_envelopeddata_input_ber_w_ctx.ber"
OAEP_FAILED = "encrypted key did not decrypt"


def _recipient(private_key: rsa.RSAPrivateKey) -> RecipientKey:
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RecipientKey(private_key, spki)


@pytest.fixture(scope="module")
def enclaver_key() -> RecipientKey:
    key = serialization.load_der_private_key(ENCLAVER_KEY.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return _recipient(key)


@pytest.fixture(scope="module")
def victim() -> RecipientKey:
    return RecipientKey.generate()


@pytest.fixture(scope="module")
def other() -> RecipientKey:
    return RecipientKey.generate()


# --- the vectors -------------------------------------------------------------------------------------


def test_enclaver_vector_decrypts(enclaver_key: RecipientKey) -> None:
    assert decrypt_enveloped_data(ENCLAVER.read_bytes(), enclaver_key) == b"Hello, World"


def test_enclaver_vector_fields(enclaver_key: RecipientKey) -> None:
    raw = ENCLAVER.read_bytes()
    assert raw.startswith(b"\x30\x80")  # BER, indefinite length
    env = parse_enveloped_data(raw)
    assert env.version == 2
    assert env.recipient_key_id == enclaver_key.spki_sha256
    assert len(env.encrypted_key) == 256
    assert (env.oaep_hash, env.mgf1_hash, env.content_algorithm) == ("sha256", "sha256", "aes256_cbc")
    assert len(env.iv) == 16
    assert len(env.encrypted_content) == 16


@pytest.mark.parametrize(
    ("path", "rid_hex", "content_len", "chunked"),
    [
        (KMS_CHUNKED, "7087b55df94ba3255cdf3c01840a2aa3ec93620625d601cf56f97bde7a3d2eb1", 48, True),
        (KMS_PRIMITIVE, "4e61df69e443b8e25c8ae83318cfc72d9b6a5176d2167790fdf819c086e6967a", 16, False),
    ],
    ids=["chunked", "primitive"],
)
def test_kms_vectors_parse(path: Path, rid_hex: str, content_len: int, chunked: bool) -> None:
    raw = path.read_bytes()
    assert raw.startswith(b"\x30\x80") and raw.endswith(b"\x00\x00")
    env = parse_enveloped_data(raw)
    assert env.version == 2
    assert env.recipient_key_id.hex() == rid_hex
    assert len(env.encrypted_key) == 256
    assert (env.oaep_hash, env.mgf1_hash, env.content_algorithm) == ("sha256", "sha256", "aes256_cbc")
    assert len(env.iv) == 16
    assert len(env.encrypted_content) == content_len
    # The content appears in the file as one run: after a chunk's OCTET STRING header (04 len) when
    # chunked inside a constructed [0] (a0 80), or directly after a primitive [0] header (80 len).
    header = b"\x04" if chunked else b"\x80"
    assert header + bytes([content_len]) + env.encrypted_content in raw
    assert (b"\xa0\x80" + header in raw) is chunked


@pytest.mark.parametrize("path", [KMS_CHUNKED, KMS_PRIMITIVE], ids=["chunked", "primitive"])
def test_kms_vectors_are_not_for_our_key(path: Path, enclaver_key: RecipientKey) -> None:
    # Threat: a CiphertextForRecipient meant for another enclave is fed to us; refuse before any RSA work.
    with pytest.raises(CmsError, match=r"^recipient id does not match this key$"):
        decrypt_enveloped_data(path.read_bytes(), enclaver_key)


# --- round trips and key binding ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096])
def test_round_trip(victim: RecipientKey, size: int) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert decrypt_enveloped_data(encrypt_for_recipient(plaintext, victim.spki_der), victim) == plaintext


def test_encrypt_output_has_kms_shape(victim: RecipientKey, enclaver_key: RecipientKey) -> None:
    out = encrypt_for_recipient(b"secret", victim.spki_der)
    env = parse_enveloped_data(out)
    assert env.recipient_key_id == hashlib.sha256(victim.spki_der).digest()
    assert len(env.encrypted_key) == 256
    # Algorithm identifiers byte-identical to the real KMS answer's.
    ours = cms.ContentInfo.load(out)["content"]
    kms = cms.ContentInfo.load(ENCLAVER.read_bytes())["content"]
    getters: list[Callable[[Any], Any]] = [
        lambda ed: ed["recipient_infos"][0].chosen["key_encryption_algorithm"],
        lambda ed: ed["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"],
        lambda ed: ed["encrypted_content_info"]["content_type"],
    ]
    for get in getters:
        assert get(ours).dump(force=True) == get(kms).dump(force=True)
    assert cms.ContentInfo.load(out).dump(force=True) == out  # DER: re-encoding changes nothing


def test_encrypt_is_fresh_each_time(victim: RecipientKey) -> None:
    # Threat: a reused content key or IV would leak plaintext equality across answers.
    a = parse_enveloped_data(encrypt_for_recipient(b"same", victim.spki_der))
    b = parse_enveloped_data(encrypt_for_recipient(b"same", victim.spki_der))
    assert a.iv != b.iv and a.encrypted_key != b.encrypted_key and a.encrypted_content != b.encrypted_content


def test_encrypt_refuses_non_rsa_and_garbage_spki() -> None:
    ec_spki = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(CmsError, match=r"expected RSA"):
        encrypt_for_recipient(b"x", ec_spki)
    with pytest.raises(CmsError, match=r"not a DER SubjectPublicKeyInfo"):
        encrypt_for_recipient(b"x", b"not a key")


@pytest.mark.parametrize("bits", [512, 1024])
def test_encrypt_refuses_small_rsa_keys(bits: int) -> None:
    # Threat: a data key wrapped for a breakable key, or a bare ValueError (HTTP 500) for a tiny one.
    modulus = int.from_bytes(hashlib.shake_256(b"modulus").digest(bits // 8)) | 1 | 1 << (bits - 1)
    small = rsa.RSAPublicNumbers(65537, modulus).public_key()  # only its size matters here
    der = small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(CmsError, match=rf"^recipient key is RSA-{bits}, at least 2048 bits needed$"):
        encrypt_for_recipient(b"x", der)


def test_encrypt_refuses_what_parse_would_refuse(victim: RecipientKey) -> None:
    with pytest.raises(CmsError, match=r"plaintext too large"):
        encrypt_for_recipient(bytes(MAX_CMS_BYTES), victim.spki_der)


def test_different_key_fails_on_recipient_id(victim: RecipientKey, other: RecipientKey) -> None:
    # Threat: an answer for one enclave replayed to another.
    with pytest.raises(CmsError, match=r"^recipient id does not match this key$"):
        decrypt_enveloped_data(encrypt_for_recipient(b"secret", victim.spki_der), other)


def test_matching_rid_wrong_private_key_gets_single_oaep_message(
    victim: RecipientKey, other: RecipientKey
) -> None:
    # Threat: an impostor holding a different private key but claiming the victim's SPKI.
    impostor = RecipientKey(other.private_key, victim.spki_der)
    with pytest.raises(CmsError) as info:
        decrypt_enveloped_data(encrypt_for_recipient(b"secret", victim.spki_der), impostor)
    assert str(info.value) == OAEP_FAILED


def _replace_encrypted_key(data: bytes, encrypted_key: bytes) -> bytes:
    info = cms.ContentInfo.load(data)
    info["content"]["recipient_infos"][0].chosen["encrypted_key"] = encrypted_key
    return bytes(info.dump(force=True))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda k: k[:-1],
        lambda k: k + b"\x00",
        lambda k: b"",
        lambda k: bytes([k[0] ^ 1]) + k[1:],
        lambda k: k[:-1] + bytes([k[-1] ^ 0x80]),
        lambda k: b"\x00" * len(k),
        lambda k: b"\xff" * len(k),  # larger than the modulus
    ],
    ids=["short", "long", "empty", "flip-first", "flip-last", "zeros", "all-ones"],
)
def test_every_oaep_failure_looks_the_same(victim: RecipientKey, tamper: Callable[[bytes], bytes]) -> None:
    # Threat: Manger's attack / OAEP padding oracle. Every failure gives one message and no chained cause
    # (a cause with the library's detail could reach a log or a response).
    good = encrypt_for_recipient(b"secret", victim.spki_der)
    bad = _replace_encrypted_key(good, tamper(parse_enveloped_data(good).encrypted_key))
    with pytest.raises(CmsError) as info:
        decrypt_enveloped_data(bad, victim)
    assert str(info.value) == OAEP_FAILED
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_content_key_must_be_32_bytes(victim: RecipientKey) -> None:
    # Threat: a downgrade to a shorter AES key through a well-formed OAEP wrap.
    short_key = victim.private_key.public_key().encrypt(
        b"k" * 16,
        asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    bad = _replace_encrypted_key(encrypt_for_recipient(b"secret", victim.spki_der), short_key)
    with pytest.raises(CmsError, match=r"^content key is 16 bytes, expected 32$"):
        decrypt_enveloped_data(bad, victim)


def _replace_content(data: bytes, iv: bytes | None = None, content: bytes | None = None) -> bytes:
    info = cms.ContentInfo.load(data)
    eci = info["content"]["encrypted_content_info"]
    if iv is not None:
        eci["content_encryption_algorithm"] = {"algorithm": "aes256_cbc", "parameters": iv}
    if content is not None:
        eci["encrypted_content"] = content
    return bytes(info.dump(force=True))


def test_tampered_iv_padding_byte_is_bad_padding(victim: RecipientKey) -> None:
    # Threat: tampering in transit. "Hello, World" pads to one block ending 04 04 04 04; flipping the IV's
    # last bit turns the last byte into 05, which is invalid padding: a deterministic "bad padding".
    good = encrypt_for_recipient(b"Hello, World", victim.spki_der)
    iv = parse_enveloped_data(good).iv
    bad = _replace_content(good, iv=iv[:-1] + bytes([iv[-1] ^ 1]))
    with pytest.raises(CmsError, match=r"^bad padding$"):
        decrypt_enveloped_data(bad, victim)


def test_cbc_has_no_integrity(victim: RecipientKey) -> None:
    # Threat: bit-flipping. Documented limitation: CBC is malleable; flipping an IV bit flips the same
    # plaintext bit and nothing notices. Integrity comes from KMS's TLS channel and the fresh wrapped key.
    good = encrypt_for_recipient(b"Hello, World", victim.spki_der)
    iv = parse_enveloped_data(good).iv
    bad = _replace_content(good, iv=bytes([iv[0] ^ 1]) + iv[1:])
    assert decrypt_enveloped_data(bad, victim) == b"Iello, World"


TAMPER_PLAINTEXT = b"a secret of some 40 bytes, give or take."


@pytest.fixture(scope="module")
def tamper_base(victim: RecipientKey) -> bytes:
    return encrypt_for_recipient(TAMPER_PLAINTEXT, victim.spki_der)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0, max_value=47), mask=st.integers(min_value=1, max_value=255))
def test_tampered_ciphertext_never_crashes(
    victim: RecipientKey, tamper_base: bytes, position: int, mask: int
) -> None:
    # Threat: tampering in transit. Only "bad padding" or a different plaintext; never another exception.
    plaintext, good = TAMPER_PLAINTEXT, tamper_base
    content = bytearray(parse_enveloped_data(good).encrypted_content)
    content[position] ^= mask
    try:
        assert decrypt_enveloped_data(_replace_content(good, content=bytes(content)), victim) != plaintext
    except CmsError as exc:
        assert str(exc) == "bad padding"


# --- independent CMS from the openssl CLI -------------------------------------------------------------

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


class _OpenSslPeer:
    """A fresh RSA-2048 key with a self-signed cert whose subjectKeyIdentifier is SHA-256(SPKI), as KMS's."""

    def __init__(self, directory: Path) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.recipient = _recipient(key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave-sidecar test")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            # openssl -keyid puts the cert's SKI in the rid; make it the KMS rid.
            .add_extension(x509.SubjectKeyIdentifier(self.recipient.spki_sha256), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.cert = directory / "cert.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key = directory / "key.pem"
        self.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def encrypt(self, plaintext: bytes, *extra: str) -> bytes:
        assert OPENSSL is not None
        # fmt: off
        argv = [
            OPENSSL, "cms", "-encrypt", "-binary", "-aes256", "-recip", str(self.cert),
            "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
            "-keyopt", "rsa_mgf1_md:sha256", "-outform", "DER", *extra,
        ]
        # fmt: on
        return subprocess.run(argv, input=plaintext, capture_output=True, check=True, timeout=30).stdout

    def decrypt(self, data: bytes) -> bytes:
        assert OPENSSL is not None
        argv = [OPENSSL, "cms", "-decrypt", "-binary", "-inform", "DER"]
        argv += ["-recip", str(self.cert), "-inkey", str(self.key)]
        return subprocess.run(argv, input=data, capture_output=True, check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> _OpenSslPeer:
    return _OpenSslPeer(tmp_path_factory.mktemp("openssl"))


@needs_openssl
def test_openssl_keyid_decrypts(peer: _OpenSslPeer) -> None:
    data = peer.encrypt(b"from openssl", "-keyid")
    assert parse_enveloped_data(data).recipient_key_id == peer.recipient.spki_sha256
    assert decrypt_enveloped_data(data, peer.recipient) == b"from openssl"


@needs_openssl
def test_openssl_stream_chunked_decrypts(peer: _OpenSslPeer) -> None:
    plaintext = bytes(range(256)) * 40  # large enough for openssl to write several content chunks
    data = peer.encrypt(plaintext, "-keyid", "-stream")
    assert data.startswith(b"\x30\x80")  # BER, indefinite length
    content = cms.ContentInfo.load(data)["content"]["encrypted_content_info"]["encrypted_content"]
    assert content.method == 1  # constructed: chunks
    assert decrypt_enveloped_data(data, peer.recipient) == plaintext


@needs_openssl
def test_openssl_issuer_and_serial_refused(peer: _OpenSslPeer) -> None:
    # Threat: recipient confusion. Only KMS's rid form (SHA-256 of our SPKI) binds the answer to our key.
    with pytest.raises(CmsError, match=r"^recipient id is not subjectKeyIdentifier"):
        decrypt_enveloped_data(peer.encrypt(b"x"), peer.recipient)


@needs_openssl
@pytest.mark.parametrize("size", [1, 5000])
def test_openssl_decrypts_our_output(peer: _OpenSslPeer, size: int) -> None:
    plaintext = b"z" * size
    assert peer.decrypt(encrypt_for_recipient(plaintext, peer.recipient.spki_der)) == plaintext


# --- malformed structure: each with its specific error ------------------------------------------------


def _edited(edit: Callable[[Any], None]) -> bytes:
    """The enclaver vector, parsed, edited (edit gets the ContentInfo) and re-encoded by asn1crypto."""
    info = cms.ContentInfo.load(ENCLAVER.read_bytes())
    info.native  # noqa: B018  # parse fully before editing
    edit(info)
    return bytes(info.dump(force=True))


def _ktri(info: Any) -> Any:
    return info["content"]["recipient_infos"][0].chosen


def _eci(info: Any) -> Any:
    return info["content"]["encrypted_content_info"]


def _oaep(hash_name: str = "sha256", mgf1_hash: str = "sha256", label: bytes = b"") -> Any:
    params = {
        "hash_algorithm": {"algorithm": hash_name},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": mgf1_hash}},
        "p_source_algorithm": {"algorithm": "p_specified", "parameters": label},
    }
    return {"algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams(params)}


def _set(get: Callable[[Any], Any], field: str, value: Any) -> Callable[[Any], None]:
    def edit(info: Any) -> None:
        get(info)[field] = value

    return edit


def _two_recipients(info: Any) -> None:
    ri = info["content"]["recipient_infos"][0]
    info["content"]["recipient_infos"] = [
        cms.RecipientInfo.load(ri.dump()),
        cms.RecipientInfo.load(ri.dump()),
    ]


def _key_agree_recipient(info: Any) -> None:
    kari = cms.KeyAgreeRecipientInfo(
        {
            "version": "v3",
            "originator": cms.OriginatorIdentifierOrKey(name="subject_key_identifier", value=b"\x01" * 20),
            "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
            "recipient_encrypted_keys": [
                {
                    "rid": cms.KeyAgreementRecipientIdentifier(
                        name="r_key_id", value={"subject_key_identifier": b"\x02" * 32}
                    ),
                    "encrypted_key": b"k" * 40,
                }
            ],
        }
    )
    info["content"]["recipient_infos"] = [cms.RecipientInfo(name="kari", value=kari)]


ISSUER_AND_SERIAL = cms.RecipientIdentifier(
    name="issuer_and_serial_number",
    value={"issuer": asn1_x509.Name.build({"common_name": "someone"}), "serial_number": 1},
)

MALFORMED: list[tuple[str, Callable[[Any], None], str]] = [
    # Threat (all): a downgraded, confused or half-valid structure slipping through as if it were KMS's.
    (
        "content-type",
        _set(lambda i: i, "content_type", "signed_data"),
        r"^content type is 1\.2\.840\.113549\.1\.7\.2, expected envelopedData$",
    ),
    (
        "version-0",
        _set(lambda i: i["content"], "version", "v0"),
        "^EnvelopedData version 0, expected 2$",
    ),
    (
        "ktri-version-0",
        _set(_ktri, "version", "v0"),
        "^KeyTransRecipientInfo version 0, expected 2$",
    ),
    ("two-recipients", _two_recipients, "^expected exactly one recipient, got 2$"),
    (
        "no-recipients",
        _set(lambda i: i["content"], "recipient_infos", []),
        "^expected exactly one recipient, got 0$",
    ),
    ("key-agree", _key_agree_recipient, r"^recipient is not KeyTransRecipientInfo \(kari\)$"),
    ("issuer-and-serial", _set(_ktri, "rid", ISSUER_AND_SERIAL), "^recipient id is not subjectKeyIdentifier"),
    (
        "pkcs1v15",
        _set(_ktri, "key_encryption_algorithm", {"algorithm": "rsaes_pkcs1v15"}),
        "^key encryption algorithm rsaes_pkcs1v15, expected RSAES-OAEP$",
    ),
    (
        "oaep-sha1",
        _set(_ktri, "key_encryption_algorithm", _oaep("sha1", "sha1")),
        "^OAEP hash must be SHA-256",
    ),
    (
        "oaep-default-params",
        _set(_ktri, "key_encryption_algorithm", {"algorithm": "rsaes_oaep"}),
        "^OAEP hash must be SHA-256, got sha1$",
    ),
    (
        "mgf1-sha1",
        _set(_ktri, "key_encryption_algorithm", _oaep(mgf1_hash="sha1")),
        "^MGF1 hash must be SHA-256",
    ),
    ("oaep-label", _set(_ktri, "key_encryption_algorithm", _oaep(label=b"x")), "^OAEP label must be empty$"),
    (
        "aes128",
        _set(_eci, "content_encryption_algorithm", {"algorithm": "aes128_cbc", "parameters": b"\x00" * 16}),
        "^content encryption algorithm aes128_cbc, expected AES-256-CBC$",
    ),
    (
        "iv-8-bytes",
        _set(_eci, "content_encryption_algorithm", {"algorithm": "aes256_cbc", "parameters": b"\x00" * 8}),
        "^IV must be 16 bytes, got 8 bytes$",
    ),
    ("missing-content", _set(_eci, "encrypted_content", None), "^missing encrypted content$"),
    ("empty-content", _set(_eci, "encrypted_content", b""), r"^missing encrypted content \(empty\)$"),
    (
        "content-17-bytes",
        _set(_eci, "encrypted_content", b"\x00" * 17),
        r"^content length is not a multiple of 16 \(17 bytes\)$",
    ),
    (
        "inner-content-type",
        _set(_eci, "content_type", "signed_data"),
        r"^encrypted content type is 1\.2\.840\.113549\.1\.7\.2, expected data$",
    ),
]


def test_unedited_reencoding_still_decrypts(enclaver_key: RecipientKey) -> None:
    # The edit route itself is sound: so each malformed case below fails only because of its edit.
    assert decrypt_enveloped_data(_edited(lambda info: None), enclaver_key) == b"Hello, World"


@pytest.mark.parametrize(("edit", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_structure(enclaver_key: RecipientKey, edit: Callable[[Any], None], message: str) -> None:
    data = _edited(edit)
    with pytest.raises(CmsError, match=message):
        parse_enveloped_data(data)
    with pytest.raises(CmsError, match=message):  # decrypt refuses before any RSA work
        decrypt_enveloped_data(data, enclaver_key)


def test_wrong_outer_content_type() -> None:
    data = cms.ContentInfo({"content_type": "data", "content": core.OctetString(b"plain")}).dump()
    with pytest.raises(
        CmsError, match=r"^content type is 1\.2\.840\.113549\.1\.7\.1, expected envelopedData$"
    ):
        parse_enveloped_data(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x30\x80", b"\x30\x05\x02\x01\x01", b"\x30\x80" * 100_000, ENCLAVER.read_bytes()[:-3]],
    ids=["empty", "text", "unterminated", "integer-in-sequence", "deep-nesting", "truncated"],
)
def test_not_ber(data: bytes) -> None:
    # Threat: parser abuse (truncation, deep nesting); only a CmsError, never a crash or a hang.
    with pytest.raises(CmsError, match=r"^not BER/DER: "):
        parse_enveloped_data(data)


def test_trailing_junk() -> None:
    # Threat: smuggling bytes after the structure that another parser might read differently.
    with pytest.raises(CmsError, match=r"^not BER/DER: Extra data - 3 bytes of trailing data"):
        parse_enveloped_data(ENCLAVER.read_bytes() + b"abc")


def test_oversize_is_checked_first(enclaver_key: RecipientKey) -> None:
    # Threat: memory/CPU exhaustion. The limit applies before parsing, even to a valid prefix.
    data = ENCLAVER.read_bytes()
    padded = data + bytes(MAX_CMS_BYTES + 1 - len(data))
    with pytest.raises(CmsError, match=rf"^CMS is {MAX_CMS_BYTES + 1} bytes, limit is {MAX_CMS_BYTES}$"):
        decrypt_enveloped_data(padded, enclaver_key)
    with pytest.raises(CmsError, match=r"^not BER/DER"):  # at the limit: parsed (and refused as junk)
        parse_enveloped_data(padded[:MAX_CMS_BYTES])


def test_not_bytes() -> None:
    with pytest.raises(CmsError, match=r"^CMS must be bytes, got str$"):
        parse_enveloped_data("0\x80")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_accepted(enclaver_key: RecipientKey) -> None:
    raw = ENCLAVER.read_bytes()
    assert decrypt_enveloped_data(bytearray(raw), enclaver_key) == b"Hello, World"  # type: ignore[arg-type]
    assert decrypt_enveloped_data(memoryview(raw), enclaver_key) == b"Hello, World"  # type: ignore[arg-type]


# --- fuzz: only CmsError, ever -------------------------------------------------------------------------

_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("set"), st.integers(min_value=0), st.sampled_from([0x00, 0x80, 0x81, 0x84, 0xFF])),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=8)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in mutations:
        i = where % (len(out) + 1)
        if kind == "flip" and i < len(out):
            out[i] ^= arg
        elif kind == "set" and i < len(out):
            out[i] = arg
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out[i:i] = arg
        elif kind == "delete":
            del out[i : i + arg]
    return bytes(out)


def _only_cms_error(data: bytes, recipient: RecipientKey) -> None:
    with contextlib.suppress(CmsError):
        parse_enveloped_data(data)
    try:
        result = decrypt_enveloped_data(data, recipient)
    except CmsError:
        return
    assert isinstance(result, bytes)


# The ContentInfo header up to the envelopedData OID: random tails then reach the EnvelopedData checks.
_ENVELOPED_PREFIX = bytes.fromhex("308006092a864886f70d010703a080")


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=1024), st.binary(max_size=1024).map(_ENVELOPED_PREFIX.__add__)))
def test_fuzz_arbitrary_bytes(enclaver_key: RecipientKey, data: bytes) -> None:
    # Threat: a hostile or broken KMS proxy; any bytes yield a CmsError, never another exception.
    _only_cms_error(data, enclaver_key)


@pytest.fixture(scope="module")
def fuzz_bases(enclaver_key: RecipientKey) -> list[bytes]:
    vectors = [path.read_bytes() for path in (ENCLAVER, KMS_CHUNKED, KMS_PRIMITIVE)]
    # Also DER (not BER) and decryptable with enclaver_key, so mutants reach OAEP, AES and unpadding.
    return [*vectors, encrypt_for_recipient(b"fuzz me, please", enclaver_key.spki_der)]


@settings(max_examples=400, deadline=None)
@given(which=st.integers(min_value=0, max_value=3), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzz_mutated_vectors(
    enclaver_key: RecipientKey, fuzz_bases: list[bytes], which: int, mutations: list[tuple[str, int, Any]]
) -> None:
    # Threat: near-valid input reaching deep code paths (OAEP, AES, unpadding): still only CmsError.
    _only_cms_error(_mutate(fuzz_bases[which], mutations), enclaver_key)
