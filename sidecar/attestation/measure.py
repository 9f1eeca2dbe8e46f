"""The measurement of what this sidecar runs: the PCR0/1/2 the NSM emulator attests.

On Nitro, PCR0 is the hash of the whole enclave image, PCR1 of its kernel and boot ramfs, PCR2 of
the application. Outside an enclave there is no image, so ``sidecar dev`` measures the code and
configuration it actually runs, with the same roles. This definition is part of the product: a
KMS key policy pins these values (``sidecar measure`` prints them), so it must not change silently.

Definitions (all hashes SHA-384, all integers unsigned 64-bit big-endian, ``||`` concatenation):

``lp(b) = len(b) || b`` (length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` hash differently).

``tree(locations)``: every regular file under the package's directories, recursively, skipping
``__pycache__`` directories and ``*.pyc`` files (every other file counts: data, templates,
``py.typed``); a single-file module is that one file. Entries are ``(path, content)``, ``path``
the POSIX path relative to its package directory (UTF-8; a name that is not UTF-8 as its raw
bytes), sorted by path then content::

    tree = SHA384("enclave-sidecar/tree/v1" || count || lp(path_1) || lp(content_1) || ...)

``core = tree(the installed sidecar package)``: the sidecar itself (PCR1's role: the platform).

``app``: the plugins' code and the configuration (PCR2's role: the application). Plugin modules
are deduplicated and sorted by name::

    app = SHA384("enclave-sidecar/app/v1" || count || lp(name_1) || tree(module_1) || ...
                 || SHA384(manifest bytes) || settings)

``settings`` is ``0x01 || SHA384(sidecar.yaml bytes)``, or ``0x00`` when there is no sidecar.yaml.

Each PCR is a register value, reached by extending from 48 zero bytes, ``extend(v, d) =
SHA384(v || d)``::

    PCR1 = extend(0^48, core)      PCR2 = extend(0^48, app)      PCR0 = extend(PCR1, app)

so PCR0 = extend(extend(0^48, core), app): any byte changed in the sidecar's code, a plugin's
code, enclaver.yaml or sidecar.yaml changes PCR0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PCR_BYTES = 48
ZERO_PCR = bytes(PCR_BYTES)
_TREE_DOMAIN = b"enclave-sidecar/tree/v1"
_APP_DOMAIN = b"enclave-sidecar/app/v1"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc",)


class MeasureError(Exception):
    """Something to be measured cannot be found or read; the message says what."""


@dataclass(frozen=True)
class Measurement:
    pcr0: bytes
    pcr1: bytes
    pcr2: bytes

    def as_dict(self) -> dict[int, bytes]:
        return {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _lp(data: bytes) -> bytes:
    return _u64(len(data)) + data


def extend(old: bytes, data: bytes) -> bytes:
    return hashlib.sha384(old + data).digest()


def _files_under(directory: Path) -> Iterable[tuple[str, bytes]]:
    for current, dirnames, filenames in os.walk(directory):
        base = Path(current)
        for name in list(dirnames):
            if name in _SKIP_DIRS:
                dirnames.remove(name)
            elif (base / name).is_symlink():
                # os.walk would silently skip it, leaving code that runs but is not measured.
                raise MeasureError(f"{base / name}: symlinked directories cannot be measured")
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            path = base / name
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise MeasureError(f"{path}: cannot read it to measure it: {exc.strerror or exc}") from exc
            yield path.relative_to(directory).as_posix(), content


def tree_digest(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """SHA-384 over sorted, length-prefixed (path, content) entries (see the module docstring)."""
    ordered = sorted(entries)
    digest = hashlib.sha384(_TREE_DOMAIN + _u64(len(ordered)))
    for path, content in ordered:
        # surrogateescape: a file name that is not UTF-8 counts as its raw bytes (os.fsencode),
        # rather than failing with UnicodeEncodeError; UTF-8 names encode as before.
        digest.update(_lp(path.encode("utf-8", "surrogateescape")))
        digest.update(_lp(content))
    return digest.digest()


def module_files(module: str) -> list[tuple[str, bytes]]:
    """The (relative path, bytes) entries of an importable module: its package tree, or its file."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise MeasureError(f"module {module!r} cannot be found to measure it: {exc}") from exc
    if spec is None:
        raise MeasureError(f"module {module!r} is not installed, so it cannot be measured")
    if spec.submodule_search_locations is not None:
        entries: list[tuple[str, bytes]] = []
        for location in spec.submodule_search_locations:
            entries.extend(_files_under(Path(location)))
        return entries
    if spec.origin is None or not spec.has_location:
        raise MeasureError(f"module {module!r} has no source file to measure ({spec.origin})")
    origin = Path(spec.origin)
    try:
        return [(origin.name, origin.read_bytes())]
    except OSError as exc:
        raise MeasureError(f"{origin}: cannot read it to measure it: {exc.strerror or exc}") from exc


def _file_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MeasureError(f"{path}: cannot read the {what} to measure it: {exc.strerror or exc}") from exc


def measure(
    manifest_path: Path,
    settings_path: Path | None,
    plugin_modules: Sequence[str],
    core_package: str = "sidecar",
) -> Measurement:
    """PCR0/1/2 of the installed ``core_package``, the plugin modules and the two config files."""
    core = tree_digest(module_files(core_package))

    names = sorted(set(plugin_modules))
    app = hashlib.sha384(_APP_DOMAIN + _u64(len(names)))
    for name in names:
        app.update(_lp(name.encode("utf-8")))
        app.update(tree_digest(module_files(name)))
    app.update(hashlib.sha384(_file_bytes(manifest_path, "manifest")).digest())
    if settings_path is None:
        app.update(b"\x00")
    else:
        app.update(b"\x01" + hashlib.sha384(_file_bytes(settings_path, "sidecar settings")).digest())
    app_digest = app.digest()

    pcr1 = extend(ZERO_PCR, core)
    return Measurement(pcr0=extend(pcr1, app_digest), pcr1=pcr1, pcr2=extend(ZERO_PCR, app_digest))
