"""``sidecar no-fly seal`` and ``check-envelope`` against moto's real KMS and S3 server.

Most cases run the click group in-process (fast); two run the real console script. Threats: an
operator tool that prints the list or the data key (terminal scrollback, CI logs), that seals a
silently truncated or empty list, or that reports an invalid envelope as valid.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import click
import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet

from plugins.no_fly_list.cli import NamesError, no_fly, parse_names, parse_s3_url
from plugins.no_fly_list.envelope import ENCRYPTION_CONTEXT, open_envelope, parse_envelope

REGION = "us-east-1"
ALIAS = "alias/no-fly-cli-test"
BUCKET = "no-fly-cli-test"
NAMES_TEXT = "Big Bird, Elmo\n\n  Oscar the Grouch \r\nzoë,\nCookie Monster,,Count von Count\n"
NAMES = ["Big Bird", "Elmo", "Oscar the Grouch", "zoë", "Cookie Monster", "Count von Count"]


@pytest.fixture(scope="module")
def aws(moto_url: str) -> dict[str, Any]:
    """A KMS key with an alias and a bucket in moto; returns clients and the key's ARN."""
    creds = {"aws_access_key_id": "operator", "aws_secret_access_key": "operator"}
    kms = boto3.client("kms", endpoint_url=moto_url, region_name=REGION, **creds)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name=REGION, **creds)
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName=ALIAS, TargetKeyId=arn)
    s3.create_bucket(Bucket=BUCKET)
    return {"kms": kms, "s3": s3, "arn": arn, "url": moto_url}


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Plain operator credentials in the environment, and no AWS config from this machine."""
    env = {
        "AWS_ACCESS_KEY_ID": "operator",
        "AWS_SECRET_ACCESS_KEY": "operator",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env


def run(*args: str, stdin: bytes | None = None) -> Result:
    group = click.Group("sidecar")
    group.add_command(no_fly)
    return CliRunner().invoke(group, ["no-fly", *args], input=stdin, prog_name="sidecar")


def seal_args(aws: dict[str, Any], names: Path, *extra: str) -> list[str]:
    return [
        "seal",
        "--key-id",
        ALIAS,
        "--in",
        str(names),
        "--region",
        REGION,
        "--endpoint-url",
        aws["url"],
        *extra,
    ]


def data_key(aws: dict[str, Any], env: Any) -> bytes:
    return bytes(aws["kms"].decrypt(**env.kms_decrypt_params(ALIAS))["Plaintext"])


def assert_no_secrets(text: str, *secrets: bytes) -> None:
    lowered = text.lower()
    for name in NAMES:
        assert name.lower() not in lowered
        assert "".join(name.split()).lower() not in lowered
    for secret in secrets:
        assert secret.hex() not in lowered
        assert base64.b64encode(secret).decode().lower() not in lowered


@pytest.fixture
def names_file(tmp_path: Path) -> Path:
    path = tmp_path / "names.txt"
    path.write_text(NAMES_TEXT, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- seal


def test_seal_writes_an_envelope_of_the_raw_names(
    aws: dict[str, Any], operator_env: Any, names_file: Path
) -> None:
    out = names_file.parent / "envelope.json"
    result = run(*seal_args(aws, names_file, "--out", str(out)))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"sealed 6 names under {aws['arn']} (aead, {out.stat().st_size} bytes)",
        f"wrote {out}",
    ]
    env = parse_envelope(out.read_bytes())
    assert env.kind == "aead" and env.key_id == aws["arn"]
    key = data_key(aws, env)
    # The operator's names as written (stripped), one per line; the enclave normalises at load.
    assert bytes(open_envelope(env, key)).decode() == "\n".join(NAMES)
    assert_no_secrets(result.output, key)


def test_the_data_key_is_bound_to_the_encryption_context(
    aws: dict[str, Any], operator_env: Any, names_file: Path
) -> None:
    # Threat: a data key blob lifted into another context (another tool's) and decrypted there.
    out = names_file.parent / "envelope.json"
    assert run(*seal_args(aws, names_file, "--out", str(out))).exit_code == 0
    env = parse_envelope(out.read_bytes())
    assert env.encryption_context == ENCRYPTION_CONTEXT
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="InvalidCiphertext"):
        aws["kms"].decrypt(CiphertextBlob=env.data_key_ciphertext)


def test_seal_to_stdout_keeps_the_report_on_stderr(
    aws: dict[str, Any], operator_env: Any, names_file: Path
) -> None:
    result = run(*seal_args(aws, names_file))
    assert result.exit_code == 0, result.output
    env = parse_envelope(result.stdout_bytes)  # stdout is exactly the envelope
    assert result.stderr.startswith("sealed 6 names under ")
    assert bytes(open_envelope(env, data_key(aws, env))).decode().split("\n") == NAMES


def test_seal_upload_puts_the_envelope_and_prints_the_etag(
    aws: dict[str, Any], operator_env: Any, names_file: Path
) -> None:
    out = names_file.parent / "envelope.json"
    url = f"s3://{BUCKET}/lists/envelope.json"
    result = run(*seal_args(aws, names_file, "--out", str(out), "--upload", url))
    assert result.exit_code == 0, result.output
    head = aws["s3"].head_object(Bucket=BUCKET, Key="lists/envelope.json")
    assert result.stdout.splitlines()[-1] == f"uploaded {url} ETag {head['ETag']}"
    stored = aws["s3"].get_object(Bucket=BUCKET, Key="lists/envelope.json")["Body"].read()
    assert stored == out.read_bytes()
    assert head["ContentType"] == "application/json"


def test_seal_reads_stdin(aws: dict[str, Any], operator_env: Any, tmp_path: Path) -> None:
    out = tmp_path / "envelope.json"
    args = ["seal", "--key-id", ALIAS, "--in", "-", "--out", str(out), "--region", REGION]
    result = run(*args, "--endpoint-url", aws["url"], stdin="\ufeffbert,ernie\n".encode())
    assert result.exit_code == 0, result.output
    env = parse_envelope(out.read_bytes())
    assert open_envelope(env, data_key(aws, env)) == b"bert\nernie"  # the BOM is not part of a name


def test_fernet_format_is_what_the_original_app_reads(
    aws: dict[str, Any], operator_env: Any, names_file: Path
) -> None:
    out = names_file.parent / "old.json"
    result = run(*seal_args(aws, names_file, "--out", str(out), "--format", "fernet"))
    assert result.exit_code == 0, result.output
    envelope = json.loads(out.read_text())
    # The original app's decrypt_envelope(), in substance (its b64encode of the key becomes the
    # URL-safe alphabet that cryptography 51 requires: the same key bytes):
    key = aws["kms"].decrypt(CiphertextBlob=base64.b64decode(envelope["data-key-ciphertext-base64"]))
    fernet = Fernet(base64.urlsafe_b64encode(key["Plaintext"]))
    plaintext = fernet.decrypt(envelope["aes-ciphertext-base64"].encode())
    assert plaintext.decode().split(",") == NAMES


INPUT_ERRORS = [
    ("", "the input holds no names; refusing to seal an empty list"),
    (" ,\n,, \n\n", "the input holds no names; refusing to seal an empty list"),
    ("bert\n" + "x" * 257 + "\n", "line 2: a name is 257 characters, over the limit of 256"),
    ("bert,ernie\n\n, elmo, " + "é" * 300, "line 3: a name is 300 characters, over the limit of 256"),
    ("bert\n\u200b\u2060\n", "line 2: a name has no visible characters"),
]


@pytest.mark.parametrize(("text", "message"), INPUT_ERRORS, ids=[m[:40] for _, m in INPUT_ERRORS])
def test_seal_input_errors_exit_2_with_the_line(
    aws: dict[str, Any], operator_env: Any, tmp_path: Path, text: str, message: str
) -> None:
    names = tmp_path / "names.txt"
    names.write_text(text, encoding="utf-8")
    result = run(*seal_args(aws, names, "--out", str(tmp_path / "e.json")))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"error: --in {names}: {message}\n"
    assert "x" * 20 not in result.stderr and "é" * 20 not in result.stderr  # the name itself is not shown
    assert not (tmp_path / "e.json").exists()


def test_seal_refuses_input_that_is_not_utf8(aws: dict[str, Any], operator_env: Any, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_bytes(b"bert\nernie\nzo\xeb\n")
    result = run(*seal_args(aws, names))
    assert (result.exit_code, result.stderr) == (2, f"error: --in {names}: line 3 is not UTF-8\n")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--upload", "https://bucket/key"],
            "error: --upload: 'https://bucket/key' is not an s3://bucket/key URL",
        ),
        (["--upload", "s3://bucket"], "error: --upload: 's3://bucket' needs both a bucket and a key"),
        (["--upload", "s3:///key"], "error: --upload: 's3:///key' needs both a bucket and a key"),
    ],
)
def test_seal_usage_errors(
    aws: dict[str, Any], operator_env: Any, names_file: Path, extra: list[str], message: str
) -> None:
    result = run(*seal_args(aws, names_file, *extra))
    assert result.exit_code == 2
    assert result.stderr.startswith(message)


def test_seal_missing_input_file(aws: dict[str, Any], operator_env: Any, tmp_path: Path) -> None:
    result = run(*seal_args(aws, tmp_path / "absent.txt"))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: --in {tmp_path / 'absent.txt'}: No such file or directory\n",
    )


def test_seal_unknown_key_is_a_kms_failure(aws: dict[str, Any], operator_env: Any, names_file: Path) -> None:
    args = seal_args(aws, names_file)
    args[args.index(ALIAS)] = "alias/does-not-exist"
    result = run(*args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: KMS GenerateDataKey with alias/does-not-exist: NotFoundException")
    assert len(result.stderr.splitlines()) == 1


def test_seal_upload_failure_is_a_failure(aws: dict[str, Any], operator_env: Any, names_file: Path) -> None:
    result = run(*seal_args(aws, names_file, "--upload", "s3://no-such-bucket-7f3a/envelope.json"))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: S3 PutObject s3://no-such-bucket-7f3a/envelope.json: NoSuchBucket"
    )


def test_seal_without_a_region_says_so(aws: dict[str, Any], operator_env: Any, names_file: Path) -> None:
    result = run("seal", "--key-id", ALIAS, "--in", str(names_file), "--endpoint-url", aws["url"])
    assert (result.exit_code, result.stderr) == (
        2,
        "error: no AWS region configured: pass --region or set AWS_DEFAULT_REGION\n",
    )


def test_seal_refuses_utf16_without_a_bom(aws: dict[str, Any], operator_env: Any, tmp_path: Path) -> None:
    # Threat: UTF-16 decodes as "UTF-8" with a NUL per letter; sealed, the list matches no passenger.
    names = tmp_path / "names.txt"
    names.write_bytes("Big Bird\nElmo\n".encode("utf-16-le"))
    result = run(*seal_args(aws, names, "--out", str(tmp_path / "e.json")))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: --in {names}: line 1: a name contains the control character U+0000 "
        "(is the file UTF-16? save it as UTF-8)\n",
    )
    assert not (tmp_path / "e.json").exists()


def test_seal_out_failure_keeps_the_old_envelope(
    aws: dict[str, Any], operator_env: dict[str, str], names_file: Path
) -> None:
    # Threat: a write that fails half way (a full disk) leaves a truncated envelope over the good one.
    out = names_file.parent / "envelope.json"
    old = b'{"an envelope": "that works"}' * 20
    out.write_bytes(old)

    def small_files() -> None:  # runs in the child: writes past 200 bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    env = {**os.environ, **operator_env, "PYTHONDONTWRITEBYTECODE": "1"}
    seal = subprocess.run(
        [sys.executable, "-m", "sidecar", "no-fly", *seal_args(aws, names_file, "--out", str(out))],
        capture_output=True, text=True, timeout=60, env=env, preexec_fn=small_files,
    )  # fmt: skip
    assert seal.returncode != 0
    assert seal.stderr.endswith("File too large\n")
    assert out.read_bytes() == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["envelope.json", "names.txt"]


# --------------------------------------------------------------------------- check-envelope


@pytest.fixture
def sealed_file(aws: dict[str, Any], operator_env: Any, names_file: Path) -> Path:
    out = names_file.parent / "envelope.json"
    assert run(*seal_args(aws, names_file, "--out", str(out))).exit_code == 0
    return out


def test_check_envelope_prints_format_key_and_sizes(aws: dict[str, Any], sealed_file: Path) -> None:
    result = run("check-envelope", str(sealed_file))
    assert result.exit_code == 0, result.output
    plaintext = len("\n".join(NAMES).encode())
    assert result.stdout.splitlines() == [
        f"{sealed_file}: valid envelope",
        "  format               enclave-sidecar/no-fly-list",
        "  version              2",
        f"  key id               {aws['arn']}",
        '  encryption context   {"purpose": "no-fly-list"}',
        f"  data key ciphertext  {len(parse_envelope(sealed_file.read_bytes()).data_key_ciphertext)} bytes",
        f"  sealed list          {plaintext + 16} bytes ({plaintext} of plaintext)",
    ]
    as_json = json.loads(run("check-envelope", "--json", str(sealed_file)).stdout)
    assert (
        as_json["valid"] is True
        and as_json["key_id"] == aws["arn"]
        and as_json["plaintext_bytes"] == plaintext
    )
    from_stdin = run("check-envelope", "-", stdin=sealed_file.read_bytes())
    assert from_stdin.exit_code == 0 and "version              2" in from_stdin.stdout


def test_check_envelope_reads_the_original_format(tmp_path: Path) -> None:
    key = os.urandom(32)
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(b"bigbird,elmo\n").decode()
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps(
            {
                "data-key-ciphertext-base64": base64.b64encode(bytes(96)).decode(),
                "aes-ciphertext-base64": token,
            }
        )
    )
    result = run("check-envelope", str(path))
    assert result.exit_code == 0, result.output
    assert "  format               fernet (original)" in result.stdout
    assert "  key id               - (not recorded in this format)" in result.stdout


def test_check_envelope_invalid_is_exit_1_with_the_reason(sealed_file: Path) -> None:
    document = json.loads(sealed_file.read_text())
    document["nonce-base64"] = base64.b64encode(bytes(8)).decode()
    sealed_file.write_text(json.dumps(document))
    result = run("check-envelope", str(sealed_file))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert (
        result.stderr == f"error: {sealed_file}: invalid envelope: 'nonce-base64' is 8 bytes, expected 12\n"
    )


def test_check_envelope_cannot_see_tampering(sealed_file: Path) -> None:
    """Structure only, by design: a flipped ciphertext byte is valid structure (the enclave refuses it)."""
    document = json.loads(sealed_file.read_text())
    raw = bytearray(base64.b64decode(document["ciphertext-base64"]))
    raw[0] ^= 1
    document["ciphertext-base64"] = base64.b64encode(raw).decode()
    sealed_file.write_text(json.dumps(document))
    assert run("check-envelope", str(sealed_file)).exit_code == 0


def test_check_envelope_refuses_an_oversize_file_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as f:  # sparse: nothing is written or read
        f.truncate(512 * 1024 * 1024 + 1)
    result = run("check-envelope", str(path))
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: {path}: envelope is {512 * 1024 * 1024 + 1} bytes, over the limit of 536870912\n"
    )


def test_check_envelope_usage_errors(tmp_path: Path) -> None:
    missing = run("check-envelope", str(tmp_path / "absent.json"))
    assert (missing.exit_code, missing.stderr) == (
        2,
        f"error: {tmp_path / 'absent.json'}: No such file or directory\n",
    )
    no_arg = run("check-envelope")
    assert no_arg.exit_code == 2 and "Missing argument 'FILE'" in no_arg.stderr


# --------------------------------------------------------------------------- the real console script


def test_console_script_seal_and_check(
    aws: dict[str, Any], operator_env: dict[str, str], names_file: Path
) -> None:
    out = names_file.parent / "envelope.json"
    env = {**os.environ, **operator_env}
    seal = subprocess.run(
        [sys.executable, "-m", "sidecar", "no-fly", *seal_args(aws, names_file, "--out", str(out))],
        capture_output=True, text=True, timeout=60, env=env, cwd=names_file.parent,
    )  # fmt: skip
    assert seal.returncode == 0, seal.stderr
    assert seal.stdout.startswith("sealed 6 names under ")
    bad = names_file.parent / "bad.json"
    bad.write_text('{"format": "enclave-sidecar/no-fly-list", "version": 3}')
    checks = subprocess.run(
        [sys.executable, "-m", "sidecar", "no-fly", "check-envelope", str(bad)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert checks.returncode == 1
    assert (
        checks.stderr
        == f"error: {bad}: invalid envelope: unsupported envelope version 3 (this build reads version 2)\n"
    )
    assert "Traceback" not in seal.stderr + checks.stderr
    assert_no_secrets(seal.stdout + seal.stderr)


# --------------------------------------------------------------------------- helpers


def test_parse_names_splits_strips_and_keeps_order() -> None:
    assert parse_names(NAMES_TEXT) == NAMES
    # Threat: a CR-only file (Excel for Mac's CSV) sealed as one entry "alicebob": neither matches.
    assert parse_names("Alice\rBob\rCarol\r") == ["Alice", "Bob", "Carol"]
    assert parse_names("a\x85b\u2028c\u2029d\r\n\re") == ["a", "b", "c", "d", "e"]
    with pytest.raises(NamesError, match=r"^line 3: a name contains the control character U\+0007 "):
        parse_names("a\rb\nc\x07d")
    assert parse_names("Big\tBird\x0c") == ["Big\tBird"]  # whitespace inside a name is still whitespace
    assert parse_names("a,b\r\nc\n\n d ,a\n") == ["a", "b", "c", "d", "a"]  # duplicates are the list's own
    assert parse_names("bigbird,elmo\n") == ["bigbird", "elmo"]  # the original's trailing newline
    with pytest.raises(NamesError, match=r"^line 4: a name is 257 characters"):
        parse_names("a\n\n,\n" + "b" * 257)
    assert parse_names("x" * 256) == ["x" * 256]


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b/k/with/slashes.json") == ("b", "k/with/slashes.json")
    for bad in ("b/k", "s3://", "s3://b", "s3://b/", "S3://b/k"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
