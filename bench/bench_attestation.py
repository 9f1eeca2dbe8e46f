"""Time to verify one attestation document, against the bare ``cryptography`` calls it needs.

What it measures
    verify      ``verify_document(data, at=<the document's own timestamp>)`` with the bundled AWS
                root (cached after the first call, as in a running sidecar): parsing with every
                field checked, the ES384 signature, the chain with its extension rules, validity,
                the timestamp.
    bare        only what no verifier can skip, on the same bytes: ``cbor2.loads`` of the
                COSE_Sign1 array and of the payload, the Sig_structure and the DER signature,
                ``load_der_x509_certificate`` of the leaf and of the 4 cabundle certificates, and 5
                ECDSA P-384/SHA-384 verifications (the document, then each certificate by its
                issuer's key). No checks, no result object.

    Rounds are interleaved (verify then bare, then bare then verify, ...) so drift on the machine
    hits both alike. Each round times a short batch of calls of each; the report gives the median
    time per call over rounds. The headline ratio is the median of the per-round ratios: each
    round's two batches run within milliseconds of each other, so the pairing cancels the drift
    that makes the medians of this VM wander (the ratio of the medians is printed too). The target
    is verify/bare <= 1.5.

How to run
    .venv/bin/python bench/bench_attestation.py                  # 150 rounds x 10 calls each
    .venv/bin/python bench/bench_attestation.py --rounds 300 --batch 20
    .venv/bin/python bench/bench_attestation.py --vector brave_core_cose_unittest.cbor

The exit code is 0 whether the target is met or not (the last line says PASS or FAIL); it is 1
when the document does not verify, since then the timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import cbor2
from benchlib import git_revision
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sidecar.attestation.document import parse_document
from sidecar.attestation.verify import verify_document

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors" / "attestation"
DEFAULT_VECTOR = "base_nitro-validator_2026-01-03_repaired.cbor"
TARGET = 1.5
ES384 = ec.ECDSA(hashes.SHA384())


def bare(data: bytes) -> None:
    """The cryptography a verifier cannot avoid; raises if the document does not verify."""
    protected, _, payload, signature = cbor2.loads(data)
    body = cbor2.loads(payload)
    leaf = x509.load_der_x509_certificate(body["certificate"])
    bundle = [x509.load_der_x509_certificate(der) for der in body["cabundle"]]
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    der = encode_dss_signature(int.from_bytes(signature[:48]), int.from_bytes(signature[48:]))
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    leaf_key.verify(der, to_be_signed, ES384)
    # leaf <- cabundle[-1] <- ... <- cabundle[0] (the root)
    chain = [leaf, *reversed(bundle)]
    for child, parent in itertools.pairwise(chain):
        key = parent.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(child.signature, child.tbs_certificate_bytes, ES384)


def time_batch(call: Callable[[], object], batch: int) -> float:
    """Seconds per call, over ``batch`` calls with the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(batch):
            call()
        return (time.perf_counter() - start) / batch
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=150, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=10, help="calls of each per round")
    parser.add_argument("--vector", default=DEFAULT_VECTOR, help=f"a file in {VECTORS}")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1")

    path = VECTORS / args.vector
    data = path.read_bytes()
    doc = parse_document(data)
    at = doc.timestamp_datetime
    result = verify_document(data, at=at)
    if not result.ok:
        print(f"error: {path.name} does not verify at {at.isoformat()}: {result.failure}", file=sys.stderr)
        return 1
    bare(data)  # raises if the bare path disagrees

    print(
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  {platform.node()}  {os.cpu_count()} CPUs"
    )
    print(
        f"python {platform.python_version()}  cryptography {version('cryptography')}  "
        f"cbor2 {version('cbor2')}  sidecar source: {git_revision()}"
    )
    print(
        f"document: {path.name} ({len(data)} bytes, {len(doc.cabundle)} cabundle certificates), "
        f"at {at.isoformat()}"
    )
    print(f"checks: {', '.join(c.name for c in result.checks)}")

    def run_verify() -> object:
        return verify_document(data, at=at)

    def run_bare() -> object:
        bare(data)
        return None

    for _ in range(3):  # warm caches (the trusted root, allocator) outside the measurement
        run_verify()
        run_bare()
    timings: dict[str, list[float]] = {"verify": [], "bare": []}
    ratios: list[float] = []
    started = time.perf_counter()
    for number in range(args.rounds):
        order = [("verify", run_verify), ("bare", run_bare)]
        if number % 2:
            order.reverse()
        this_round = {name: time_batch(call, args.batch) for name, call in order}
        for name, seconds in this_round.items():
            timings[name].append(seconds)
        ratios.append(this_round["verify"] / this_round["bare"])
    elapsed = time.perf_counter() - started

    print(f"\n{args.rounds} rounds x {args.batch} calls each, interleaved; time per call (ms)")
    print(f"{'':8} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in timings.items():
        ms = [v * 1e3 for v in values]
        print(f"{name:8} {statistics.median(ms):8.3f} {min(ms):8.3f} {max(ms):8.3f}")
    of_medians = statistics.median(timings["verify"]) / statistics.median(timings["bare"])
    overhead_us = (statistics.median(timings["verify"]) - statistics.median(timings["bare"])) * 1e6
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    ratio = statistics.median(ratios)
    print(f"verify - bare = {overhead_us:.0f} us per document (difference of the medians)")
    print(f"ratio of the medians {of_medians:.2f}")
    print(
        f"per-round ratio: median {ratio:.2f}, quartiles {quartiles[0]:.2f}..{quartiles[2]:.2f}, "
        f"range {min(ratios):.2f}..{max(ratios):.2f}"
    )
    print(f"total wall time {elapsed:.1f}s\n")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"ratio verify/bare = {ratio:.2f} (target <= {TARGET}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
