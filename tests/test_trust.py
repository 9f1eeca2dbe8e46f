"""`sidecar trust` and `sidecar measure`, against stored real documents and a running `sidecar dev`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

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


DEBUG_DOC = VECTORS / "capeprivacy_cape_js_test.cbor"  # real hardware, --debug-mode: PCR0 all zeros
DEBUG_TS = "1657650918399"


def test_a_debug_mode_enclave_is_not_verified_unless_allowed() -> None:
    # Threat: a debug-mode enclave (console readable from the parent, PCRs all zeros) passes as
    # VERIFIED because its document is correctly signed by real Nitro hardware.
    refused = trust("--document", str(DEBUG_DOC), "--at", DEBUG_TS)
    assert refused.returncode == 1, refused.stderr
    assert "check       FAIL production mode: PCR0 is all zeros" in refused.stdout
    (line,) = refused.stderr.splitlines()
    assert line.startswith("not verified: production mode: PCR0 is all zeros: the enclave runs in debug mode")
    allowed = trust("--document", str(DEBUG_DOC), "--at", DEBUG_TS, "--allow-debug", "--json")
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert report["verified"] is True
    assert {
        "name": "production mode",
        "ok": True,
        "detail": "PCR0 is all zeros: debug mode, accepted by --allow-debug",
    } in report["checks"]
    production = trust("--document", str(MARLIN), "--at", MARLIN_TS, "--json")
    assert {"name": "production mode", "ok": True, "detail": "PCR0 is the image's measurement"} in json.loads(
        production.stdout
    )["checks"]


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
        # Found by review: each of these was a traceback (exit 1) instead of a usage error.
        (("--document", str(MARLIN), "--at", "99999999999999999999"), "is out of range"),
        (("--document", str(MARLIN), "--at", "\u00b2"), "is neither ISO 8601"),  # isdigit() but not int()
        (("--document", str(MARLIN), "--at", "0001-01-01T00:00:00+01:00"), "is out of range"),
        (("--document", str(MARLIN), "--expect-pcr", "\u00b2=" + "00" * 48), "expected N=HEX"),
        (("http://127.0.0.1:80x",), "is not a valid URL"),
        (("http://[::1",), "is not a valid URL"),
    ],
)
def test_usage_and_input_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    result = trust(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert "Traceback" not in result.stderr


def test_expected_pcrs_refuse_huge_indexes_and_conflicting_values() -> None:
    # Threat: an expectation dropped silently (the last of two values won) or a traceback, not a usage error.
    from sidecar.attestation.trust import TrustInputError, parse_expected_pcrs

    one, two = "11" * 48, "22" * 48
    with pytest.raises(TrustInputError, match=r"index 0\.\.31"):
        parse_expected_pcrs(("9" * 5000 + f"={one}",))
    with pytest.raises(TrustInputError, match="PCR0 is already expected with another value"):
        parse_expected_pcrs((f"0={one}", f"0={two}"))
    assert parse_expected_pcrs((f"0={one}", f" 0 ={one}", f"8={two}")) == {
        0: bytes.fromhex(one),
        8: bytes.fromhex(two),
    }


def test_a_peer_that_does_not_speak_http_is_an_input_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer_garbage() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        result = trust(f"http://127.0.0.1:{server.getsockname()[1]}")
        thread.join(10)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot fetch ") and line.endswith(": BadStatusLine")


def forged_document(tmp_path: Path, module_id: str = "i-0-enc0", subject_cn: bytes | None = None) -> Path:
    """A COSE_Sign1 an attacker can make: its own leaf key and certificate, AWS's real root copied into
    cabundle[0], a valid signature under the attacker's key. It must never verify."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LEAFLEAF")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=3))
        .sign(key, hashes.SHA384())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    if subject_cn is not None:  # patch the CN's bytes (same length): a subject that does not parse
        der = der.replace(b"\x0c\x08LEAFLEAF", b"\x0c\x08" + subject_cn)
    root = x509.load_pem_x509_certificate((VECTORS / "aws_nitro_root.pem").read_bytes())
    body = {
        "module_id": module_id,
        "digest": "SHA384",
        "timestamp": int(now.timestamp() * 1000),
        "pcrs": {0: bytes(48)},
        "certificate": der,
        "cabundle": [root.public_bytes(serialization.Encoding.DER)],
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    payload = cbor2.dumps(body)
    protected = cbor2.dumps({1: -35})
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(signature)
    path = tmp_path / "forged.cbor"
    path.write_bytes(cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")]))
    return path


def test_a_forged_document_cannot_draw_a_verdict_on_the_terminal(tmp_path: Path) -> None:
    # Threat: a malicious peer's module_id carrying newlines and escape codes that print fake
    # "check ok" and "VERIFIED" lines and conceal (ESC[8m) the real verdict on a terminal.
    fake = "i-0-enc0\ncheck       ok   chain: 5 certificates\nverdict     VERIFIED\x1b[8m"
    result = trust("--document", str(forged_document(tmp_path, module_id=fake)))
    assert result.returncode == 1
    assert "\x1b" not in result.stdout + result.stderr and "VERIFIED" not in result.stdout.replace(
        "NOT VERIFIED", ""
    )
    assert "payload.module_id: must be printable ASCII" in result.stderr


def test_rendered_lines_escape_every_control_character() -> None:
    from sidecar.attestation.trust import printable

    assert printable("plain text: ok") == "plain text: ok"
    assert printable("a\x1b[8mb\nc\u202ed") == "a\\x1b[8mb\\nc\\u202ed"


@pytest.mark.parametrize("mode", [(), ("--json",)])
def test_a_forged_leaf_whose_subject_does_not_parse_is_not_verified_without_a_crash(
    tmp_path: Path, mode: tuple[str, ...]
) -> None:
    path = forged_document(tmp_path, subject_cn=b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc")  # not UTF-8
    result = trust("--document", str(path), *mode)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("not verified: chain: ")
    if mode:
        subjects = [c["subject"] for c in json.loads(result.stdout)["chain"]]
        assert "(a subject that does not parse)" in subjects
    else:
        assert "(a subject that does not parse)" in result.stdout


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
