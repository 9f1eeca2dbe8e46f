"""no_fly_list at scale: load time and RSS of the sealed list, and requests/s of /enclave/passenger.

Subcommands: ``load``, ``http`` and ``breakdown``; ``all`` (the default) runs the three.

load: a sealed list of 100k, 1M and 5M names, loaded in a fresh process per measurement
    Names are synthetic and deterministic: "First Last" / "First Middle Last" / "First Last-Last"
    display forms whose normalised form (no whitespace, casefolded) is 12 to 20 characters; about
    4% use non-ASCII letters (accented Latin, Cyrillic, Greek), only ones both the original's rule
    and ours normalise alike. The payload is the original's format: normalised names,
    comma-separated, one trailing newline. Smaller lists are prefixes of the 5M one. Each list is
    sealed once in this process with a random 32-byte data key (no KMS: the KMS hop is not part of
    "load time"):

    ours         our AEAD envelope (``seal_envelope``)      -> ``NameIndex.from_payload``
    ours-fernet  the original's Fernet envelope (``seal_fernet_envelope``) -> ``NameIndex.from_payload``
    set          the original app's own steps on its Fernet envelope: ``json.loads``, Fernet decrypt,
                 ``set(payload.decode().rstrip("\\n").split(","))``: the plain set of names it kept

    Each measurement is its own ``python bench/bench_passenger.py _load-child ...`` process: it
    imports everything first, reads VmRSS, reads the envelope file (not timed: that is the fetch),
    then times parsing + decryption + building the index (the "load time"; the three are also shown
    apart), drops everything but the index, runs ``gc.collect()`` and reads VmRSS again.
    "retained" is that difference (what the list costs for as long as the sidecar runs, malloc's
    free lists included); "peak" is VmHWM minus the first VmRSS (envelope, plaintext and index at
    once: what the enclave's memory must allow at start-up). The child then checks 200 verdicts
    (100 listed, 100 unlisted display names) and the index's length, so a broken index cannot post a
    good number. Rounds are interleaved (each round runs every size and variant once, variants in a
    rotated order); the report gives medians. Children are not pinned (``--pin`` pins them).

    Targets: a 1M-name list loads (``ours``) in under 3 s; under 120 bytes of RSS per name
    (``ours``, retained, worst size).

http: requests/s and p99 of ``GET /enclave/passenger?name=...``
    Each server its own process, loaded one at a time with ``wrk -t1 -c50 --latency`` and a Lua
    script that cycles through a fixed mix of 256 query URLs (plus ``Big Bird``): half listed and
    half unlisted names, display forms with spaces and capitals (so normalisation does work), ~10%
    non-ASCII (percent-encoded UTF-8). Every server holds the same list (``--http-names``, default
    1M plus the Sesame Street cast) and, before any load, must give the expected text for every
    URL of the mix; a run with any non-2xx answer under load (except ours-429) stops with an error.

    bare         a bare aiohttp handler: the original's normalisation ("".join(name.split()).lower()),
                 a frozenset lookup, the same response text, ``access_log=None``: the limit for this
                 stack
    bare+plugin  a bare aiohttp app routing straight to the plugin's ``handle_passenger`` (rate limit
                 off, no per-route wrapper, no request id, no access log): tells the plugin's own
                 cost apart from the sidecar runtime's
    flask        the original design: a Flask app (``python -m flask run``: the Flask dev server,
                 threaded by default, its request log to a file) with plain set membership
    ours         ``sidecar dev`` with no_fly_list, ``log.access: true`` (as shipped), rate limit off
                 (``rate_limit: {enabled: false}``), ``reload_interval: 0``: the whole real path
                 (listener, per-route wrapper, plugin handler, access log) with the list fetched from
                 S3 and its data key decrypted by attested KMS at start-up. `sidecar dev` starts a
                 fresh moto, so the list is sealed inside it before start-up by a throwaway
                 third-party plugin (``bench_no_fly_seed``, installed in a temporary site dir, listed
                 before no_fly_list) whose only hook is ``prepare_dev_world``: it makes the bucket
                 and a key pinned to the measured PCR0 and runs the plugin's ``seal_names`` (what
                 ``sidecar no-fly seal`` runs), as the NF e2e test does. It does nothing per request.
                 (An earlier version swapped the list in by hot reload; its ETag poll every 10 s
                 added ~10k instructions per request under valgrind, so reload is off here.) moto,
                 the KMS front and IMDS share the process and sit idle under load.
    ours-nolog   the same with ``log.access: false``
    ours-429     the same as ``ours`` with the plugin's DEFAULT rate limit: wrk is one client, so
                 after the burst nearly every answer is a 429; shows what a refused request costs.
                 Not part of the ratios.

    With ``--pin`` (the default with taskset and 2+ CPUs) servers run on the last CPU and wrk on the
    first. Rounds are interleaved as in bench_server.py, a round in which other processes took more
    than NOISY of a core is rerun (at most ``--retries`` times) and kept rounds that were noisy are
    marked ``*``. Reported per server: median requests/s, p99, the server process's CPU time per
    request (steadier than requests/s on a shared VM) and its kernel share ("of it sys": on loopback
    that includes waking wrk, which on a VM costs a slower server more per request), and CPU busy.

    ``--profile``: afterwards one more run per server under ``py-spy record --nonblocking``, and a
    table of CPU us per request by function (inclusive).
    ``--instructions N``: instead of wrk, each server (not flask, not ours-429) under valgrind's
    callgrind; after a warm-up the user-space instructions of exactly N requests (8 keep-alive
    connections cycling through the mix) are counted. Repeatable to ~0.5%: shows what wrk's noise
    hides on a shared VM. Under valgrind time-driven work (the access log's 0.25 s flush) happens
    per fewer requests, so the access log's share is somewhat overstated.

    Targets: ours >= 0.85x bare; ours >= 5x flask (requests/s, median over median).

breakdown: the pieces of the handler timed in this process (no server), on aiohttp's mocked
    requests: bare's handler, the plugin's, inside the sidecar's wrap_handler, the 429 path, and
    query parsing, validation, normalisation, membership and response construction alone.

How to run
    .venv/bin/python bench/bench_passenger.py                       # load, http, breakdown
    .venv/bin/python bench/bench_passenger.py load --sizes 100k,1M,5M --load-rounds 3
    .venv/bin/python bench/bench_passenger.py http --rounds 7 --duration 4 --profile
    .venv/bin/python bench/bench_passenger.py http --servers bare,flask  # baselines only
    .venv/bin/python bench/bench_passenger.py http --instructions 4000 --http-names 20000 \\
        --servers bare,bare+plugin,ours-nolog,ours                  # needs valgrind

Needs wrk (``apt-get install -y wrk``), Flask (in the dev extra, through moto[server]); py-spy for
``--profile`` and valgrind for ``--instructions``. The exit code is 0 whether the targets are met
or not (this is a report; the last lines say PASS or FAIL); it is 1 only when something cannot run
(a server does not start, a verdict is wrong, wrk fails).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    CONNECTIONS,
    HOST,
    NOISY,
    ROOT,
    Measurement,
    check_alive,
    children_cpu_seconds,
    free_ports,
    git_revision,
    interleaved_rounds,
    machine_cpu_seconds,
    machine_line,
    median,
    pin_cpus,
    print_noise,
    round_ratios,
    run_wrk,
    spawn,
    stop_process,
    tail_file,
)
from benchlib import measure as measure_load

PASSENGER = "/enclave/passenger"
READY = "/enclave/ready"
START_TIMEOUT = 120.0  # seconds for a server to answer (ours loads the list first)
STOP_TIMEOUT = 10.0

LOAD_SECONDS_TARGET = 3.0  # a 1M-name list loads in under 3 s
BYTES_PER_NAME_TARGET = 120.0
BARE_RATIO_TARGET = 0.85
FLASK_RATIO_TARGET = 5.0

SEED = 20261128
SIZES = {"100k": 100_000, "1M": 1_000_000, "5M": 5_000_000}
LOAD_VARIANTS = ("ours", "ours-fernet", "set")
HTTP_SERVERS = ("bare", "bare+plugin", "flask", "ours", "ours-nolog", "ours-429")
MIX_SIZE = 256
PROBES = 100  # listed and unlisted names each, checked by every load child
# ours: where `sidecar dev` finds the list; the bench's seed plugin puts it there before start-up.
OURS_BUCKET = "bench-no-fly"
OURS_ENVELOPE = f"s3://{OURS_BUCKET}/list.json"
OURS_KEY_ID = "alias/bench-no-fly"
SEED_PLUGIN_NAME = "bench_no_fly_seed"
PLACEHOLDER_KEY_CIPHERTEXT = b"bench: not a KMS ciphertext".ljust(184, b".")

SESAME = [
    *("bigbird", "oscarthegrouch", "bert", "ernie", "cookiemonster", "zoe", "rosita", "grover"),
    *("countvoncount", "thecount", "prairiedawn", "elmo", "abbycadabby", "julia", "two-headedmonster"),
]

CLEARED = "{name} is cleared to fly. Enjoy your flight!\n"
DENIED = "{name} is on the no-fly list and CAN NOT BOARD!\n"

BIN = Path(sys.executable).parent
PYTHON = sys.executable

# ---------------------------------------------------------------------------- names


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "james mary robert patricia john jennifer michael linda david elizabeth william barbara richard "
    "susan joseph jessica thomas sarah charles karen christopher lisa daniel nancy matthew betty "
    "anthony margaret mark sandra donald ashley steven kimberly paul emily andrew donna joshua "
    "michelle kenneth carol kevin amanda brian melissa george deborah timothy stephanie ronald "
    "rebecca edward sharon jason laura jeffrey cynthia ryan kathleen jacob amy gary angela nicholas "
    "shirley eric anna jonathan brenda stephen pamela larry emma justin nicole scott helen brandon "
    "samantha benjamin katherine samuel christine gregory debra alexander rachel frank carolyn "
    "patrick janet raymond catherine jack maria dennis heather jerry diane tyler ruth aaron julie "
    "jose olivia adam joyce henry virginia nathan victoria douglas kelly zachary lauren peter "
    "christina kyle joan ahmed fatima mohammed aisha wei li hiroshi yuki priya arjun olga ivan "
    "lucia mateo sofia diego camila pierre amelie hans greta lars ingrid kofi amara chen mei"
)
LAST = _words(
    "smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez "
    "gonzalez wilson anderson thomas taylor moore jackson martin lee perez thompson white harris "
    "sanchez clark ramirez lewis robinson walker young allen king wright scott torres nguyen hill "
    "flores green adams nelson baker hall rivera campbell mitchell carter roberts gomez phillips "
    "evans turner diaz parker cruz edwards collins reyes stewart morris morales murphy cook rogers "
    "gutierrez ortiz morgan cooper peterson bailey reed kelly howard ramos kim cox ward richardson "
    "watson brooks chavez wood james bennett gray mendoza ruiz hughes price alvarez castillo "
    "sanders patel myers long ross foster jimenez okafor mensah tanaka suzuki watanabe yamamoto "
    "kowalski novak schmidt schneider fischer weber meyer wagner becker hoffmann rossi russo "
    "ferrari esposito bianchi romano dubois moreau laurent lefebvre silva santos oliveira souza "
    "ivanov smirnov kuznetsov popov wang zhang liu chen yang huang zhao wu zhou xu sun ma"
)
SYLLABLES = _words(
    "an ba be bo ca ce da de di do el en er fa fe ga go ha he in ka ke ko la le li lo ma me mi mo "
    "na ne ni no or pa pe ra re ri ro sa se si so ta te ti to va ve vi wa ya yo za ze"
)
# Non-ASCII names, already NFC and stable under NFKC+casefold (so every normaliser agrees on them).
FIRST_UNICODE = _words("józef zoë łukasz søren björn ångström çağrı renée andré maría ανδρέας иван ольга")  # noqa: RUF001
LAST_UNICODE = _words(
    "müller núñez dvořák çelik şahin nguyễn kovač wójcik jørgensen håkansson gómez pérez "
    "παπαδόπουλος петров смирнова кузнецов"
)


def normalize_original(name: str) -> str:
    """The original app's rule: remove all whitespace, then lowercase."""
    return "".join(name.split()).lower()


def normalize_full(name: str) -> str:
    """The spec's rule (NFKC, casefold, NFKC; no whitespace or format characters), for filtering only."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Cf")


def _surname(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(LAST)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _display_name(rng: random.Random) -> str:
    unicode_name = rng.random() < 0.08
    first = rng.choice(FIRST_UNICODE if unicode_name and rng.random() < 0.5 else FIRST)
    last = rng.choice(LAST_UNICODE) if unicode_name else _surname(rng)
    shape = rng.random()
    if shape < 0.55:
        parts = [first, last]
    elif shape < 0.8:
        parts = [first, rng.choice(FIRST), last]
    else:
        parts = [first, f"{last}-{_surname(rng)}"]
    # Display forms as a clerk types them: capitalised words, single spaces.
    return " ".join(p[:1].upper() + p[1:] for p in parts)


def generate_names(count: int, seed: int = SEED, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct display names, deterministic for ``seed``; normalised length 12..20.

    ``exclude``: normalised names that must not appear (to draw names that are certainly unlisted).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    names: list[str] = []
    while len(names) < count:
        display = _display_name(rng)
        key = normalize_original(display)
        # Only names both rules normalise alike (not e.g. Greek final sigma, which casefold changes):
        # the baselines use the original's rule, ours the full one, and they must agree on verdicts.
        if (
            12 <= len(key) <= 20
            and key not in seen
            and key not in exclude
            and (key.isascii() or key == normalize_full(display))
        ):
            seen.add(key)
            names.append(display)
    return names


def payload_of(names: Sequence[str]) -> bytes:
    """The original's plaintext: normalised names, comma-separated, a trailing newline."""
    return (",".join(normalize_original(n) for n in names) + "\n").encode()


# ---------------------------------------------------------------------------- process helpers


def vm_status(field_name: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def versions(*dists: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in dists:
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} ?")
    return "  ".join(out)


def source_revision() -> str:
    """git_revision() (sidecar/) plus whether plugins/no_fly_list has uncommitted changes."""
    rev = git_revision()
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "plugins/no_fly_list"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return rev
    return f"{rev}  plugins/no_fly_list: {'uncommitted changes' if dirty else 'clean'}"


# ---------------------------------------------------------------------------- load: child


def _load_child(argv: list[str]) -> int:
    """``_load-child VARIANT ENVELOPE KEYFILE PROBES EXPECT``: one measurement; prints one JSON line."""
    variant, envelope_path, key_path, probes_path, expect_text = argv
    expect = int(expect_text)
    # Everything any variant uses is imported before the first reading, so all variants start equal.
    import base64
    import ctypes

    from cryptography.fernet import Fernet

    from plugins.no_fly_list.envelope import open_envelope, parse_envelope
    from plugins.no_fly_list.index import NameIndex
    from plugins.no_fly_list.normalize import normalize

    data_key = Path(key_path).read_bytes()
    probes = json.loads(Path(probes_path).read_text(encoding="utf-8"))
    gc.collect()
    rss_before = vm_status("VmRSS")
    peak_reset = reset_peak_rss()
    data = Path(envelope_path).read_bytes()  # the fetch: not timed
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    envelope: Any
    payload: Any
    index: Any
    if variant == "set":
        # The original app's own steps: JSON, Fernet, decode, split on commas, a set of str.
        envelope = json.loads(data)
        t1 = time.perf_counter()
        payload = Fernet(base64.urlsafe_b64encode(data_key)).decrypt(envelope["aes-ciphertext-base64"])
        t2 = time.perf_counter()
        index = set(payload.decode().rstrip("\n").split(","))
    else:
        envelope = parse_envelope(data)
        t1 = time.perf_counter()
        payload = open_envelope(envelope, data_key)
        t2 = time.perf_counter()
        index = NameIndex.from_payload(payload)
    t3 = time.perf_counter()
    cpu = time.process_time() - cpu0
    del data, envelope, payload
    gc.collect()
    rss_after = vm_status("VmRSS")
    peak = vm_status("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Diagnostic: what glibc keeps in free lists (returned by malloc_trim) versus live objects.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss_trimmed = vm_status("VmRSS")
    except (OSError, AttributeError):
        rss_trimmed = rss_after

    # Verdicts: the index must be right, or its numbers mean nothing.
    lookup: Callable[[str], bool]
    if variant == "set":
        lookup = lambda name: normalize_original(name) in index  # noqa: E731
    else:
        lookup = lambda name: normalize(name) in index  # noqa: E731
    wrong = [n for n in probes["listed"] if not lookup(n)] + [n for n in probes["unlisted"] if lookup(n)]
    t4 = time.perf_counter()
    for _ in range(10):
        for n in probes["listed"]:
            lookup(n)
        for n in probes["unlisted"]:
            lookup(n)
    lookup_us = (time.perf_counter() - t4) * 1e6 / (10 * (len(probes["listed"]) + len(probes["unlisted"])))
    result = {
        "variant": variant,
        "names": len(index),
        "expect": expect,
        "wrong_verdicts": len(wrong),
        "parse_s": t1 - t0,
        "open_s": t2 - t1,
        "index_s": t3 - t2,
        "load_s": t3 - t0,
        "cpu_s": cpu,
        "rss_before": rss_before,
        "retained": rss_after - rss_before,
        "trimmed": rss_trimmed - rss_before,
        "peak": peak - rss_before,
        "peak_reset": peak_reset,
        "lookup_us": lookup_us,
    }
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------- load: parent


@dataclass
class LoadRun:
    size: str
    variant: str
    results: list[dict[str, Any]] = field(default_factory=list)
    other: list[float] = field(default_factory=list)  # cores used by other processes during the run

    def med(self, key: str) -> float:
        return median([float(r[key]) for r in self.results])


def parse_sizes(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        label = part.strip()
        match = re.fullmatch(r"(\d+)([kKmM]?)", label)
        if match is None:
            raise argparse.ArgumentTypeError(f"bad size {label!r}: use e.g. 100k, 1M, 5M or 250000")
        count = int(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()]
        if count < PROBES:
            raise argparse.ArgumentTypeError(f"size {label!r} is below {PROBES} names")
        out.append((label, count))
    return out


def seal_lists(
    tmp: Path, sizes: list[tuple[str, int]], variants: Sequence[str]
) -> tuple[Path, dict[tuple[str, str], Path], dict[str, Path]]:
    """Generate the names once, seal every size in the formats the variants need; key and probe files."""
    from plugins.no_fly_list.envelope import seal_envelope, seal_fernet_envelope

    largest = max(n for _, n in sizes)
    t0 = time.perf_counter()
    names = generate_names(largest)
    listed_keys = frozenset(normalize_original(n) for n in names)
    unlisted = generate_names(PROBES, seed=SEED + 1, exclude=listed_keys)
    del listed_keys
    non_ascii = sum(1 for n in names if not n.isascii())
    lengths = [len(normalize_original(n)) for n in names[:100_000]]
    print(
        f"generated {largest:,} names in {time.perf_counter() - t0:.1f}s: "
        f"{non_ascii / largest:.1%} non-ASCII, "
        f"normalised length {min(lengths)}..{max(lengths)} (mean {statistics.fmean(lengths):.1f})",
        flush=True,
    )
    data_key = os.urandom(32)
    key_path = tmp / "data-key"
    key_path.write_bytes(data_key)
    envelopes: dict[tuple[str, str], Path] = {}
    probes: dict[str, Path] = {}
    rng = random.Random(SEED + 2)
    for label, count in sizes:
        payload = payload_of(names[:count])
        probe_path = tmp / f"probes-{label}.json"
        probe_path.write_text(
            json.dumps({"listed": rng.sample(names[:count], PROBES), "unlisted": unlisted}), encoding="utf-8"
        )
        probes[label] = probe_path
        formats = {"aead" if v == "ours" else "fernet" for v in variants}
        for fmt in sorted(formats):
            t0 = time.perf_counter()
            # No KMS: the data-key "ciphertext" is a placeholder of a KMS blob's usual size (184
            # bytes); the children read the data key itself.
            if fmt == "aead":
                sealed = seal_envelope(payload, data_key, PLACEHOLDER_KEY_CIPHERTEXT, "alias/bench")
            else:
                sealed = seal_fernet_envelope(payload, data_key, PLACEHOLDER_KEY_CIPHERTEXT)
            path = tmp / f"envelope-{label}-{fmt}.json"
            path.write_bytes(sealed)
            for v in variants:
                if ("aead" if v == "ours" else "fernet") == fmt:
                    envelopes[(label, v)] = path
            print(
                f"  sealed {label:>5} ({count:,} names, payload {len(payload) / 1e6:.1f} MB) as {fmt}: "
                f"envelope {len(sealed) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
    return key_path, envelopes, probes


def run_load_child(
    variant: str, envelope: Path, key_path: Path, probe_path: Path, expect: int, prefix: list[str]
) -> tuple[dict[str, Any], float | None]:
    """One fresh process; its result and the cores other processes used meanwhile."""
    argv = [
        *prefix,
        PYTHON,
        str(Path(__file__).resolve()),
        "_load-child",
        variant,
        str(envelope),
        str(key_path),
        str(probe_path),
        str(expect),
    ]
    machine0, children0, wall0 = machine_cpu_seconds(), children_cpu_seconds(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
    machine1, children1, wall1 = machine_cpu_seconds(), children_cpu_seconds(), time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"load child {variant} exited {done.returncode}:\n{done.stderr.strip()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["wrong_verdicts"] or result["names"] != expect:
        raise RuntimeError(
            f"{variant} on {envelope.name}: {result['wrong_verdicts']} wrong verdicts of {2 * PROBES}, "
            f"{result['names']} names where {expect} were sealed"
        )
    other = None
    if machine0 is not None and machine1 is not None:
        other = max(0.0, (machine1 - machine0) - (children1 - children0)) / max(wall1 - wall0, 1e-9)
    return result, other


def run_load(args: argparse.Namespace) -> int:
    sizes: list[tuple[str, int]] = args.sizes
    variants: list[str] = args.variants
    # Not pinned unless asked: one single-threaded child gains nothing from it, and other benches
    # pin their servers to the last CPU too.
    pins = pin_cpus() if args.pin else None
    prefix = pins[0] if pins else []
    print()
    print(f"== load: {', '.join(label for label, _ in sizes)} names; variants {', '.join(variants)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-passenger-load-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            key_path, envelopes, probes = seal_lists(tmp, sizes, variants)
        except ImportError as exc:
            print(f"error: the plugin's envelope/index modules are not importable: {exc}", file=sys.stderr)
            return 1
        gc.collect()
        runs = {(label, v): LoadRun(label, v) for label, _ in sizes for v in variants}
        if prefix:
            print(f"children pinned: `{' '.join(prefix)}`")
        try:
            for r in range(args.rounds):
                for i, (label, count) in enumerate(sizes):
                    shift = (r + i) % len(variants)
                    order = variants[shift:] + variants[:shift]
                    cells = []
                    for v in order:
                        res, other = run_load_child(
                            v, envelopes[(label, v)], key_path, probes[label], count, prefix
                        )
                        run = runs[(label, v)]
                        run.results.append(res)
                        if other is not None:
                            run.other.append(other)
                        noisy = "*" if other is not None and other > NOISY else ""
                        cells.append(f"{v} {res['load_s']:.2f}s {res['retained'] / count:.0f}B/name{noisy}")
                    print(f"  round {r + 1}/{args.rounds} {label:>5}: {', '.join(cells)}", flush=True)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    report_load(runs, sizes, variants, args.rounds, time.monotonic() - started)
    return 0


def report_load(
    runs: dict[tuple[str, str], LoadRun],
    sizes: list[tuple[str, int]],
    variants: list[str],
    rounds: int,
    elapsed: float,
) -> None:
    print()
    print(f"load time and RSS, {rounds} fresh processes per cell; medians")
    header = (
        f"{'names':>6} {'variant':<12} {'load s':>7} {'parse':>6} {'open':>6} {'index':>6} {'CPU s':>6} "
        f"{'retained MB':>11} {'B/name':>7} {'trimmed':>7} {'peak MB':>8} {'peak B/name':>11} "
        f"{'lookup us':>9}"
    )
    print(header)
    print("-" * len(header))
    for label, count in sizes:
        for v in variants:
            run = runs[(label, v)]
            print(
                f"{label:>6} {v:<12} {run.med('load_s'):>7.2f} {run.med('parse_s'):>6.2f} "
                f"{run.med('open_s'):>6.2f} {run.med('index_s'):>6.2f} {run.med('cpu_s'):>6.2f} "
                f"{run.med('retained') / 1e6:>11.1f} {run.med('retained') / count:>7.1f} "
                f"{run.med('trimmed') / count:>7.1f} {run.med('peak') / 1e6:>8.1f} "
                f"{run.med('peak') / count:>11.1f} {run.med('lookup_us'):>9.2f}"
            )
    print("(load = parse + decrypt + building the index (set: json.loads + Fernet.decrypt + set(split));")
    print(" the file read and KMS are not in it. CPU s: the child's CPU time for the load.")
    print(" retained = VmRSS after the load and gc.collect() minus before, per name in B/name; trimmed = the")
    print(" same after malloc_trim(0), i.e. without what glibc kept in its free lists (diagnostic only);")
    print(" peak = VmHWM minus VmRSS before (the envelope file's bytes are in it);")
    print(" lookup = normalise + membership of one probe name, in the child, after the load)")
    other = [o for run in runs.values() for o in run.other]
    if other:
        noisy = sum(1 for o in other if o > NOISY)
        print(
            f"other processes on the machine used {median(other):.2f} cores (median), {max(other):.2f} (max) "
            f"during the children; {noisy} of {len(other)} children above {NOISY} (marked * above)"
        )
    print(f"total wall time {elapsed:.0f}s")
    print()
    if "set" in variants and "ours" in variants:
        print("ours against the original's plain set (medians, same run):")
        for label, _ in sizes:
            ours, base = runs[(label, "ours")], runs[(label, "set")]
            print(
                f"  {label:>5}: load time {ours.med('load_s') / base.med('load_s'):.2f}x, "
                f"retained RSS {ours.med('retained') / base.med('retained'):.2f}x"
            )
        print()
    one_m = next((label for label, count in sizes if count == 1_000_000), None)
    if "ours" in variants and one_m is not None:
        t, cpu = runs[(one_m, "ours")].med("load_s"), runs[(one_m, "ours")].med("cpu_s")
        print(
            f"1M-name list loads in {t:.3f} s, CPU {cpu:.3f} s (target < {LOAD_SECONDS_TARGET:g} s): "
            f"{'PASS' if t < LOAD_SECONDS_TARGET else 'FAIL'}"
        )
    if "ours" in variants:
        worst = max(runs[(label, "ours")].med("retained") / count for label, count in sizes)
        print(
            f"retained RSS per name, worst size: {worst:.1f} bytes (target < {BYTES_PER_NAME_TARGET:g}): "
            f"{'PASS' if worst < BYTES_PER_NAME_TARGET else 'FAIL'}"
        )


# ---------------------------------------------------------------------------- http: servers

BARE_APP = textwrap.dedent(
    """
    import sys
    from aiohttp import web

    with open(sys.argv[1], encoding="utf-8") as f:
        NO_FLY = frozenset(f.read().rstrip("\\n").split(","))

    async def passenger(request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            return web.Response(status=400, text="missing name\\n")
        if "".join(name.split()).lower() in NO_FLY:
            return web.Response(text=f"{name} is on the no-fly list and CAN NOT BOARD!\\n")
        return web.Response(text=f"{name} is cleared to fly. Enjoy your flight!\\n")

    app = web.Application()
    app.router.add_get("/enclave/passenger", passenger)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
    """
)

# The plugin's own handler with nothing of the sidecar around it: no per-route wrapper, no request
# id, no access log. Tells the plugin's cost apart from the sidecar runtime's.
PLUGIN_BARE_APP = textwrap.dedent(
    """
    import sys, tempfile
    from pathlib import Path
    from aiohttp import web
    from plugins.no_fly_list.index import NameIndex
    from plugins.no_fly_list.service import NoFlyService
    from sidecar.context import PluginContext, Services

    config = {
        "envelope": "unused", "key_id": "unused", "reload_interval": 0, "max_batch": 1000,
        "metrics_interval": 0,
        "rate_limit": {"enabled": False, "per_second": 20.0, "burst": 40, "max_clients": 10000},
    }
    context = PluginContext("no_fly_list", config, None, Path(tempfile.gettempdir()), Services())
    service = NoFlyService(context)
    with open(sys.argv[1], "rb") as f:
        service.index = NameIndex.from_payload(bytearray(f.read()))
    app = web.Application()
    app.router.add_get("/enclave/passenger", service.handle_passenger)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
    """
)

# The original design: Flask, a set of names, the original's normalisation (and its 500 on a
# missing name). `python -m flask run` is the Flask dev server, threaded by default.
FLASK_APP = textwrap.dedent(
    """
    import os

    from flask import Flask, request

    app = Flask(__name__)

    with open(os.environ["BENCH_NAMES"], encoding="utf-8") as f:
        NO_FLY = set(f.read().rstrip("\\n").split(","))


    @app.route("/enclave/passenger")
    def passenger():
        name = request.args.get("name")
        if "".join(name.split()).lower() in NO_FLY:
            return f"{name} is on the no-fly list and CAN NOT BOARD!\\n"
        return f"{name} is cleared to fly. Enjoy your flight!\\n"
    """
)


@dataclass
class Server:
    name: str
    description: str
    port: int
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    ready_path: str = PASSENGER + "?name=probe"
    expects_429: bool = False
    proc: subprocess.Popen[bytes] | None = None
    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)  # of cpu_us, the kernel's share
    busy: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    non2xx: list[float] = field(default_factory=list)  # share of answers that were not 2xx
    errors: list[str] = field(default_factory=list)

    def url(self, path: str = PASSENGER) -> str:
        return f"http://{HOST}:{self.port}{path}"


def query_mix(names: Sequence[str], count: int = MIX_SIZE) -> list[tuple[str, bool]]:
    """(display name, listed?) pairs: half listed, half not, ~10% non-ASCII, spaces and capitals."""
    rng = random.Random(SEED + 3)
    listed_keys = frozenset(normalize_original(n) for n in names)
    unlisted = generate_names(count, seed=SEED + 4, exclude=listed_keys)
    pool_ascii = [n for n in names[:200_000] if n.isascii()]
    pool_unicode = [n for n in names[:200_000] if not n.isascii()]
    mix: list[tuple[str, bool]] = []
    for i in range(count):
        listed = i % 2 == 0
        if listed:
            want_unicode = rng.random() < 0.10 and pool_unicode
            name = rng.choice(pool_unicode if want_unicode else pool_ascii)
        else:
            name = unlisted[i]
        variant = rng.random()
        if variant < 0.2:
            name = name.upper() if name.isascii() else name
        elif variant < 0.3:
            name = "  " + name.replace(" ", "   ") + " "
        mix.append((name, listed))
    mix.append(("Big Bird", True))  # the demo's line
    return mix


def expected_text(name: str, listed: bool) -> str:
    return (DENIED if listed else CLEARED).format(name=name)


def write_wrk_script(path: Path, mix: list[tuple[str, bool]]) -> list[str]:
    """A Lua script cycling through the mix's URLs (requests pre-formatted); the paths, in order."""
    paths = [f"{PASSENGER}?name={urllib.parse.quote(name, safe='')}" for name, _ in mix]
    entries = ",\n".join(f'  "{p}"' for p in paths)
    # Requests are formatted in init(): wrk.format() adds wrk.headers (Host) only once wrk has set them.
    path.write_text(
        "-- generated by bench_passenger.py: cycle through a fixed mix of passenger queries\n"
        f"local paths = {{\n{entries}\n}}\n"
        "local requests = {}\n"
        "local i = 0\n"
        "init = function(args)\n"
        '  for k, p in ipairs(paths) do requests[k] = wrk.format("GET", p) end\n'
        "end\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  if i > #requests then i = 1 end\n"
        "  return requests[i]\n"
        "end\n"
    )
    return paths


# A throwaway third-party plugin whose only hook is prepare_dev_world, listed before no_fly_list:
# it does what an operator does before the enclave starts (bucket, a key pinned to this sidecar's
# PCR0, the list sealed with the plugin's own seal_names -- what `sidecar no-fly seal` runs --
# and uploaded). no_fly_list's prepare_dev_world then finds the object and leaves it alone, and its
# lifespan loads it through S3 and attested KMS. Nothing of it runs per request.
SEED_PLUGIN = textwrap.dedent(
    f"""
    import os

    from sidecar import hookimpl


    @hookimpl
    def prepare_dev_world(world, context):
        from plugins.no_fly_list.cli import seal_names, upload

        with open(os.environ["BENCH_NO_FLY_NAMES"], encoding="utf-8") as f:
            names = f.read().rstrip("\\n").split(",")
        world.admin("s3").create_bucket(Bucket={OURS_BUCKET!r})
        world.create_key(world.pcr0.hex(), {OURS_KEY_ID!r})
        sealed = seal_names(world.admin("kms"), {OURS_KEY_ID!r}, names)
        upload(world.admin("s3"), {OURS_ENVELOPE!r}, sealed.envelope)
    """
)


def install_seed_plugin(site: Path) -> Path:
    """The seed plugin as pip would leave it: a module and a dist-info with a [sidecar] entry point."""
    info = site / "bench_no_fly_seed-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-no-fly-seed\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[sidecar]\n{SEED_PLUGIN_NAME} = {SEED_PLUGIN_NAME}\n")
    (site / f"{SEED_PLUGIN_NAME}.py").write_text(SEED_PLUGIN)
    return site


def ours_configs(directory: Path, access: bool, rate_limit: bool) -> tuple[Path, Path, int]:
    """enclaver.yaml and sidecar.yaml for `sidecar dev`: no_fly_list, and the seed plugin before it."""
    directory.mkdir(parents=True, exist_ok=True)
    ingress, api, kms_proxy, egress = free_ports(4)
    manifest = directory / "enclaver.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: v1
            name: "bench-passenger"
            target: "bench-passenger:enclave-latest"
            sources:
              app: "bench-passenger:latest"
            kms_proxy:
              listen_port: {kms_proxy}
            api:
              listen_port: {api}
            egress:
              proxy_port: {egress}
              allow:
                - kms.*.amazonaws.com
                - s3.*.amazonaws.com
                - 169.254.169.254
            ingress:
              - listen_port: {ingress}
            """
        )
    )
    rate = "" if rate_limit else "\n                  rate_limit: {enabled: false}"
    settings = directory / "sidecar.yaml"
    settings.write_text(
        textwrap.dedent(
            f"""\
            listen_host: {HOST}
            state_dir: {directory / "state"}
            log:
              level: info
              access: {"true" if access else "false"}
            attestation: {{nsm: emulator}}
            aws: {{imds: "off"}}
            plugins:
              {SEED_PLUGIN_NAME}: {{}}
              no_fly_list:
                listen_port: {ingress}
                config:
                  envelope: {OURS_ENVELOPE}
                  key_id: {OURS_KEY_ID}
                  reload_interval: 0{rate}
            """
        )
    )
    return manifest, settings, ingress


def make_servers(tmp: Path, wanted: Sequence[str], names_file: Path) -> list[Server]:
    servers: list[Server] = []
    for name in wanted:
        if name == "bare":
            (port,) = free_ports(1)
            servers.append(
                Server(
                    "bare",
                    "bare aiohttp handler, frozenset lookup, access_log=None",
                    port,
                    [PYTHON, "-c", BARE_APP, str(names_file), str(port)],
                    tmp / "bare.log",
                )
            )
        elif name == "bare+plugin":
            (port,) = free_ports(1)
            servers.append(
                Server(
                    "bare+plugin",
                    "bare aiohttp app routing to the plugin's handle_passenger (no wrapper, no access log)",
                    port,
                    [PYTHON, "-c", PLUGIN_BARE_APP, str(names_file), str(port)],
                    tmp / "bare+plugin.log",
                )
            )
        elif name == "flask":
            (port,) = free_ports(1)
            app_dir = tmp / "flask-app"
            app_dir.mkdir(exist_ok=True)
            (app_dir / "noflyapp.py").write_text(FLASK_APP)
            env = {**os.environ, "FLASK_APP": "noflyapp", "BENCH_NAMES": str(names_file)}
            servers.append(
                Server(
                    "flask",
                    "the original: Flask dev server (python -m flask run, threaded), set lookup",
                    port,
                    [PYTHON, "-m", "flask", "run", "--host", HOST, "--port", str(port)],
                    tmp / "flask.log",
                    env=env,
                    cwd=app_dir,
                )
            )
        else:
            access = name != "ours-nolog"
            limited = name == "ours-429"
            manifest, settings, port = ours_configs(tmp / name, access=access, rate_limit=limited)
            what = "default rate limit" if limited else "rate limit off"
            site = install_seed_plugin(tmp / "seed-site")
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")])
                ),
                "BENCH_NO_FLY_NAMES": str(names_file),
            }
            servers.append(
                Server(
                    name,
                    f"sidecar dev, no_fly_list, log.access: {'true' if access else 'false'}, {what}",
                    port,
                    [str(BIN / "sidecar"), "dev", "--manifest", str(manifest), "--config", str(settings)],
                    tmp / f"{name}.log",
                    env=env,
                    ready_path=READY,
                    expects_429=limited,
                )
            )
    return servers


def start(server: Server, prefix: list[str]) -> None:
    server.proc = spawn([*prefix, *server.argv], server.log_path, server.cwd or ROOT, server.env)


def stop(server: Server) -> None:
    stop_process(server.proc, STOP_TIMEOUT)


def tail(server: Server, lines: int = 30) -> str:
    return tail_file(server.log_path, lines)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def wait_ready(server: Server, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}\n{tail(server)}")
        try:
            status, body = http_get(server.port, server.ready_path, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status} {body[:200]}"
            if status == 500:  # a broken server, not one still starting (ours says 503 until loaded)
                raise RuntimeError(f"{server.name} answered {last}\n{tail(server)}")
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name} not ready on {server.url(server.ready_path)} within {timeout:.0f}s: {last}"
    )


def check_verdicts(server: Server, mix: list[tuple[str, bool]], paths: list[str]) -> None:
    """Every URL of the mix gives the expected text (ours-429: only the first, before the burst ends)."""
    for (name, listed), path in zip(mix, paths, strict=True):
        status, body = http_get(server.port, path, timeout=60.0)  # 60: valgrind is slow
        if status != 200 or body != expected_text(name, listed):
            raise RuntimeError(
                f"{server.name}: {path} answered {status} {body[:160]!r}, "
                f"expected {expected_text(name, listed)!r}"
            )
        if server.expects_429:
            break


def check_429(server: Server, path: str) -> str:
    """Send requests until a 429; its Retry-After (or raise if none comes in 10,000 requests)."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=5.0)
    try:
        for i in range(10_000):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 429:
                return f"429 after {i + 1} requests, Retry-After: {resp.getheader('Retry-After')}"
    finally:
        conn.close()
    raise RuntimeError(f"{server.name}: no 429 in 10,000 requests from one client")


def measure(server: Server, script: Path, duration: int, prefix: list[str]) -> Measurement:
    assert server.proc is not None
    m = measure_load(server.proc.pid, duration, lambda: run_wrk(server.url(), duration, prefix, script))
    if m.result.non2xx and not server.expects_429:
        # Requests/s of error answers would mean nothing: stop rather than report them.
        raise RuntimeError(
            f"{server.name}: {m.result.non2xx} of {m.result.requests} answers under load were not 2xx"
        )
    return m


def record(server: Server, m: Measurement) -> None:
    server.rps.append(m.result.rps)
    server.p99_ms.append(m.result.p99_ms)
    server.non2xx.append(m.result.non2xx / m.result.requests if m.result.requests else 0.0)
    if m.cpu_us is not None and m.busy is not None:
        server.cpu_us.append(m.cpu_us)
        server.busy.append(m.busy)
    if m.sys_us is not None:
        server.sys_us.append(m.sys_us)
    if m.other is not None:
        server.other.append(m.other)
    server.errors.append(m.result.socket_errors)


def loaded(server: Server) -> str:
    """What the plugin's no_fly_loaded line says (entries, kind), from the server's log."""
    with contextlib.suppress(OSError):
        for line in server.log_path.read_text(errors="replace").splitlines():
            if '"no_fly_loaded"' in line:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    return f"no_fly_loaded: {record.get('entries')} entries, {record.get('kind')}"
    return "no no_fly_loaded line in its log"


def run_http(args: argparse.Namespace) -> int:
    wanted: list[str] = args.servers
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 1
    pins = pin_cpus() if args.pin is not False else None
    server_prefix, tool_prefix = pins or ([], [])
    retries = args.rounds if args.retries is None else args.retries
    print()
    print(f"== http: {PASSENGER}, servers {', '.join(wanted)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-passenger-http-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        names = generate_names(args.http_names)
        names_file = tmp / "names.txt"
        listed = list(names) + SESAME
        names_file.write_bytes(payload_of(listed))
        mix = query_mix(names)
        script = tmp / "mix.lua"
        paths = write_wrk_script(script, mix)
        print(
            f"list: {len(listed):,} names (generated in {time.perf_counter() - t0:.1f}s); "
            f"query mix: {len(mix)} URLs, {sum(1 for _, is_listed in mix if is_listed)} listed, "
            f"{sum(1 for n, _ in mix if not n.isascii())} non-ASCII"
        )
        print(f"load: wrk -t1 -c{CONNECTIONS} -d{args.duration}s --latency -s mix.lua URL")
        if pins:
            print(f"pinned: servers `{' '.join(server_prefix)}`, wrk `{' '.join(tool_prefix)}`")
        servers: list[Server] = []
        try:
            servers = make_servers(tmp, wanted, names_file)
            for s in servers:
                start(s, server_prefix)
            started_at = time.monotonic()
            for s in servers:
                wait_ready(s)
                if s.name.startswith("ours"):
                    print(
                        f"  {s.name:<11} ready {time.monotonic() - started_at:.1f}s after start ({loaded(s)})"
                    )
                check_verdicts(s, mix, paths)
                note = f"; {check_429(s, paths[0])}" if s.expects_429 else ""
                print(f"  {s.name:<11} {s.url()}  ({s.description}){note}", flush=True)
            print(f"  all servers gave the expected text for all {len(mix)} URLs of the mix")
            for s in servers:
                measure(s, script, args.warmup, tool_prefix)
            noisy_kept = interleaved_rounds(
                servers,
                args.rounds,
                retries,
                lambda s: measure(s, script, args.duration, tool_prefix),
                lambda s: s.name,
                record,
                lambda: check_alive(servers),
            )
            report_http(servers, args, time.monotonic() - started, noisy_kept)
            if args.profile:
                profile_servers(
                    [s for s in servers if s.name != "flask"], script, args.duration, tool_prefix, tmp
                )
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            for s in servers:
                stop(s)
    return 0


# Frames every request shares at the bottom of its stack (start-up, the event loop): not informative.
_PROFILE_SKIP = re.compile(
    r"^(<module>|main|run|run_app|serve|dev|Command\.|Group\.|Context\.|Runner\.|BaseEventLoop\.run_"
    r"|BaseEventLoop\._run_once|Handle\._run|Thread\.|_run_app)"
)


def py_spy_samples(path: Path) -> tuple[int, dict[str, int]]:
    """(total samples, samples per function that appear anywhere in the stack) of a raw py-spy file."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        seen = set()
        for frame in stack.split(";"):
            key = re.sub(r":\d+\)$", ")", frame.strip())
            key = re.sub(r"\((?:.*/)?(site-packages/)?", "(", key)
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + count
    return total, inclusive


def profile_servers(servers: list[Server], script: Path, duration: int, prefix: list[str], tmp: Path) -> None:
    """One more wrk run per server under py-spy (sampling, --nonblocking): CPU us/req by function."""
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        print("profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped")
        return
    print()
    print(f"== profile: one {duration}s wrk run per server under `py-spy record --rate 250 --nonblocking`")
    columns: list[tuple[str, float, int, dict[str, int]]] = []
    for server in servers:
        assert server.proc is not None
        out = tmp / f"{server.name}.py-spy.txt"
        argv = [*prefix, spy, "record", "--pid", str(server.proc.pid), "--rate", "250", "--nonblocking"]
        argv += ["--duration", str(duration + 1), "--format", "raw", "-o", str(out)]
        recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches
        m = measure(server, script, duration, prefix)
        _, err = recorder.communicate(timeout=duration + 60)
        if recorder.returncode != 0 or not out.exists():
            print(f"  {server.name}: py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
            continue
        total, inclusive = py_spy_samples(out)
        cpu = m.cpu_us or float("nan")
        print(f"  {server.name:<11} {m.result.rps:.0f} req/s, CPU {cpu:.1f} us/req, {total} samples")
        columns.append((server.name, cpu, total, inclusive))
    if not columns:
        return
    rows: dict[str, list[float]] = {}
    for i, (_, cpu, total, inclusive) in enumerate(columns):
        for key, count in inclusive.items():
            if _PROFILE_SKIP.match(key):
                continue
            rows.setdefault(key, [0.0] * len(columns))[i] = count / total * cpu
    shown = sorted((k for k, v in rows.items() if max(v) >= 1.5), key=lambda k: -max(rows[k]))
    print()
    print("CPU us per request spent in each function and what it calls (share of samples x CPU us/req):")
    print(f"{'function':<72}" + "".join(f" {name:>10}" for name, *_ in columns))
    print("-" * (72 + 11 * len(columns)))
    print(f"{'(all: the server process CPU per request)':<72}" + "".join(f" {c[1]:>10.1f}" for c in columns))
    for key in shown:
        print(f"{key[:72]:<72}" + "".join(f" {v:>10.1f}" for v in rows[key]))
    print("(inclusive: a caller's row contains its callees' rows; sampled, so +-1 us or so)")


def ratio(num: Server, den: Server) -> tuple[float, str]:
    r, _, spread = round_ratios(num.rps, den.rps)
    return r, f"{r:6.2f}   ({spread})"


def cpu_ratio(num: Server, den: Server) -> str:
    if not num.cpu_us or not den.cpu_us:
        return "   n/a"
    return f"{median(den.cpu_us) / median(num.cpu_us):6.2f}"


def report_http(servers: list[Server], args: argparse.Namespace, elapsed: float, noisy: int) -> None:
    by = {s.name: s for s in servers}
    print()
    print(
        f"{PASSENGER} mix, wrk -t1 -c{CONNECTIONS}, {args.rounds} rounds x {args.duration}s interleaved; "
        "median of rounds"
    )
    header = (
        f"{'server':<11} {'req/s median':>12} {'min':>8} {'max':>8} {'p99 ms':>7} {'CPU us/req':>10} "
        f"{'of it sys':>9} {'CPU busy':>8} {'non-2xx':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in servers:
        cpu = f"{median(s.cpu_us):>10.1f}" if s.cpu_us else f"{'n/a':>10}"
        kernel = f"{median(s.sys_us):>9.1f}" if s.sys_us else f"{'n/a':>9}"
        busy = f"{median(s.busy):>8.0%}" if s.busy else f"{'n/a':>8}"
        print(
            f"{s.name:<11} {median(s.rps):>12.0f} {min(s.rps):>8.0f} {max(s.rps):>8.0f} "
            f"{median(s.p99_ms):>7.2f} {cpu} {kernel} {busy} {median(s.non2xx):>8.1%}"
        )
    print("(CPU us/req and CPU busy: the server process's own CPU time, all its threads; busy ~100% = it was")
    print(" the bottleneck. of it sys: kernel time, mostly sending the answer and waking wrk; on a VM a")
    print(" slower server pays more per request for the wake-up. non-2xx: share of answers that were not")
    print(" 2xx, e.g. 429s)")
    print_noise([o for s in servers for o in s.other], args.rounds, noisy)
    problems = [f"{s.name}: {e}" for s in servers for e in s.errors if e]
    if problems:
        print("load generator reported errors (these results are suspect):")
        for p in sorted(set(problems)):
            print(f"  {p}")
    print()
    verdicts = []
    if "ours" in by:
        ours = by["ours"]
        print("ratios of requests/s (median over median, same run); CPU: the den's CPU us/req over the num's")
        for den_name in ("bare", "flask"):
            if den_name in by:
                _, line = ratio(ours, by[den_name])
                print(f"  ours/{den_name:<12} {line}   CPU {cpu_ratio(ours, by[den_name])}")
        if "ours-nolog" in by:
            for den_name in ("bare",):
                if den_name in by:
                    _, line = ratio(by["ours-nolog"], by[den_name])
                    print(
                        f"  ours-nolog/{den_name:<6} {line}   CPU {cpu_ratio(by['ours-nolog'], by[den_name])}"
                    )
            _, line = ratio(ours, by["ours-nolog"])
            print(f"  ours/ours-nolog   {line}   <- cost of the access log")
        if "bare+plugin" in by and "bare" in by:
            _, line = ratio(by["bare+plugin"], by["bare"])
            cpu = cpu_ratio(by["bare+plugin"], by["bare"])
            print(f"  bare+plugin/bare  {line}   CPU {cpu}   <- the plugin's handler")
        if "bare+plugin" in by and "ours-nolog" in by:
            _, line = ratio(by["ours-nolog"], by["bare+plugin"])
            print(
                f"  ours-nolog/bare+plugin {line}   CPU {cpu_ratio(by['ours-nolog'], by['bare+plugin'])}"
                "   <- the sidecar runtime"
            )
        if "bare" in by:
            r, _ = ratio(ours, by["bare"])
            verdicts.append(
                f"ours/bare = {r:.2f} (target >= {BARE_RATIO_TARGET}): "
                f"{'PASS' if r >= BARE_RATIO_TARGET else 'FAIL'}"
            )
        if "flask" in by:
            r, _ = ratio(ours, by["flask"])
            verdicts.append(
                f"ours/flask = {r:.1f} (target >= {FLASK_RATIO_TARGET:g}): "
                f"{'PASS' if r >= FLASK_RATIO_TARGET else 'FAIL'}"
            )
    if "bare" in by and "flask" in by:
        _, line = ratio(by["bare"], by["flask"])
        print(f"  bare/flask        {line}   CPU {cpu_ratio(by['bare'], by['flask'])}")
    if "ours-429" in by:
        limited = by["ours-429"]
        print()
        cpu = f"{median(limited.cpu_us):.1f} us" if limited.cpu_us else "n/a"
        line = (
            f"ours-429 (default rate limit): {median(limited.rps):.0f} answers/s, "
            f"{median(limited.non2xx):.1%} were 429"
        )
        print(f"{line}, CPU {cpu} per answer")
        if "ours" in by and by["ours"].cpu_us and limited.cpu_us:
            print(
                f"  a refused request costs {median(limited.cpu_us) / median(by['ours'].cpu_us):.2f}x "
                "the CPU"
                " of an answered one (ours, rate limit off)"
            )
    print(f"total wall time {elapsed:.0f}s")
    if verdicts:
        print()
        for v in verdicts:
            print(v)


# ---------------------------------------------------------------------------- instructions


async def _keepalive_requests(port: int, paths: Sequence[str], total: int, connections: int = 8) -> int:
    """``total`` GETs cycling through ``paths`` over ``connections`` keep-alive connections."""
    import asyncio

    async def one(offset: int, count: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for i in range(count):
                path = paths[(offset + i) % len(paths)]
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 2"):
                    raise RuntimeError(f"unexpected answer: {head[:80]!r}")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
        finally:
            writer.close()

    per = max(1, total // connections)
    await asyncio.wait_for(asyncio.gather(*(one(c * 37, per) for c in range(connections))), 3600)
    return per * connections


def _callgrind_total(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"), re.M)
        if match:
            return int(match.group(1))
    return None


def run_instructions(args: argparse.Namespace) -> int:
    """User-space instructions per request under valgrind's callgrind: deterministic, noise-free."""
    import asyncio

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("error: --instructions needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 1
    wanted = [w for w in args.servers if w not in ("flask", "ours-429")]
    requests: int = args.instructions
    print()
    print(
        f"== instructions: {requests} requests over 8 keep-alive connections cycling through the mix, "
        "after 400 to warm up; servers under `valgrind --tool=callgrind --instr-atstart=no`"
    )
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-passenger-instr-") as tmp_name:
        tmp = Path(tmp_name)
        names = generate_names(args.http_names)
        listed = list(names) + SESAME
        names_file = tmp / "names.txt"
        names_file.write_bytes(payload_of(listed))
        mix = query_mix(names)
        paths = [f"{PASSENGER}?name={urllib.parse.quote(name, safe='')}" for name, _ in mix]
        print(f"list: {len(listed):,} names; mix: {len(mix)} URLs")
        for server in make_servers(tmp, wanted, names_file):
            out = tmp / f"{server.name}.callgrind"
            prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
            prefix.append("--dump-instr=no")
            t0 = time.monotonic()
            start(server, prefix)
            try:
                wait_ready(server, timeout=1800)
                check_verdicts(server, mix, paths)
                asyncio.run(_keepalive_requests(server.port, paths, 400))
                assert server.proc is not None
                pid = str(server.proc.pid)
                for flag in ("-i", "on"), ("-z",):
                    subprocess.run(
                        ["callgrind_control", *flag, pid], capture_output=True, check=True, timeout=300
                    )
                done = asyncio.run(_keepalive_requests(server.port, paths, requests))
                subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True, timeout=300)
                dump = Path(f"{out}.{pid}.1")
                total = None
                for _ in range(600):  # callgrind_control returns once the dump is requested
                    total = _callgrind_total(dump)
                    if total is not None:
                        break
                    time.sleep(0.1)
                if total is None:
                    raise RuntimeError(f"{server.name}: no callgrind dump at {dump}")
                results[server.name] = total / done
                print(
                    f"  {server.name:<11} {results[server.name]:>10,.0f} instructions/request "
                    f"({time.monotonic() - t0:.0f}s under valgrind)",
                    flush=True,
                )
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            finally:
                stop(server)
    if "bare" in results:
        print()
        print("instructions per request of bare over the server's (the throughput ratio they predict):")
        for name, value in results.items():
            if name != "bare":
                print(f"  bare/{name:<12} {results['bare'] / value:6.3f}   (+{value - results['bare']:,.0f})")
        steps = [
            ("bare", "bare+plugin", "the plugin's handler (validation, normalise, keyed hash, headers)"),
            ("bare+plugin", "ours-nolog", "the sidecar runtime (per-route wrapper, request id, sidecar dev)"),
            ("ours-nolog", "ours", "the access log"),
        ]
        print("where the extra instructions per request go:")
        for a, b, what in steps:
            if a in results and b in results:
                print(f"  {b:<11} - {a:<11} {results[b] - results[a]:>+9,.0f}  {what}")
        if "ours" in results:
            r = results["bare"] / results["ours"]
            print(
                f"instructions bare/ours = {r:.3f} (target for requests/s >= {BARE_RATIO_TARGET}): "
                f"{'PASS' if r >= BARE_RATIO_TARGET else 'FAIL'}"
            )
    return 0


# ---------------------------------------------------------------------------- breakdown


def _run_handler(handler: Callable[[Any], Any], request: Any) -> Any:
    """Run a handler coroutine that never waits (both GET handlers) without an event loop."""
    coro = handler(request)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the handler waited")


def _per_call_us(fn: Callable[[Any], Any], inputs: Sequence[Any], repeats: int) -> float:
    """Best of ``repeats`` passes over ``inputs``: microseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in inputs:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / len(inputs)


def run_breakdown(args: argparse.Namespace) -> int:
    """Per-request CPU of the pieces of ``GET /enclave/passenger``, in this process, no server."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from plugins.no_fly_list.index import NameIndex
    from plugins.no_fly_list.normalize import normalize
    from plugins.no_fly_list.service import TEXT_HEADERS, TEXT_VERDICT, NoFlyService, name_problem
    from sidecar.context import PluginContext, Services
    from sidecar.routes import Listener
    from sidecar.server import REQUEST_ID, request_ids, wrap_handler

    print()
    print(f"== breakdown: the pieces of {PASSENGER}, timed in this process (best of {args.repeats} passes)")
    names = generate_names(args.http_names)
    listed = list(names) + SESAME
    mix = query_mix(names)
    paths = [f"{PASSENGER}?name={urllib.parse.quote(name, safe='')}" for name, _ in mix]
    no_fly = frozenset(payload_of(listed).decode().rstrip("\n").split(","))
    index = NameIndex.from_payload(bytearray(payload_of(listed)))
    print(f"list: {len(listed):,} names; inputs: the {len(mix)} names of the http mix")

    def config(enabled: bool) -> dict[str, Any]:
        limit = {"enabled": enabled, "per_second": 20.0, "burst": 40, "max_clients": 10_000}
        return {
            "envelope": OURS_ENVELOPE,
            "key_id": OURS_KEY_ID,
            "reload_interval": 0,
            "max_batch": 1000,
            "rate_limit": limit,
            "metrics_interval": 0,
        }

    def service(enabled: bool) -> NoFlyService:
        context = PluginContext("no_fly_list", config(enabled), None, Path(tempfile.gettempdir()), Services())
        svc = NoFlyService(context)
        svc.index = index
        return svc

    ours, limited = service(False), service(True)

    async def bare(request: web.Request) -> web.Response:  # BARE_APP's handler
        name = request.query.get("name")
        if not name:
            return web.Response(status=400, text="missing name\n")
        if "".join(name.split()).lower() in no_fly:
            return web.Response(text=f"{name} is on the no-fly list and CAN NOT BOARD!\n")
        return web.Response(text=f"{name} is cleared to fly. Enjoy your flight!\n")

    fake_runtime = argparse.Namespace(request_ids=request_ids())
    listener = Listener(audience="ingress", port=8001)
    # The limits create_app gives the GET route: its own (the 1 MiB default) and the app's (the
    # largest route limit), so the wrapper clones the request exactly when the live server would.
    route_limits = [r.max_body_bytes or 0 for r in ours.routes(listener)]
    app_limit = max([1 << 20, *route_limits])
    wrapped = wrap_handler(fake_runtime, listener, ours.handle_passenger, 1 << 20, app_limit)

    def requests(count: int) -> list[Any]:
        out = []
        for i in range(count):
            request = make_mocked_request("GET", paths[i % len(paths)])
            request[REQUEST_ID] = "bench"
            out.append(request)
        return out

    reps = args.repeats
    rounds = (
        2  # fresh mocked requests per pass (request.query is computed once per request); ~2 ms each to make
    )
    display = [name for name, _ in mix]
    normalized = [normalize(n) for n in display]
    original = [normalize_original(n) for n in display]
    rows: list[tuple[str, float]] = []

    def handler_us(handler: Callable[[Any], Any]) -> float:
        best = float("inf")
        for _ in range(reps):
            batch = requests(rounds * len(paths))
            t0 = time.perf_counter()
            for request in batch:
                _run_handler(handler, request)
            best = min(best, (time.perf_counter() - t0) / len(batch))
        return best * 1e6

    def query_us(getter: Callable[[Any], Any]) -> float:
        best = float("inf")
        for _ in range(reps):
            batch = requests(rounds * len(paths))
            t0 = time.perf_counter()
            for request in batch:
                getter(request)
            best = min(best, (time.perf_counter() - t0) / len(batch))
        return best * 1e6

    # Exhaust the limiter's bucket for the mocked client, so every call below takes the 429 path.
    for request in requests(100):
        _run_handler(limited.handle_passenger, request)

    rows.append(("bare handler, whole (query, normalise, frozenset, Response)", handler_us(bare)))
    rows.append(("ours handle_passenger, whole (rate limit off)", handler_us(ours.handle_passenger)))
    rows.append(
        (f"ours handle_passenger inside wrap_handler (clones: {app_limit != (1 << 20)})", handler_us(wrapped))
    )
    rows.append(("ours handle_passenger answering 429 (limiter on)", handler_us(limited.handle_passenger)))
    rows.append(("  request.query.get('name') (bare)", query_us(lambda r: r.query.get("name"))))
    rows.append(
        ("  request.query.getall('name', None) (ours)", query_us(lambda r: r.query.getall("name", None)))
    )
    rows.append(("  name_problem(name)", _per_call_us(name_problem, display, reps * 20)))
    rows.append(
        (
            "  original normalise: ''.join(n.split()).lower()",
            _per_call_us(normalize_original, display, reps * 20),
        )
    )
    rows.append(("  normalize(name)", _per_call_us(normalize, display, reps * 20)))
    rows.append(("  normalised in frozenset (bare)", _per_call_us(no_fly.__contains__, original, reps * 20)))
    rows.append(
        ("  normalised in NameIndex (keyed BLAKE2s)", _per_call_us(index.__contains__, normalized, reps * 20))
    )
    rows.append(
        (
            "  web.Response(text=...) (bare)",
            _per_call_us(
                lambda n: web.Response(text=f"{n} is cleared to fly. Enjoy your flight!\n"), display, reps * 5
            ),
        )
    )
    rows.append(
        (
            "  web.Response(body=..., headers=TEXT_HEADERS)",
            _per_call_us(
                lambda n: web.Response(body=n.encode() + b" is cleared\n", headers=TEXT_HEADERS),
                display,
                reps * 5,
            ),
        )
    )
    rows.append(
        (
            "  TEXT_VERDICT.response(body) (ours: sidecar.hotpath)",
            _per_call_us(lambda n: TEXT_VERDICT.response(n.encode() + b" is cleared\n"), display, reps * 5),
        )
    )
    print()
    print(f"{'piece':<62} {'us/call':>8}")
    print("-" * 71)
    for label, us in rows:
        print(f"{label:<62} {us:>8.2f}")
    print("(handlers run without a server or event loop on aiohttp's mocked requests; the server's own")
    print(" work -- parsing, routing, writing the answer, the access log -- is not in these rows)")
    return 0


# ---------------------------------------------------------------------------- main


def csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated)")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load-child"]:
        return _load_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("what", nargs="?", choices=["all", "load", "http", "breakdown"], default="all")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("100k,1M,5M"), help="list sizes (load)"
    )
    parser.add_argument(
        "--variants", type=csv_choice(LOAD_VARIANTS), default=list(LOAD_VARIANTS), help="load variants"
    )
    parser.add_argument(
        "--load-rounds", dest="load_rounds", type=int, default=3, help="fresh processes per cell"
    )
    parser.add_argument(
        "--servers",
        type=csv_choice(HTTP_SERVERS),
        default=list(HTTP_SERVERS),
        help="http servers (comma-separated)",
    )
    parser.add_argument("--http-names", type=int, default=1_000_000, help="names every http server holds")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved http rounds")
    parser.add_argument("--duration", type=int, default=4, help="seconds of wrk load per server per round")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per server first")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="http: then one more run per server under py-spy (CPU by function)",
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="http: instead of wrk, count instructions per request over N requests under valgrind",
    )
    parser.add_argument("--repeats", type=int, default=5, help="breakdown: passes per piece (best is kept)")
    parser.add_argument(
        "--retries", type=int, default=None, help="noisy http rounds to rerun (default: --rounds)"
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="http: servers on the last CPU, wrk on the first (default: when possible); load: children "
        "on the last CPU (default: not pinned)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 1 or args.load_rounds < 1:
        parser.error("--duration > 0, --rounds >= 1, --warmup >= 1, --load-rounds >= 1")
    if args.http_names < MIX_SIZE * 4:
        parser.error(f"--http-names must be >= {MIX_SIZE * 4}")
    print(machine_line())
    print(f"python {platform.python_version()}  {versions('aiohttp', 'cryptography', 'flask', 'werkzeug')}")
    print(f"sidecar source: {source_revision()}")
    code = 0
    if args.what in ("all", "load"):
        code |= run_load(_with(args, rounds=args.load_rounds))
    if args.what in ("all", "http") and args.instructions is not None:
        code |= run_instructions(args)
    elif args.what in ("all", "http"):
        code |= run_http(args)
    if args.what in ("all", "breakdown"):
        code |= run_breakdown(args)
    return code


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


if __name__ == "__main__":
    raise SystemExit(main())
