"""Bad input on the command line: one clear line and exit 2 (1 for a peer's failure), never a
traceback and never a hang. Each case was found by a review that ran every subcommand with
hostile input (devices, FIFOs, Unicode digits, trailing newlines, broken URLs, garbage peers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

PCR0 = "a" * 96


def sidecar(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, snippet: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and snippet in last, result.stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)  # reading it would block until a writer came
    return path


@pytest.mark.parametrize("device", ["/dev/zero", "fifo"])
@pytest.mark.parametrize(
    "command",
    [
        ("config", "--manifest", "{}"),
        ("measure", "--manifest", "{}"),
        ("trust", "--document", "{}"),
        ("no-fly", "check-envelope", "{}"),
        ("no-fly", "seal", "--key-id", "alias/x", "--region", "us-east-1", "--in", "{}"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_device_or_fifo_is_refused_not_read_for_ever(
    command: tuple[str, ...], device: str, fifo: Path
) -> None:
    target = str(fifo) if device == "fifo" else device
    result = sidecar(*(target if part == "{}" else part for part in command), timeout=20)
    assert_one_line_error(result, 2, "not a regular file")


@pytest.mark.parametrize(
    ("args", "snippet"),
    [
        (("policy", "--pcr0", PCR0 + "\n"), "--pcr0 must be 96 hex digits"),  # "$" took the newline
        (("policy", "--pcr0", PCR0, "--pcr", "\u00b2=aa"), "expected N=HEX"),  # "²".isdigit()
        (("policy", "--pcr0", PCR0, "--principal", "arn:aws:iam::123456789012:role/x\n"), "principal"),
        (("new-plugin", "abc_"), "not ending with an underscore"),  # "sidecar-abc-" is no PEP 508 name
        (("new-plugin", "abc\n"), "is not a valid plugin name"),
        (("vault", "status", "--address", "http://127.0.0.1:abc"), "Port could not be cast"),
        (("vault", "status", "--address", "http://[::1"), "Invalid IPv6 URL"),
        (("vault", "status", "--address", "http://127.0.0.1:99999"), "Port out of range"),
        (("vault", "status", "--address", "https://127.0.0.1:9", "--ca-cert", "/nonexistent"), "--ca-cert"),
        (
            (
                "no-fly",
                "seal",
                "--key-id",
                "k",
                "--region",
                "us-east-1",
                "--endpoint-url",
                "notaurl",
                "--in",
                "{names}",
            ),
            "--endpoint-url 'notaurl'",
        ),
        (("dev", "--state-dir", "/dev/null/x"), "Not a directory"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(tmp_path: Path, args: tuple[str, ...], snippet: str) -> None:
    names = tmp_path / "names.txt"
    names.write_text("Big Bird\n")
    result = sidecar(*(str(names) if a == "{names}" else a for a in args))
    assert_one_line_error(result, 2, snippet)


def test_new_plugin_with_an_unusable_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = sidecar("new-plugin", "foo", "--dir", str(tmp_path / ("x" * 300)))
    assert_one_line_error(result, 2, "File name too long")


def test_vault_cli_against_a_peer_that_is_not_http(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer_garbage() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        result = sidecar("vault", "status", "--address", f"http://127.0.0.1:{server.getsockname()[1]}")
        thread.join(10)
    assert_one_line_error(result, 1, "BadStatusLine")


def test_a_config_that_is_one_string_is_not_echoed(tmp_path: Path) -> None:
    # Passing a token file by mistake must not print the token.
    token = tmp_path / "token.txt"
    token.write_text("s.SuperSecretRootToken0123456789\n")
    result = sidecar("config", "--config", str(token))
    assert_one_line_error(result, 2, "expected a mapping, got a string")
    assert "SuperSecret" not in result.stdout + result.stderr
