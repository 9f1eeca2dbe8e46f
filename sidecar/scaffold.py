"""``sidecar new-plugin NAME``: write a ready-to-install plugin package.

The package has a ``pyproject.toml`` with the ``sidecar`` entry point, one route, a config schema, a
test that boots a real sidecar with the ``sidecar_factory`` fixture, and a README. The templates are
Python strings here rather than package data, so an installed sidecar always carries them.

The generated code follows the rules in docs/plugins.md: the route that takes personal data is marked
sensitive, the secret setting is marked ``secret=True`` and compared in constant time, and nothing
logs a request's contents.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar import __version__

# Lowercase so the entry-point name, the sidecar.yaml key and the module agree without surprises.
# \Z, not $: "$" also matches before a final newline. No trailing "_": "sidecar-NAME-" is not a valid
# distribution name.
NAME_PATTERN: Final = re.compile(r"^[a-z](?:[a-z0-9_]*[a-z0-9])?\Z")
MAX_NAME_CHARS: Final = 40
RESERVED: Final = frozenset({"sidecar", "plugins", "test", "tests"})


class ScaffoldError(ValueError):
    """NAME or the target directory is unusable; the message says why. The CLI exits 2."""


@dataclass(frozen=True)
class PluginNames:
    """The three names of a plugin: its sidecar.yaml key, its Python module and its distribution."""

    name: str  # the entry-point name and the key under `plugins:` in sidecar.yaml
    module: str  # the importable package
    distribution: str  # the name on PyPI / in `pip install`


def plugin_names(name: str) -> PluginNames:
    """Validate NAME and derive the module and distribution names from it."""
    if not name:
        raise ScaffoldError("the plugin name must not be empty")
    if not NAME_PATTERN.match(name):
        hint = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
        suggestion = f" (e.g. {hint!r})" if hint and NAME_PATTERN.match(hint) else ""
        raise ScaffoldError(
            f"{name!r} is not a valid plugin name: use lowercase letters, digits and underscores, "
            f"starting with a letter and not ending with an underscore{suggestion}"
        )
    if len(name) > MAX_NAME_CHARS:
        raise ScaffoldError(f"the plugin name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    if "__" in name:
        raise ScaffoldError(f"{name!r}: use single underscores between words")
    if keyword.iskeyword(name) or name in RESERVED:
        raise ScaffoldError(f"{name!r} is reserved; choose another plugin name")
    from sidecar.plugins import CORE_PLUGINS, installed_entry_points

    if name in CORE_PLUGINS:
        raise ScaffoldError(f"{name!r} is a core plugin of the sidecar; choose another plugin name")
    installed = installed_entry_points().get(name)
    if installed is not None:
        owner = installed.dist.metadata["Name"] if installed.dist is not None else installed.value
        # Two plugins under one name: only the first is ever loaded, silently.
        raise ScaffoldError(f"a plugin named {name!r} is already installed (by {owner}); choose another name")
    module = name if name.startswith("sidecar_") else f"sidecar_{name}"
    distribution = module.replace("_", "-")
    # "foo" and "sidecar_foo" share a module and a distribution: installing one would uninstall the
    # other (pip replaces a distribution of the same name) or shadow its module.
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        raise ScaffoldError(
            f"a distribution named {distribution!r} is already installed; installing the new package "
            "would replace it. Choose another plugin name"
        )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or []) or "?"
        raise ScaffoldError(
            f"a module named {module!r} is already importable (from {where}); choose another plugin name"
        )
    return PluginNames(name=name, module=module, distribution=distribution)


def render(names: PluginNames) -> dict[str, str]:
    """The package's files: relative path to text."""
    tokens = {  # the longer token first: it contains no shorter one, but keep the order obvious
        "__PLUGIN_NAME_UPPER__": names.name.upper(),
        "__PLUGIN_NAME__": names.name,
        "__PLUGIN_MODULE__": names.module,
        "__PLUGIN_DIST__": names.distribution,
        "__SIDECAR_VERSION__": __version__,
    }
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        ".gitignore": GITIGNORE,
        f"{names.module}/__init__.py": PLUGIN,
        f"{names.module}/py.typed": "",
        f"tests/test_{names.name}.py": TESTS,
    }
    rendered: dict[str, str] = {}
    for path, text in files.items():
        for token, value in tokens.items():
            text = text.replace(token, value)
        rendered[path] = text
    return rendered


def check_target(target: Path) -> None:
    """Refuse a target that is not a directory, or a directory with anything in it."""
    try:
        _check_target(target)
    except OSError as exc:  # a name too long, a path through a file, no permission
        raise ScaffoldError(f"cannot use {target}: {exc.strerror or exc}") from None


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise ScaffoldError(f"{target} is a symbolic link; give a real directory with --dir")
    if target.exists():
        if not target.is_dir():
            raise ScaffoldError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            raise ScaffoldError(f"{target} is not empty; refusing to overwrite it (choose another --dir)")


def write_plugin(name: str, directory: Path | None = None) -> tuple[PluginNames, Path, list[str]]:
    """Write the package for NAME into DIRECTORY (default ``./<distribution>``).

    Returns the names, the directory and the files written. Files are created exclusively, so an
    existing file is never overwritten even if one appears while we write; on any failure, what this
    call created is removed again.
    """
    names = plugin_names(name)
    target = directory if directory is not None else Path.cwd() / names.distribution
    check_target(target)
    files = render(names)
    created_dir = not target.exists()
    written: list[Path] = []
    made: list[Path] = []  # subdirectories this call created, outermost first
    try:
        target.mkdir(parents=True, exist_ok=True)
        for relative, text in files.items():
            path = target / relative
            for parent in reversed(path.relative_to(target).parents[:-1]):
                if not (target / parent).exists():
                    (target / parent).mkdir()
                    made.append(target / parent)
            with path.open("x", encoding="utf-8", newline="\n") as f:
                written.append(path)
                f.write(text)
    except FileExistsError as exc:
        _undo(target, created_dir, written, made)
        raise ScaffoldError(f"{exc.filename} appeared while writing; nothing was left behind") from None
    except OSError as exc:
        _undo(target, created_dir, written, made)
        raise ScaffoldError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None
    return names, target, list(files)


def _undo(target: Path, created_dir: bool, written: list[Path], made: list[Path]) -> None:
    """Remove exactly what this call created, never anything someone else put there meanwhile."""
    for path in written:
        with contextlib.suppress(OSError):
            path.unlink()
    for directory in [*reversed(made), *([target] if created_dir else [])]:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty


def next_steps(names: PluginNames, target: Path) -> str:
    """What to do after ``sidecar new-plugin``, printed by the CLI."""
    return NEXT_STEPS.replace("__DIR__", str(target)).replace("__PLUGIN_NAME__", names.name)


NEXT_STEPS: Final = """\
next steps:
  cd __DIR__
  pip install -e '.[test]'     # registers the `sidecar` entry point
  pytest                       # boots a real sidecar with your plugin
  sidecar plugins              # lists __PLUGIN_NAME__
then enable it in sidecar.yaml:
  plugins:
    __PLUGIN_NAME__:
      listen_port: 8001        # an ingress port of enclaver.yaml
      config: {greeting: Hello}
"""

PYPROJECT: Final = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "__PLUGIN_DIST__"
version = "0.1.0"
description = "An enclave-sidecar plugin: __PLUGIN_NAME__"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["enclave-sidecar>=__SIDECAR_VERSION__"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.23"]

# The sidecar finds plugins in this entry-point group. The name on the left is the plugin's key
# under `plugins:` in sidecar.yaml.
[project.entry-points.sidecar]
__PLUGIN_NAME__ = "__PLUGIN_MODULE__"

[tool.setuptools]
packages = ["__PLUGIN_MODULE__"]

[tool.setuptools.package-data]
"__PLUGIN_MODULE__" = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"

[tool.mypy]
strict = true

[tool.ruff]
line-length = 110
"""

PLUGIN: Final = '''\
"""__PLUGIN_NAME__: an enclave-sidecar plugin.

GET /__PLUGIN_NAME__/greet?name=NAME answers {"greeting": "<greeting>, NAME!"}. A name is personal
data, so the route is marked sensitive: the access log records the route's pattern, never its query
string. When ``api_token`` is set, callers must send ``Authorization: Bearer <token>``.

The hooks are documented in enclave-sidecar's docs/plugins.md.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Iterable

from aiohttp import web
from sidecar import Listener, PluginContext, Route, hookimpl
from sidecar.logs import event
from sidecar.schema import Int, Map, Str


@hookimpl
def register_config_schema() -> Map:
    # Checked at start-up and by `sidecar config`: an unknown key or a wrong type stops the sidecar
    # with "sidecar.yaml: plugins.__PLUGIN_NAME__.config.<key>: <problem>".
    return Map(
        fields={
            "greeting": Str(default="Hello", min_len=1, max_len=40, doc="the word before the name"),
            "max_name_chars": Int(default=64, min=1, max=1024, doc="longer names are refused with 400"),
            # secret=True: masked in `sidecar config`, never echoed in an error message.
            "api_token": Str(secret=True, doc="when set, callers must send Authorization: Bearer TOKEN"),
        }
    )


@hookimpl
def register_routes(listener: Listener, context: PluginContext) -> Iterable[Route]:
    greeting: str = context.config["greeting"]
    max_chars: int = context.config["max_name_chars"]
    token: str | None = context.config["api_token"]

    async def greet(request: web.Request) -> web.Response:
        if token is not None and not _authorized(request, token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        name = request.query.get("name", "").strip()
        if not name:
            return web.json_response({"error": "the query parameter 'name' is required"}, status=400)
        if len(name) > max_chars:
            return web.json_response({"error": f"'name' is over {max_chars} characters"}, status=400)
        return web.json_response({"greeting": f"{greeting}, {name}!"})

    # sensitive=True: no log line ever records this route's concrete path or query string.
    return [Route("GET", "/__PLUGIN_NAME__/greet", greet, sensitive=True)]


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    # Start-up runs once the listeners are open; /enclave/ready answers 503 until it yields. Load
    # data and open clients here; raise sidecar.PluginStartupError("public reason") to fail closed.
    event(context.log, logging.INFO, "plugin_started")
    yield
    # Clean-up runs at shutdown, even when another plugin failed.
    event(context.log, logging.INFO, "plugin_stopped")


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes the same time wherever the first wrong byte is. surrogateescape: a header
    # that is not UTF-8 arrives with lone surrogates, and a plain encode() would answer 500, not 401.
    given = presented.encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode())
'''

TESTS: Final = '''\
"""Tests for the __PLUGIN_NAME__ plugin: a real sidecar, in-process, on ephemeral ports.

enclave-sidecar registers the `sidecar_factory` fixture with pytest. Run: pip install -e '.[test]'
and then pytest.
"""

from __future__ import annotations

from typing import Any

import pytest
from sidecar.config import ConfigError
from sidecar.testing import SidecarFactory, SidecarHarness

import __PLUGIN_MODULE__

NAME = "__PLUGIN_NAME__"
PATH = "/__PLUGIN_NAME__/greet"


async def start(sidecar_factory: SidecarFactory, **config: Any) -> SidecarHarness:
    sc = await sidecar_factory(plugins={NAME: __PLUGIN_MODULE__}, config={NAME: config})
    await sc.wait_started()
    return sc


async def test_greets_by_name(sidecar_factory: SidecarFactory) -> None:
    sc = await start(sidecar_factory, greeting="Hi")
    async with sc.session.get(sc.url(PATH), params={"name": "Ana"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"greeting": "Hi, Ana!"}


async def test_missing_or_long_name_is_a_client_error(sidecar_factory: SidecarFactory) -> None:
    sc = await start(sidecar_factory, max_name_chars=3)
    async with sc.session.get(sc.url(PATH)) as resp:
        assert resp.status == 400
    async with sc.session.get(sc.url(PATH), params={"name": "Anna"}) as resp:
        assert resp.status == 400


async def test_token_is_required_when_configured(sidecar_factory: SidecarFactory) -> None:
    """Threat: anyone who reaches the port uses the plugin. With api_token set, only its holders can."""
    sc = await start(sidecar_factory, api_token="s3cret-token")
    params = {"name": "Ana"}
    async with sc.session.get(sc.url(PATH), params=params) as resp:
        assert resp.status == 401
    wrong = {"Authorization": "Bearer s3cret-tokem"}
    async with sc.session.get(sc.url(PATH), params=params, headers=wrong) as resp:
        assert resp.status == 401
    right = {"Authorization": "Bearer s3cret-token"}
    async with sc.session.get(sc.url(PATH), params=params, headers=right) as resp:
        assert resp.status == 200


async def test_routes_are_sensitive(sidecar_factory: SidecarFactory) -> None:
    """Threat: names in the access log. A sensitive route's query string is never logged."""
    sc = await start(sidecar_factory)
    routes = [route for _, route in sc.runtime.routes_of(NAME)]
    assert routes
    assert all(route.sensitive for route in routes)


async def test_bad_config_stops_start_up(sidecar_factory: SidecarFactory) -> None:
    with pytest.raises(ConfigError, match=r"plugins\\.__PLUGIN_NAME__\\.config\\.greeting"):
        await start(sidecar_factory, greeting="")


async def test_installed_entry_point_loads(sidecar_factory: SidecarFactory) -> None:
    """The package's `sidecar` entry point names this module. Needs the package installed."""
    sc = await sidecar_factory(installed=[NAME], config={NAME: {}})
    await sc.wait_started()
    async with sc.session.get(sc.url(PATH), params={"name": "Ana"}) as resp:
        assert resp.status == 200
'''

README: Final = """\
# __PLUGIN_DIST__

An [enclave-sidecar](https://pypi.org/project/enclave-sidecar/) plugin. It serves
`GET /__PLUGIN_NAME__/greet?name=NAME` and answers `{"greeting": "Hello, NAME!"}`.

## Develop

```sh
pip install -e '.[test]'   # also registers the plugin's `sidecar` entry point
pytest                     # boots a real sidecar in-process with the sidecar_factory fixture
sidecar plugins            # lists __PLUGIN_NAME__ with its hooks
```

## Enable it

In `sidecar.yaml` (check it with `sidecar config`):

```yaml
plugins:
  __PLUGIN_NAME__:
    listen_port: 8001            # one of the ingress ports in enclaver.yaml
    config:
      greeting: Hello
      max_name_chars: 64
      api_token: {"$env": __PLUGIN_NAME_UPPER___TOKEN}   # optional; masked in `sidecar config`
```

| key | default | meaning |
|---|---|---|
| `greeting` | `Hello` | the word before the name (1 to 40 characters) |
| `max_name_chars` | `64` | longer names get `400` |
| `api_token` | unset | when set, callers send `Authorization: Bearer TOKEN`; others get `401` |

The plugin's code and config are part of the enclave image, so they are measured into PCR0: a KMS
key pinned to the old PCR0 refuses an image with a changed plugin.

## Rules this plugin follows (docs/plugins.md in enclave-sidecar)

- Routes that carry personal data are `sensitive=True`: no log records their path or query string.
- Secrets are `secret=True` in the schema and compared with `hmac.compare_digest`.
- Nothing logs a request's contents, a secret or a token.
- Outbound HTTP goes through `context.http` (the egress proxy and its policy); blocking calls such as
  boto3 run in `asyncio.to_thread`.
"""

GITIGNORE: Final = """\
__pycache__/
*.egg-info/
build/
dist/
.pytest_cache/
.mypy_cache/
.ruff_cache/
"""
