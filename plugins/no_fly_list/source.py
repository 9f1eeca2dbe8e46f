"""Where the sealed list comes from: an S3 object or a local file, with a version tag for polling.

:func:`fetch` returns the envelope's bytes and a tag that changes when the envelope does, or
``None`` and the tag when it has not changed since the tag the caller passed in:

- ``s3://bucket/key``: a GetObject through the sidecar's AWS clients (``context.aws("s3")``; its
  traffic leaves through the egress proxy). The tag is the object's ETag, sent back as
  ``If-None-Match``, so an unchanged object costs one small request and is never downloaded again.
- any other location is a local path, absolute or relative to the sidecar's working directory
  (the same rule as ``sidecar no-fly`` and ``sidecar dev``). The tag is
  ``<mtime_ns>-<size>-<sha256>``: while mtime and size stay the same the file is not even read; a
  file touched but not changed keeps its content hash and counts as unchanged. Replace the file
  atomically (write elsewhere, then rename), as one would an S3 object.

boto3 blocks, and so do file reads: both run in a worker thread. Every failure is a
:class:`SourceError` whose message names the location and the cause (an AWS error code, an OS
error), never content.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from plugins.no_fly_list.envelope import MAX_ENVELOPE_BYTES
from sidecar.context import PluginContext, ServiceNotConfigured

__all__ = ["Location", "SourceError", "content_id", "fetch", "parse_location"]

S3_SCHEME: Final = "s3://"
_FILE_TAG: Final = re.compile(r"[0-9]+-[0-9]+-([0-9a-f]{64})")
_NOT_MODIFIED: Final = {"304", "NotModified"}


class SourceError(Exception):
    """The envelope could not be fetched. The message is safe to show and to log."""


@dataclass(frozen=True)
class Location:
    """A parsed envelope location: an S3 object (``bucket`` and ``key``) or a local ``path``."""

    text: str
    bucket: str = ""
    key: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.path is None

    def __str__(self) -> str:
        return self.text


def parse_location(location: str) -> Location:
    """``s3://bucket/key`` or a local path. Raises ValueError with the problem for a bad S3 URL."""
    if location.startswith(S3_SCHEME):
        bucket, _, key = location[len(S3_SCHEME) :].partition("/")
        if not bucket:
            raise ValueError("an s3:// location needs a bucket: s3://BUCKET/KEY")
        if not key or key.endswith("/"):
            raise ValueError("an s3:// location needs an object key: s3://BUCKET/KEY")
        return Location(location, bucket=bucket, key=key)
    if not location:
        raise ValueError("the envelope location is empty")
    if "://" in location:
        raise ValueError("only s3:// URLs and local paths are supported")
    return Location(location, path=Path(location).expanduser())


def check_location(location: str) -> str | None:
    """A config-schema check: None when ``location`` parses, else the problem."""
    try:
        parse_location(location)
    except ValueError as exc:
        return str(exc)
    return None


async def fetch(context: PluginContext, location: str, etag: str | None) -> tuple[bytes | None, str]:
    """The envelope at ``location`` and its tag, or ``(None, tag)`` when ``etag`` is still current."""
    where = parse_location(location)
    if where.is_s3:
        return await asyncio.to_thread(_fetch_s3, context, where, etag)
    assert where.path is not None
    return await asyncio.to_thread(_fetch_file, where.path, etag)


def content_id(tag: str) -> str:
    """The part of a tag that names the content: a local file's hash (not its mtime), or the ETag."""
    match = _FILE_TAG.fullmatch(tag)
    return match.group(1) if match else tag


def _fetch_s3(context: PluginContext, where: Location, etag: str | None) -> tuple[bytes | None, str]:
    # botocore is imported here: it is slow to import, and CLI commands that load this plugin
    # never need it.
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3 = context.aws("s3")
    except ServiceNotConfigured as exc:
        raise SourceError(f"{where}: {exc}") from None
    params: dict[str, Any] = {"Bucket": where.bucket, "Key": where.key}
    if etag:
        params["IfNoneMatch"] = etag
    try:
        answer = s3.get_object(**params)
        body = answer["Body"]
        try:
            size = int(answer.get("ContentLength") or 0)
            if size > MAX_ENVELOPE_BYTES:
                raise SourceError(f"{where}: the object is {size} bytes, over the envelope limit")
            data: bytes = body.read(MAX_ENVELOPE_BYTES + 1)
        finally:
            body.close()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if etag and (code in _NOT_MODIFIED or status == 304):
            return None, etag
        # KMS/S3 error messages name resources, not data; the code alone is the stable part.
        raise SourceError(f"{where}: S3 GetObject failed: {code or status}") from None
    except BotoCoreError as exc:  # no connection, timeouts, a broken answer: botocore says which
        raise SourceError(f"{where}: S3 GetObject failed: {exc}") from None
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SourceError(f"{where}: the object is over the envelope limit of {MAX_ENVELOPE_BYTES} bytes")
    tag = str(answer.get("ETag") or "")
    if not tag:
        # Without an ETag every poll would look like a change; fall back to the content's hash.
        tag = "sha256:" + hashlib.sha256(data).hexdigest()
    return data, tag


def _fetch_file(path: Path, tag: str | None) -> tuple[bytes | None, str]:
    try:
        stat = path.stat()
        if tag and tag.startswith(f"{stat.st_mtime_ns}-{stat.st_size}-"):
            return None, tag
        with path.open("rb") as f:
            before = os.fstat(f.fileno())
            if before.st_size > MAX_ENVELOPE_BYTES:
                raise SourceError(f"{path}: the file is {before.st_size} bytes, over the envelope limit")
            data = f.read(MAX_ENVELOPE_BYTES + 1)
            after = os.fstat(f.fileno())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the envelope: {exc.strerror or type(exc).__name__}") from None
    changed = (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size)
    if changed or len(data) != after.st_size:
        # A writer is still at work (the file was not replaced atomically): try again next time.
        raise SourceError(f"{path}: the file changed while it was being read")
    digest = hashlib.sha256(data).hexdigest()
    new_tag = f"{after.st_mtime_ns}-{after.st_size}-{digest}"
    if tag and tag.endswith(f"-{digest}"):
        return None, new_tag  # touched, or rewritten with the same content
    return data, new_tag
