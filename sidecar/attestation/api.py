"""The attestation API, a builtin plugin registered like any other (entry point ``attestation``).

- ``POST /v1/attestation`` on the loopback API listener, Enclaver-compatible: a JSON body with
  optional ``nonce`` and ``user_data`` (standard base64) and ``public_key`` (PEM); answers the raw
  document as ``application/cbor``.
- ``GET /enclave/attestation?nonce=HEX`` on every ingress listener, for remote verifiers: the nonce
  (1 to 64 bytes) is required, ``public_key`` is the sidecar's recipient key and ``user_data`` its
  SHA-256, so a verifier can bind what it encrypts to this enclave (``sidecar trust`` checks it).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sidecar import Listener, PluginContext, Route, ServiceNotConfigured, hookimpl
from sidecar.attestation.nsm import MAX_NONCE, MAX_PUBLIC_KEY, MAX_USER_DATA, NsmError
from sidecar.logs import event

CBOR = "application/cbor"
MAX_REMOTE_NONCE = 64
MAX_BODY = 16 * 1024
log = logging.getLogger("sidecar.attestation")


class BadRequest(Exception):
    """The client's input is wrong; the message says how (and never echoes secrets)."""


def error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=json.dumps({"error": message}).encode(), content_type="application/json"
    )


@hookimpl
def register_routes(listener: Listener, context: PluginContext) -> Iterable[Route]:
    if listener.audience == "api":
        return [Route("POST", "/v1/attestation", local_handler(context), max_body_bytes=MAX_BODY)]
    return [Route("GET", "/enclave/attestation", remote_handler(context))]


def local_handler(context: PluginContext) -> Any:
    async def post_attestation(request: web.Request) -> web.StreamResponse:
        try:
            fields = parse_local_request(await request.read())
        except BadRequest as exc:
            return error(400, str(exc))
        return await attest(context, **fields)

    return post_attestation


def remote_handler(context: PluginContext) -> Any:
    async def get_attestation(request: web.Request) -> web.StreamResponse:
        try:
            nonce = parse_hex_nonce(request.query.getall("nonce", []))
        except BadRequest as exc:
            return error(400, str(exc))
        recipient = context.services.recipient
        if recipient is None:
            return error(503, "the recipient key is not available")
        return await attest(
            context, nonce=nonce, user_data=recipient.spki_sha256, public_key=recipient.spki_der
        )

    return get_attestation


async def attest(context: PluginContext, **fields: bytes | None) -> web.StreamResponse:
    try:
        document = await context.attest(**fields)
    except ServiceNotConfigured:
        return error(503, "attestation is not available: this sidecar runs without an NSM")
    except NsmError as exc:
        event(log, logging.ERROR, "attestation_failed", error=f"{type(exc).__name__}: {exc}")
        return error(503, "the NSM refused the attestation request (details in the log)")
    return web.Response(body=document, content_type=CBOR)


def parse_hex_nonce(values: list[str]) -> bytes:
    if not values:
        raise BadRequest("query parameter nonce is required: 1 to 64 bytes as hex")
    if len(values) > 1:
        raise BadRequest("give the nonce query parameter once")
    try:
        nonce = bytes.fromhex(values[0])
    except ValueError:
        raise BadRequest("nonce must be hex (0-9, a-f), an even number of digits") from None
    if not 1 <= len(nonce) <= MAX_REMOTE_NONCE:
        raise BadRequest(f"nonce must be 1 to {MAX_REMOTE_NONCE} bytes, got {len(nonce)}")
    return nonce


LOCAL_FIELDS = {"nonce", "user_data", "public_key"}


def parse_local_request(body: bytes) -> dict[str, bytes | None]:
    """Enclaver's request body: every field optional; an empty body asks for a bare document."""
    if not body.strip():
        return {"nonce": None, "user_data": None, "public_key": None}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(data) - LOCAL_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: expected nonce, user_data, public_key")
    return {
        "nonce": b64_field(data, "nonce", MAX_NONCE),
        "user_data": b64_field(data, "user_data", MAX_USER_DATA),
        "public_key": pem_field(data),
    }


def b64_field(data: dict[str, Any], name: str, limit: int) -> bytes | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name} is not valid standard base64") from None
    if len(raw) > limit:
        raise BadRequest(f"{name} is {len(raw)} bytes; at most {limit} are allowed")
    return raw


def pem_field(data: dict[str, Any]) -> bytes | None:
    value = data.get("public_key")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("public_key must be a PEM string")
    try:
        key = serialization.load_pem_public_key(value.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequest("public_key is not a PEM public key") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if len(der) > MAX_PUBLIC_KEY:
        raise BadRequest(f"public_key is {len(der)} bytes as DER; at most {MAX_PUBLIC_KEY} are allowed")
    return der
