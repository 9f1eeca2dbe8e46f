"""The KMS proxy: a loopback endpoint speaking KMS's JSON 1.1 protocol, attesting on the app's behalf.

Child applications point unmodified boto3 at it (the sidecar exports ``AWS_KMS_ENDPOINT``, and
``AWS_ENDPOINT_URL_KMS``, which boto3 reads by itself; see :func:`child_environment`). They get plain
answers from keys whose policy requires attestation:

* the attesting operations (:data:`sidecar.aws.kms.ATTESTED_OPERATIONS`: Decrypt, GenerateDataKey,
  GenerateDataKeyPair, GenerateRandom, DeriveSharedSecret) are sealed by the attested client: it adds
  ``Recipient`` (a fresh attestation document for this enclave's recipient key) and decrypts KMS's
  ``CiphertextForRecipient``, failing closed when the answer is not sealed. The parameters are first
  checked against botocore's model of KMS (types, required and unknown members).
* every other operation (Encrypt, DescribeKey, CreateKey, ...) and any request that already carries
  its own ``Recipient`` (an app that attests by itself) is forwarded byte for byte to KMS, re-signed.

How an attested request travels depends on the attested client. An
:class:`~sidecar.aws.kms.AttestedKms` (what the sidecar runs) exposes its two steps, ``recipient()``
and ``unseal()`` (:class:`SealingKms`), so the proxy keeps the app's request as KMS JSON: it adds
``Recipient``, signs and sends it on the same upstream session as forwarded requests, and unseals
KMS's JSON answer. KMS's own errors then pass through exactly as KMS sent them, and the app's SDK
does the retrying, as for forwarded requests. Any other :class:`KmsCaller` (one with only ``call``)
gets boto3 parameters, converted from and back to JSON with botocore's model (blobs are base64 in
JSON and bytes in boto3), in a worker thread. The first way exists for speed: it skips a round of
botocore serialisation and parsing, two model conversions and a worker thread's hand-over, about
1 ms of CPU per call (``bench/bench_kms.py``), and it changes nothing in what is checked.

Threat model. The proxy listens on loopback inside the enclave, where every process is ours: the
enclave image is measured, and nothing outside it can reach loopback. The app's SigV4 signature is
therefore **not verified**; apps may sign with any dummy key. The proxy only reads the credential
scope from ``Authorization`` (the service must be ``kms``; the region is taken from it), then signs
the request again with the sidecar's own credentials. Anything that can reach this port can use the
sidecar's KMS permissions and attestation: never bind it to a non-loopback address.

Every answer is KMS-shaped: KMS's own errors pass through with their status, and the proxy's own
failures become ``{"__type": ..., "message": ...}`` JSON errors that boto3 raises as ``ClientError``,
never a dropped connection. One ``kms_proxy_call`` event is logged per request (operation, status,
duration); bodies, plaintexts, keys and credentials are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import functools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import botocore.session
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ParamValidationError,
    ReadTimeoutError,
)
from botocore.model import ListShape, MapShape, ServiceModel, Shape, StructureShape

from sidecar.aws.clients import USER_AGENT_EXTRA, ClientFactory
from sidecar.aws.imds import ImdsError
from sidecar.aws.kms import ATTESTED_OPERATIONS, CIPHERTEXT_FOR_RECIPIENT, AttestedKmsError
from sidecar.logs import event

log = logging.getLogger("sidecar.aws.kms_proxy")

AMZ_JSON = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_BODY_BYTES = 1 << 20  # KMS's largest inputs are a few KiB (4 KiB plaintext, 6 KiB ciphertext).
LOOPBACK = "127.0.0.1"
ENV_VARS = ("AWS_KMS_ENDPOINT", "AWS_ENDPOINT_URL_KMS")

_OPERATION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,127}")
# Only hostname-safe labels: the region becomes part of the upstream URL.
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)+")
_CREDENTIAL = re.compile(r"Credential=([^,\s]+)")

# When a ClientError carries no HTTP status (one raised by hand rather than parsed from KMS), the
# status KMS documents for the code; everything else KMS raises is a 400.
_SERVER_ERRORS = {
    "KMSInternalException": 500,
    "KeyUnavailableException": 500,
    "DependencyTimeoutException": 503,
}


class KmsCaller(Protocol):
    """What the proxy needs from the attested client (:class:`sidecar.aws.kms.AttestedKms`)."""

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class SealingKms(Protocol):
    """An attested client whose steps the proxy can drive itself (:class:`~sidecar.aws.kms.AttestedKms`).

    ``client`` is its boto3 KMS client: the proxy sends to that client's endpoint and region.
    """

    client: Any

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]: ...

    def recipient(self) -> dict[str, Any]: ...

    def unseal(self, operation: str, response: dict[str, Any]) -> dict[str, Any]: ...


class KmsProxyError(Exception):
    """A failure answered as a KMS JSON error: ``{"__type": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class ProxyState:
    kms: KmsCaller
    factory: ClientFactory
    model: ServiceModel
    session: aiohttp.ClientSession | None = field(default=None, repr=False)
    # Set when ``kms`` is a SealingKms: attested requests then stay KMS JSON (see the module docstring).
    sealing: SealingKms | None = field(default=None, repr=False)


KMS_PROXY: web.AppKey[ProxyState] = web.AppKey("kms_proxy", ProxyState)


def child_environment(url: str) -> dict[str, str]:
    """Environment for child apps: ``AWS_KMS_ENDPOINT`` and boto3's own ``AWS_ENDPOINT_URL_KMS``."""
    return dict.fromkeys(ENV_VARS, url)


@functools.lru_cache(maxsize=64)
def kms_endpoint(region: str) -> str:
    """KMS's public endpoint in ``region``, as botocore resolves it for its own clients.

    Each partition has its own domain (``amazonaws.com.cn``, ``c2s.ic.gov``, ``amazonaws.eu``...), so
    botocore's endpoint data decides, not a pattern. The client is built only to read its endpoint:
    unsigned, so no credential lookup runs. Blocking (~15 ms the first time per region).
    """
    with _ENDPOINT_LOCK:  # a botocore session is not documented as safe to share between threads
        client = _ENDPOINT_SESSION.create_client(
            "kms", region_name=region, config=Config(signature_version=UNSIGNED)
        )
    return str(client.meta.endpoint_url)


_ENDPOINT_SESSION = botocore.session.get_session()
_ENDPOINT_LOCK = threading.Lock()


def create_kms_proxy_app(kms: KmsCaller, factory: ClientFactory) -> web.Application:
    """The proxy's application: one route, ``POST /``, and an upstream HTTP session for its lifetime."""
    # aiohttp enforces client_max_size while reading, which covers chunked bodies without a length.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    sealing = kms if isinstance(kms, SealingKms) else None
    app[KMS_PROXY] = ProxyState(kms, factory, factory.service_model("kms"), sealing=sealing)
    app.router.add_post("/", handle_kms)
    app.cleanup_ctx.append(_upstream_session)
    return app


async def start_kms_proxy(
    kms: KmsCaller, factory: ClientFactory, port: int, host: str = LOOPBACK
) -> tuple[web.AppRunner, str]:
    """Serve the proxy on ``host:port`` (port 0: any free port). Returns the runner and the URL."""
    # No aiohttp access log: the handler logs its own event, without the cost of a second line.
    runner = web.AppRunner(create_kms_proxy_app(kms, factory), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    url = f"http://{bound_host}:{bound_port}"
    event(log, logging.INFO, "listening", listener="kms_proxy", address=f"{bound_host}:{bound_port}")
    return runner, url


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[KMS_PROXY]
    factory = state.factory
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=factory.connect_timeout, sock_read=factory.read_timeout
    )
    # trust_env=False: the only proxy is the factory's egress proxy, passed per request; HTTP_PROXY
    # and friends from the environment must not reroute KMS traffic.
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        state.session = session
        yield
        state.session = None


# ---------------------------------------------------------------------- the handler


async def handle_kms(request: web.Request) -> web.Response:
    state = request.app[KMS_PROXY]
    started = time.perf_counter()
    request_id = str(uuid.uuid4())
    operation = ""
    region = ""
    attested = False
    try:
        operation = _operation(request)
        _check_content_type(request)
        region = _scope_region(request)
        body = await _read_body(request)
        params = _parse_json(body)
        # An app that sends its own Recipient attests by itself and wants KMS's answer unchanged.
        # (JSON null counts as absent, as everywhere in the JSON protocol.)
        attested = operation in ATTESTED_OPERATIONS and params.get("Recipient") is None
        if attested:
            response = await _attested_call(state, request, operation, params, region, request_id)
        else:
            response = await _forward(state, request, operation, region, body)
    except KmsProxyError as exc:
        response = error_response(exc.status, exc.code, exc.message, request_id)
    except ImdsError as exc:
        # No credentials to sign with: a dependency failure (retryable), not a fault of the proxy.
        # ImdsError's message never holds a token or a credential.
        response = error_response(503, "KMSInternalException", f"no AWS credentials: {exc}", request_id)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The message could quote a parameter, so the log gets the type and the place only.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else ""
        event(
            log, logging.ERROR, "kms_proxy_error", operation=operation, error=type(exc).__name__, where=where
        )
        response = error_response(500, "KMSInternalException", "internal error in the KMS proxy", request_id)
    event(
        log,
        logging.INFO,
        "kms_proxy_call",
        operation=operation or None,
        region=region or None,
        attested=attested,
        status=response.status,
        ms=round((time.perf_counter() - started) * 1000, 2),
        request_id=response.headers.get("x-amzn-RequestId", request_id),
    )
    return response


def error_response(status: int, code: str, message: str, request_id: str) -> web.Response:
    """A KMS JSON 1.1 error, which botocore parses into ``ClientError`` with ``code``."""
    body = json.dumps({"__type": code, "message": message}).encode()
    return web.Response(
        status=status, body=body, content_type=AMZ_JSON, headers={"x-amzn-RequestId": request_id}
    )


def _operation(request: web.Request) -> str:
    target = request.headers.get("X-Amz-Target")
    if not target:
        raise KmsProxyError(400, "UnknownOperationException", "missing X-Amz-Target header")
    if not target.startswith(TARGET_PREFIX) or not _OPERATION.fullmatch(target[len(TARGET_PREFIX) :]):
        raise KmsProxyError(
            400, "UnknownOperationException", "X-Amz-Target must be TrentService.<Operation>: this is KMS"
        )
    return target[len(TARGET_PREFIX) :]


def _check_content_type(request: web.Request) -> None:
    if request.content_type != AMZ_JSON:
        # AWS JSON services answer an unreadable body with SerializationException.
        raise KmsProxyError(400, "SerializationException", f"Content-Type must be {AMZ_JSON}")


def _scope_region(request: web.Request) -> str:
    """The region from the SigV4 credential scope. The signature itself is not checked (see above)."""
    authorization = request.headers.get("Authorization")
    if not authorization:
        raise KmsProxyError(
            400, "MissingAuthenticationTokenException", "Request is missing Authentication Token"
        )
    match = _CREDENTIAL.search(authorization)
    parts = match.group(1).split("/") if match else []
    if not authorization.startswith("AWS4-HMAC-SHA256 ") or len(parts) != 5 or parts[4] != "aws4_request":
        # AWS's code for a malformed Authorization header (not SigV4, or no Credential=AKID/scope).
        raise KmsProxyError(
            400,
            "IncompleteSignatureException",
            "Authorization must be AWS4-HMAC-SHA256 with Credential=AKID/DATE/REGION/kms/aws4_request",
        )
    _, _, region, service, _ = parts
    if service != "kms":
        # InvalidSignatureException is what AWS itself answers for a credential scoped to another
        # service ("Credential should be scoped to correct service"), so clients recognise it.
        raise KmsProxyError(
            400,
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: 'kms'. This proxy accepts only service kms, "
            f"not {service[:32]!r}",
        )
    if not _REGION.fullmatch(region):
        raise KmsProxyError(400, "InvalidSignatureException", "Credential should be scoped to a valid region")
    return region


async def _read_body(request: web.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    except (RequestPayloadError, HttpProcessingError):  # e.g. a gzip body that does not decompress
        raise KmsProxyError(400, "SerializationException", "the request body cannot be read") from None


def _too_large() -> KmsProxyError:
    # KMS has no code for this (its limits are far below ours); RequestEntityTooLargeException is
    # the name AWS's front ends use with 413, and boto3 does not retry it.
    return KmsProxyError(
        413, "RequestEntityTooLargeException", f"request body too large: the limit is {MAX_BODY_BYTES} bytes"
    )


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        params = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting ~1000 deep
        raise KmsProxyError(400, "SerializationException", "the request body is not valid JSON") from None
    if not isinstance(params, dict):
        raise KmsProxyError(400, "SerializationException", "the request body must be a JSON object")
    return params


# ---------------------------------------------------------------------- attested operations


def attested_region(kms: KmsCaller) -> str | None:
    """The region the attested client calls: its ``region``, or its boto3 client's region."""
    region = getattr(kms, "region", None)
    if region is None:
        meta = getattr(getattr(kms, "client", None), "meta", None)
        region = getattr(meta, "region_name", None)
    return region if isinstance(region, str) else None


async def _attested_call(
    state: ProxyState,
    request: web.Request,
    operation: str,
    params: dict[str, Any],
    region: str,
    request_id: str,
) -> web.Response:
    # The attested client is bound to the sidecar's region. Serving another region's request from
    # it would silently pick another region's key (an alias) or fail obscurely (a key ARN).
    own_region = attested_region(state.kms)
    if own_region is not None and own_region != region:
        raise KmsProxyError(
            400,
            "ValidationException",
            f"{operation} is attested in region {own_region} only; this request is scoped to {region}",
        )
    op_model = state.model.operation_model(operation)
    # Checked on both ways (and converted for a call-only client): a request the model refuses
    # never reaches KMS.
    boto_params = from_json(op_model.input_shape, params) if op_model.input_shape else {}
    if state.sealing is not None:
        return await _sealed_call(state, state.sealing, request, operation, params, region, request_id)
    try:
        result = await asyncio.to_thread(state.kms.call, operation, boto_params)
    except ClientError as exc:
        raise _from_client_error(exc) from None
    except AttestedKmsError as exc:
        # AttestedKmsError's messages are written to be safe to show (no key material, no documents).
        raise KmsProxyError(
            500, "KMSInternalException", f"attestation-protected call failed: {exc}"
        ) from None
    except ParamValidationError:
        # botocore's message quotes parameter values; the app gets the names from its own SDK.
        raise KmsProxyError(
            400, "ValidationException", f"the parameters do not match KMS's model of {operation}"
        ) from None
    except (ConnectTimeoutError, ReadTimeoutError):
        raise KmsProxyError(503, "DependencyTimeoutException", "KMS did not answer in time") from None
    except EndpointConnectionError:
        raise KmsProxyError(503, "KMSInternalException", "cannot reach KMS") from None
    except BotoCoreError as exc:
        raise KmsProxyError(
            500, "KMSInternalException", f"attestation-protected call failed: {type(exc).__name__}"
        ) from None
    result.pop("CiphertextForRecipient", None)  # the app asked for a plain answer
    body = to_json(op_model.output_shape, result) if op_model.output_shape else {}
    metadata = result.get("ResponseMetadata")
    upstream_id = metadata.get("RequestId") if isinstance(metadata, dict) else None
    return web.Response(
        body=json.dumps(body).encode(),
        content_type=AMZ_JSON,
        headers={"x-amzn-RequestId": upstream_id or request_id},
    )


def _prepare_sealed(
    factory: ClientFactory,
    kms: SealingKms,
    url: str,
    region: str,
    headers: dict[str, str],
    params: dict[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """The KMS JSON body with our ``Recipient``, and its signed headers. Blocking (NSM, credentials)."""
    recipient = kms.recipient()  # a fresh document for every call (see AttestedKms.recipient)
    # JSON null means absent; leaving nulls out keeps the body what botocore would have sent.
    body = {name: value for name, value in params.items() if value is not None}
    body["Recipient"] = {
        "AttestationDocument": base64.b64encode(recipient["AttestationDocument"]).decode("ascii"),
        "KeyEncryptionAlgorithm": recipient["KeyEncryptionAlgorithm"],
    }
    data = json.dumps(body).encode()
    return data, dict(_signed_headers(factory, url, region, headers, data).items())


async def _sealed_call(
    state: ProxyState,
    kms: SealingKms,
    request: web.Request,
    operation: str,
    params: dict[str, Any],
    region: str,
    request_id: str,
) -> web.Response:
    """An attested operation kept as KMS JSON: add Recipient, send, unseal the answer."""
    url = _endpoint(kms.client.meta.endpoint_url, region)
    headers = {
        "Host": urlsplit(url).netloc,
        "Content-Type": AMZ_JSON,
        "X-Amz-Target": TARGET_PREFIX + operation,
    }
    try:
        # One worker thread for both blocking steps: the NSM (an ioctl on the device) and signing
        # (which may refresh credentials from IMDS).
        body, signed = await asyncio.to_thread(
            _prepare_sealed, state.factory, kms, url, region, headers, params
        )
    except AttestedKmsError as exc:
        raise KmsProxyError(
            500, "KMSInternalException", f"attestation-protected call failed: {exc}"
        ) from None
    except BotoCoreError as exc:
        raise KmsProxyError(
            503, "KMSInternalException", f"the sidecar cannot sign for KMS: {type(exc).__name__}"
        ) from None
    signed["User-Agent"] = f"{request.headers.get('User-Agent', 'unknown')} {USER_AGENT_EXTRA}"
    status, payload, content_type, upstream_id = await _send(state, url, body, signed)
    if status != 200:
        # KMS's own error (AccessDeniedException when the measurements do not match, throttling...)
        # as KMS sent it; the app's SDK retries what it retries for KMS itself.
        return _relay(status, payload, content_type, upstream_id)
    answer = _json_answer(payload)
    sealed = answer.get(CIPHERTEXT_FOR_RECIPIENT)
    if sealed is not None:
        if not isinstance(sealed, str):
            raise _unsealable("CiphertextForRecipient is not a base64 string")
        try:
            answer[CIPHERTEXT_FOR_RECIPIENT] = base64.b64decode(sealed, validate=True)
        except binascii.Error:
            raise _unsealable("CiphertextForRecipient is not valid base64") from None
    try:
        # In the event loop, not a worker thread: about 2 ms of CPU (RSA-OAEP, AES, CMS parsing)
        # that holds the GIL either way, so a thread would only add the hand-over.
        kms.unseal(operation, answer)  # fails closed: no CiphertextForRecipient, no plaintext
    except AttestedKmsError as exc:
        raise _unsealable(str(exc)) from None
    field_name = ATTESTED_OPERATIONS[operation]
    answer[field_name] = base64.b64encode(answer[field_name]).decode("ascii")
    return web.Response(
        body=json.dumps(answer).encode(),
        content_type=AMZ_JSON,
        headers={"x-amzn-RequestId": upstream_id or request_id},
    )


def _unsealable(reason: str) -> KmsProxyError:
    # AttestedKmsError's messages are written to be safe to show (no key material, no documents).
    return KmsProxyError(500, "KMSInternalException", f"attestation-protected call failed: {reason}")


def _json_answer(payload: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise _unsealable("KMS's answer is not a JSON object")
    return answer


def _from_client_error(exc: ClientError) -> KmsProxyError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "KMSInternalException")
    message = str(error.get("Message") or "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = _SERVER_ERRORS.get(code, 400)
    return KmsProxyError(status, code, message)


def from_json(shape: Shape, value: Any, path: str = "") -> Any:
    """KMS JSON parameters to boto3 parameters: base64 blobs become bytes, checked against ``shape``.

    Unknown members are refused (ValidationException) rather than dropped: a member this botocore
    does not know (``DryRun`` once was one) must not silently change what the call does.
    """
    kind = shape.type_name
    where = path or "the request"
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        if not isinstance(value, dict):
            raise _serialization(where, "an object")
        out: dict[str, Any] = {}
        for name, item in value.items():
            member = shape.members.get(name)
            if member is None:
                raise KmsProxyError(
                    400, "ValidationException", f"unknown member {_join(path, str(name)[:64])!r}"
                )
            if item is not None:  # JSON null means absent, as in AWS's JSON protocol
                out[name] = from_json(member, item, _join(path, name))
        missing = [name for name in shape.required_members if name not in out]
        if missing:
            raise KmsProxyError(
                400,
                "ValidationException",
                f"{len(missing)} validation error(s) detected: "
                + "; ".join(f"value null at {_join(path, m)!r} must not be null" for m in missing),
            )
        return out
    if kind == "list":
        assert isinstance(shape, ListShape)
        if not isinstance(value, list):
            raise _serialization(where, "an array")
        return [from_json(shape.member, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if kind == "map":
        assert isinstance(shape, MapShape)
        if not isinstance(value, dict):
            raise _serialization(where, "an object")
        return {key: from_json(shape.value, item, f"{path}.{key}") for key, item in value.items()}
    if kind == "blob":
        if not isinstance(value, str):
            raise _serialization(where, "a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise _serialization(where, "valid base64") from None
    if kind == "string":
        if not isinstance(value, str):
            raise _serialization(where, "a string")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _serialization(where, "a boolean")
        return value
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _serialization(where, "an integer")
        return value
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _serialization(where, "a number")
        return value
    if kind == "timestamp":
        # The JSON protocol sends epoch seconds; boto3 accepts those (and ISO strings) as they are.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _serialization(where, "a timestamp")
        return value
    return value


def to_json(shape: Shape, value: Any) -> Any:
    """A boto3 response to KMS JSON: bytes to base64, datetimes to epoch seconds, as KMS answers.

    Members the shape does not declare (``ResponseMetadata``) are left out, and so are ``None`` values.
    """
    kind = shape.type_name
    if kind == "structure" and isinstance(value, Mapping):
        assert isinstance(shape, StructureShape)
        return {
            name: to_json(shape.members[name], item)
            for name, item in value.items()
            if name in shape.members and item is not None
        }
    if kind == "list" and isinstance(value, list | tuple):
        assert isinstance(shape, ListShape)
        return [to_json(shape.member, item) for item in value]
    if kind == "map" and isinstance(value, Mapping):
        assert isinstance(shape, MapShape)
        return {key: to_json(shape.value, item) for key, item in value.items()}
    if kind == "blob" and isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if kind == "timestamp" and isinstance(value, datetime.datetime):
        return value.timestamp()
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _serialization(where: str, expected: str) -> KmsProxyError:
    return KmsProxyError(400, "SerializationException", f"{where} must be {expected}")


# ---------------------------------------------------------------------- forwarded operations


def _signed_headers(
    factory: ClientFactory, url: str, region: str, headers: dict[str, str], body: bytes
) -> Any:
    """Sign a request to KMS with the sidecar's credentials. Blocking (credential refresh)."""
    aws_request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(factory.credentials(), "kms", region).add_auth(aws_request)
    return aws_request.headers


def _endpoint(configured: str | None, region: str) -> str:
    return (configured or kms_endpoint(region)).rstrip("/") + "/"


async def _send(
    state: ProxyState, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, str, str | None]:
    """POST to KMS through the egress proxy: status, body, Content-Type and KMS's request id."""
    if state.session is None:  # only between the app's shutdown and the handler finishing
        raise KmsProxyError(503, "KMSInternalException", "the KMS proxy is shutting down")
    try:
        # The session keeps connections alive: no TCP (or TLS) set-up per call.
        async with state.session.post(url, data=body, headers=headers, proxy=state.factory.proxy) as upstream:
            payload = await upstream.read()
            return (
                upstream.status,
                payload,
                upstream.headers.get("Content-Type", AMZ_JSON),
                upstream.headers.get("x-amzn-RequestId"),
            )
    except TimeoutError:
        # aiohttp's timeouts are TimeoutError subclasses. 503 (KMS's status for this code) is
        # retried by boto3.
        raise KmsProxyError(503, "DependencyTimeoutException", "KMS did not answer in time") from None
    except aiohttp.ClientError as exc:
        # A network failure before KMS answered: 503 rather than 500, since it is usually transient
        # (egress proxy restarting, DNS) and boto3 retries 503.
        raise KmsProxyError(
            503, "KMSInternalException", f"cannot reach KMS at {urlsplit(url).hostname}: {type(exc).__name__}"
        ) from None


def _relay(status: int, payload: bytes, content_type: str, upstream_id: str | None) -> web.Response:
    """KMS's answer to the app as it is."""
    response = web.Response(status=status, body=payload)
    response.headers["Content-Type"] = content_type
    response.headers["x-amzn-RequestId"] = upstream_id or str(uuid.uuid4())
    return response


async def _forward(
    state: ProxyState, request: web.Request, operation: str, region: str, body: bytes
) -> web.Response:
    configured = state.factory.endpoints.get("kms")
    content_type, target = request.headers["Content-Type"], request.headers["X-Amz-Target"]

    def sign() -> tuple[str, Any]:  # both may block: endpoint resolution, credential refresh
        url = _endpoint(configured, region)
        # Host is set here, so the signed value and the sent value are the same string.
        headers = {"Host": urlsplit(url).netloc, "Content-Type": content_type, "X-Amz-Target": target}
        return url, _signed_headers(state.factory, url, region, headers, body)

    try:
        url, signed = await asyncio.to_thread(sign)
    except BotoCoreError as exc:
        # No credentials (IMDS unreachable or still starting): transient, so 503 and boto3 retries.
        raise KmsProxyError(
            503, "KMSInternalException", f"the sidecar cannot sign for KMS: {type(exc).__name__}"
        ) from None
    out = dict(signed.items())
    # The user agent is not signed; keeping the app's helps to tell callers apart in CloudTrail.
    out["User-Agent"] = f"{request.headers.get('User-Agent', 'unknown')} {USER_AGENT_EXTRA}"
    return _relay(*await _send(state, url, body, out))
