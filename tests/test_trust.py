"""`sidecar trust` and `sidecar measure`, against stored real documents and a running `sidecar dev`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SHARED
from tests.test_example_plugin import wait_for, write_configs

VECTORS = SHARED / "vectors" / "attestation"
MARLIN = VECTORS / "marlin_oyster_attestation_verifier_test_attestation.cbor"
MARLIN_TS = "1723012689640"
MARLIN_PCR0 = "5fec1b7372742584"


def trust(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "trust", *args], capture_output=True, text=True, timeout=60
    )


def test_stored_document_verifies_at_its_own_time() -> None:
    result = trust("--document", str(MARLIN), "--at", MARLIN_TS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "verdict     VERIFIED" in out
    assert "PCR0 (enclave image)" in out and MARLIN_PCR0 in out
    assert "PCR1 (kernel and bootstrap)" in out and "PCR2 (application)" in out
    assert "PCR8 (signing certificate)" in out
    assert "module id   i-084e1dd2f1b2c529b-enc0190fecc5b166251" in out
    assert out.count("chain       ") == 5  # root, three intermediates, leaf
    assert "aws.nitro-enclaves" in out


def test_stored_document_is_expired_now() -> None:
    # Threat: replaying an old, once-valid document. Its leaf certificate lived three hours.
    result = trust("--document", str(MARLIN))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("not verified: ") and "valid" in line


def test_json_output_and_expected_pcrs(tmp_path: Path) -> None:
    ok = trust("--document", str(MARLIN), "--at", "2024-08-07T07:00:00Z", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["verified"] is True
    pcr0 = report["document"]["pcrs"]["0"]
    assert pcr0.startswith(MARLIN_PCR0)
    good = trust("--document", str(MARLIN), "--at", MARLIN_TS, "--expect-pcr", f"0={pcr0}")
    assert good.returncode == 0
    bad = trust("--document", str(MARLIN), "--at", MARLIN_TS, "--expect-pcr", f"0={'00' * 48}")
    assert bad.returncode == 1
    assert "PCR0" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one of URL or --document FILE"),
        (("http://x", "--document", str(MARLIN)), "give exactly one of URL or --document FILE"),
        (("--document", str(MARLIN), "--at", "yesterday"), "--at 'yesterday' is neither ISO 8601"),
        (("--document", str(MARLIN), "--expect-pcr", "zero=00"), "expected N=HEX"),
        (("--document", "/nonexistent.cbor"), "--document /nonexistent.cbor: No such file"),
        (("--document", str(MARLIN), "--root", str(MARLIN)), "root"),
        (("http://127.0.0.1:9",), "cannot fetch"),
    ],
)
def test_usage_and_input_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    result = trust(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert "Traceback" not in result.stderr


@pytest.fixture
def dev_sidecar(tmp_path: Path) -> Iterator[tuple[int, Path, Path, Path]]:
    manifest, config, port, _ = write_configs(tmp_path, {})
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "dev", "--manifest", str(manifest), "--config", str(config),
         "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/enclave/ready", 200, proc)
        yield port, state / "dev-root.pem", manifest, config
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_trust_against_a_running_dev_sidecar(dev_sidecar: tuple[int, Path, Path, Path]) -> None:
    port, root, manifest, config = dev_sidecar
    measured = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "measure",
            "--json",
            "--manifest",
            str(manifest),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pcr0 = json.loads(measured.stdout)["PCR0"]
    result = trust(f"http://127.0.0.1:{port}", "--root", str(root), "--expect-pcr", f"0={pcr0}", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] is True
    assert report["document"]["pcrs"]["0"] == pcr0  # the emulator attests the measurement
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["key binding"]["ok"] is True
    assert report["document"]["nonce"] and len(report["document"]["nonce"]) == 64  # a fresh 32-byte nonce

    # Threat: a dev-world sidecar passing for a real enclave. The AWS root must refuse it.
    aws = trust(f"http://127.0.0.1:{port}")
    assert aws.returncode == 1
    # Threat: a different image. A pinned PCR0 that does not match must fail.
    other = trust(f"http://127.0.0.1:{port}", "--root", str(root), "--expect-pcr", f"0={'11' * 48}")
    assert other.returncode == 1 and "PCR0" in other.stderr
