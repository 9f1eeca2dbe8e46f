"""``sidecar trust``: fetch a document from a running sidecar (or read one), verify it, explain it.

For a URL, a fresh random nonce is sent and must come back, and the document's ``user_data`` must
be SHA-256 of its ``public_key`` (how a sidecar binds its recipient key to the attestation).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sidecar.attestation.verify import Check, Expectations, VerificationResult, verify_document

PCR_LABELS = {0: "enclave image", 1: "kernel and bootstrap", 2: "application", 8: "signing certificate"}
MAX_DOCUMENT_BYTES = 64 * 1024
NONCE_BYTES = 32


class TrustInputError(Exception):
    """Bad arguments or an unreachable sidecar: exit code 2, not a verification verdict."""


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2024-08-07T08:00:00Z``; no zone means UTC) or milliseconds since the epoch."""
    try:
        if text.isascii() and text.isdigit():  # isdigit() alone takes "²", which int() refuses
            return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except ValueError:
        raise TrustInputError(f"--at {text!r} is neither ISO 8601 nor milliseconds since the epoch") from None
    except (OverflowError, OSError):
        raise TrustInputError(f"--at {text!r} is out of range") from None


def parse_expected_pcrs(items: tuple[str, ...]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for item in items:
        digits, sep, value = item.partition("=")
        digits = digits.strip()
        if not sep or not (digits.isascii() and digits.isdigit()):
            raise TrustInputError(f"--expect-pcr {item!r}: expected N=HEX")
        try:
            data = bytes.fromhex(value.strip())
        except ValueError:
            raise TrustInputError(f"--expect-pcr {item!r}: the value is not hex") from None
        # Length first: int() of more than 4300 digits raises ValueError, not a usage error.
        if len(digits) > 2 or not 0 <= int(digits) <= 31 or len(data) not in (32, 48, 64):
            raise TrustInputError(f"--expect-pcr {item!r}: index 0..31 and 32, 48 or 64 bytes")
        index = int(digits)
        # Two different values for one PCR cannot both hold; keeping the last would drop one silently.
        if pcrs.get(index, data) != data:
            raise TrustInputError(f"--expect-pcr {item!r}: PCR{index} is already expected with another value")
        pcrs[index] = data
    return pcrs


def attestation_url(url: str, nonce: bytes) -> str:
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise TrustInputError(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TrustInputError(f"{url!r} is not an http(s) URL")
    path = parts.path if parts.path not in ("", "/") else "/enclave/attestation"
    query = urllib.parse.urlencode({"nonce": nonce.hex()})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def fetch_document(url: str, nonce: bytes, timeout: float = 10.0) -> bytes:
    target = attestation_url(url, nonce)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 - http(s) checked above
            body: bytes = resp.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise TrustInputError(f"{target} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrustInputError(f"cannot fetch {target}: {reason}") from None
    except (http.client.HTTPException, ValueError) as exc:  # not HTTP (a garbage status line), a bad URL
        raise TrustInputError(f"cannot fetch {target}: {type(exc).__name__}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise TrustInputError(f"{target} sent more than {MAX_DOCUMENT_BYTES} bytes")
    return body


@dataclass
class TrustReport:
    result: VerificationResult
    source: str
    binding_required: bool
    allow_debug: bool = False

    @property
    def checks(self) -> list[Check]:
        """The verifier's checks, the debug-mode check, and the recipient-key binding for documents
        fetched from a sidecar."""
        checks = list(self.result.checks)
        if self.result.document is not None:
            checks.append(self.debug_check())
        if self.binding_required:
            checks.append(self.binding_check())
        return checks

    @property
    def ok(self) -> bool:
        return self.result.ok and all(c.ok for c in self.checks)

    @property
    def failure(self) -> str | None:
        if not self.result.ok:
            return self.result.failure
        return next((f"{c.name}: {c.detail}" for c in self.checks if not c.ok), None)

    def debug_check(self) -> Check:
        """Nitro reports PCR0 as all zeros for an enclave run with --debug-mode: its console is
        readable from the parent instance, and its PCRs attest no image. A correct signature from
        such an enclave proves nothing about the code, so it is not VERIFIED unless asked for."""
        doc = self.result.document
        assert doc is not None
        pcr0 = doc.pcrs.get(0, b"")
        if any(pcr0):
            return Check("production mode", True, "PCR0 is the image's measurement")
        if self.allow_debug:
            return Check("production mode", True, "PCR0 is all zeros: debug mode, accepted by --allow-debug")
        return Check(
            "production mode",
            False,
            "PCR0 is all zeros: the enclave runs in debug mode (its console is readable from the parent "
            "and its PCRs attest no image); --allow-debug accepts it",
        )

    def binding_check(self) -> Check:
        doc = self.result.document
        if doc is None or not doc.public_key or doc.user_data is None:
            return Check("key binding", False, "the document has no public_key and user_data to bind")
        bound = hmac.compare_digest(doc.user_data, hashlib.sha256(doc.public_key).digest())
        detail = "user_data is SHA-256 of public_key" if bound else "user_data is not SHA-256 of public_key"
        return Check("key binding", bound, detail)


def check(
    *,
    url: str | None,
    document: bytes | None,
    root: Any = None,
    at: datetime | None = None,
    pcrs: dict[int, bytes] | None = None,
    allow_debug: bool = False,
) -> TrustReport:
    nonce = None
    if url is not None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        document = fetch_document(url, nonce)
    assert document is not None
    result = verify_document(document, root=root, at=at, expect=Expectations(pcrs=pcrs or {}, nonce=nonce))
    return TrustReport(result, url or "file", binding_required=url is not None, allow_debug=allow_debug)


def render_text(report: TrustReport) -> str:
    result = report.result
    lines: list[str] = []
    doc = result.document
    if doc is not None:
        when = datetime.fromtimestamp(doc.timestamp / 1000, tz=UTC).isoformat(timespec="milliseconds")
        lines += [
            f"module id   {doc.module_id}",
            f"timestamp   {when} ({doc.timestamp})",
            f"digest      {doc.digest}",
        ]
        for index, value in sorted(doc.pcrs.items()):
            name = f"PCR{index}" + (f" ({PCR_LABELS[index]})" if index in PCR_LABELS else "")
            lines.append(f"{name:29} {value.hex()}")
        lines.append(f"user_data   {doc.user_data.hex() if doc.user_data else '-'}")
        if doc.public_key:
            lines.append(f"public key  sha256:{hashlib.sha256(doc.public_key).hexdigest()}")
        else:
            lines.append("public key  -")
        if doc.nonce:
            lines.append(f"nonce       {doc.nonce.hex()}")
    for cert in result.chain:
        lines.append(
            f"chain       {subject_of(cert)}  "
            f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}"
        )
    for item in report.checks:
        lines.append(f"check       {'ok  ' if item.ok else 'FAIL'} {item.name}: {item.detail}")
    at = result.at.isoformat(timespec="seconds")
    lines.append(
        f"verdict     {'VERIFIED' if report.ok else 'NOT VERIFIED: ' + (report.failure or '')} (at {at})"
    )
    # What is printed comes from the document (a forgery's too): no control character may reach the
    # terminal, where it could draw a fake verdict or hide the real one.
    return "\n".join(printable(line) for line in lines)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped as in a Python literal (``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def subject_of(cert: Any) -> str:
    """A certificate's subject (RFC 4514), or a placeholder when a forged one does not parse."""
    try:
        return str(cert.subject.rfc4514_string())
    except ValueError:
        return "(a subject that does not parse)"


def render_json(report: TrustReport) -> dict[str, Any]:
    result = report.result
    doc = result.document
    out: dict[str, Any] = {
        "verified": report.ok,
        "failure": report.failure,
        "at": result.at.isoformat(),
        "source": report.source,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
        "chain": [
            {
                "subject": subject_of(c),
                "not_before": c.not_valid_before_utc.isoformat(),
                "not_after": c.not_valid_after_utc.isoformat(),
            }
            for c in result.chain
        ],
    }
    if doc is not None:
        out["document"] = {
            "module_id": doc.module_id,
            "timestamp": doc.timestamp,
            "digest": doc.digest,
            "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items())},
            "user_data": doc.user_data.hex() if doc.user_data is not None else None,
            "nonce": doc.nonce.hex() if doc.nonce is not None else None,
            "public_key_sha256": hashlib.sha256(doc.public_key).hexdigest() if doc.public_key else None,
        }
    return out
