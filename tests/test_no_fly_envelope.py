"""The no-fly list's envelope: both formats, strict structure, authenticated decryption.

Threats: an S3 object changed by someone with write access (tamper, swapped key id, swapped data
key, oversize or malformed JSON meant to crash or exhaust the enclave), and error messages that
would leak key material or plaintext into logs and /enclave/ready.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from typing import Any

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.no_fly_list import envelope as envelope_module
from plugins.no_fly_list.envelope import (
    ENCRYPTION_CONTEXT,
    FORMAT,
    NOT_DECRYPTABLE,
    Envelope,
    EnvelopeError,
    associated_data,
    open_envelope,
    parse_envelope,
    seal_envelope,
    seal_fernet_envelope,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
BLOB = b"\x01\x02\x03\x00" + bytes(range(92))  # stands in for a KMS ciphertext blob
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PAYLOAD = "bigbird\nelmo\nzoë\n\uff22\uff49\uff47 \uff22\uff49\uff52\uff44".encode()  # full-width Big Bird


def sealed(payload: bytes = PAYLOAD, key: bytes = KEY, key_id: str = KEY_ARN) -> bytes:
    return seal_envelope(payload, key, BLOB, key_id)


def doc(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


def dump(document: Any) -> bytes:
    return json.dumps(document).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def original_app_envelope(payload: str, key: bytes = KEY) -> bytes:
    """What the original app's sealer wrote: Fernet under base64(data key), the token as text.

    The original encoded the key with ``base64.b64encode``; cryptography 51 accepts only the
    URL-safe alphabet, which encodes the same 32 key bytes, so the tests use that.
    """
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(payload.encode("utf-8"))
    return dump({"data-key-ciphertext-base64": b64(BLOB), "aes-ciphertext-base64": token.decode()})


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("payload", [b"", b"bigbird", PAYLOAD, os.urandom(1 << 20)], ids=len)
def test_aead_round_trip(payload: bytes) -> None:
    env = parse_envelope(sealed(payload))
    assert env.kind == "aead" and env.version == 2 and env.key_id == KEY_ARN
    assert env.data_key_ciphertext == BLOB
    opened = open_envelope(env, KEY)
    assert isinstance(opened, bytearray)  # mutable, so the caller can wipe it
    assert opened == payload


def test_aead_layout_is_the_documented_one() -> None:
    """An independent reader (plain AESGCM and the documented AAD) opens what we seal."""
    document = doc(sealed())
    assert list(document) == [
        "format",
        "version",
        "key_id",
        "encryption-context",
        "sealed-at",
        "data-key-ciphertext-base64",
        "nonce-base64",
        "ciphertext-base64",
    ]
    assert document["format"] == FORMAT == "enclave-sidecar/no-fly-list"
    assert document["encryption-context"] == {"purpose": "no-fly-list"}
    sealed_at = document["sealed-at"]
    assert abs(sealed_at - time.time() * 1000) < 60_000  # milliseconds since the epoch, now
    aad = (
        b'{"format":"enclave-sidecar/no-fly-list","key_id":"'
        + KEY_ARN.encode()
        + b'","sealed-at":'
        + str(sealed_at).encode()
        + b',"version":2}'
    )
    assert associated_data(KEY_ARN, 2, sealed_at) == aad
    # Envelopes sealed before "sealed-at" existed keep the shorter associated data.
    assert (
        associated_data(KEY_ARN)
        == b'{"format":"enclave-sidecar/no-fly-list","key_id":"' + KEY_ARN.encode() + b'","version":2}'
    )
    nonce = base64.b64decode(document["nonce-base64"])
    plaintext = AESGCM(KEY).decrypt(nonce, base64.b64decode(document["ciphertext-base64"]), aad)
    assert plaintext == PAYLOAD


def test_every_seal_uses_a_fresh_nonce() -> None:
    nonces = {doc(sealed())["nonce-base64"] for _ in range(50)}
    assert len(nonces) == 50


def test_original_app_envelope_opens() -> None:
    """Compatibility: the original demo's envelope (Fernet token as text, key via standard base64)."""
    env = parse_envelope(original_app_envelope("bigbird,elmo,bert\n"))
    assert env.kind == "fernet" and env.version == 1 and env.key_id is None
    assert env.encryption_context is None
    assert open_envelope(env, KEY) == b"bigbird,elmo,bert\n"  # splitting is the index's job


def test_seal_fernet_envelope_is_readable_by_the_original_app_code() -> None:
    document = doc(seal_fernet_envelope(b"bigbird,elmo", KEY, BLOB))
    assert set(document) == {"data-key-ciphertext-base64", "aes-ciphertext-base64"}
    # The original: Fernet(base64.b64encode(key)).decrypt(envelope["aes-ciphertext-base64"].encode()),
    # with the URL-safe alphabet that cryptography 51 requires (the same key bytes).
    assert (
        Fernet(base64.urlsafe_b64encode(KEY)).decrypt(document["aes-ciphertext-base64"].encode())
        == b"bigbird,elmo"
    )


def test_kms_decrypt_params_carry_the_encryption_context() -> None:
    aead = parse_envelope(sealed())
    assert aead.kms_decrypt_params("alias/no-fly-list") == {
        "CiphertextBlob": BLOB,
        "KeyId": "alias/no-fly-list",
        "EncryptionContext": {"purpose": "no-fly-list"},
    }
    params = aead.kms_decrypt_params("k")
    params["EncryptionContext"]["purpose"] = "changed"  # a copy: the module constant stays intact
    assert ENCRYPTION_CONTEXT == {"purpose": "no-fly-list"}
    fernet = parse_envelope(original_app_envelope("x"))
    assert fernet.kms_decrypt_params("k") == {"CiphertextBlob": BLOB, "KeyId": "k"}


def test_describe_and_repr_show_sizes_only() -> None:
    env = parse_envelope(seal_envelope(b"bigbird\nelmo", KEY, BLOB, KEY_ARN, sealed_at=1_796_600_000_123))
    assert env.describe() == {
        "format": FORMAT,
        "version": 2,
        "key_id": KEY_ARN,
        "encryption_context": {"purpose": "no-fly-list"},
        "data_key_ciphertext_bytes": len(BLOB),
        "sealed_bytes": 12 + 16,
        "sealed_at": "2026-12-06T23:33:20.123Z",
        "plaintext_bytes": 12,
    }
    text = repr(env)
    assert "28 bytes" in text and KEY_ARN in text
    assert env.ciphertext.hex() not in text and b64(env.ciphertext) not in text
    old = parse_envelope(original_app_envelope("bigbird"))
    info = old.describe()
    assert info["format"] == "fernet (original)" and info["key_id"] is None
    assert info["sealed_bytes"] == 1 + 8 + 16 + 16 + 32
    assert info["plaintext_bytes_max"] == 15


# --------------------------------------------------------------------------- decryption failures


def test_wrong_data_key_does_not_decrypt() -> None:
    # Threat: an envelope whose data key ciphertext was swapped for another one KMS will decrypt.
    for data in (sealed(), original_app_envelope("bigbird")):
        with pytest.raises(EnvelopeError) as err:
            open_envelope(parse_envelope(data), OTHER_KEY)
        assert str(err.value) == NOT_DECRYPTABLE


def test_swapped_key_id_fails_authentication() -> None:
    # Threat: relabelling an envelope with another key id (the key id is bound as associated data).
    document = doc(sealed())
    document["key_id"] = "arn:aws:kms:us-east-1:123456789012:key/other"
    env = parse_envelope(dump(document))
    with pytest.raises(
        EnvelopeError, match=r"^envelope does not decrypt: tampered or sealed under another key$"
    ):
        open_envelope(env, KEY)


@pytest.mark.parametrize("field", ["nonce-base64", "ciphertext-base64"])
def test_tampered_fields_fail_authentication(field: str) -> None:
    document = doc(sealed())
    raw = bytearray(base64.b64decode(document[field]))
    raw[len(raw) // 2] ^= 0x40
    document[field] = b64(bytes(raw))
    with pytest.raises(EnvelopeError) as err:
        open_envelope(parse_envelope(dump(document)), KEY)
    assert str(err.value) == NOT_DECRYPTABLE


def test_single_byte_flip_sweep_of_the_sealed_bytes() -> None:
    """Every single-bit change anywhere in the nonce, ciphertext or tag is detected."""
    env = parse_envelope(sealed())
    sealed_bytes = env.nonce + env.ciphertext
    for position in range(len(sealed_bytes)):
        for bit in (0x01, 0x80):
            flipped = bytearray(sealed_bytes)
            flipped[position] ^= bit
            changed = Envelope(
                "aead",
                env.data_key_ciphertext,
                env.key_id,
                2,
                nonce=bytes(flipped[:12]),
                ciphertext=bytes(flipped[12:]),
            )
            with pytest.raises(EnvelopeError, match="does not decrypt"):
                open_envelope(changed, KEY)


@pytest.mark.parametrize("kind", ["aead", "fernet"])
def test_single_byte_flip_sweep_of_the_file(kind: str) -> None:
    """Flip each byte of the envelope file: it is refused or opens to the very same payload.

    Never a different plaintext, never another exception type. (Flips inside the data key
    ciphertext are KMS's to catch; flips in base64 padding bits may not change the bytes at all.)
    """
    payload = b"bigbird\nelmo" if kind == "aead" else b"bigbird,elmo"
    data = sealed(payload) if kind == "aead" else seal_fernet_envelope(payload, KEY, BLOB)
    key_text = b64(BLOB).encode()
    key_start = data.index(key_text)
    accepted_elsewhere = []
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        try:
            opened = open_envelope(parse_envelope(bytes(flipped)), KEY)
        except EnvelopeError:
            continue
        assert opened == payload, position
        if not key_start <= position < key_start + len(key_text):
            accepted_elsewhere.append(position)
    # Outside the data key ciphertext only a base64 character's unused low bits may flip unnoticed:
    # at most the last character before padding, once per base64 field.
    assert len(accepted_elsewhere) <= 2, accepted_elsewhere


def test_failed_authentication_leaves_no_plaintext_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # GCM releases plaintext before the tag is checked; the buffer it went to must be wiped.
    buffers: list[bytearray] = []
    real = bytearray

    class Recording(bytearray):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            buffers.append(self)

    monkeypatch.setattr(envelope_module, "bytearray", Recording, raising=False)
    document = doc(sealed(b"bigbird" * 10))
    document["key_id"] = "swapped"
    with pytest.raises(EnvelopeError):
        open_envelope(parse_envelope(dump(document)), KEY)
    assert buffers and all(buf == real(len(buf)) for buf in buffers)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_data_key_of_the_wrong_size(size: int) -> None:
    with pytest.raises(EnvelopeError, match=f"the data key is {size} bytes, expected 32"):
        open_envelope(parse_envelope(sealed()), bytes(size))


# --------------------------------------------------------------------------- structure


def v2(**changes: Any) -> bytes:
    document = doc(sealed())
    for name, value in changes.items():
        name = name.replace("_b64", "-base64").replace("_", "-") if name != "key_id" else name
        if value is ...:
            del document[name]
        else:
            document[name] = value
    return dump(document)


STRUCTURE_CASES: list[tuple[bytes, str]] = [
    (b"", "envelope is empty"),
    (b"\xff\xfe{}", "envelope is not UTF-8"),
    (b"{", "envelope is not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b"not json", "envelope is not JSON: Expecting value at line 1 column 1"),
    (b"[]", "envelope must be a JSON object, got an array"),
    (b'"x"', "envelope must be a JSON object, got a string"),
    (b"null", "envelope must be a JSON object, got null"),
    (b"12", "envelope must be a JSON object, got a number"),
    (b"{}", "not a no-fly-list envelope"),
    (b'{"format": NaN}', "envelope is not valid JSON: NaN is not allowed"),
    (b"[" * 100_000, "envelope is not valid JSON: nested too deeply"),
    (b'{"version": ' + b"9" * 5000 + b"}", "envelope is not valid JSON: Exceeds the limit"),
    (b'{"format": "a", "format": "b"}', "envelope has the field 'format' twice"),
    (v2(format="enclave-sidecar/other"), "unknown envelope format 'enclave-sidecar/other'"),
    (v2(format=7), "unknown envelope format a number"),
    (v2(format=...), "envelope has 'version' but no 'format'"),
    (v2(version=3), "unsupported envelope version 3 (this build reads version 2)"),
    (v2(version=1), "unsupported envelope version 1"),
    (v2(version="2"), "'version' must be an integer, got a string"),
    (v2(version=True), "'version' must be an integer, got a boolean"),
    (v2(version=2.0), "'version' must be an integer, got a number"),
    (v2(version=...), "envelope is missing the field 'version'"),
    (v2(key_id=...), "envelope is missing the field 'key_id'"),
    (v2(encryption_context=...), "envelope is missing the field 'encryption-context'"),
    (v2(data_key_ciphertext_b64=...), "envelope is missing the field 'data-key-ciphertext-base64'"),
    (v2(nonce_b64=...), "envelope is missing the field 'nonce-base64'"),
    (v2(ciphertext_b64=...), "envelope is missing the field 'ciphertext-base64'"),
    (v2(extra="x"), "envelope has an unknown field 'extra'"),
    (v2(key_id=5), "'key_id' must be a string, got a number"),
    (v2(key_id=""), "'key_id' must be 1 to 2048 printable ASCII characters"),
    (v2(key_id="alias/no fly"), "'key_id' must be 1 to 2048 printable ASCII characters"),
    (v2(key_id="alias/nöfly"), "'key_id' must be 1 to 2048 printable ASCII characters"),
    (v2(key_id="a" * 2049), "'key_id' must be 1 to 2048 printable ASCII characters"),
    (v2(encryption_context={}), '\'encryption-context\' must be {"purpose": "no-fly-list"}'),
    (v2(encryption_context={"purpose": "vault"}), "'encryption-context' must be"),
    (v2(encryption_context="purpose=no-fly-list"), "'encryption-context' must be"),
    (v2(nonce_b64="AAAA AAAA"), "'nonce-base64' is not valid base64"),
    (v2(nonce_b64="AAA"), "'nonce-base64' is not valid base64"),
    (v2(nonce_b64="é"), "'nonce-base64' is not valid base64"),
    (v2(nonce_b64=None), "'nonce-base64' must be a string, got null"),
    (v2(nonce_b64=b64(bytes(11))), "'nonce-base64' is 11 bytes, expected 12"),
    (v2(nonce_b64=b64(bytes(16))), "'nonce-base64' is 16 bytes, expected 12"),
    (v2(ciphertext_b64=b64(bytes(15))), "'ciphertext-base64' is 15 bytes, shorter than the 16-byte GCM tag"),
    (v2(ciphertext_b64="!!!!"), "'ciphertext-base64' is not valid base64"),
    (
        v2(data_key_ciphertext_b64=b64(bytes(31))),
        "'data-key-ciphertext-base64' is 31 bytes, expected 32 to 6144",
    ),
    (v2(data_key_ciphertext_b64=b64(bytes(6145))), "'data-key-ciphertext-base64' is 6145 bytes"),
    (v2(data_key_ciphertext_b64=[]), "'data-key-ciphertext-base64' must be a string, got an array"),
]


@pytest.mark.parametrize(("data", "message"), STRUCTURE_CASES, ids=[m[:60] for _, m in STRUCTURE_CASES])
def test_structure_errors_are_specific(data: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        parse_envelope(data)
    assert str(err.value).startswith(message) or message in str(err.value), str(err.value)


def original(**changes: Any) -> bytes:
    document = doc(original_app_envelope("bigbird"))
    for name, value in changes.items():
        field = {"token": "aes-ciphertext-base64", "key": "data-key-ciphertext-base64"}.get(name, name)
        if value is ...:
            del document[field]
        else:
            document[field] = value
    return dump(document)


TOKEN = doc(original_app_envelope("bigbird"))["aes-ciphertext-base64"]
ORIGINAL_CASES: list[tuple[bytes, str]] = [
    (original(key=...), "envelope is missing the field 'data-key-ciphertext-base64'"),
    (original(extra=1), "envelope has an unknown field 'extra'"),
    (original(token=5), "'aes-ciphertext-base64' must be a string, got a number"),
    (original(token=""), "'aes-ciphertext-base64' is not a Fernet token"),
    (original(token=TOKEN.replace("-", "+").replace("_", "/") + "+"), "is not a Fernet token"),
    (original(token=TOKEN[:-4]), "is not a Fernet token"),  # the HMAC cut short
    (original(token=b64(b"U" + bytes(72)).replace("+", "-").replace("/", "_")), "version byte or length"),
    (original(token="U2FsdGVkX18a+Ji6uIdSAc9GQF3BV1Eq"), "is not a Fernet token"),  # openssl enc output
    (original(key="%%%"), "'data-key-ciphertext-base64' is not valid base64"),
]


@pytest.mark.parametrize(("data", "message"), ORIGINAL_CASES, ids=[m[:60] for _, m in ORIGINAL_CASES])
def test_original_format_structure_errors(data: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        parse_envelope(data)
    assert message in str(err.value), str(err.value)


def test_fernet_timestamp_after_year_9999_is_refused() -> None:
    # Threat: a crafted token timestamp (HMAC-covered, never checked without a TTL) crashing
    # check-envelope's describe() with OverflowError and outranking every later list on reload.
    token = base64.urlsafe_b64decode(TOKEN)
    far = token[:1] + (2**64 - 1).to_bytes(8, "big") + token[9:]
    with pytest.raises(EnvelopeError, match="its timestamp is after 9999"):
        parse_envelope(original(token=base64.urlsafe_b64encode(far).decode()))
    last = token[:1] + (253402300799).to_bytes(8, "big") + token[9:]  # 9999-12-31T23:59:59Z
    assert parse_envelope(original(token=base64.urlsafe_b64encode(last).decode())).describe()["sealed_at"]


def test_oversize_envelope_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat: a huge object making the enclave allocate without bound. (The limit is lowered here so
    # the test need not allocate 512 MiB; the check is the same code.)
    monkeypatch.setattr(envelope_module, "MAX_ENVELOPE_BYTES", 1000)
    with pytest.raises(EnvelopeError, match="envelope is 1001 bytes, over the limit"):
        parse_envelope(b" " * 1001)
    with pytest.raises(EnvelopeError, match=r"the sealed envelope would be .* over the limit"):
        sealed(b"x" * 1000)


def test_default_limit_is_512_mib() -> None:
    assert envelope_module.MAX_ENVELOPE_BYTES == 512 * 1024 * 1024


def test_error_messages_never_echo_field_values() -> None:
    # Threat: a reason shown in /enclave/ready or the log carrying ciphertext or a planted string.
    marker = "SECRETMARKER"
    for data in (
        v2(nonce_b64=marker + "!"),
        v2(ciphertext_b64=marker + "!"),
        v2(key_id=marker + " x"),
        v2(encryption_context={"purpose": marker}),
        original(token=marker + "!"),
        v2(version=marker),
    ):
        with pytest.raises(EnvelopeError) as err:
            parse_envelope(data)
        assert marker not in str(err.value)


@pytest.mark.parametrize("bad", [b"x" * 16, b"x" * 33])
def test_seal_refuses_a_key_that_is_not_32_bytes(bad: bytes) -> None:
    with pytest.raises(EnvelopeError, match="expected 32"):
        seal_envelope(b"x", bad, BLOB, KEY_ARN)
    with pytest.raises(EnvelopeError, match="expected 32"):
        seal_fernet_envelope(b"x", bad, BLOB)


def test_seal_refuses_a_bad_key_id() -> None:
    with pytest.raises(EnvelopeError, match="key id"):
        seal_envelope(b"x", KEY, BLOB, "alias/with space")


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_only_raise_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        parse_envelope(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "format",
    "version",
    "key_id",
    "encryption-context",
    "data-key-ciphertext-base64",
    "nonce-base64",
    "ciphertext-base64",
    "aes-ciphertext-base64",
]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_near_valid_documents(data: st.DataObject) -> None:
    """Start from a valid envelope of either format and replace, drop or add fields at random."""
    base = doc(sealed(b"bigbird")) if data.draw(st.booleans()) else doc(original_app_envelope("bigbird"))
    for name in data.draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        action = data.draw(st.sampled_from(["drop", "value", "b64"]))
        if action == "drop":
            base.pop(name, None)
        elif action == "value":
            base[name] = data.draw(JSON_VALUES)
        else:
            base[name] = b64(data.draw(st.binary(max_size=80)))
    try:
        env = parse_envelope(dump(base))
    except EnvelopeError:
        return
    try:
        opened = open_envelope(env, KEY)
    except EnvelopeError:
        return
    assert opened in (b"bigbird",)  # whatever parses and opens was sealed by us
