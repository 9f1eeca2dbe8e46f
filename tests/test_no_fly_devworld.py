"""The no-fly list in the dev world, end to end: seal, upload, start, query, reload, refuse.

Two parts:

- ``prepare_dev_world`` against an in-process dev world: what `make run` seeds (bucket, a key
  pinned to the measured PCR0, the demo list sealed with the CLI's own function).
- ``sidecar dev`` subprocesses, all started at once and shared by the module:
  * ``main``: the list is sealed with ``sidecar no-fly seal`` (run by a tiny test plugin's
    ``prepare_dev_world``, so it happens before start-up, as an operator would) and uploaded;
    then queries, batch, 400s, 429, hot reload, a tampered upload, and the log scan;
  * ``tampered``: the uploaded envelope has one flipped ciphertext byte before start-up;
  * ``other_pcr0``: the list is sealed under a key whose policy pins another enclave's PCR0;
  * ``demo``: the repository's own enclaver.yaml and sidecar.yaml, only the ports and the log level
    changed (what `make run` serves): no_fly_list seeds the demo list itself; Big Bird is denied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from plugins.no_fly_list.devworld import demo_names, prepare_dev_world
from plugins.no_fly_list.envelope import open_envelope, parse_envelope
from plugins.no_fly_list.normalize import normalize
from sidecar.attestation.emulator import DevPki
from sidecar.context import PluginContext, Services
from sidecar.devworld.world import DevWorld
from tests.conftest import ROOT, install_plugin_dist
from tests.devworld_support import (
    OPERATOR,
    DevSidecar,
    attested_kms,
    running_world,
    start,
    stop_all,
    wait_settled,
)

pytestmark = pytest.mark.slow

DEMO = [
    "bigbird", "oscarthegrouch", "bert", "ernie", "cookiemonster", "zoe", "rosita", "grover",
    "countvoncount", "thecount", "prairiedawn", "elmo", "abbycadabby", "julia", "two-headedmonster",
]  # fmt: skip
DENIED = "{} is on the no-fly list and CAN NOT BOARD!\n"
CLEARED = "{} is cleared to fly. Enjoy your flight!\n"


# =========================================================================== prepare_dev_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevWorld, DevPki]]:
    """An in-process dev world whose servers run on a loop in a background thread."""
    with running_world(
        tmp_path_factory.mktemp("pki"), hashlib.sha384(b"nf-ops measured enclave").digest()
    ) as w:
        yield w


def plugin_context(tmp_path: Path, envelope: str, key_id: str) -> PluginContext:
    config = {"envelope": envelope, "key_id": key_id, "reload_interval": 60}
    return PluginContext("no_fly_list", config, None, tmp_path, Services())


def attested_decrypt(world: DevWorld, pki: DevPki, pcr0: bytes, params: dict[str, Any]) -> bytes:
    """KMS Decrypt as an enclave measuring ``pcr0`` does it: IMDS credentials, attested, via the front."""
    return bytes(attested_kms(world, pki, pcr0).decrypt(**params)["Plaintext"])


def test_demo_names_are_the_sesame_street_cast() -> None:
    assert demo_names() == DEMO


def test_seeds_bucket_key_and_demo_envelope_only_the_measured_enclave_opens(
    world: tuple[DevWorld, DevPki], tmp_path: Path
) -> None:
    # Threat: a demo that "works" because its key is open to anyone. The seeded key must be pinned.
    dev, pki = world
    prepare_dev_world(dev, plugin_context(tmp_path, "s3://nf-seed/lists/envelope.json", "alias/nf-seed"))
    s3, kms = dev.admin("s3"), dev.admin("kms")
    env = parse_envelope(s3.get_object(Bucket="nf-seed", Key="lists/envelope.json")["Body"].read())
    key = kms.describe_key(KeyId="alias/nf-seed")["KeyMetadata"]
    assert env.kind == "aead" and env.key_id == key["Arn"]
    policy = kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
    assert dev.pcr0.hex() in policy
    data_key = attested_decrypt(dev, pki, dev.pcr0, env.kms_decrypt_params("alias/nf-seed"))
    assert bytes(open_envelope(env, data_key)).decode().split("\n") == DEMO
    with pytest.raises(ClientError) as err:
        attested_decrypt(
            dev, pki, hashlib.sha384(b"another image").digest(), env.kms_decrypt_params("alias/nf-seed")
        )
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"


def test_an_existing_envelope_and_key_are_left_alone(world: tuple[DevWorld, DevPki], tmp_path: Path) -> None:
    dev, _ = world
    context = plugin_context(tmp_path, "s3://nf-keep/envelope.json", "alias/nf-keep")
    prepare_dev_world(dev, context)
    s3 = dev.admin("s3")
    etag = s3.head_object(Bucket="nf-keep", Key="envelope.json")["ETag"]
    prepare_dev_world(dev, context)  # a second `sidecar dev` start against the same world
    assert s3.head_object(Bucket="nf-keep", Key="envelope.json")["ETag"] == etag
    # An alias that already exists is used as it is (the operator's key, the operator's policy).
    other = dev.create_key("ab" * 48, "alias/nf-operator")
    prepare_dev_world(dev, plugin_context(tmp_path, "s3://nf-keep/other.json", "alias/nf-operator"))
    env = parse_envelope(s3.get_object(Bucket="nf-keep", Key="other.json")["Body"].read())
    assert env.key_id is not None and env.key_id.endswith(other)


def test_local_envelope_is_sealed_when_missing(world: tuple[DevWorld, DevPki], tmp_path: Path) -> None:
    dev, _ = world
    path = tmp_path / "sealed" / "envelope.json"
    prepare_dev_world(dev, plugin_context(tmp_path, str(path), "alias/nf-local"))
    env = parse_envelope(path.read_bytes())
    data_key = dev.admin("kms").decrypt(**env.kms_decrypt_params("alias/nf-local"))["Plaintext"]
    assert bytes(open_envelope(env, data_key)).decode().split("\n") == DEMO
    path.write_bytes(b"operator's own")
    prepare_dev_world(dev, plugin_context(tmp_path, str(path), "alias/nf-local"))
    assert path.read_bytes() == b"operator's own"


def test_seeding_never_logs_the_data_key(
    world: tuple[DevWorld, DevPki], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Threat: `sidecar dev` at log level debug. botocore then logs response bodies, and
    # GenerateDataKey's body holds the plaintext data key: with the envelope, that is the list.
    dev, _ = world
    # The worst case: botocore itself at DEBUG (sidecar.logs.configure clamps it to INFO, but the
    # seeding hook must not rely on who configured logging).
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="botocore"):
        prepare_dev_world(dev, plugin_context(tmp_path, "s3://nf-quiet/envelope.json", "alias/nf-quiet"))
        dev.admin("kms").list_keys()  # botocore's debug logging is back on afterwards
    env = parse_envelope(dev.admin("s3").get_object(Bucket="nf-quiet", Key="envelope.json")["Body"].read())
    data_key = dev.admin("kms").decrypt(**env.kms_decrypt_params("alias/nf-quiet"))["Plaintext"]
    assert base64.b64encode(data_key).decode() not in caplog.text
    assert "Response body" in caplog.text and "ListKeys" in caplog.text
    assert any(
        r.name == "plugins.no_fly_list" and r.getMessage() == "no_fly_demo_sealed" for r in caplog.records
    )


def test_a_missing_key_that_is_not_an_alias_is_an_error(
    world: tuple[DevWorld, DevPki], tmp_path: Path
) -> None:
    dev, _ = world
    missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    with pytest.raises(ValueError, match="does not exist in the dev world; use an alias/NAME"):
        prepare_dev_world(dev, plugin_context(tmp_path, "s3://nf-missing/envelope.json", missing))


# =========================================================================== sidecar dev, end to end

# Test scaffolding installed as a third-party plugin, listed before no_fly_list in sidecar.yaml: its
# prepare_dev_world runs first and does what an operator does before the enclave starts. It makes
# the bucket and a key (pinned to this sidecar's PCR0, or to another enclave's), seals the list with
# the real `sidecar no-fly seal` command and uploads it; in "tampered" mode it then flips one
# ciphertext byte in the stored object. no_fly_list's own prepare_dev_world then finds the object
# and leaves it alone.
SEED_PLUGIN = """
import base64, json, os, subprocess, sys

from sidecar import hookimpl


@hookimpl
def prepare_dev_world(world, context):
    mode, bucket, alias = os.environ["NF_E2E_MODE"], os.environ["NF_E2E_BUCKET"], os.environ["NF_E2E_KEY"]
    world.admin("s3").create_bucket(Bucket=bucket)
    world.create_key("ab" * 48 if mode == "other_pcr0" else world.pcr0.hex(), alias)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="operator", AWS_SECRET_ACCESS_KEY="operator")
    sealed = subprocess.run(
        [sys.executable, "-m", "sidecar", "no-fly", "seal", "--key-id", alias,
         "--in", os.environ["NF_E2E_NAMES"], "--upload", f"s3://{bucket}/envelope.json",
         "--region", world.region, "--endpoint-url", world.moto_url],
        env=env, capture_output=True, text=True, timeout=60,
    )
    with open(os.environ["NF_E2E_CLI_LOG"], "a") as log:
        log.write(sealed.stdout + sealed.stderr)
    if sealed.returncode:
        raise RuntimeError(f"sidecar no-fly seal failed: {sealed.stderr}")
    if mode == "tampered":
        s3 = world.admin("s3")
        document = json.loads(s3.get_object(Bucket=bucket, Key="envelope.json")["Body"].read())
        raw = bytearray(base64.b64decode(document["ciphertext-base64"]))
        raw[len(raw) // 2] ^= 0x01
        document["ciphertext-base64"] = base64.b64encode(bytes(raw)).decode()
        s3.put_object(Bucket=bucket, Key="envelope.json", Body=json.dumps(document).encode())
"""

# The main world's list: the cast, plus entries that exercise Unicode and long, distinctive names.
MAIN_NAMES = [*DEMO, "Zoë Ångström", "Großmann Straße", "Bartholomew Quince"]
# After the hot reload: Big Bird is off the list, Snuffleupagus is on it.
RELOADED_NAMES = [n for n in MAIN_NAMES if n != "bigbird"] + ["Aloysius Snuffleupagus"]
FERNET_NAME = "Count Fernetini"  # only in the list resealed in the original format
RATE = {"per_second": 5, "burst": 40}  # slow refill: a loaded machine still reaches 429


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DevSidecar]]:
    """The four dev sidecars, started together (start-up dominates; they overlap)."""
    site = install_plugin_dist(tmp_path_factory.mktemp("nf-site"), "nfops-e2e", {"nf_e2e_seed": SEED_PLUGIN})
    base_env = {
        **os.environ,
        **OPERATOR,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started: dict[str, DevSidecar] = {}
    try:
        for name in ("main", "tampered", "other_pcr0"):
            directory = tmp_path_factory.mktemp(f"nf-{name}")
            names = directory / "names.txt"
            names.write_text("\n".join(MAIN_NAMES) + "\n", encoding="utf-8")
            bucket, key = f"nf-e2e-{name.replace('_', '-')}", f"alias/nf-e2e-{name}"
            config: dict[str, Any] = {
                "envelope": f"s3://{bucket}/envelope.json",
                "key_id": key,
                "reload_interval": 1,
            }
            if name == "main":
                config["rate_limit"] = RATE
            settings = {
                "log": {"level": "debug", "access": True},
                "startup": {"on_failure": "unready"},
                "plugins": {
                    "nf_e2e_seed": {},
                    "no_fly_list": {"listen_port": "INGRESS", "config": config},
                },
            }
            env = {
                **base_env,
                "NF_E2E_MODE": name,
                "NF_E2E_BUCKET": bucket,
                "NF_E2E_KEY": key,
                "NF_E2E_NAMES": str(names),
                "NF_E2E_CLI_LOG": str(directory / "cli.log"),
            }
            started[name] = start(name, directory, settings, env)
            started[name].bucket, started[name].key = bucket, key
        # The repository's demo configuration, as `make run` uses it; only ports and log level differ.
        demo = yaml.safe_load((ROOT / "sidecar.yaml").read_text())
        demo["plugins"]["no_fly_list"]["listen_port"] = "INGRESS"
        demo["plugins"]["vault_like"]["listen_port"] = "INGRESS2"
        demo["log"]["level"] = "debug"  # for the log scan: the most a log can say
        started["demo"] = start("demo", tmp_path_factory.mktemp("nf-demo"), demo, {**base_env})
        for sidecar in started.values():
            sidecar.ready = wait_settled(sidecar, "no_fly_list")
        yield started
    finally:
        stop_all(list(started.values()))


@pytest.fixture(scope="module")
def main(sidecars: dict[str, DevSidecar]) -> DevSidecar:
    assert sidecars["main"].ready["status"] == 200, sidecars["main"].ready
    return sidecars["main"]


def operator_seal(
    sidecar: DevSidecar, names: list[str], directory: Path, fmt: str = "aead"
) -> subprocess.CompletedProcess[str]:
    """`sidecar no-fly seal ... --upload` against the running world, as an operator re-seals."""
    path = directory / "names-reloaded.txt"
    path.write_text(",".join(names), encoding="utf-8")  # comma-separated this time
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "no-fly", "seal", "--key-id", sidecar.key, "--in", str(path),
         "--upload", f"s3://{sidecar.bucket}/envelope.json", "--region", "us-east-1",
         "--endpoint-url", sidecar.moto_url, "--format", fmt],
        capture_output=True, text=True, timeout=60, env={**os.environ, **OPERATOR}, cwd=directory,
    )  # fmt: skip


DATA_KEYS: list[bytes] = []  # every data key the main world served, for the log scan


def current_data_key(sidecar: DevSidecar, bucket: str, key_id: str) -> bytes:
    """The plaintext data key of the envelope now in the world's bucket (moto directly, as admin)."""
    s3 = boto3.client("s3", endpoint_url=sidecar.moto_url, region_name="us-east-1", **_creds())
    kms = boto3.client("kms", endpoint_url=sidecar.moto_url, region_name="us-east-1", **_creds())
    env = parse_envelope(s3.get_object(Bucket=bucket, Key="envelope.json")["Body"].read())
    return bytes(kms.decrypt(**env.kms_decrypt_params(key_id))["Plaintext"])


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- start-up


def test_demo_config_serves_big_bird_denied(sidecars: dict[str, DevSidecar]) -> None:
    """`make run`: the demo sidecar.yaml seeds the demo list itself and answers at once."""
    demo = sidecars["demo"]
    assert demo.ready["status"] == 200, demo.ready
    reply = demo.passenger("Big Bird")
    assert (reply.status, reply.text) == (200, DENIED.format("Big Bird"))
    assert reply.headers["content-type"].startswith("text/plain")
    assert demo.passenger("foo").text == CLEARED.format("foo")
    seeded = [e for e in demo.events() if e["event"] == "no_fly_demo_sealed"]
    assert len(seeded) == 1 and seeded[0]["count"] == 15


def readme_shell_lines() -> list[str]:
    """The README's shell lines after the two set-up commands: the tour and the plugins' sections."""
    from tests.test_docs import SHELL_LANGUAGES, code_blocks, logical_lines

    found = []
    for language, body, _ in code_blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        if language in SHELL_LANGUAGES and "make run" not in body:
            found += [line for line, _ in logical_lines(body) if line.strip()]
    return found


def test_readme_shell_lines_run_against_the_demo(sidecars: dict[str, DevSidecar]) -> None:
    """Every shell line of the README's tour and plugin sections, run as written against `make run`'s
    configuration (only the ports, the state dir and the venv path differ). A line's trailing comment
    is what it prints: each fragment between `...` must appear in the output, in order."""
    demo = sidecars["demo"]
    manifest = yaml.safe_load((demo.directory / "enclaver.yaml").read_text())
    vault_port = manifest["ingress"][1]["listen_port"]
    api_port = manifest["api"]["listen_port"]
    state = demo.directory / "state"
    lines = readme_shell_lines()
    assert any("8200" in line for line in lines) and any("sidecar trust" in line for line in lines)
    script = ""
    for line in lines:
        command, _, comment = line.partition("  #")
        command = (
            command.replace("localhost:8001", f"localhost:{demo.port}")
            .replace("localhost:8200", f"localhost:{vault_port}")
            .replace("127.0.0.1:8200", f"127.0.0.1:{vault_port}")
            .replace("localhost:9000", f"localhost:{api_port}")
            .replace(".sidecar-state/", f"{state}/")
            .replace(".venv/bin/sidecar", f"{sys.executable} -m sidecar")
        )
        script += command + "\n"
        if command.lstrip().startswith("export"):
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        output = result.stdout
        script = "".join(f"{kept}\n" for kept in script.splitlines() if kept.lstrip().startswith("export"))
        expected = comment.strip() or ("VERIFIED" if "sidecar trust" in command else "")
        at = 0
        for fragment in (f.strip() for f in expected.split("...")):
            found = output.find(fragment.rstrip(","), at)
            assert found >= 0, f"README line {line!r}: {fragment!r} not in {output!r}"
            at = found + len(fragment.rstrip(","))


def test_main_started_from_the_cli_sealed_envelope(main: DevSidecar) -> None:
    cli_output = main.cli_log.read_text()
    assert cli_output.startswith(f"sealed {len(MAIN_NAMES)} names under arn:aws:kms:")
    assert f"uploaded s3://{main.bucket}/envelope.json ETag " in cli_output
    assert not [
        e for e in main.events() if e["event"] == "no_fly_demo_sealed"
    ]  # the CLI's list, not the demo


def test_tampered_envelope_fails_startup_with_a_clear_reason(sidecars: dict[str, DevSidecar]) -> None:
    # Threat: someone with write access to the bucket changing the sealed list.
    tampered = sidecars["tampered"]
    assert tampered.ready["status"] == 503
    reason = tampered.ready["plugins"]["no_fly_list"]
    assert "does not decrypt" in reason and "tampered" in reason, reason
    reply = tampered.passenger("Big Bird")
    assert reply.status == 503  # never an answer from a list that was not loaded
    assert tampered.request("GET", "/enclave/ready").status == 503  # and it stays that way


def test_key_pinned_to_another_pcr0_fails_startup(sidecars: dict[str, DevSidecar]) -> None:
    # Threat: a list sealed for another enclave image; KMS must refuse this one the data key.
    other = sidecars["other_pcr0"]
    assert other.ready["status"] == 503
    reason = other.ready["plugins"]["no_fly_list"]
    assert "AccessDenied" in reason, reason
    assert other.passenger("Big Bird").status == 503


# --------------------------------------------------------------------------- queries


@pytest.mark.parametrize(
    ("name", "denied"),
    [
        ("bigbird", True),
        ("Big Bird", True),  # the original rule: whitespace removed, then lowercased
        (" BIG  bird ", True),
        ("BiG\u00a0BiRd", True),  # a no-break space is whitespace too
        ("Cookie Monster", True),
        ("Two-Headed Monster", True),  # the hyphen is part of the entry
        ("twoheadedmonster", False),
        ("Kermit the Frog", False),
        ("Big Birds", False),
        ("\uff22\uff49\uff47 \uff22\uff49\uff52\uff44", True),  # full-width Big Bird: NFKC
        ("big\u200bbird", True),  # a zero-width space does not hide a name
        ("b\u00adig\u2060bird\ufeff", True),  # soft hyphen, word joiner, BOM
        ("ZOË ÅNGSTRÖM", True),  # case folding beyond ASCII
        ("Zoe\u0308 A\u030angstro\u0308m", True),  # decomposed accents: NFKC composes them
        ("Zoe Angstrom", False),  # accents are kept: a different name
        ("GROSSMANN STRASSE", True),  # casefold: ß is ss
        ("großmannstraße", True),
    ],
)
def test_passenger_answers(main: DevSidecar, name: str, denied: bool) -> None:
    reply = main.passenger(name, source="127.0.0.2")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.text == (DENIED if denied else CLEARED).format(name)  # the name as given


def test_passenger_json(main: DevSidecar) -> None:
    reply = main.passenger("Big Bird", source="127.0.0.3", Accept="application/json")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {"name": "Big Bird", "cleared": False}
    assert main.passenger("Kermit", source="127.0.0.3", Accept="application/json").json() == {
        "name": "Kermit",
        "cleared": True,
    }


def test_batch_answers_in_order(main: DevSidecar) -> None:
    names = ["Kermit", "Big Bird", "\uff25\uff2c\uff2d\uff2f", "Miss Piggy", "oscar the grouch", "julia"]
    reply = main.request("POST", "/enclave/passengers", {"names": names}, source="127.0.0.4")
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert [r["name"] for r in answer["results"]] == names
    assert [r["cleared"] for r in answer["results"]] == [True, False, False, True, False, False]


def test_batch_of_a_full_flight_manifest(main: DevSidecar) -> None:
    names = [f"Passenger {i}" for i in range(999)] + ["Count von Count"]
    reply = main.request("POST", "/enclave/passengers", {"names": names}, source="127.0.0.5")
    assert reply.status == 200, reply.body
    cleared = [r["cleared"] for r in reply.json()["results"]]
    assert cleared == [True] * 999 + [False]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/enclave/passenger", None),  # no name: the original answered 500
        ("GET", "/enclave/passenger?name=", None),
        ("GET", "/enclave/passenger?name=%20%20", None),  # nothing left after normalising
        ("GET", "/enclave/passenger?name=" + "a" * 257, None),
        ("GET", "/enclave/passenger?name=bert&name=ernie", None),  # which one would it be?
        ("GET", "/enclave/passenger?name=bert%0Ais%20cleared", None),  # would forge a verdict line
        ("POST", "/enclave/passengers", b"{not json"),
        ("POST", "/enclave/passengers", {"names": "bert"}),
        ("POST", "/enclave/passengers", {"names": ["bert", 5]}),
        ("POST", "/enclave/passengers", {"names": ["bert", ""]}),
        ("POST", "/enclave/passengers", {"names": ["bert", "a" * 257]}),
        ("POST", "/enclave/passengers", {"names": ["x"] * 1001}),
        ("POST", "/enclave/passengers", {}),
        ("POST", "/enclave/passengers", ["bert"]),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, dict | list) else json.dumps(v)[:40],
)
def test_client_mistakes_are_400_with_a_message(main: DevSidecar, method: str, path: str, body: Any) -> None:
    reply = main.request(method, path, body, source="127.0.0.6")
    assert reply.status == 400, (reply.status, reply.body[:200])
    assert reply.body and b"Traceback" not in reply.body
    assert b"bert" not in reply.body.lower() and b"ernie" not in reply.body.lower()  # no echo of names


def test_rate_limit_answers_429_with_retry_after(main: DevSidecar) -> None:
    # Threat: enumerating the list by brute force (every plausible name, as fast as possible).
    statuses = []
    limited = None
    for i in range(RATE["burst"] * 5):
        reply = main.passenger(f"guess {i}", source="127.0.0.7")
        statuses.append(reply.status)
        if reply.status == 429:
            limited = reply
            break
    assert limited is not None, statuses
    assert statuses.count(200) >= RATE["burst"] - 2  # the burst is honoured first
    assert int(limited.headers["retry-after"]) >= 1
    # Per client: another address is still served at once.
    assert main.passenger("Big Bird", source="127.0.0.8").status == 200


# --------------------------------------------------------------------------- hot reload


def test_hot_reload_serves_a_resealed_list(main: DevSidecar, tmp_path: Path) -> None:
    sealed = operator_seal(main, RELOADED_NAMES, tmp_path)
    assert sealed.returncode == 0, sealed.stderr
    assert "uploaded s3://" in sealed.stdout
    wait_for(
        lambda: main.passenger("Aloysius Snuffleupagus", source="127.0.0.9").text.endswith(
            "CAN NOT BOARD!\n"
        ),
        what="the re-sealed list to be served",
    )
    assert main.passenger("Big Bird", source="127.0.0.9").text == CLEARED.format("Big Bird")
    assert main.passenger("Elmo", source="127.0.0.9").text == DENIED.format("Elmo")
    assert main.request("GET", "/enclave/ready").status == 200
    DATA_KEYS.append(current_data_key(main, main.bucket, main.key))


def test_hot_reload_reads_the_original_format(main: DevSidecar, tmp_path: Path) -> None:
    """The original app's envelope (Fernet, no encryption context) loads through attested KMS too."""
    sealed = operator_seal(main, [*RELOADED_NAMES, FERNET_NAME], tmp_path, fmt="fernet")
    assert sealed.returncode == 0, sealed.stderr
    wait_for(
        lambda: main.passenger(FERNET_NAME, source="127.0.0.11").text.endswith("CAN NOT BOARD!\n"),
        what="the Fernet envelope to be served",
    )
    assert [e for e in main.events() if e["event"] == "no_fly_reloaded"][-1]["kind"] == "fernet"
    assert main.passenger("Aloysius Snuffleupagus", source="127.0.0.11").text.endswith("CAN NOT BOARD!\n")
    assert main.passenger("Big Bird", source="127.0.0.11").text == CLEARED.format("Big Bird")
    DATA_KEYS.append(current_data_key(main, main.bucket, main.key))


def test_a_tampered_reload_keeps_the_old_list_and_says_why(main: DevSidecar) -> None:
    # Threat: a changed object in the bucket; the enclave must neither serve it nor go down.
    probes = ["Aloysius Snuffleupagus", "Big Bird", "Elmo", "Kermit"]
    before_answers = [main.passenger(n, source="127.0.0.10").text for n in probes]
    s3 = boto3.client("s3", endpoint_url=main.moto_url, region_name="us-east-1", **_creds())
    document = json.loads(s3.get_object(Bucket=main.bucket, Key="envelope.json")["Body"].read())
    if "ciphertext-base64" in document:
        raw = bytearray(base64.b64decode(document["ciphertext-base64"]))
        raw[0] ^= 0x80
        document["ciphertext-base64"] = base64.b64encode(bytes(raw)).decode()
    else:  # the list in use is the original (Fernet) format: flip a byte of its AES ciphertext
        raw = bytearray(base64.urlsafe_b64decode(document["aes-ciphertext-base64"]))
        raw[30] ^= 0x80
        document["aes-ciphertext-base64"] = base64.urlsafe_b64encode(bytes(raw)).decode()
    before = len(main.log())
    s3.put_object(Bucket=main.bucket, Key="envelope.json", Body=json.dumps(document).encode())
    wait_for(lambda: "no_fly_reload_failed" in main.log()[before:], what="the failed reload to be logged")
    failed = [e for e in main.events() if e["event"] == "no_fly_reload_failed"]
    assert failed[-1]["level"] == "error"
    assert "does not decrypt: tampered or sealed under another key" in failed[-1]["reason"]
    # The list in use before the bad upload is still the one served, and the sidecar stays ready.
    assert [main.passenger(n, source="127.0.0.10").text for n in probes] == before_answers
    assert main.request("GET", "/enclave/ready").status == 200


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "operator", "aws_secret_access_key": "operator"}


# --------------------------------------------------------------------------- the log


def name_forms(name: str) -> set[str]:
    """How a list entry could show up in a log: as written, lowercased, normalised, URL-encoded."""
    forms = {name, name.lower(), name.casefold(), normalize(name), "".join(name.split()).lower()}
    forms |= {urllib.parse.quote(f) for f in list(forms)} | {urllib.parse.quote_plus(f) for f in list(forms)}
    return {f.lower() for f in forms if f}


def leaked(text: str, form: str) -> bool:
    """Whether ``form`` occurs in ``text`` (lowercased).

    Short forms (under 8 characters) only count outside runs of letters, digits and base64
    characters: the debug log holds kilobytes of base64 (attestation documents, ciphertext), where
    four random letters like "elmo" turn up by chance. A leaked name stands on its own: in quotes,
    after "=", between commas.
    """
    if len(form) >= 8:
        return form in text
    return re.search(rf"(?<![a-z0-9+/=_-]){re.escape(form)}(?![a-z0-9+/=_-])", text) is not None


def test_the_log_scanner_finds_a_planted_name() -> None:
    """The scanner below must catch a leak in the shapes a log would carry it, or it proves nothing."""
    forms = name_forms("Big Bird") | name_forms("Elmo") | name_forms("Zoë Ångström")
    for line in (
        '{"event": "checked", "name": "Big Bird"}',
        '{"event": "checked", "normalized": "bigbird"}',
        '{"path": "/enclave/passenger?name=Big%20Bird"}',
        '{"path": "/enclave/passenger?name=Big+Bird"}',
        '{"name": "ELMO"}',
        "denied elmo,",
        '{"name": "zoë ångström"}',
        '{"name": "Zo%C3%AB%20%C3%85ngstr%C3%B6m"}',
    ):
        assert any(leaked(line.lower(), f) for f in forms), line
    # Four letters inside base64 are chance, not a leak.
    assert not any(leaked("aGVsbG8gelmoQmFzZTY0IGJsb2I=", f) for f in name_forms("Elmo"))


def test_the_rendered_log_of_a_full_run_holds_no_list_entry(
    sidecars: dict[str, DevSidecar], main: DevSidecar
) -> None:
    """Every name on either list, in every form, and every data key are absent from every log.

    Run last: the main sidecar has seen start-up, queries, batches, 400s, 429s, two reloads (one
    failed) and now a shutdown; its log level is debug and its access log is on.
    """
    data_keys = [*DATA_KEYS, current_data_key(sidecars["demo"], "no-fly-list", "alias/no-fly-list")]
    for name in ("tampered", "other_pcr0"):
        data_keys.append(current_data_key(sidecars[name], sidecars[name].bucket, sidecars[name].key))
    main.proc.terminate()
    assert main.proc.wait(timeout=30) == 0
    queried = ["Big Bird", " BIG  bird ", "Aloysius Snuffleupagus", "Zoe\u0308 A\u030angstro\u0308m"]
    everyone = [*MAIN_NAMES, *RELOADED_NAMES, FERNET_NAME, *queried]
    forms = set().union(*(name_forms(n) for n in everyone))
    for sidecar in sidecars.values():
        text = sidecar.log()
        # The log is JSON lines; look at the decoded text too, so \\u escapes hide nothing.
        decoded = "\n".join(json.dumps(e, ensure_ascii=False) for e in sidecar.events())
        cli = sidecar.cli_log.read_text() if sidecar.cli_log.exists() else ""
        corpus = (text + "\n" + decoded + "\n" + cli).lower()
        found = sorted(f for f in forms if leaked(corpus, f))
        assert not found, f"{sidecar.name}: list entries in the log: {found}"
        for data_key in data_keys:  # nor any data key that would open the envelope
            assert base64.b64encode(data_key).decode().lower() not in corpus
            assert data_key.hex() not in corpus
    assert len(main.log()) > 10_000  # a debug log with real content was searched
