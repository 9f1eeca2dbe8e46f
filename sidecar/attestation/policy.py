"""KMS key policies that only an attested enclave image can use (``sidecar policy``).

The attested statement allows Decrypt, GenerateDataKey and GenerateRandom only when the request
carries a Nitro attestation document whose measurements match. KMS evaluates these condition keys
only on requests with ``Recipient``; a request without one has no such key, so the condition fails
and KMS denies it (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ATTESTED_ACTIONS = ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"]
# Administration without any cryptographic use: a key policy must leave someone able to manage
# the key, and kms:* for an account would let any of its principals decrypt without attestation.
ADMIN_ACTIONS = [
    "kms:CancelKeyDeletion",
    "kms:Create*",
    "kms:Delete*",
    "kms:Describe*",
    "kms:Disable*",
    "kms:Enable*",
    "kms:Get*",
    "kms:List*",
    "kms:Put*",
    "kms:Revoke*",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:Update*",
]
# Used with fullmatch: "$" would also accept a final newline, and a policy naming "…\n" never matches.
PCR_HEX = re.compile(r"[0-9a-fA-F]{96}")
ARN = re.compile(r"arn:aws[a-z-]*:(iam|sts)::(\d{12}):[\w+=,.@/-]+", re.ASCII)
KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[\w-]+", re.ASCII)


class PolicyInputError(ValueError):
    """A PCR, principal or key ARN given to ``sidecar policy`` is malformed."""


def check_pcr(label: str, value: str) -> str:
    if not PCR_HEX.fullmatch(value):
        raise PolicyInputError(
            f"{label} must be 96 hex digits (a SHA-384 measurement), got {len(value)} characters"
        )
    if not value.strip("0"):
        # A debug-mode enclave reports its PCRs as zeros: a key pinned to zeros opens to any image
        # run with --debug-mode, whose console the parent instance can read.
        raise PolicyInputError(f"{label} is all zeros: that is what every debug-mode enclave reports")
    return value.lower()


def key_policy(
    pcr0: str | None,
    pcrs: Mapping[int, str] | None = None,
    principal: str | None = None,
    key_arn: str | None = None,
) -> dict[str, Any]:
    """The policy document. ``pcr0`` pins ImageSha384; each of ``pcrs`` pins its PCRn."""
    conditions: dict[str, str] = {}
    if pcr0 is not None:
        conditions["kms:RecipientAttestation:ImageSha384"] = check_pcr("--pcr0", pcr0)
    for index, value in sorted((pcrs or {}).items()):
        if not 0 <= index <= 31:
            raise PolicyInputError(f"--pcr index must be 0..31, got {index}")
        conditions[f"kms:RecipientAttestation:PCR{index}"] = check_pcr(f"--pcr {index}", value)
    if not conditions:
        raise PolicyInputError("give --pcr0 or at least one --pcr N=HEX: an unpinned key protects nothing")
    if principal is not None and not ARN.fullmatch(principal):
        raise PolicyInputError(f"--principal must be an IAM or STS ARN, got {principal!r}")
    if key_arn is not None and not KEY_ARN.fullmatch(key_arn):
        raise PolicyInputError(f"--key-arn must be a KMS key ARN, got {key_arn!r}")
    resource = key_arn or "*"
    statements: list[dict[str, Any]] = []
    if principal is not None:
        account = ARN.fullmatch(principal).group(2)  # type: ignore[union-attr]
        statements.append(
            {
                "Sid": "AdministerTheKeyWithoutUsingIt",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": ADMIN_ACTIONS,
                "Resource": resource,
            }
        )
    statements.append(
        {
            "Sid": "UseOnlyFromTheAttestedEnclave",
            "Effect": "Allow",
            "Principal": {"AWS": principal or "*"},
            "Action": ATTESTED_ACTIONS,
            "Resource": resource,
            "Condition": {"StringEqualsIgnoreCase": conditions},
        }
    )
    return {"Version": "2012-10-17", "Id": "enclave-sidecar-attested-key", "Statement": statements}
