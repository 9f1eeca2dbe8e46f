"""The no_fly_list plugin in a real in-process sidecar: answers, errors, rate limit, logs, reload, start-up.

KMS is a fake with the shape of :class:`sidecar.aws.kms.AttestedKms` (``decrypt(**params)`` returning
``Plaintext``); the dev-world end-to-end test (attested KMS, S3 through egress) is
test_no_fly_devworld.py. Envelopes are made with the plugin's own sealing functions, in both formats.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from multidict import CIMultiDict

import plugins.no_fly_list as no_fly_list
from plugins.no_fly_list import service as service_module
from plugins.no_fly_list.envelope import (
    ENCRYPTION_CONTEXT,
    associated_data,
    seal_envelope,
    seal_fernet_envelope,
)
from plugins.no_fly_list.envelope import open_envelope as real_open
from plugins.no_fly_list.service import NoFlyService, wants_json
from sidecar.config import ConfigError
from sidecar.context import Services
from sidecar.logs import JsonFormatter, iso_ms
from sidecar.routes import Listener
from sidecar.server import json_error
from sidecar.testing import SidecarHarness, run_sidecar

SidecarFactory = Callable[..., Awaitable[SidecarHarness]]

CAST = [
    "bigbird",
    "oscarthegrouch",
    "bert",
    "ernie",
    "cookiemonster",
    "zoe",
    "rosita",
    "grover",
    "countvoncount",
    "thecount",
    "prairiedawn",
    "elmo",
    "abbycadabby",
    "julia",
    "two-headedmonster",
]
KEY_ID = "alias/no-fly-test"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0b0e5a1e-0000-4000-8000-000000000001"
PASSENGER = "/enclave/passenger"
PASSENGERS = "/enclave/passengers"
NO_LIMIT = {"enabled": False}
NOT_UTF8 = "the query parameter 'name' is not valid UTF-8 (check its percent-encoding)"
NOT_DECRYPTABLE = "envelope rejected: envelope does not decrypt: tampered or sealed under another key"
NOT_JSON = "the body is not valid JSON: "

# ---------------------------------------------------------------------------- fakes and helpers


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} from the test KMS"}}, "Decrypt")


@dataclass
class FakeKms:
    """Decrypt as AttestedKms answers it: the data key of a blob this KMS made, in ``Plaintext``.

    Like KMS it refuses a blob it did not make, and an EncryptionContext other than the one the
    data key was generated with.
    """

    keys: dict[bytes, tuple[bytes, dict[str, str] | None]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    error: Exception | None = None
    answer_key: bytes | None = None  # answer this key instead (a KMS that returns the wrong key)

    def new_key(self, context: dict[str, str] | None) -> tuple[bytes, bytes]:
        key, blob = os.urandom(32), b"test-blob-" + os.urandom(48)
        self.keys[blob] = (key, context)
        return key, blob

    def decrypt(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        if self.error is not None:
            raise self.error
        found = self.keys.get(params["CiphertextBlob"])
        if found is None or found[1] != params.get("EncryptionContext"):
            raise client_error("InvalidCiphertextException")
        return {"KeyId": KEY_ARN, "Plaintext": self.answer_key or found[0]}


def seal(kms: FakeKms, names: Sequence[str], kind: str = "aead") -> bytes:
    """An envelope of ``names`` as the operator tools make it (aead) or the original app did (fernet)."""
    if kind == "aead":
        key, blob = kms.new_key(dict(ENCRYPTION_CONTEXT))
        return seal_envelope("\n".join(names).encode() + b"\n", key, blob, KEY_ARN)
    key, blob = kms.new_key(None)
    # The original: comma-separated, with a trailing newline.
    return seal_fernet_envelope(",".join(names).encode() + b"\n", key, blob)


def replace_file(path: Path, data: bytes) -> None:
    """Write then rename, as an operator should (and as S3 replaces an object)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class NoFly:
    sc: SidecarHarness
    kms: FakeKms
    path: Path

    @property
    def service(self) -> NoFlyService:
        found = self.sc.runtime.services.extra["plugins.no_fly_list.state"]  # PluginContext.state's key
        assert isinstance(found, NoFlyService)
        return found

    async def get(self, name: str | None, accept: str | None = None) -> tuple[int, CIMultiDict[str], str]:
        path = PASSENGER if name is None else f"{PASSENGER}?name={quote(name, safe='')}"
        return await self.raw_get(path, accept)

    async def raw_get(self, path: str, accept: str | None = None) -> tuple[int, CIMultiDict[str], str]:
        headers = {"Accept": accept} if accept is not None else {}
        async with self.sc.session.get(self.sc.url(path), headers=headers) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.text()

    async def post(
        self, body: Any, content_type: str = "application/json", raw: bytes | None = None
    ) -> tuple[int, CIMultiDict[str], Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.sc.session.post(
            self.sc.url(PASSENGERS), data=data, headers={"Content-Type": content_type}
        ) as resp:
            text = await resp.text()
            parsed = json.loads(text) if resp.content_type == "application/json" else text
            return resp.status, CIMultiDict(resp.headers), parsed

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with self.sc.session.get(self.sc.url("/enclave/ready")) as resp:
            return resp.status, await resp.json()


async def start_no_fly(
    factory: SidecarFactory,
    tmp_path: Path,
    names: Sequence[str] = CAST,
    kind: str = "aead",
    sealed: bytes | None = None,
    kms: FakeKms | None = None,
    wait: bool = True,
    services: Services | None = None,
    **config: Any,
) -> NoFly:
    kms = kms or FakeKms()
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "envelope.json"
    path.write_bytes(sealed if sealed is not None else seal(kms, names, kind))
    config.setdefault("envelope", str(path))
    config.setdefault("key_id", KEY_ID)
    config.setdefault("rate_limit", NO_LIMIT)
    config.setdefault("reload_interval", 0)
    if services is None:
        services = Services()
        services.kms = kms
    sc = await factory(installed=["no_fly_list"], config={"no_fly_list": config}, services=services)
    if wait:
        await sc.wait_started()
    else:
        await sc.runtime.startup_done.wait()
    return NoFly(sc, kms, path)


@pytest.fixture
async def demo(sidecar_factory: SidecarFactory, tmp_path: Path) -> NoFly:
    return await start_no_fly(sidecar_factory, tmp_path)


def rendered(records: list[logging.LogRecord]) -> str:
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in records)


# ---------------------------------------------------------------------------- the original's answers


@pytest.mark.parametrize("kind", ["aead", "fernet"])
async def test_both_envelope_formats_answer_like_the_original(
    sidecar_factory: SidecarFactory, tmp_path: Path, kind: str
) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, kind=kind)
    status, headers, text = await nf.get("Big Bird")
    assert (status, text) == (200, "Big Bird is on the no-fly list and CAN NOT BOARD!\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status, _, text = await nf.get("foo")
    assert (status, text) == (200, "foo is cleared to fly. Enjoy your flight!\n")
    assert len(nf.service.index or ()) == len(CAST)


async def test_kms_is_asked_with_the_configured_key_and_the_envelope_context(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    """Threat: an envelope whose data key was made under another key the enclave may also use."""
    nf = await start_no_fly(sidecar_factory, tmp_path)
    (call,) = nf.kms.calls
    assert call["KeyId"] == KEY_ID
    assert call["EncryptionContext"] == {"purpose": "no-fly-list"}


async def test_original_format_has_no_encryption_context(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, kind="fernet")
    (call,) = nf.kms.calls
    assert call["KeyId"] == KEY_ID and "EncryptionContext" not in call


@pytest.mark.parametrize(
    "name",
    [
        "Big Bird",
        "bigbird",
        " BIG  bird ",
        "\uff22\uff49\uff47 \uff22\uff49\uff52\uff44",
        "big\u200bbird",
        "ELMO",
    ],
)
async def test_normalised_spellings_are_denied_and_echoed_as_given(demo: NoFly, name: str) -> None:
    """Threat: a listed passenger boards by spelling the name with other spaces, case or width."""
    status, _, text = await demo.get(name)
    assert (status, text) == (200, f"{name} is on the no-fly list and CAN NOT BOARD!\n")


async def test_dotted_capital_i(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    # casefold("İ") is "i" + U+0307: it matches the entry written that way, in any encoding.
    nf = await start_no_fly(sidecar_factory, tmp_path, names=[*CAST, "B\u0130G BIRD"])
    for name in ("B\u0130G BIRD", "bi\u0307g bird", "BI\u0307G BIRD"):
        assert (await nf.get(name))[2].endswith("CAN NOT BOARD!\n")
    assert (await nf.get("BIG BIRD"))[2].endswith("CAN NOT BOARD!\n")  # the plain entry bigbird
    demo_only = await start_no_fly(sidecar_factory, tmp_path / "demo")
    assert (await demo_only.get("B\u0130G BIRD"))[2].endswith("cleared to fly. Enjoy your flight!\n")


async def test_json_answer(demo: NoFly) -> None:
    status, headers, text = await demo.get("Big Bird", accept="application/json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(text) == {"name": "Big Bird", "cleared": False}
    status, _, text = await demo.get('Zo\u00eb "Q"', accept="application/json")
    assert json.loads(text) == {"name": 'Zo\u00eb "Q"', "cleared": True}


async def test_curl_and_browsers_get_text(demo: NoFly) -> None:
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept in ("*/*", browser, "text/plain, application/json", "application/json;q=0"):
        _, headers, _ = await demo.get("elmo", accept=accept)
        assert headers["Content-Type"].startswith("text/plain"), accept


def test_accept_negotiation() -> None:
    assert wants_json("application/json")
    assert wants_json("application/json, */*")
    assert wants_json("text/plain;q=0.5, application/json")
    assert wants_json("application/json;q=0.9, */*;q=0.8")
    assert not wants_json("*/*")
    assert not wants_json("text/plain, application/json")
    assert not wants_json("application/json;q=0.5, text/plain")
    assert not wants_json("application/json;q=0")
    assert not wants_json("application/json;q=oops")
    assert not wants_json("")


async def test_answers_are_not_cacheable_or_sniffable(demo: NoFly) -> None:
    """Threat: a shared cache keeps a passenger's verdict; a browser renders an echoed name as HTML."""
    _, headers, _ = await demo.get("<script>x</script>")
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    _, headers, _ = await demo.get("elmo", accept="application/json")
    assert headers["Cache-Control"] == "no-store"


# ---------------------------------------------------------------------------- bad single requests


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (PASSENGER, "the query parameter 'name' is required: /enclave/passenger?name=NAME"),
        (f"{PASSENGER}?name=", "the query parameter 'name' is empty"),
        (f"{PASSENGER}?name", "the query parameter 'name' is empty"),
        (f"{PASSENGER}?name=a&name=b", "give the query parameter 'name' once"),
        (f"{PASSENGER}?name={'a' * 257}", "the query parameter 'name' is longer than 256 characters"),
        (f"{PASSENGER}?name={'%C3%A9' * 257}", "the query parameter 'name' is longer than 256 characters"),
        (f"{PASSENGER}?name=%FF", NOT_UTF8),
        (f"{PASSENGER}?name=Big%C3(", NOT_UTF8),
        (f"{PASSENGER}?name=%ED%A0%80", NOT_UTF8),  # an encoded surrogate is not UTF-8 either
        (
            f"{PASSENGER}?name=Big%0ABird",
            "the query parameter 'name' contains a control character or a line separator",
        ),
        (
            f"{PASSENGER}?name=Big%00",
            "the query parameter 'name' contains a control character or a line separator",
        ),
        (
            f"{PASSENGER}?name=%C2%85",
            "the query parameter 'name' contains a control character or a line separator",
        ),
        # U+2028 and U+2029: str.splitlines() breaks lines at them too (found by review).
        (
            f"{PASSENGER}?name=Big%E2%80%A8Bird",
            "the query parameter 'name' contains a control character or a line separator",
        ),
        (
            f"{PASSENGER}?name=Big%E2%80%A9Bird",
            "the query parameter 'name' contains a control character or a line separator",
        ),
        (f"{PASSENGER}?name=%20%20", "the query parameter 'name' has no visible characters"),
        (f"{PASSENGER}?name=%E2%80%8B", "the query parameter 'name' has no visible characters"),
    ],
)
async def test_bad_names_are_400_with_a_clear_message(demo: NoFly, path: str, message: str) -> None:
    """Threat: client mistakes answered 500 (the original), or a forged second verdict line (newline)."""
    status, headers, text = await demo.raw_get(path)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    body = json.loads(text)
    assert body["error"] == message
    assert body["request_id"] == headers["X-Request-Id"]


async def test_boundaries_that_are_fine(demo: NoFly) -> None:
    assert (await demo.get("a" * 256))[0] == 200
    assert (await demo.get("\u00e9" * 256))[0] == 200  # characters, not bytes
    status, _, text = await demo.raw_get(f"{PASSENGER}?name=%EF%BF%BD")  # a real U+FFFD is fine
    assert (status, text) == (200, "\ufffd is cleared to fly. Enjoy your flight!\n")
    assert (await demo.raw_get(f"{PASSENGER}?name=Big+Bird"))[2].startswith("Big Bird is on")


async def test_raw_bytes_in_the_request_line_never_reach_500(demo: NoFly) -> None:
    """Threat: undecodable bytes crash the handler (a 500 and a traceback) instead of a 400."""
    port = demo.sc.runtime.bound_port(8001)
    for target in (b"/enclave/passenger?name=\xff\xfe", b"/enclave/passenger?name=Big\xc3(Bird"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert status_line.split()[1] == b"400", status_line


# ---------------------------------------------------------------------------- batches


async def test_batch_answers_in_order(demo: NoFly) -> None:
    names = ["foo", "Big Bird", "ELMO", "bar", "Zo\u00eb", "zoe", " Oscar the Grouch "]
    status, headers, body = await demo.post({"names": names})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body == {
        "results": [
            {"name": "foo", "cleared": True},
            {"name": "Big Bird", "cleared": False},
            {"name": "ELMO", "cleared": False},
            {"name": "bar", "cleared": True},
            {"name": "Zo\u00eb", "cleared": True},
            {"name": "zoe", "cleared": False},
            {"name": " Oscar the Grouch ", "cleared": False},
        ]
    }


async def test_largest_batch_fits_the_default_body_limit(demo: NoFly) -> None:
    name = "\U0001f600" * 256  # 4 bytes each in UTF-8: the largest a name can be
    names = [name] * 999 + ["Big Bird"]
    raw = json.dumps({"names": names}, ensure_ascii=False).encode()
    assert len(raw) <= 1024 * 1024
    status, _, body = await demo.post(None, raw=raw)
    assert status == 200
    assert [r["cleared"] for r in body["results"]] == [True] * 999 + [False]
    # \u-escaped, the same batch is three times larger: a clear 413, not a crash.
    status, _, body = await demo.post({"names": names})
    assert status == 413 and body["error"] == "request body too large: the limit is 1048576 bytes"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", NOT_JSON + "Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"", NOT_JSON + "Expecting value at line 1 column 1"),
        (b"\xff{}", "the body is not valid UTF-8 (byte 0)"),
        (b'["Big Bird"]', 'the body must be a JSON object: {"names": ["NAME", ...]}'),
        (b"{}", "the body needs the field 'names' (an array of names)"),
        (b'{"names": "Big Bird"}', "'names' must be an array of strings, got a string"),
        (b'{"names": []}', "'names' is empty: send 1 to 1000 names"),
        (b'{"names": ["a"], "extra": 1}', "the body has fields other than 'names'"),
        (b'{"names": ["a"], "names": ["b"]}', "the body has a field twice"),
        (b'{"names": ["a", 3]}', "names[1] must be a string, got a number"),
        (b'{"names": ["a", null]}', "names[1] must be a string, got null"),
        (b'{"names": ["a", ["b"]]}', "names[1] must be a string, got an array"),
        (b'{"names": ["a", ""]}', "names[1] is empty"),
        (b'{"names": ["a", "\\u200b"]}', "names[1] has no visible characters"),
        (b'{"names": ["a\\nb"]}', "names[0] contains a control character or a line separator"),
        (b'{"names": ["\\ud800"]}', "names[0] is not valid Unicode (it contains an unpaired surrogate)"),
        (b'{"names": [NaN]}', NOT_JSON + "NaN is not allowed"),
        (b'{"names": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", NOT_JSON + "nested too deeply"),
        (b'{"names": [' + b"1" * 5000 + b"]}", NOT_JSON + "Exceeds the limit (4300 digits)"),
    ],
)  # fmt: skip
async def test_bad_batches_are_400_with_a_specific_message(demo: NoFly, raw: bytes, message: str) -> None:
    """Threat: malformed bodies crash the handler (500) or are half-understood (duplicate fields)."""
    status, _, body = await demo.post(None, raw=raw)
    assert status == 400
    assert body["error"].startswith(message)


async def test_batch_size_limits(demo: NoFly) -> None:
    status, _, body = await demo.post({"names": ["x"] * 1001})
    assert (status, body["error"]) == (400, "'names' has 1001 names; the limit is 1000 per request")
    status, _, body = await demo.post({"names": ["x" * 257]})
    assert (status, body["error"]) == (400, "names[0] is longer than 256 characters")
    status, _, body = await demo.post({"names": ["x"] * 1000})
    assert status == 200 and len(body["results"]) == 1000


async def test_configured_max_batch(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, max_batch=3)
    status, _, body = await nf.post({"names": ["a", "b", "c", "d"]})
    assert (status, body["error"]) == (400, "'names' has 4 names; the limit is 3 per request")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", ""],
)
async def test_batch_needs_json(demo: NoFly, content_type: str) -> None:
    status, _, body = await demo.post({"names": ["a"]}, content_type=content_type)
    assert status == 415
    assert "JSON" in body["error"] or "UTF-8" in body["error"]


async def test_json_with_utf8_charset_is_fine(demo: NoFly) -> None:
    status, _, _ = await demo.post({"names": ["a"]}, content_type="application/json; charset=UTF-8")
    assert status == 200


# ---------------------------------------------------------------------------- rate limit


async def test_rate_limit_is_on_by_default(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """Threat: a client enumerates the list by asking for every name it can think of."""
    kms = FakeKms()
    nf = await start_no_fly(sidecar_factory, tmp_path, kms=kms, rate_limit={})
    assert nf.service.limiter is not None
    assert (nf.service.limiter.per_second, nf.service.limiter.burst) == (20.0, 40.0)
    statuses = [(await nf.get(f"guess {i}"))[0] for i in range(60)]
    assert statuses.count(429) >= 10
    assert statuses[:40] == [200] * 40


async def test_429_has_retry_after_and_the_bucket_refills(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 20, "burst": 2})
    assert [(await nf.get("a"))[0] for _ in range(2)] == [200, 200]
    status, headers, text = await nf.get("a")
    assert status == 429
    assert headers["Retry-After"] == "1"
    body = json.loads(text)
    assert body["retry_after"] == 1
    assert body["error"].startswith("too many checks from this client: the limit is 20 names a second")
    await asyncio.sleep(0.2)  # 4 tokens at 20/s, capped at the burst of 2
    assert [(await nf.get("a"))[0] for _ in range(3)] == [200, 200, 429]


async def test_429_body_is_exactly_the_sidecar_json_error(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    """The 429 is assembled from parts built once per wait (it is the path an enumerator hammers).

    It must stay byte for byte what json_error would say, with this request's own id, and keep
    Retry-After and the JSON content type, for every wait time.
    """
    # A token a second: the test's requests all fall within the same empty bucket.
    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 1, "burst": 1})
    limiter = nf.service.limiter
    assert limiter is not None
    assert (await nf.get("a"))[0] == 200
    seen = set()
    for _ in range(3):  # the same wait: the cached parts, a different request id each time
        status, headers, text = await nf.get("a")
        assert status == 429 and headers["Content-Type"] == "application/json"
        seconds = headers["Retry-After"]
        message = (
            "too many checks from this client: the limit is 1 names a second (bursts of 1); "
            f"retry in {seconds} s"
        )
        expected = json_error(429, message, headers["X-Request-Id"], retry_after=int(seconds))
        assert isinstance(expected.body, bytes)
        assert text.encode() == expected.body
        seen.add(headers["X-Request-Id"])
    assert len(seen) == 3
    assert (await nf.post({"names": ["a"] * 3}))[0] == 429  # a batch is refused the same way
    assert nf.service.metrics.rate_limited == 4


async def test_batch_costs_one_token_per_name(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """Threat: enumeration through batches, 1000 guesses for the price of one request."""
    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 2, "burst": 5})
    assert (await nf.post({"names": ["a"] * 20}))[0] == 200  # admitted on a full bucket: 5 - 20 = -15
    status, headers, _ = await nf.get("a")
    assert status == 429
    assert headers["Retry-After"] == "8"  # (1 - -15) / 2 s
    status, headers, _ = await nf.post({"names": ["a"]})
    assert status == 429 and headers["Retry-After"] == "8"
    assert nf.service.metrics.checks == 20


async def test_an_ipv6_client_cannot_dodge_the_limit_by_changing_address(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    # Threat: an IPv6 host picking a fresh address of its /64 per request, a full bucket each time.
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from sidecar.server import REQUEST_ID

    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 0.01, "burst": 2})

    async def check(peer: str, name: str = "a") -> int:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (
            (peer, 1234) if key == "peername" else default
        )
        request = make_mocked_request("GET", f"/enclave/passenger?name={name}", transport=transport)
        request[REQUEST_ID] = "r"
        return (await nf.service.handle_passenger(request)).status

    assert [await check(f"2001:db8:1:2::{i:x}") for i in range(1, 5)] == [200, 200, 429, 429]
    assert await check("2001:db8:1:2:ffff:ffff:ffff:fffe%eth0") == 429  # a zone changes nothing
    assert await check("2001:db8:1:3::1") == 200  # another /64 is another client
    assert [await check(peer) for peer in ("192.0.2.7", "::ffff:192.0.2.7", "192.0.2.7")] == [200, 200, 429]


async def test_invalid_requests_cost_no_token(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 0.01, "burst": 1})
    for _ in range(5):
        assert (await nf.get(""))[0] == 400
    assert (await nf.get("a"))[0] == 200
    assert (await nf.get("a"))[0] == 429


# ---------------------------------------------------------------------------- metrics and logs


async def test_metrics_count_without_names(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, rate_limit={"per_second": 0.01, "burst": 4})
    await nf.get("Big Bird")  # denied
    await nf.get("foo")  # cleared
    await nf.get("")  # 400
    await nf.post({"names": ["elmo", "x"]})  # 2 checks, 1 denied
    await nf.post({"names": ["a"]}, content_type="text/plain")  # 415
    await nf.get("bar")  # 429
    assert nf.service.metrics_snapshot() == {
        "checks": 4,
        "denied": 2,
        "bad_requests": 2,
        "rate_limited": 1,
        "reloads": 0,
        "reload_failures": 0,
        "entries": len(CAST),
        "rate_limited_clients": 1,
    }


async def test_routes_only_on_the_ingress_listener(demo: NoFly) -> None:
    # The counters are log lines (no_fly_metrics), never a route: the API listener gets none.
    context = demo.sc.runtime.plugins["no_fly_list"].context
    assert no_fly_list.register_routes(listener=Listener("api", 9000), context=context) == []
    ingress = no_fly_list.register_routes(listener=Listener("ingress", 8001), context=context)
    assert {(r.method, r.path, r.sensitive) for r in ingress} == {
        ("GET", PASSENGER, True),
        ("POST", PASSENGERS, True),
    }


async def test_no_name_reaches_any_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Threat: the list or the names asked about leak through event logs or the access log."""
    caplog.set_level(logging.DEBUG)
    listed = ["Quokkafellow Secretentry", "Zzyzx Hiddenname"]
    asked = ["Unlisted Askedperson", "Quokkafellow Secretentry", "Zzyzx  HIDDENNAME"]
    needles = ["quokkafellow", "zzyzx", "askedperson", "hiddenname", "secretentry", "Quokkafellow%20"]
    kms = FakeKms()
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(seal(kms, listed))
    access = io.StringIO()
    services = Services()
    services.kms = kms
    config = {
        "envelope": str(envelope),
        "key_id": KEY_ID,
        "reload_interval": 0,
        "metrics_interval": 1,
        "rate_limit": {"per_second": 0.01, "burst": 6},
    }
    state = tmp_path / "state"
    state.mkdir()
    async with run_sidecar(
        state_dir=state, installed=["no_fly_list"], config={"no_fly_list": config}, services=services
    ) as sc:
        await sc.wait_started()
        sc.runtime.access_sink.stream = access
        nf = NoFly(sc, kms, envelope)
        for name in asked:
            await nf.get(name)
            await nf.get(name, accept="application/json")
        await nf.post({"names": asked})  # over the limit by now: a 429
        await nf.get(asked[0] + "\n")  # a 400
        # A reload that fails on a broken list names the entry's number, never its text.
        replace_file(envelope, _bad_list(kms))
        assert await nf.service.reload() is False
        await asyncio.sleep(1.2)  # one no_fly_metrics line
    text = rendered(caplog.records) + "\n" + access.getvalue()
    for needle in needles:
        assert needle.lower() not in text.lower(), needle
    # The capture worked: the events and the access lines are there.
    events = [r.getMessage() for r in caplog.records]
    assert {"no_fly_loaded", "no_fly_reload_failed", "no_fly_metrics"} <= set(events)
    assert access.getvalue().count('"path":"/enclave/passenger"') == 7
    assert '"path":"/enclave/passengers"' in access.getvalue()


def _bad_list(kms: FakeKms) -> bytes:
    """An envelope that authenticates but holds invalid UTF-8 next to real names."""
    key, blob = kms.new_key(dict(ENCRYPTION_CONTEXT))
    return seal_envelope(b"Quokkafellow Secretentry\n\xff\xfeZzyzx\n", key, blob, KEY_ARN)


# ---------------------------------------------------------------------------- hot reload


async def test_reload_swaps_in_a_changed_list(
    sidecar_factory: SidecarFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugins.no_fly_list")
    nf = await start_no_fly(sidecar_factory, tmp_path)
    old = nf.service.index
    assert await nf.service.reload() is False  # unchanged: not even read again
    os.utime(nf.path)  # touched, same content: still unchanged
    assert await nf.service.reload() is False
    assert nf.service.index is old
    replace_file(nf.path, seal(nf.kms, ["Kermit the Frog", "Bert"], kind="fernet"))
    assert await nf.service.reload() is True
    assert (await nf.get("Kermit The Frog"))[2].endswith("CAN NOT BOARD!\n")
    assert (await nf.get("Big Bird"))[2].endswith("cleared to fly. Enjoy your flight!\n")
    reloaded = [r for r in caplog.records if r.getMessage() == "no_fly_reloaded"]
    assert [r.sidecar_fields["entries"] for r in reloaded] == [2]  # type: ignore[attr-defined]
    assert nf.service.metrics.reloads == 1


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"not json", "envelope rejected: envelope is not JSON"),
        (b"tampered", NOT_DECRYPTABLE),
        (b"bad list", "list rejected: list entry 2 is not valid UTF-8"),
        # A genuine but empty envelope would clear everyone at once (found by review).
        (b"empty", "the new list is empty; keeping the list in use"),
    ],
)
async def test_failed_reload_keeps_the_old_list(
    sidecar_factory: SidecarFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes, reason: str
) -> None:
    """Threat: a broken or tampered upload empties the list (everyone cleared) until someone notices."""
    caplog.set_level(logging.INFO, logger="plugins.no_fly_list")
    nf = await start_no_fly(sidecar_factory, tmp_path)
    if bad == b"tampered":
        envelope = json.loads(seal(nf.kms, ["someone"]))
        ciphertext = bytearray(envelope["ciphertext-base64"].encode())
        ciphertext[5] = ord("A") if ciphertext[5] != ord("A") else ord("B")
        envelope["ciphertext-base64"] = ciphertext.decode()
        data = json.dumps(envelope).encode()
    elif bad == b"bad list":
        data = _bad_list(nf.kms)
    elif bad == b"empty":
        data = seal(nf.kms, [])
    else:
        data = bad
    replace_file(nf.path, data)
    assert await nf.service.reload() is False
    assert (await nf.get("Big Bird"))[2].endswith("CAN NOT BOARD!\n")
    failed = [r for r in caplog.records if r.getMessage() == "no_fly_reload_failed"]
    fields = failed[-1].sidecar_fields  # type: ignore[attr-defined]
    assert fields["reason"].startswith(reason)
    assert fields["kept_entries"] == len(CAST)
    assert (await nf.ready())[0] == 200  # the old list still serves: still ready
    # The same bad version is not retried (or logged) at every poll ...
    assert await nf.service.reload() is False
    assert nf.service.metrics.reload_failures == 1
    # ... and a good one is taken as soon as it appears.
    replace_file(nf.path, seal(nf.kms, ["Kermit"]))
    assert await nf.service.reload() is True
    assert (await nf.get("kermit"))[2].endswith("CAN NOT BOARD!\n")


def legacy_aead(kms: FakeKms, names: Sequence[str]) -> bytes:
    """A version-2 envelope as sealed before "sealed-at" existed (no seal time, shorter AAD)."""
    key, blob = kms.new_key(dict(ENCRYPTION_CONTEXT))
    document = json.loads(seal_envelope("\n".join(names).encode(), key, blob, KEY_ARN))
    del document["sealed-at"]
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, "\n".join(names).encode(), associated_data(KEY_ARN))
    document["nonce-base64"] = base64.b64encode(nonce).decode()
    document["ciphertext-base64"] = base64.b64encode(ciphertext).decode()
    return json.dumps(document).encode()


def fernet_at(kms: FakeKms, names: Sequence[str], seconds: int) -> bytes:
    """The original format, its token stamped ``seconds`` since the epoch (the token's own clock)."""
    key, blob = kms.new_key(None)
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt_at_time(",".join(names).encode(), seconds)
    return json.dumps(
        {
            "data-key-ciphertext-base64": base64.b64encode(blob).decode(),
            "aes-ciphertext-base64": token.decode(),
        }
    ).encode()


async def test_reload_refuses_an_envelope_sealed_before_the_list_in_use(
    sidecar_factory: SidecarFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Threat (found by review): anyone who can write the envelope's object puts an older genuine
    envelope back, and the passengers added since are cleared to fly."""
    caplog.set_level(logging.INFO, logger="plugins.no_fly_list")
    nf = await start_no_fly(sidecar_factory, tmp_path)
    in_use = nf.service.sealed_at
    assert in_use is not None and abs(in_use - time.time() * 1000) < 60_000

    def reasons() -> list[str]:
        failed = [r for r in caplog.records if r.getMessage() == "no_fly_reload_failed"]
        return [r.sidecar_fields["reason"] for r in failed]  # type: ignore[attr-defined]

    key, blob = nf.kms.new_key(dict(ENCRYPTION_CONTEXT))
    for older in (
        seal_envelope(b"Mallory Evil\n", key, blob, KEY_ARN, sealed_at=in_use - 60_000),
        fernet_at(nf.kms, ["Mallory Evil"], in_use // 1000 - 60),  # the original format's clock too
        legacy_aead(nf.kms, ["Mallory Evil"]),  # no seal time at all: a downgrade
    ):
        replace_file(nf.path, older)
        assert await nf.service.reload() is False
        assert (await nf.get("Big Bird"))[2].endswith("CAN NOT BOARD!\n")  # the list in use stays
    assert reasons()[0].startswith("the new envelope was sealed at ")
    assert reasons()[0].endswith("before the list in use (" + iso_ms(in_use) + "); keeping the list in use")
    assert "before the list in use" in reasons()[1]
    assert (
        reasons()[2]
        == "the new envelope has no seal time and the list in use has one; keeping the list in use"
    )
    # A newer one is taken, and becomes the one to beat.
    replace_file(nf.path, seal_envelope(b"Kermit\n", key, blob, KEY_ARN, sealed_at=in_use + 1000))
    assert await nf.service.reload() is True
    assert nf.service.sealed_at == in_use + 1000
    assert (await nf.get("Kermit"))[2].endswith("CAN NOT BOARD!\n")


async def test_kms_failure_on_reload_is_retried(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path)
    replace_file(nf.path, seal(nf.kms, ["Kermit"]))
    nf.kms.error = client_error("ThrottlingException")
    assert await nf.service.reload() is False
    assert (await nf.get("Big Bird"))[2].endswith("CAN NOT BOARD!\n")
    nf.kms.error = None
    assert await nf.service.reload() is True  # the same version again: KMS errors are not final
    assert (await nf.get("Kermit"))[2].endswith("CAN NOT BOARD!\n")


async def test_back_to_the_list_in_use_after_a_bad_version(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path)
    good = nf.path.read_bytes()
    replace_file(nf.path, b"garbage")
    assert await nf.service.reload() is False
    replace_file(nf.path, good)
    old = nf.service.index
    assert await nf.service.reload() is False  # same content as the list in use: nothing to load
    assert nf.service.index is old and nf.service.failed_tag is None


@pytest.mark.slow
async def test_poll_loop_picks_up_a_change(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    nf = await start_no_fly(sidecar_factory, tmp_path, reload_interval=1)
    replace_file(nf.path, seal(nf.kms, ["Kermit"]))
    async with asyncio.timeout(10):
        while not (await nf.get("Kermit"))[2].endswith("CAN NOT BOARD!\n"):
            await asyncio.sleep(0.2)
    assert nf.service.metrics.reloads == 1


# ---------------------------------------------------------------------------- S3


@pytest.fixture
def s3(moto_url: str) -> Any:
    client = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    bucket = "no-fly-" + os.urandom(4).hex()
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


class CountingS3:
    """The S3 client a plugin gets from context.aws("s3"), counting what it asks."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.gets: list[dict[str, Any]] = []

    def get_object(self, **params: Any) -> Any:
        self.gets.append(params)
        return self.client.get_object(**params)


@pytest.mark.slow
async def test_s3_envelope_with_etag_polling(
    sidecar_factory: SidecarFactory, tmp_path: Path, s3: Any
) -> None:
    kms = FakeKms()
    s3.put_object(Bucket=s3.bucket, Key="lists/envelope.json", Body=seal(kms, CAST))
    counting = CountingS3(s3)
    services = Services()
    services.kms = kms
    services.aws = lambda service, **kw: counting
    config = {
        "envelope": f"s3://{s3.bucket}/lists/envelope.json",
        "key_id": KEY_ID,
        "reload_interval": 0,
        "rate_limit": NO_LIMIT,
    }
    sc = await sidecar_factory(installed=["no_fly_list"], config={"no_fly_list": config}, services=services)
    await sc.wait_started()
    nf = NoFly(sc, kms, tmp_path)
    assert (await nf.get("Big Bird"))[2].endswith("CAN NOT BOARD!\n")
    assert "IfNoneMatch" not in counting.gets[0]
    assert await nf.service.reload() is False  # 304 Not Modified: nothing downloaded
    assert counting.gets[1]["IfNoneMatch"] == nf.service.tag
    s3.put_object(Bucket=s3.bucket, Key="lists/envelope.json", Body=seal(kms, ["Kermit"]))
    assert await nf.service.reload() is True
    assert (await nf.get("Kermit"))[2].endswith("CAN NOT BOARD!\n")
    assert (await nf.get("Big Bird"))[2].endswith("cleared to fly. Enjoy your flight!\n")
    s3.delete_object(Bucket=s3.bucket, Key="lists/envelope.json")
    assert await nf.service.reload() is False  # gone: the list in use stays
    assert (await nf.get("Kermit"))[2].endswith("CAN NOT BOARD!\n")


@pytest.mark.slow
async def test_s3_missing_object_fails_start_up(sidecar_factory: SidecarFactory, s3: Any) -> None:
    services = Services()
    services.kms = FakeKms()
    services.aws = lambda service, **kw: s3
    config = {"envelope": f"s3://{s3.bucket}/nothing.json", "key_id": KEY_ID}
    sc = await sidecar_factory(installed=["no_fly_list"], config={"no_fly_list": config}, services=services)
    await sc.runtime.startup_done.wait()
    async with sc.session.get(sc.url("/enclave/ready")) as resp:
        body = await resp.json()
    assert body["plugins"]["no_fly_list"] == (
        f"failed to start: list not loaded: s3://{s3.bucket}/nothing.json: S3 GetObject failed: NoSuchKey"
    )


# ---------------------------------------------------------------------------- start-up failures


def tampered(data: bytes) -> bytes:
    envelope = json.loads(data)
    field_name = "ciphertext-base64" if "ciphertext-base64" in envelope else "aes-ciphertext-base64"
    text = bytearray(envelope[field_name].encode())
    text[-10] = ord("A") if text[-10] != ord("A") else ord("B")
    envelope[field_name] = text.decode()
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", NOT_DECRYPTABLE),
        ("tampered-fernet", NOT_DECRYPTABLE),
        ("wrong key", NOT_DECRYPTABLE),
        ("access denied", "KMS refused to decrypt the data key (AccessDeniedException)"),
        ("other kms key", "KMS refused to decrypt the data key (InvalidCiphertextException)"),
        ("not json", "envelope rejected: envelope is not JSON: Expecting value at line 1 column 1"),
        ("missing file", "cannot read the envelope: No such file or directory"),
        ("no kms", "attested KMS is not configured in this sidecar"),
    ],
)
async def test_start_up_fails_closed_with_a_clear_reason(
    sidecar_factory: SidecarFactory, tmp_path: Path, case: str, reason: str
) -> None:
    """Threat: a tampered list, a data key from elsewhere, or a KMS denial, served as if all were well."""
    kms = FakeKms()
    envelope = seal(kms, CAST, kind="fernet" if case == "tampered-fernet" else "aead")
    if case.startswith("tampered"):
        envelope = tampered(envelope)
    elif case == "wrong key":
        kms.answer_key = os.urandom(32)
    elif case == "access denied":
        kms.error = client_error("AccessDeniedException")
    elif case == "other kms key":
        envelope = seal(FakeKms(), CAST)
    elif case == "not json":
        envelope = b"<html>"
    extra: dict[str, Any] = {}
    if case == "missing file":
        extra["envelope"] = str(tmp_path / "nowhere.json")
    if case == "no kms":
        extra["services"] = Services()  # a sidecar without attested KMS
    nf = await start_no_fly(sidecar_factory, tmp_path, sealed=envelope, kms=kms, wait=False, **extra)
    status, body = await nf.ready()
    assert status == 503 and body["ready"] is False
    shown = body["plugins"]["no_fly_list"]
    assert shown.startswith("failed to start: list not loaded: ")
    assert reason in shown
    status, _, text = await nf.get("Big Bird")
    assert status == 503
    assert json.loads(text)["error"] == "plugin 'no_fly_list' is not ready"


# ---------------------------------------------------------------------------- memory hygiene


async def test_plaintext_and_data_key_are_wiped_after_loading(
    demo: NoFly, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threat: the decrypted list or the data key stays readable in buffers the plugin controls."""
    seen: dict[str, bytearray] = {}

    def spy(envelope: Any, data_key: bytearray) -> bytearray:
        seen["key"] = data_key
        seen["payload"] = real_open(envelope, data_key)
        return seen["payload"]

    monkeypatch.setattr(service_module, "open_envelope", spy)
    replace_file(demo.path, seal(demo.kms, ["Kermit", "Piggy"]))
    assert await demo.service.reload() is True
    assert isinstance(seen["key"], bytearray) and len(seen["key"]) == 32
    assert seen["key"] == bytes(32)
    assert len(seen["payload"]) > 0 and seen["payload"] == bytes(len(seen["payload"]))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"key_id": KEY_ID}, "plugins.no_fly_list.config.envelope: is required"),
        ({"envelope": "x.json"}, "plugins.no_fly_list.config.key_id: is required"),
        (
            {"envelope": "s3://bucket-only", "key_id": KEY_ID},
            "plugins.no_fly_list.config.envelope: an s3:// location needs an object key: s3://BUCKET/KEY",
        ),
        (
            {"envelope": "https://example.com/list", "key_id": KEY_ID},
            "plugins.no_fly_list.config.envelope: only s3:// URLs and local paths are supported",
        ),
        (
            {"envelope": "x.json", "key_id": KEY_ID, "rate_limit": {"burst": 0}},
            "plugins.no_fly_list.config.rate_limit.burst: 0 is below the minimum of 1",
        ),
    ],
)
async def test_config_errors(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        async with run_sidecar(state_dir=tmp_path, installed=["no_fly_list"], config={"no_fly_list": config}):
            pass
    assert message in str(err.value)
