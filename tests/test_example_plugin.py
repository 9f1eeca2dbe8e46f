"""The example third-party plugin, pip-installed and loaded through its entry point; shutdown.

These run the real console entry point in a subprocess: what an operator runs, signals included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.testing import free_port
from tests.conftest import ROOT, install_plugin_dist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def greeter_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_plugin installed with pip into its own directory (not into the venv)."""
    target = tmp_path_factory.mktemp("greeter-site")
    build = tmp_path_factory.mktemp("greeter-src")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "tests" / "example_plugin")],
        check=True,
        cwd=build,
        timeout=180,
        capture_output=True,
    )  # fmt: skip
    assert (target / "sidecar_greeter" / "__init__.py").exists()
    return target


def write_configs(
    directory: Path, plugins: dict[str, Any], allow: Sequence[str] = (), **settings: Any
) -> tuple[Path, Path, int, int]:
    """enclaver.yaml (egress ``allow`` rules) and sidecar.yaml on free ports; returns both paths and ports."""
    ingress, api = free_port(), free_port()
    manifest = {
        "version": "v1",
        "name": "greeter-test",
        "target": "greeter:enclave",
        "sources": {"app": "greeter:latest"},
        "ingress": [{"listen_port": ingress}],
        "api": {"listen_port": api},
        "egress": {"proxy_port": free_port(), "allow": list(allow)},
    }
    (directory / "enclaver.yaml").write_text(yaml.safe_dump(manifest))
    settings.setdefault("attestation", {"nsm": "emulator"})  # no /dev/nsm on a test machine
    settings.setdefault("aws", {"imds": "off"})  # and no instance metadata service to reach
    (directory / "sidecar.yaml").write_text(yaml.safe_dump({"plugins": plugins, **settings}))
    return directory / "enclaver.yaml", directory / "sidecar.yaml", ingress, api


def env_with(*sites: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(s) for s in sites), env.get("PYTHONPATH", "")])
    return env


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test server
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(
    url: str, status: int, proc: subprocess.Popen[str], within: float = 20.0, until: str | None = None
) -> str:
    """The body of the first answer with ``status`` (and, with ``until``, containing that text)."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sidecar exited early with {proc.returncode}"
        try:
            code, body = get(url)
            if code == status and (until is None or until in body):
                return body
            last = body
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(
        f"{url} never answered {status}" + (f" with {until!r}; last: {last}" if until else "")
    )


def run_to_exit(manifest: Path, config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`sidecar run` that is expected to stop by itself (a failed start, a config error)."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config)],
        env=env_with(site),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def run_sidecar_process(tmp_path: Path, greeter_site: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(manifest: Path, config: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config)],
            env=env_with(greeter_site),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_sidecar_plugins_lists_the_installed_example(tmp_path: Path, greeter_site: Path) -> None:
    manifest, config, _, _ = write_configs(tmp_path, {"greeter": {"config": {"greeting": "Hi"}}})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "plugins",
            "--json",
            "--manifest",
            str(manifest),
            "--config",
            str(config),
        ],
        env=env_with(greeter_site),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    greeter = rows["greeter"]
    assert greeter["version"] == "1.2.3"
    assert greeter["distribution"] == "sidecar-greeter"
    assert greeter["enabled"] is True
    assert greeter["hooks"] == ["lifespan", "readiness", "register_config_schema", "register_routes"]
    assert greeter["routes"] == [
        f"GET /greet (ingress:{yaml.safe_load(manifest.read_text())['ingress'][0]['listen_port']}, sensitive)"
    ]
    assert rows["no_fly_list"]["enabled"] is False  # installed, not enabled by this sidecar.yaml


def test_example_plugin_serves_and_sigterm_shuts_down_cleanly(
    tmp_path: Path, run_sidecar_process: Any
) -> None:
    marker = tmp_path / "marker.txt"
    manifest, config, port, api = write_configs(
        tmp_path, {"greeter": {"config": {"greeting": "Hi", "marker_file": str(marker)}}}
    )
    proc = run_sidecar_process(manifest, config)
    wait_for(f"http://127.0.0.1:{port}/enclave/ready", 200, proc)
    assert get(f"http://127.0.0.1:{port}/greet?name=Big%20Bird") == (200, "Hi, Big Bird!\n")
    assert get(f"http://127.0.0.1:{api}/enclave/health")[0] == 200
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert marker.read_text() == "started\nstopped\n"  # the plugin's clean-up ran
    events = [json.loads(line) for line in stderr.splitlines()]
    names = [e["event"] for e in events]
    assert names.index("shutting_down") < names.index("plugin_stopped") < names.index("stopped")
    assert "Big Bird" not in stderr  # the sensitive route's query never reaches the log
    assert any(e["event"] == "access" and e["path"] == "/greet" for e in events)


def test_sigint_also_exits_zero(tmp_path: Path, run_sidecar_process: Any) -> None:
    manifest, config, port, _ = write_configs(tmp_path, {"greeter": {}})
    proc = run_sidecar_process(manifest, config)
    wait_for(f"http://127.0.0.1:{port}/enclave/health", 200, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_failed_startup_exits_1_naming_the_plugin(tmp_path: Path, run_sidecar_process: Any) -> None:
    site = install_plugin_dist(
        tmp_path / "site2",
        "failing",
        {"doomed": "from sidecar import hookimpl, PluginStartupError\n"
                   "@hookimpl\n"
                   "async def lifespan():\n"
                   "    raise PluginStartupError('the data key was refused')\n"
                   "    yield\n"},
    )  # fmt: skip
    manifest, config, _, _ = write_configs(tmp_path, {"doomed": {}})
    proc = run_to_exit(manifest, config, site)
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    failed = next(e for e in events if e["event"] == "plugin_start_failed")
    assert failed["plugin"] == "doomed" and failed["error"] == "failed to start: the data key was refused"
    assert next(e for e in events if e["event"] == "startup_failed")["plugins"] == ["doomed"]


def test_unready_mode_keeps_serving_with_readiness_false(tmp_path: Path, run_sidecar_process: Any) -> None:
    manifest, config, port, _ = write_configs(
        tmp_path, {"greeter": {"config": {"ready": False}}}, startup={"on_failure": "unready"}
    )
    proc = run_sidecar_process(manifest, config)
    # /enclave/ready is 503 from the first moment (plugins "pending"): wait for the start-up's result.
    body = wait_for(f"http://127.0.0.1:{port}/enclave/ready", 503, proc, until="told to stay unready")
    assert json.loads(body) == {"ready": False, "plugins": {"greeter": "greeter told to stay unready"}}
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_enabled_plugin_that_fails_to_import_is_a_config_error(tmp_path: Path) -> None:
    site = install_plugin_dist(
        tmp_path / "site3", "broken", {"shattered": "import does_not_exist_anywhere\n"}
    )
    manifest, config, _, _ = write_configs(tmp_path, {"shattered": {}})
    proc = run_to_exit(manifest, config, site)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: plugin 'shattered': failed to import broken_shattered: "
        "ModuleNotFoundError: No module named 'does_not_exist_anywhere'"
    ]
