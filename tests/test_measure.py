"""Tests of sidecar.attestation.measure: what PCR0/1/2 cover, and that the definition stays put.

The measurement pins a KMS key to the code and config that run. So every byte of the sidecar's
code, a plugin's code, enclaver.yaml and sidecar.yaml must move PCR0, and the hashing must be
unambiguous and deterministic. The tests measure throwaway packages on ``sys.path``, plus the real
sidecar once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.attestation.measure import MeasureError, Measurement, measure, module_files, tree_digest

ROOT = Path(__file__).resolve().parent.parent
ZERO = bytes(48)


@dataclass
class World:
    core: str
    core_dir: Path
    plugin: str
    plugin_dir: Path
    single: str
    single_file: Path
    manifest: Path
    settings: Path

    def measure(self, *, with_settings: bool = True) -> Measurement:
        settings = self.settings if with_settings else None
        return measure(self.manifest, settings, [self.plugin, self.single], core_package=self.core)


@pytest.fixture
def world(plugin_site: Path, tmp_path: Path) -> World:
    """A core package, a plugin package and a single-file plugin on sys.path; copies of the configs."""
    tag = uuid.uuid4().hex[:8]
    core, plugin, single = f"core_{tag}", f"plugin_{tag}", f"single_{tag}"
    core_dir = plugin_site / core
    (core_dir / "sub").mkdir(parents=True)
    (core_dir / "__init__.py").write_text("VERSION = 1\n")
    (core_dir / "sub" / "__init__.py").write_text("")
    (core_dir / "sub" / "mod.py").write_text("def f() -> int:\n    return 1\n")
    (core_dir / "schema.json").write_text('{"a": 1}\n')
    (core_dir / "py.typed").write_text("")
    plugin_dir = plugin_site / plugin
    plugin_dir.mkdir()
    (plugin_dir / "__init__.py").write_text("NAME = 'p'\n")
    single_file = plugin_site / f"{single}.py"
    single_file.write_text("X = 1\n")
    configs = tmp_path / "configs"
    configs.mkdir()
    manifest = Path(shutil.copy(ROOT / "enclaver.yaml", configs / "enclaver.yaml"))
    settings = Path(shutil.copy(ROOT / "sidecar.yaml", configs / "sidecar.yaml"))
    return World(core, core_dir, plugin, plugin_dir, single, single_file, manifest, settings)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# --- the definition -----------------------------------------------------------------------------


def spec_tree(entries: list[tuple[str, bytes]]) -> bytes:
    """The module docstring's tree digest, written out again from the text."""
    digest = hashlib.sha384(b"enclave-sidecar/tree/v1" + len(entries).to_bytes(8, "big"))
    for path, content in sorted(entries):
        raw = path.encode()
        digest.update(len(raw).to_bytes(8, "big") + raw + len(content).to_bytes(8, "big") + content)
    return digest.digest()


def test_measurement_follows_the_documented_definition(world: World) -> None:
    # The definition is part of the product (KMS policies pin it): recompute it from the docstring.
    core_entries = [
        ("__init__.py", b"VERSION = 1\n"),
        ("sub/__init__.py", b""),
        ("sub/mod.py", b"def f() -> int:\n    return 1\n"),
        ("schema.json", b'{"a": 1}\n'),
        ("py.typed", b""),
    ]
    core = spec_tree(core_entries)
    plugins = sorted(
        [
            (world.plugin, spec_tree([("__init__.py", b"NAME = 'p'\n")])),
            (world.single, spec_tree([(world.single_file.name, b"X = 1\n")])),
        ]
    )
    app = hashlib.sha384(b"enclave-sidecar/app/v1" + len(plugins).to_bytes(8, "big"))
    for name, digest in plugins:
        app.update(len(name).to_bytes(8, "big") + name.encode() + digest)
    app.update(hashlib.sha384(world.manifest.read_bytes()).digest())
    app.update(b"\x01" + hashlib.sha384(world.settings.read_bytes()).digest())
    pcr1 = hashlib.sha384(ZERO + core).digest()
    expected = Measurement(
        pcr0=hashlib.sha384(pcr1 + app.digest()).digest(),
        pcr1=pcr1,
        pcr2=hashlib.sha384(ZERO + app.digest()).digest(),
    )
    assert world.measure() == expected
    assert expected.as_dict() == {0: expected.pcr0, 1: expected.pcr1, 2: expected.pcr2}
    assert all(len(v) == 48 for v in expected.as_dict().values())


def test_length_prefixing_makes_paths_and_contents_unambiguous() -> None:
    # Threat: moving bytes between a file name and its content (or between two files) to produce a
    # different tree with the same digest.
    assert tree_digest([("ab", b"c")]) != tree_digest([("a", b"bc")])
    assert tree_digest([("a", b"b"), ("c", b"")]) != tree_digest([("a", b"bc")])
    assert tree_digest([("a", b"")]) != tree_digest([])
    assert tree_digest([("x", b"1"), ("y", b"2")]) == tree_digest([("y", b"2"), ("x", b"1")])


# --- every input moves PCR0 ---------------------------------------------------------------------


def test_sidecar_code_change_moves_pcr0_and_pcr1(world: World) -> None:
    # Threat: modified sidecar code passing for the attested build.
    before = world.measure()
    flip_last_byte(world.core_dir / "sub" / "mod.py")
    after = world.measure()
    assert after.pcr0 != before.pcr0 and after.pcr1 != before.pcr1
    assert after.pcr2 == before.pcr2


def test_plugin_code_change_moves_pcr0_and_pcr2(world: World) -> None:
    # Threat: a modified plugin (package or single-file module) passing for the attested one.
    before = world.measure()
    flip_last_byte(world.plugin_dir / "__init__.py")
    after = world.measure()
    assert after.pcr0 != before.pcr0 and after.pcr2 != before.pcr2
    assert after.pcr1 == before.pcr1
    flip_last_byte(world.single_file)
    assert world.measure().pcr0 != after.pcr0


def test_manifest_change_moves_pcr0(world: World) -> None:
    # Threat: a changed manifest (e.g. a wider egress allow-list) passing for the attested one.
    before = world.measure()
    world.manifest.write_bytes(world.manifest.read_bytes().replace(b"9999", b"9998", 1))
    after = world.measure()
    assert after.pcr0 != before.pcr0 and after.pcr2 != before.pcr2
    assert after.pcr1 == before.pcr1


def test_settings_change_moves_pcr0(world: World) -> None:
    # Threat: changed plugin settings (e.g. another key id or storage) passing for the attested ones.
    before = world.measure()
    world.settings.write_bytes(world.settings.read_bytes() + b"\n")  # even whitespace counts
    after = world.measure()
    assert after.pcr0 != before.pcr0 and after.pcr2 != before.pcr2


def test_no_settings_differs_from_empty_settings(world: World) -> None:
    world.settings.write_bytes(b"")
    assert world.measure(with_settings=False).pcr0 != world.measure().pcr0


def test_every_file_counts_not_only_python(world: World) -> None:
    before = world.measure()
    flip_last_byte(world.core_dir / "schema.json")
    assert world.measure().pcr0 != before.pcr0


def test_added_and_renamed_files_count(world: World) -> None:
    before = world.measure()
    (world.core_dir / "extra.py").write_text("")
    added = world.measure()
    assert added.pcr0 != before.pcr0
    (world.core_dir / "extra.py").rename(world.core_dir / "extra2.py")
    assert world.measure().pcr0 not in (before.pcr0, added.pcr0)


def test_bytecode_caches_do_not_count(world: World) -> None:
    # Running the code writes __pycache__; that must not change what it measures to.
    before = world.measure()
    cache = world.core_dir / "__pycache__"
    cache.mkdir()
    (cache / "mod.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (world.core_dir / "stray.pyc").write_bytes(b"\x00")
    assert world.measure() == before


def test_plugin_list_order_and_duplicates_do_not_matter(world: World) -> None:
    a = measure(world.manifest, world.settings, [world.plugin, world.single], core_package=world.core)
    b = measure(
        world.manifest, world.settings, [world.single, world.plugin, world.single], core_package=world.core
    )
    assert a == b
    c = measure(world.manifest, world.settings, [world.plugin], core_package=world.core)
    assert c.pcr0 != a.pcr0  # but which plugins run does


def test_module_files_of_a_single_file_module(world: World) -> None:
    assert module_files(world.single) == [(world.single_file.name, b"X = 1\n")]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda w: measure(w.manifest, w.settings, ["no_such_plugin_module_x"], core_package=w.core),
        lambda w: measure(w.manifest, w.settings, [w.plugin], core_package="no_such_core_package_x"),
        lambda w: measure(w.manifest.with_name("missing.yaml"), w.settings, [w.plugin], core_package=w.core),
        lambda w: measure(w.manifest, w.settings.with_name("missing.yaml"), [w.plugin], core_package=w.core),
        lambda w: measure(w.manifest, w.settings, ["sys"], core_package=w.core),  # built in: no source
    ],
)
def test_what_cannot_be_measured_is_an_error(world: World, change: Callable[[World], object]) -> None:
    with pytest.raises(MeasureError):
        change(world)


def test_a_file_name_that_is_not_utf8_is_measured_as_its_bytes(world: World) -> None:
    # Threat: a file that makes measuring crash (UnicodeEncodeError) instead of moving PCR0.
    before = world.measure()
    name = os.fsdecode(b"\xff.py")
    (world.plugin_dir / name).write_text("EVIL = 1\n")
    after = world.measure()
    assert after.pcr0 != before.pcr0 and after.pcr2 != before.pcr2
    # The name counts as its raw bytes, distinct from the UTF-8 spelling of U+00FF.
    raw = b"\xff.py"
    expected = hashlib.sha384(b"enclave-sidecar/tree/v1" + (1).to_bytes(8, "big"))
    expected.update(len(raw).to_bytes(8, "big") + raw + (1).to_bytes(8, "big") + b"x")
    assert tree_digest([(name, b"x")]) == expected.digest()
    assert tree_digest([(name, b"x")]) != tree_digest([("\u00ff.py", b"x")])


def test_symlinked_directory_is_refused(world: World, tmp_path: Path) -> None:
    # Threat: code reached through a symlinked directory that os.walk would skip, so it runs unmeasured.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hidden.py").write_text("EVIL = 1\n")
    os.symlink(outside, world.core_dir / "linked")
    with pytest.raises(MeasureError, match="symlinked"):
        world.measure()


# --- the real sidecar ---------------------------------------------------------------------------

DEMO_PLUGINS = ["plugins.no_fly_list", "plugins.vault_like"]


def test_real_sidecar_measurement_is_deterministic_across_processes() -> None:
    here = measure(ROOT / "enclaver.yaml", ROOT / "sidecar.yaml", DEMO_PLUGINS)
    assert here == measure(ROOT / "enclaver.yaml", ROOT / "sidecar.yaml", list(reversed(DEMO_PLUGINS)))
    # Another interpreter, with another hash seed, must agree byte for byte.
    code = (
        "from pathlib import Path; from sidecar.attestation.measure import measure; "
        f"print(measure(Path({str(ROOT / 'enclaver.yaml')!r}), Path({str(ROOT / 'sidecar.yaml')!r}), "
        f"{DEMO_PLUGINS!r}).pcr0.hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here.pcr0.hex()
