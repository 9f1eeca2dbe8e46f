"""``sidecar dev``: seed the dev world with the demo no-fly list, as an operator seeds AWS.

When the configured envelope is missing, :func:`prepare_dev_world` makes what an operator would
have made: the bucket, the KMS key (``key_id`` must then be an ``alias/...``; the key's policy pins
this sidecar's measured PCR0), and an envelope of the demo list (the Sesame Street cast,
``demo_names.txt``) sealed by :func:`~plugins.no_fly_list.cli.seal_names`, the very function behind
``sidecar no-fly seal``. An envelope that exists is left alone, so a test or an operator can seal
their own list first. Plain admin clients are used (no attestation): this is the operator's side.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from plugins.no_fly_list.cli import parse_names, seal_names, upload, write_atomically
from plugins.no_fly_list.source import parse_location
from sidecar import hookimpl
from sidecar.logs import event

if TYPE_CHECKING:
    from sidecar.context import PluginContext
    from sidecar.devworld.world import DevWorld

__all__ = ["demo_names", "prepare_dev_world"]

DEMO_NAMES_FILE = "demo_names.txt"
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def demo_names() -> list[str]:
    """The demo list shipped with the plugin (package data)."""
    text = resources.files("plugins.no_fly_list").joinpath(DEMO_NAMES_FILE).read_text("utf-8")
    return parse_names(text)


@hookimpl
def prepare_dev_world(world: DevWorld, context: PluginContext) -> None:
    with _botocore_bodies_unlogged():
        _prepare(world, context)


@contextlib.contextmanager
def _botocore_bodies_unlogged() -> Iterator[None]:
    """Keep botocore at INFO while sealing: at DEBUG it logs response bodies, and GenerateDataKey's
    answer holds the plaintext data key. (Plugin hooks run one at a time here, before any lifespan.)
    """
    botocore = logging.getLogger("botocore")
    level = botocore.level
    if botocore.getEffectiveLevel() < logging.INFO:
        botocore.setLevel(logging.INFO)
    try:
        yield
    finally:
        botocore.setLevel(level)


def _prepare(world: DevWorld, context: PluginContext) -> None:
    location: str = context.config["envelope"]
    key_id: str = context.config["key_id"]
    where = parse_location(location)  # the plugin's own rule, so both look in the same place
    if where.is_s3:
        s3 = world.admin("s3")
        if _object_exists(s3, where.bucket, where.key):
            event(context.log, logging.INFO, "no_fly_demo_kept", envelope=location)
            return
        world.ensure_bucket(where.bucket)
        kms = world.admin("kms")
        _ensure_key(world, kms, key_id)
        sealed = seal_names(kms, key_id, demo_names())
        upload(s3, location, sealed.envelope)
    else:
        assert where.path is not None
        if where.path.exists():
            event(context.log, logging.INFO, "no_fly_demo_kept", envelope=location)
            return
        kms = world.admin("kms")
        _ensure_key(world, kms, key_id)
        sealed = seal_names(kms, key_id, demo_names())
        where.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(where.path, sealed.envelope)
    event(
        context.log,
        logging.INFO,
        "no_fly_demo_sealed",
        envelope=location,
        key=sealed.key_arn,
        count=sealed.count,
    )


def _object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in _MISSING:
            return False
        raise
    return True


def _ensure_key(world: DevWorld, kms: Any, key_id: str) -> None:
    """The key must exist; an alias that does not is created, pinned to this sidecar's PCR0."""
    try:
        kms.describe_key(KeyId=key_id)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NotFoundException":
            raise
    if not key_id.startswith("alias/"):
        raise ValueError(
            f"key_id {key_id!r} does not exist in the dev world; use an alias/NAME so it can be created"
        )
    world.create_key(world.pcr0.hex(), key_id)
