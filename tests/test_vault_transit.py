"""Transit engine (plugins/vault_like/transit.py): aes256-gcm96 keys, vault:vN: ciphertexts.

Bodies and messages were checked against OpenBao 2.7.2's transit engine.
"""

from __future__ import annotations

import base64
import json

import pytest
from vault_fakes import FakeJsonStore

from plugins.vault_like.logical import LogicalRequest, LogicalResponse, Operation, VaultError
from plugins.vault_like.transit import Transit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def store() -> FakeJsonStore:
    return FakeJsonStore()


@pytest.fixture
def transit(store: FakeJsonStore) -> Transit:
    return Transit(store, "transit/")


async def call(
    engine: Transit, op: Operation, path: str, data: dict[str, object] | None = None
) -> LogicalResponse:
    return await engine.handle(LogicalRequest(op, path, data=data or {}))


async def error(
    engine: Transit, op: Operation, path: str, data: dict[str, object] | None = None
) -> tuple[int, list[str]]:
    with pytest.raises(VaultError) as info:
        await call(engine, op, path, data)
    return info.value.status, info.value.errors


async def test_create_read_shape(transit: Transit, store: FakeJsonStore) -> None:
    created = await call(transit, "update", "keys/k1")
    assert created.data is not None
    assert created.data["type"] == "aes256-gcm96" and created.data["latest_version"] == 1
    assert set(created.data["keys"]) == {"1"} and isinstance(created.data["keys"]["1"], int)
    read = await call(transit, "read", "keys/k1")
    assert read.data == created.data
    # the key material is stored (inside the barrier) but never shown
    stored = store.docs["policy/k1"][0]
    material = json.loads(stored)["keys"]["1"]["key"]
    assert len(base64.b64decode(material)) == 32
    assert material not in json.dumps(read.data)
    assert (await call(transit, "update", "keys/k1")).data == created.data  # create again: unchanged
    assert await error(transit, "update", "keys/k2", {"type": "foo"}) == (400, ["unknown key type foo"])
    assert await error(transit, "read", "keys/absent") == (404, [])
    assert (await call(transit, "list", "keys/")).data == {"keys": ["k1"]}


async def test_encrypt_decrypt_roundtrip_and_rotation(transit: Transit) -> None:
    await call(transit, "update", "keys/k")
    enc = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"hello")})
    assert enc.data is not None
    v1 = enc.data["ciphertext"]
    assert v1.startswith("vault:v1:") and enc.data["key_version"] == 1
    raw = base64.b64decode(v1.removeprefix("vault:v1:"))
    assert len(raw) == 12 + 5 + 16  # nonce | ciphertext | tag, as Vault lays it out
    assert (await call(transit, "update", "decrypt/k", {"ciphertext": v1})).data == {
        "plaintext": b64(b"hello")
    }
    again = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"hello")})
    assert again.data is not None and again.data["ciphertext"] != v1  # fresh nonce each time

    rotated = await call(transit, "update", "keys/k/rotate")
    assert (
        rotated.data is not None
        and rotated.data["latest_version"] == 2
        and set(rotated.data["keys"]) == {"1", "2"}
    )
    v2 = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"")})
    assert v2.data is not None and v2.data["ciphertext"].startswith("vault:v2:")
    assert (await call(transit, "update", "decrypt/k", {"ciphertext": v1})).data == {
        "plaintext": b64(b"hello")
    }
    assert (await call(transit, "update", "decrypt/k", {"ciphertext": v2.data["ciphertext"]})).data == {
        "plaintext": ""
    }
    old = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"x"), "key_version": 1})
    assert old.data is not None and old.data["ciphertext"].startswith("vault:v1:")


async def test_tampering_is_detected(transit: Transit) -> None:
    """Threat: a modified or re-labelled ciphertext decrypting to attacker-chosen plaintext."""
    await call(transit, "update", "keys/k")
    await call(transit, "update", "keys/k/rotate")
    enc = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"secret")})
    assert enc.data is not None
    ct = enc.data["ciphertext"]
    raw = bytearray(base64.b64decode(ct.removeprefix("vault:v2:")))
    raw[-1] ^= 1
    flipped = "vault:v2:" + b64(bytes(raw))
    auth_failed = (400, ["cipher: message authentication failed"])
    assert await error(transit, "update", "decrypt/k", {"ciphertext": flipped}) == auth_failed
    relabelled = ct.replace("vault:v2:", "vault:v1:")  # the other key version must not open it
    assert await error(transit, "update", "decrypt/k", {"ciphertext": relabelled}) == auth_failed
    await call(transit, "update", "keys/other")
    assert (
        await error(transit, "update", "decrypt/other", {"ciphertext": ct.replace("v2", "v1")}) == auth_failed
    )


async def test_errors(transit: Transit) -> None:
    await call(transit, "update", "keys/k")
    cases: list[tuple[Operation, str, dict[str, object], tuple[int, list[str]]]] = [
        ("update", "encrypt/k", {}, (400, ["missing plaintext to encrypt"])),
        ("update", "encrypt/k", {"plaintext": "!!"}, (400, ["illegal base64 data at input byte 0"])),
        (
            "update",
            "encrypt/k",
            {"plaintext": "", "key_version": 9},
            (400, ["requested version for encryption is higher than the latest key version"]),
        ),
        ("update", "decrypt/k", {}, (400, ["missing ciphertext to decrypt"])),
        ("update", "decrypt/k", {"ciphertext": "garbage"}, (400, ["invalid ciphertext: no prefix"])),
        ("update", "decrypt/k", {"ciphertext": "vault:v1:AAAA"}, (400, ["invalid ciphertext length"])),
        (
            "update",
            "decrypt/k",
            {"ciphertext": "vault:v9:" + "A" * 40},
            (400, ["invalid ciphertext: version is too new"]),
        ),
        (
            "update",
            "decrypt/k",
            {"ciphertext": "vault:vx:AAAA"},
            (400, ["invalid ciphertext: version number could not be decoded"]),
        ),
        *[
            (
                "update",
                "decrypt/k",
                {"ciphertext": f"vault:v{version}:" + "A" * 40},
                (400, ["invalid ciphertext: version number could not be decoded"]),
            )
            # int() refuses "²" and 5,000 digits (a 500 before); "\u0661" (Arabic-Indic one)
            # would have decrypted as version 1, which Go's strconv refuses.
            for version in ("\u00b2", "9" * 5000, "\u0661")
        ],
        (
            "update",
            "decrypt/k",
            {"ciphertext": "vault:v1:!!!"},
            (400, ["invalid ciphertext: could not decode base64"]),
        ),
        ("update", "decrypt/absent", {"ciphertext": "vault:v1:AAAA"}, (400, ["encryption key not found"])),
        ("update", "keys/absent/rotate", {}, (400, ["key not found"])),
        ("delete", "keys/k", {}, (400, ["error deleting policy k: deletion is not allowed for this key"])),
        ("read", "foo", {}, (404, ["1 error occurred:\n\t* unsupported path\n\n"])),
        ("read", "keys/a/b/c", {}, (404, ["1 error occurred:\n\t* unsupported path\n\n"])),
        ("read", "encrypt/k", {}, (405, ["1 error occurred:\n\t* unsupported operation\n\n"])),
    ]
    for op, path, data, expected in cases:
        assert await error(transit, op, path, data) == expected, (op, path, data)


async def test_encrypt_creates_missing_key_and_existence(transit: Transit) -> None:
    """Vault's upsert: encrypt/NAME creates the key; the ACL sees that as a create (existence False)."""
    request = LogicalRequest("update", "encrypt/new", data={"plaintext": b64(b"x")})
    assert await transit.existence(request) is False
    enc = await transit.handle(request)
    assert enc.data is not None and enc.data["key_version"] == 1
    assert await transit.existence(request) is True
    assert await transit.existence(LogicalRequest("update", "keys/new")) is True
    assert await transit.existence(LogicalRequest("update", "decrypt/new")) is None


async def test_found_by_review_associated_data_is_authenticated(transit: Transit) -> None:
    """Threat: associated_data was ignored, so a ciphertext bound to tenant A decrypted for B."""
    tenant_a = b64(b"tenant-a")
    sealed = await call(
        transit, "update", "encrypt/k", {"plaintext": b64(b"secret"), "associated_data": tenant_a}
    )
    assert sealed.data is not None
    ciphertext = sealed.data["ciphertext"]
    opened = await call(
        transit, "update", "decrypt/k", {"ciphertext": ciphertext, "associated_data": tenant_a}
    )
    assert opened.data == {"plaintext": b64(b"secret")}
    for other in ({}, {"associated_data": b64(b"tenant-b")}):
        assert await error(transit, "update", "decrypt/k", {"ciphertext": ciphertext, **other}) == (
            400,
            ["cipher: message authentication failed"],
        )


@pytest.mark.parametrize(
    ("path", "data", "name"),
    [
        ("keys/d", {"derived": True}, "derived"),
        ("keys/e", {"exportable": True}, "exportable"),
        ("keys/c", {"convergent_encryption": True}, "convergent_encryption"),
        ("encrypt/k", {"plaintext": "", "context": "Y3R4"}, "context"),
        ("encrypt/k", {"batch_input": [{"plaintext": ""}]}, "batch_input"),
    ],
)
async def test_found_by_review_unsupported_options_are_refused_not_ignored(
    transit: Transit, path: str, data: dict[str, object], name: str
) -> None:
    """Threat: a "derived" key created as an underived one loses the per-context key separation
    the caller asked for, silently."""
    if "batch_input" in data:
        data = {"plaintext": "", **data}
    assert await error(transit, "update", path, data) == (
        400,
        [f"{name!r} is not supported by this transit engine"],
    )


async def test_key_version_may_be_a_decimal_string(transit: Transit) -> None:
    # The bao CLI sends every field as a string (key_version=1).
    sealed = await call(transit, "update", "encrypt/k", {"plaintext": b64(b"x"), "key_version": "1"})
    assert sealed.data is not None and sealed.data["key_version"] == 1
    for bad in ("\u00b2", "-1", "one", True):
        assert (await error(transit, "update", "encrypt/k", {"plaintext": b64(b"x"), "key_version": bad}))[
            0
        ] == 400
