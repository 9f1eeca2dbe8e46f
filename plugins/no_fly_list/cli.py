"""``sidecar no-fly``: operator tools that run outside the enclave, with plain AWS credentials.

``seal`` turns a list of names into a version-2 envelope: KMS GenerateDataKey (AES_256, with the
envelope's encryption context) makes the data key, :func:`~plugins.no_fly_list.envelope.seal_envelope`
encrypts the list, and the envelope goes to a file, stdout or S3. ``check-envelope`` validates an
envelope's structure without any key.

The sealed payload is the operator's names as written (stripped, one per line), not their normalised
form: the enclave normalises at load, so a change to the normalisation rule never needs a re-seal.
Neither command ever prints a name or the data key. Exit codes follow the rest of the CLI: 0 done,
1 the check or AWS failed, 2 usage or input error; errors are one ``error: ...`` line.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

import click

from plugins.no_fly_list.envelope import (
    ENCRYPTION_CONTEXT,
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    parse_envelope,
    seal_envelope,
    seal_fernet_envelope,
)
from plugins.no_fly_list.normalize import MAX_NAME_CHARS, normalize
from sidecar import files, hookimpl
from sidecar.files import FileProblem, read_regular_file

__all__ = [
    "NamesError",
    "Sealed",
    "parse_names",
    "parse_s3_url",
    "register_commands",
    "seal_names",
    "upload",
    "write_atomically",
]

# A names file this large could not fit the envelope limit once base64-encoded; refuse before reading.
MAX_INPUT_BYTES: Final = MAX_ENVELOPE_BYTES * 3 // 4 - 4096
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
# Every line break an editor or export may write: CRLF, a lone CR (Excel for Mac's CSV), NEL, U+2028/9.
# Splitting on "\n" alone left "Alice\rBob" one entry, which the enclave reads as "alicebob".
_LINE_BREAK: Final = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


class NamesError(ValueError):
    """The names input is unusable. The message names a line number, never a name."""


@dataclass(frozen=True)
class Sealed:
    envelope: bytes  # the JSON envelope (ciphertext only)
    key_arn: str  # the key KMS generated the data key under
    count: int  # names sealed


def parse_names(text: str) -> list[str]:
    """Names from comma- or newline-separated text: stripped, empty entries skipped, order kept.

    Lines end at LF, CRLF, a lone CR, NEL, U+2028 or U+2029. Raises :class:`NamesError` for a name
    over ``MAX_NAME_CHARS`` characters, a name with a control character (a NUL from UTF-16, say), a
    name that normalises to nothing (it could never match a passenger, and would only hide a
    mistake), or no names at all.
    """
    names: list[str] = []
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        for raw in line.split(","):
            name = raw.strip()
            if not name:
                continue
            if len(name) > MAX_NAME_CHARS:
                raise NamesError(
                    f"line {number}: a name is {len(name)} characters, over the limit of {MAX_NAME_CHARS}"
                )
            control = next((c for c in name if unicodedata.category(c) == "Cc" and not c.isspace()), None)
            if control is not None:
                # Threat: a UTF-16 file without a BOM decodes as UTF-8 with a NUL in every name; the
                # enclave keeps NULs, so no passenger could ever match and the list would screen nobody.
                raise NamesError(
                    f"line {number}: a name contains the control character U+{ord(control):04X} "
                    "(is the file UTF-16? save it as UTF-8)"
                )
            if not normalize(name):
                raise NamesError(f"line {number}: a name has no visible characters")
            names.append(name)
    if not names:
        raise NamesError("the input holds no names; refusing to seal an empty list")
    return names


def seal_names(
    kms: Any, key_id: str, names: Sequence[str], fmt: Literal["aead", "fernet"] = "aead"
) -> Sealed:
    """Seal ``names`` under a fresh KMS data key from ``kms`` (a plain boto3 KMS client).

    Raises botocore's ``ClientError`` (and friends) for KMS failures, :class:`EnvelopeError` for a
    list too large for an envelope. The plaintext data key is dropped before returning.
    """
    if fmt == "aead":
        answer = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ENCRYPTION_CONTEXT)
    else:  # the original app generated its data key without an encryption context
        answer = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    data_key = bytes(answer.pop("Plaintext"))
    key_arn = str(answer["KeyId"])
    blob = bytes(answer["CiphertextBlob"])
    try:
        if fmt == "aead":
            envelope = seal_envelope("\n".join(names).encode("utf-8"), data_key, blob, key_arn)
        else:  # the original reader splits on commas
            envelope = seal_fernet_envelope(",".join(names).encode("utf-8"), data_key, blob)
    finally:
        del data_key  # the only copy we hold; the enclave gets it again from KMS
    return Sealed(envelope, key_arn, len(names))


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); ValueError with the reason otherwise."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url!r} needs both a bucket and a key: s3://bucket/key")
    return bucket, key


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: readers see the old envelope or the new one."""
    target = Path(os.path.realpath(path))  # through a symbolic link: replace the file it names
    if target.exists() and not target.is_file():  # /dev/stdout, a FIFO: nothing to replace
        target.write_bytes(data)
        return
    files.write_atomically(target, data)


def upload(s3: Any, url: str, envelope: bytes) -> str:
    """Put ``envelope`` at ``url`` (s3://bucket/key); returns the object's ETag."""
    bucket, key = parse_s3_url(url)
    answer = s3.put_object(Bucket=bucket, Key=key, Body=envelope, ContentType="application/json")
    return str(answer.get("ETag", ""))


# --------------------------------------------------------------------------- commands


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _aws_error(exc: Exception) -> str:
    """One line for a botocore failure: the service's code and message, or the error's own text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        code = error.get("Code", "Error")
        message = error.get("Message") or ""
        return f"{code}: {message}".rstrip(": ")
    return str(exc) or type(exc).__name__


def _read_names(path: str) -> list[str]:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            source = Path(path)
            if source.stat().st_size > MAX_INPUT_BYTES:
                _fail(f"--in {path}: over {MAX_INPUT_BYTES} bytes, too large for one envelope")
            data = read_regular_file(source, MAX_INPUT_BYTES + 1)  # never /dev/zero or a FIFO
    except FileProblem as exc:
        _fail(f"--in {path}: {exc}")
    except OSError as exc:
        _fail(f"--in {path}: {exc.strerror or exc}")
    if len(data) > MAX_INPUT_BYTES:
        _fail(f"--in {path}: over {MAX_INPUT_BYTES} bytes, too large for one envelope")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        _fail(f"--in {path}: line {line} is not UTF-8")
    try:
        return parse_names(text.removeprefix("\ufeff"))  # a BOM from a Windows editor is not a name
    except NamesError as exc:
        _fail(f"--in {path}: {exc}")
    raise AssertionError("unreachable")  # pragma: no cover


@click.group("no-fly")
def no_fly() -> None:
    """Operator tools for the no-fly list: seal, upload and check envelopes.

    \b
      sidecar no-fly seal --key-id alias/no-fly-list --in names.txt --upload s3://no-fly-list/envelope.json
      sidecar no-fly check-envelope envelope.json
    """


@no_fly.command("seal")
@click.option("--key-id", required=True, metavar="KEY", help="the KMS key: id, ARN or alias/NAME")
@click.option(
    "--in", "in_path", required=True, metavar="FILE", help="names, comma- or newline-separated (- for stdin)"
)
@click.option("--out", "out_path", metavar="FILE", help="write the envelope here")
@click.option("--upload", "upload_url", metavar="s3://BUCKET/KEY", help="put the envelope to S3")
@click.option("--region", metavar="REGION", help="AWS region (default: the AWS configuration's)")
@click.option(
    "--endpoint-url",
    metavar="URL",
    help="KMS and S3 endpoint override, e.g. the dev world's (AWS_ENDPOINT_URL_KMS/_S3 also work)",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["aead", "fernet"]),
    default="aead",
    show_default=True,
    help="aead: the versioned format; fernet: the original app's, for compatibility tests only",
)
def seal(
    key_id: str,
    in_path: str,
    out_path: str | None,
    upload_url: str | None,
    region: str | None,
    endpoint_url: str | None,
    fmt: Literal["aead", "fernet"],
) -> None:
    """Seal a list of names into an envelope with a KMS data key.

    Runs outside the enclave with ordinary AWS credentials (environment, profile or instance role),
    which need kms:GenerateDataKey on KEY and, with --upload, s3:PutObject. Names are stripped;
    empty entries are skipped; a name over 256 characters stops with its line number. Without
    --out and --upload the envelope goes to stdout. Names and the data key are never printed.
    Exit code 0 sealed, 1 KMS or S3 failed, 2 usage or input error.
    """
    if upload_url is not None:
        try:
            parse_s3_url(upload_url)
        except ValueError as exc:
            _fail(f"--upload: {exc}")
    names = _read_names(in_path)

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

    try:
        session = boto3.session.Session(region_name=region)
        kms = session.client("kms", endpoint_url=endpoint_url)
        sealed = seal_names(kms, key_id, names, fmt)
    except NoRegionError:
        _fail("no AWS region configured: pass --region or set AWS_DEFAULT_REGION")
    except EnvelopeError as exc:
        _fail(f"cannot seal: {exc}")
    except (BotoCoreError, ClientError) as exc:
        _fail(f"KMS GenerateDataKey with {key_id}: {_aws_error(exc)}", EXIT_FAILED)
    except ValueError as exc:  # botocore's "Invalid endpoint: ..." for a malformed --endpoint-url
        _fail(f"--endpoint-url {endpoint_url!r}: {str(exc).splitlines()[0][:200]}")
    except (KeyError, TypeError, AttributeError) as exc:  # an endpoint that is not KMS answered
        _fail(
            f"KMS GenerateDataKey with {key_id}: the answer is not KMS's ({type(exc).__name__})", EXIT_FAILED
        )
    del names
    to_stdout = out_path is None and upload_url is None

    def report(line: str) -> None:  # stdout carries the envelope itself when nothing else does
        click.echo(line, err=to_stdout)

    report(f"sealed {sealed.count} names under {sealed.key_arn} ({fmt}, {len(sealed.envelope)} bytes)")
    if to_stdout:
        try:
            sys.stdout.buffer.write(sealed.envelope)
            sys.stdout.buffer.flush()
        except OSError as exc:  # a full disk, a closed pipe
            _fail(f"cannot write the envelope to stdout: {exc.strerror or exc}", EXIT_FAILED)
        return
    if out_path is not None:
        try:
            write_atomically(Path(out_path), sealed.envelope)
        except OSError as exc:
            _fail(f"--out {out_path}: {exc.strerror or exc}")
        report(f"wrote {out_path}")
    if upload_url is not None:
        try:
            etag = upload(session.client("s3", endpoint_url=endpoint_url), upload_url, sealed.envelope)
        except (BotoCoreError, ClientError) as exc:
            _fail(f"S3 PutObject {upload_url}: {_aws_error(exc)}", EXIT_FAILED)
        report(f"uploaded {upload_url} ETag {etag}")


@no_fly.command("check-envelope")
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def check_envelope(file: str, as_json: bool) -> None:
    """Validate an envelope's structure without decrypting it; print its format, key id and sizes.

    Reads either format (the original Fernet one and the versioned AEAD one); FILE may be - for
    stdin. No key is needed, so it cannot tell whether the envelope decrypts: only the enclave can.
    Exit code 0 valid, 1 invalid (the reason on one line), 2 usage or unreadable file.
    """
    try:
        if file == "-":
            data = sys.stdin.buffer.read(MAX_ENVELOPE_BYTES + 1)
        else:
            size = Path(file).stat().st_size
            if size > MAX_ENVELOPE_BYTES:
                _fail(
                    f"{file}: envelope is {size} bytes, over the limit of {MAX_ENVELOPE_BYTES}", EXIT_FAILED
                )
            data = read_regular_file(file, MAX_ENVELOPE_BYTES + 1)  # never /dev/zero or a FIFO
    except FileProblem as exc:
        _fail(f"{file}: {exc}")
    except OSError as exc:
        _fail(f"{file}: {exc.strerror or exc}")
    try:
        info = parse_envelope(data).describe()
    except EnvelopeError as exc:
        _fail(f"{file}: invalid envelope: {exc}", EXIT_FAILED)
    if as_json:
        click.echo(json.dumps({"file": file, "valid": True, **info}, indent=2))
        return
    click.echo(f"{file}: valid envelope")
    click.echo(f"  format               {info['format']}")
    click.echo(f"  version              {info['version']}")
    click.echo(f"  key id               {info['key_id'] or '- (not recorded in this format)'}")
    context = info["encryption_context"]
    click.echo(f"  encryption context   {json.dumps(context) if context else '- (none)'}")
    click.echo(f"  data key ciphertext  {info['data_key_ciphertext_bytes']} bytes")
    if "plaintext_bytes" in info:
        click.echo(
            f"  sealed list          {info['sealed_bytes']} bytes ({info['plaintext_bytes']} of plaintext)"
        )
    else:
        click.echo(
            f"  sealed list          {info['sealed_bytes']} bytes "
            f"(at most {info['plaintext_bytes_max']} of plaintext)"
        )


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(no_fly)
