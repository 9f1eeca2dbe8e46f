"""`sidecar new-plugin NAME [--dir DIR]`: a ready-to-install plugin package, and the refusals.

The slow test pip-installs the generated package into its own directory (never into the venv),
checks that `sidecar plugins` lists it, and runs the package's own tests, which must pass and must
fail when the plugin breaks one of the security rules they check.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.scaffold import ScaffoldError, plugin_names, render, write_plugin
from tests.conftest import ROOT

RUFF = Path(sys.executable).with_name("ruff")


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["new-plugin", *args])
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def test_writes_the_package_into_sidecar_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli("hello") == 0
    target = tmp_path / "sidecar-hello"
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == [
        ".gitignore",
        "README.md",
        "pyproject.toml",
        "sidecar_hello/__init__.py",
        "sidecar_hello/py.typed",
        "tests/test_hello.py",
    ]
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["name"] == "sidecar-hello"
    assert project["project"]["entry-points"]["sidecar"] == {"hello": "sidecar_hello"}
    assert any(dep.startswith("enclave-sidecar") for dep in project["project"]["dependencies"])
    assert project["tool"]["setuptools"]["packages"] == ["sidecar_hello"]
    source = (target / "sidecar_hello" / "__init__.py").read_text()
    tree = ast.parse(source)
    hooks = {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "hookimpl" for d in f.decorator_list)
    }
    assert {"register_config_schema", "register_routes", "lifespan"} <= hooks
    assert 'Route("GET", "/hello/greet", greet, sensitive=True)' in source
    assert "secret=True" in source
    test_source = (target / "tests" / "test_hello.py").read_text()
    ast.parse(test_source)
    assert "sidecar_factory" in test_source
    assert "__PLUGIN" not in "".join(p.read_text() for p in target.rglob("*") if p.is_file())


def test_dir_option_and_an_existing_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "here"
    empty.mkdir()
    assert run_cli("hello", "--dir", str(empty)) == 0
    assert (empty / "sidecar_hello" / "__init__.py").exists()
    nested = tmp_path / "a" / "b"
    assert run_cli("sidecar_tools", "--dir", str(nested)) == 0
    # A name that already says "sidecar" is not prefixed twice.
    assert (nested / "sidecar_tools" / "__init__.py").exists()
    project = tomllib.loads((nested / "pyproject.toml").read_text())["project"]
    assert project["name"] == "sidecar-tools"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("My-Plugin", "not a valid plugin name.*'my_plugin'"),
        ("hello-world", "not a valid plugin name.*'hello_world'"),
        ("1st", "not a valid plugin name"),
        ("a b", "not a valid plugin name"),
        ("über", "not a valid plugin name"),
        ("x" * 41, "limit is 40"),
        ("a__b", "single underscores"),
        ("class", "reserved"),
        ("sidecar", "reserved"),
        ("aws", "core plugin"),
        ("no_fly_list", "already installed.*enclave-sidecar"),
    ],
)
def test_refuses_bad_names_with_exit_2(
    name: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(name) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    with pytest.raises(ScaffoldError, match=message):
        plugin_names(name)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_name_whose_module_or_distribution_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: "sidecar_foo" shares plugin "foo"'s distribution and module; installing it uninstalls foo.
    info = tmp_path / "sidecar_foo-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sidecar-foo\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[sidecar]\nfoo = sidecar_foo\n")
    (tmp_path / "sidecar_bar").mkdir()
    (tmp_path / "sidecar_bar" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ScaffoldError, match="already installed"):
        plugin_names("foo")
    with pytest.raises(ScaffoldError, match="distribution named 'sidecar-foo' is already installed"):
        plugin_names("sidecar_foo")
    with pytest.raises(ScaffoldError, match="module named 'sidecar_bar' is already importable"):
        plugin_names("bar")
    assert plugin_names("baz").module == "sidecar_baz"


def test_refuses_a_non_empty_dir_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Threat: the generator overwrites someone's work."""
    target = tmp_path / "busy"
    target.mkdir()
    (target / "pyproject.toml").write_text("mine\n")
    assert run_cli("hello", "--dir", str(target)) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["pyproject.toml"]
    assert (target / "pyproject.toml").read_text() == "mine\n"


def test_refuses_a_file_or_a_symlink_as_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    assert run_cli("hello", "--dir", str(file)) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert run_cli("hello", "--dir", str(tmp_path / "link")) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list((tmp_path / "real").iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_open = Path.open

    def failing_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if tmp_path in self.parents:
            calls["n"] += 1
        if calls["n"] == 4 and tmp_path in self.parents:
            raise OSError(28, "No space left on device", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    fresh = tmp_path / "fresh"
    with pytest.raises(ScaffoldError, match="No space left"):
        write_plugin("hello", fresh)
    assert not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    calls["n"] = 0
    with pytest.raises(ScaffoldError):
        write_plugin("hello", existing)
    assert existing.exists() and list(existing.iterdir()) == []


@pytest.mark.skipif(not RUFF.exists(), reason="ruff is not installed next to this Python")
def test_generated_code_is_lint_clean(tmp_path: Path) -> None:
    target = tmp_path / "gen"
    write_plugin("lint_me", target)
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([str(RUFF), *args], cwd=target, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_generated_token_check_refuses_a_non_utf8_header(tmp_path: Path) -> None:
    # Threat: bytes that are not UTF-8 in Authorization made the generated route answer 500, not 401.
    write_plugin("token_check", tmp_path / "gen")
    spec = importlib.util.spec_from_file_location(
        "generated_token_check", tmp_path / "gen" / "sidecar_token_check" / "__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def request(authorization: str) -> Any:
        return types.SimpleNamespace(headers={"Authorization": authorization})

    # aiohttp decodes a header's bytes as UTF-8 with surrogateescape: b"\xff" arrives as "\udcff".
    assert module._authorized(request("Bearer \udcff\udcfe"), "tok") is False
    assert module._authorized(request("Bearer tok"), "tok") is True


def test_render_substitutes_every_token() -> None:
    files = render(plugin_names("hello_world"))
    text = "".join(files.values())
    assert "__PLUGIN" not in text and "__SIDECAR_VERSION__" not in text
    assert '{"$env": HELLO_WORLD_TOKEN}' in files["README.md"]


# --------------------------------------------------------------------------- installed for real


def env_with_site(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_ADDOPTS", None)
    return env


@pytest.mark.slow
def test_generated_plugin_installs_lists_and_passes_its_own_tests(tmp_path: Path) -> None:
    target = tmp_path / "sidecar-greeting-demo"
    site = tmp_path / "site"
    assert run_cli("greeting_demo", "--dir", str(target)) == 0
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(target)],
        check=True, cwd=tmp_path, timeout=180, capture_output=True,
    )  # fmt: skip
    env = env_with_site(site)

    listed = subprocess.run(
        [sys.executable, "-m", "sidecar", "plugins", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    row = rows["greeting_demo"]
    assert row["distribution"] == "sidecar-greeting-demo"
    assert row["version"] == "0.1.0"
    assert row["module"] == "sidecar_greeting_demo"
    assert {"register_config_schema", "register_routes", "lifespan"} <= set(row["hooks"])

    # The package's own tests, against the installed copy: -P keeps the source tree (the working
    # directory) off sys.path, so the import resolves to the site the package was installed into.
    pytest_cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    passed = subprocess.run(pytest_cmd, cwd=target, env=env, capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-2000:]
    assert "6 passed" in passed.stdout

    # They can fail: a plugin that drops sensitive=True is caught by its own test.
    installed = site / "sidecar_greeting_demo" / "__init__.py"
    installed.write_text(installed.read_text().replace("sensitive=True", "sensitive=False"))
    shutil.rmtree(site / "sidecar_greeting_demo" / "__pycache__", ignore_errors=True)
    broken = subprocess.run(
        [*pytest_cmd, "-k", "sensitive"], cwd=target, env=env, capture_output=True, text=True, timeout=120
    )
    assert broken.returncode == 1, broken.stdout[-2000:]
    assert "1 failed" in broken.stdout


def test_the_generated_tests_use_the_fixtures_this_sidecar_ships() -> None:
    """The template names fixtures and helpers that must exist in sidecar.testing."""
    from sidecar import testing

    text = render(plugin_names("fixture_check"))["tests/test_fixture_check.py"]
    for name in ("SidecarFactory", "SidecarHarness"):
        assert f"{name}" in text and hasattr(testing, name)
    assert (ROOT / "sidecar" / "testing.py").exists()
