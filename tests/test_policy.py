"""`sidecar policy`: KMS key policies pinned to enclave measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sidecar.attestation.policy import ADMIN_ACTIONS, ATTESTED_ACTIONS, PolicyInputError, key_policy

PCR0 = "85aaa37e85a0b7178bb5700a8c1ae584bf4f994996db6f18503e215cf35b65f737b19e822b3f10eb634317bd4f11deee"
PCR8 = "ab" * 48
ROLE = "arn:aws:iam::123456789012:role/no-fly-list"
KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_pcr0_pins_image_sha384_for_the_three_actions() -> None:
    policy = key_policy(PCR0.upper())
    (statement,) = policy["Statement"]
    assert policy["Version"] == "2012-10-17"
    assert statement["Action"] == ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"]
    assert statement["Principal"] == {"AWS": "*"}
    assert statement["Resource"] == "*"
    assert statement["Condition"] == {
        "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0}
    }


def test_principal_gets_an_admin_statement_that_cannot_decrypt() -> None:
    # Threat: an admin statement with kms:* would let any principal of the account decrypt without
    # an attestation, defeating the PCR pin.
    policy = key_policy(PCR0, {8: PCR8}, principal=ROLE, key_arn=KEY)
    admin, use = policy["Statement"]
    assert admin["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}
    assert admin["Action"] == ADMIN_ACTIONS
    assert not any(a in ("kms:*", *ATTESTED_ACTIONS, "kms:Encrypt") for a in admin["Action"])
    assert "Condition" not in admin
    assert use["Principal"] == {"AWS": ROLE}
    assert use["Resource"] == KEY and admin["Resource"] == KEY
    assert use["Condition"]["StringEqualsIgnoreCase"] == {
        "kms:RecipientAttestation:ImageSha384": PCR0,
        "kms:RecipientAttestation:PCR8": PCR8,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pcr0": None}, "an unpinned key protects nothing"),
        ({"pcr0": "abc"}, "--pcr0 must be 96 hex digits"),
        ({"pcr0": "zz" * 48}, "--pcr0 must be 96 hex digits"),
        ({"pcr0": PCR0, "pcrs": {32: PCR8}}, "--pcr index must be 0..31"),
        # Threat: a key pinned to zeros opens to any debug-mode enclave (its console is readable).
        ({"pcr0": "0" * 96}, "--pcr0 is all zeros: that is what every debug-mode enclave reports"),
        ({"pcr0": PCR0, "pcrs": {1: "0" * 96}}, "--pcr 1 is all zeros"),
        ({"pcr0": PCR0, "principal": "root"}, "--principal must be an IAM or STS ARN"),
        ({"pcr0": PCR0, "key_arn": "alias/x"}, "--key-arn must be a KMS key ARN"),
    ],
)
def test_bad_input_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyInputError, match=message):
        key_policy(**kwargs)  # type: ignore[arg-type]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "policy", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_prints_json_policy() -> None:
    result = run_cli("--pcr0", PCR0, "--pcr", f"8={PCR8}", "--principal", ROLE)
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    assert (
        policy["Statement"][1]["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:PCR8"] == PCR8
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--pcr0", "12"),  "--pcr0 must be 96 hex digits"),
        (("--pcr", "x=ab"), "--pcr 'x=ab': expected N=HEX"),
        ((), "an unpinned key protects nothing"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2_with_one_line(args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
