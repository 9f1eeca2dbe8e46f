"""The deployment artefacts: the Dockerfile (parsed with the `dockerfile` package, which wraps
BuildKit's own Go parser), .dockerignore, deploy/constraints.txt, the odyn shim, the systemd units,
and bringing the enclave's loopback interface up. No Docker engine runs here.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import dockerfile  # type: ignore[import-not-found]  # BuildKit's parser, compiled; no stubs
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sidecar.cli import build_cli
from sidecar.config import (
    MANIFEST_ENV,
    MANIFEST_SEARCH,
    SETTINGS_ENV,
    SETTINGS_SEARCH,
    load_yaml,
    parse_settings,
)
from tests.conftest import ROOT
from tests.test_docs import check_command, code_blocks, logical_lines, simple_commands

# A full X.Y.Z version and a named Debian release; optionally a digest. Never `latest`, never `3.11`.
PINNED_BASE = re.compile(r"^python:3\.\d+\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?$")
# What nitro-cli's init searches for the entrypoint (init.c: DEFAULT_PATH_ENV).
INIT_PATH = ("/sbin", "/usr/sbin", "/bin", "/usr/bin")
# Tools that have no business in the enclave image.
DEV_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|gcc|g\+\+|cc|clang|make|build-essential|git|curl|wget|ssh|vim|gdb|strace)\b"
)

Stage = list[dockerfile.Command]


def stages() -> list[tuple[str, Stage]]:
    """(stage name or index, instructions) for each FROM."""
    result: list[tuple[str, Stage]] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            value = command.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else str(len(result))
            result.append((name, [command]))
        else:
            assert result, f"line {command.start_line}: {command.cmd} before the first FROM"
            result[-1][1].append(command)
    return result


def final_stage() -> Stage:
    return stages()[-1][1]


def run_words(stage: Stage) -> list[list[str]]:
    """Every simple command of every RUN in the stage, split as a shell would (no expansion)."""
    words: list[list[str]] = []
    for command in stage:
        if command.cmd == "RUN":
            assert not command.json, "RUN in exec form: keep RUN in shell form so it reads as one script"
            for line in command.value:
                words.extend(simple_commands(line))
    return words


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            pairs = command.value
            env.update(zip(pairs[0::2], pairs[1::2], strict=True))
    return env


def copies_from_context(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD that reads the build context (no --from)."""
    found = []
    for command in stage:
        if command.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in command.flags):
            *sources, destination = command.value
            found.append((sources, destination))
    return found


# --------------------------------------------------------------------------- Dockerfile


def test_every_base_image_is_pinned_to_one_version() -> None:
    """Threat: an unpinned base (`python:3.11-slim`, `latest`) changes under the same Dockerfile, so
    the image, and PCR0, change without a commit to explain them."""
    names = [name for name, _ in stages()]
    bases = []
    for _, stage in stages():
        image = stage[0].value[0]
        if image == "scratch" or image in names:
            continue
        assert PINNED_BASE.match(image), f"base image {image!r} is not pinned to a full version"
        bases.append(image)
    assert bases
    assert len(set(bases)) == 1, f"the build and the final stage must share one base (ABI): {bases}"


def test_final_stage_starts_from_the_pinned_base_not_the_build_stage() -> None:
    """Threat: `FROM build` would carry the build stage's tools and sources into the enclave."""
    name, stage = stages()[-1]
    image = stage[0].value[0]
    assert PINNED_BASE.match(image), f"the final stage {name!r} starts from {image!r}"


def test_final_stage_installs_only_the_runtime_wheels() -> None:
    """No dev extras, no compilers, no package manager, no network at install time, no source tree."""
    stage = final_stage()
    commands = run_words(stage)
    joined = [" ".join(words) for words in commands]
    for text in joined:
        assert not DEV_TOOLS.search(text), f"the final stage runs a dev tool: {text!r}"
    installs = [w for w in commands if w[:4] == ["python", "-m", "pip", "install"]]
    assert len(installs) == 1, f"expected one pip install in the final stage, got {joined}"
    args = installs[0][4:]
    assert "--no-index" in args, "the final pip install must not reach an index"
    assert "--find-links" in args
    requirements = [a for a in args if not a.startswith("-") and a != args[args.index("--find-links") + 1]]
    assert requirements == ["enclave-sidecar"], f"install exactly the package, no extras: {requirements}"
    uninstalls = [w for w in commands if w[:4] == ["python", "-m", "pip", "uninstall"]]
    assert uninstalls and {"pip", "setuptools", "wheel"} <= set(uninstalls[0]), "remove the installers"
    for sources, _ in copies_from_context(stage):
        for source in sources:
            assert source.rstrip("/") not in {".", "sidecar", "plugins", "tests"}, (
                f"the final stage copies source {source!r}; code arrives only as the wheel"
            )


def test_build_stage_takes_dependencies_as_pinned_prebuilt_wheels() -> None:
    """Threat: a dependency's sdist runs arbitrary setup.py code at build time, or a newer release
    slips in. Dependencies come only as wheels (--only-binary) at deploy/constraints.txt's versions."""
    commands = run_words(stages()[0][1])
    wheel_runs = [w for w in commands if w[:4] == ["python", "-m", "pip", "wheel"]]
    deps = [w for w in wheel_runs if "--no-deps" not in w]
    assert deps, "no pip wheel for the dependencies"
    for words in deps:
        assert "--only-binary=:all:" in words
        assert "--constraint" in words and words[words.index("--constraint") + 1] == "deploy/constraints.txt"


def test_user_is_numeric_non_root_and_set_before_the_entrypoint() -> None:
    """Threat: the process runs as root under runtimes that honour USER (docker run, Kubernetes)."""
    stage = final_stage()
    cmds = [c.cmd for c in stage]
    assert "ENTRYPOINT" in cmds and "USER" in cmds
    entry = cmds.index("ENTRYPOINT")
    users = [c for c in stage[:entry] if c.cmd == "USER"]
    assert users, "USER must come before ENTRYPOINT"
    assert not any(c.cmd == "USER" for c in stage[entry:]), "no USER may follow ENTRYPOINT"
    user = users[-1].value[0]
    uid, _, gid = user.partition(":")
    # Numeric, so a runtime can check non-root without reading /etc/passwd (runAsNonRoot).
    assert uid.isdigit() and (not gid or gid.isdigit()), f"USER {user!r} is not numeric"
    assert int(uid) != 0 and gid != "0", f"USER {user!r} is root"
    created = [w for w in run_words(stage) if w and w[0] == "useradd"]
    assert created and created[0][created[0].index("--uid") + 1] == uid, "USER's uid is not the created user"


def test_entrypoint_is_exactly_sidecar_run_in_exec_form() -> None:
    """Exec form: no shell between the init and the sidecar, so signals reach it. No CMD: nothing
    appended to `sidecar run` (Enclaver appends CMD to the entrypoint)."""
    stage = final_stage()
    entrypoints = [c for c in stage if c.cmd == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert entrypoints[0].json, "ENTRYPOINT must be in exec (JSON) form"
    assert entrypoints[0].value == ("sidecar", "run")
    assert not [c for c in stage if c.cmd == "CMD"]
    assert stage[-1].cmd == "ENTRYPOINT"


def test_sidecar_is_found_on_the_enclave_init_path() -> None:
    """nitro-cli's init execs the entrypoint with PATH=/sbin:/usr/sbin:/bin:/usr/bin, which lacks
    /usr/local/bin where pip puts console scripts in the python image."""
    links = [w for w in run_words(final_stage()) if w[:2] == ["ln", "-s"]]
    targets = {os.path.dirname(w[3]) for w in links if w[2] == "/usr/local/bin/sidecar" and len(w) == 4}
    assert targets & set(INIT_PATH), f"no link to /usr/local/bin/sidecar in {INIT_PATH}"


def test_config_files_are_where_the_sidecar_looks() -> None:
    stage = final_stage()
    copies = {sources[0]: destination for sources, destination in copies_from_context(stage)}
    env = env_of(stage)
    settings_path = copies.get("sidecar.yaml")
    manifest_path = copies.get("enclaver.yaml")
    assert settings_path == "/etc/sidecar/sidecar.yaml"
    assert Path(settings_path) in SETTINGS_SEARCH
    assert manifest_path == "/etc/enclaver/enclaver.yaml"  # where `enclaver build` puts it too
    assert Path(manifest_path) in MANIFEST_SEARCH
    # Named explicitly: inside the enclave the working directory is "/", whatever WORKDIR says.
    assert env.get(SETTINGS_ENV) == settings_path
    assert env.get(MANIFEST_ENV) == manifest_path


def test_state_dir_exists_and_belongs_to_the_user() -> None:
    """sidecar.yaml's relative state_dir resolves next to /etc/sidecar/sidecar.yaml; a non-root
    sidecar must be able to write there, and nobody else."""
    settings = parse_settings(load_yaml(ROOT / "sidecar.yaml"), Path("/etc/sidecar/sidecar.yaml"))
    state = str(settings.state_dir)
    made = [w for w in run_words(final_stage()) if w[:2] == ["install", "-d"] and w[-1] == state]
    assert made, f"the image does not create the state dir {state}"
    words = made[0]
    owner = words[words.index("-o") + 1]
    created = [w for w in run_words(final_stage()) if w and w[0] == "useradd"]
    assert owner == created[0][-1], f"{state} belongs to {owner}, not to the image's user"
    assert words[words.index("-m") + 1] == "0700"


def test_odyn_shim_stage_puts_the_shim_where_enclaver_takes_odyn_from() -> None:
    """Enclaver copies /usr/local/bin/odyn out of the `sources.supervisor` image."""
    shim = dict(stages())["odyn-shim"]
    assert shim[0].value[0] == "scratch"
    copies = copies_from_context(shim)
    assert copies == [(["deploy/odyn-shim"], "/usr/local/bin/odyn")]
    chmod = [f for c in shim if c.cmd == "COPY" for f in c.flags if f.startswith("--chmod=")]
    assert chmod and int(chmod[0].split("=", 1)[1], 8) & 0o111, "the shim must be executable"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    """Threat: the build context carries .sidecar-state (the dev world's private keys), .venv or .git
    into a layer. The ignore file is an allowlist, and it allows only the Dockerfile's COPY sources."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for _, stage in stages()
        for sources, _ in copies_from_context(stage)
        for source in sources
    }
    assert allowed == copied
    for secret in (".sidecar-state", ".venv", ".git", "tests", ".hypothesis"):
        assert not any(a == secret or a.startswith(secret + "/") for a in allowed)


def test_constraints_pin_every_runtime_dependency() -> None:
    """The image installs what deploy/constraints.txt names: each direct dependency pinned with ==,
    at a version pyproject.toml accepts."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        assert canonicalize_name(req.name) not in pins, f"pinned twice: {req.name}"
        pins[canonicalize_name(req.name)] = specs[0].version
    for text in project["dependencies"]:
        dep = Requirement(text)
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not pinned in deploy/constraints.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), (
            f"{dep.name}=={pins[name]} does not satisfy pyproject's {dep.specifier}"
        )


# --------------------------------------------------------------------------- odyn shim


def shim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ROOT / "deploy" / "odyn-shim"), *args], capture_output=True, text=True, timeout=10
    )


def test_odyn_shim_execs_the_entrypoint_after_odyn_options() -> None:
    """What Enclaver runs: `odyn --config-dir /etc/enclaver -- ENTRYPOINT CMD`."""
    done = shim("--config-dir", "/etc/enclaver", "--", "printf", "[%s]\\n", "sidecar", "run with space")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[sidecar]\n[run with space]\n"
    assert shim("-v", "--config-dir=/x", "--", "sh", "-c", "exit 7").returncode == 7


@pytest.mark.parametrize(
    "args",
    [
        ("--config-dir", "/etc/enclaver"),  # no entrypoint
        ("--config-dir",),  # option without its value
        ("--unknown", "--", "true"),  # an odyn option we do not know: refuse, do not guess
    ],
)
def test_odyn_shim_refuses_what_it_does_not_understand(args: tuple[str, ...]) -> None:
    done = shim(*args)
    assert done.returncode == 2
    assert done.stderr.startswith("odyn-shim: ")


def test_odyn_shim_is_executable() -> None:
    assert os.access(ROOT / "deploy" / "odyn-shim", os.X_OK)


# --------------------------------------------------------------------------- systemd units


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((ROOT / "deploy" / name).read_text())
    return parser


def manifest_defaults() -> dict[str, int]:
    data = yaml.safe_load((ROOT / "enclaver.yaml").read_text())
    return {"--cpu-count": data["defaults"]["cpu_count"], "--memory": data["defaults"]["memory_mb"]}


def option(words: list[str], name: str) -> str:
    assert name in words, f"{name} missing from {words}"
    return words[words.index(name) + 1]


def test_host_unit_runs_a_real_sidecar_host_command(capsys: pytest.CaptureFixture[str]) -> None:
    service = unit("sidecar-host.service")["Service"]
    words = shlex.split(service["ExecStart"])
    assert words[0].endswith("/bin/sidecar")
    group = build_cli()
    assert isinstance(group, click.Group)
    check_command(group, words[1:], "deploy/sidecar-host.service", capsys)
    assert words[1] == "host"


def test_host_unit_is_unprivileged_and_sandboxed() -> None:
    """Threat: the parent half faces the network and the enclave's requests; if compromised, it must
    hold no capability and no write access to the system."""
    service = unit("sidecar-host.service")["Service"]
    assert service["User"] not in ("root", "0")
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    families = set(service["RestrictAddressFamilies"].split())
    assert "AF_VSOCK" in families and "AF_PACKET" not in families


def test_units_agree_with_each_other_and_the_manifest() -> None:
    host = shlex.split(unit("sidecar-host.service")["Service"]["ExecStart"])
    enclave = unit("sidecar-enclave.service")
    run = shlex.split(enclave["Service"]["ExecStart"])
    assert run[1:2] == ["run-enclave"]
    assert option(host, "--cid") == option(run, "--enclave-cid")
    for name, value in manifest_defaults().items():
        assert int(option(run, name)) == value, f"{name} differs from enclaver.yaml defaults"
    assert "--debug-mode" not in run, "a debug-mode enclave attests with all-zero PCRs"
    stop = shlex.split(enclave["Service"]["ExecStop"])
    assert option(stop, "--enclave-name") == option(run, "--enclave-name")
    assert "sidecar-enclave.service" in unit("sidecar-host.service")["Unit"]["PartOf"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: an unknown or misspelled directive is reported, not silently ignored."""
    sidecar = Path(sys.executable).with_name("sidecar")
    (tmp_path / "sidecar-host.service").write_text(
        (ROOT / "deploy" / "sidecar-host.service")
        .read_text()
        .replace("/opt/enclave-sidecar/bin/sidecar", str(sidecar))
    )
    (tmp_path / "sidecar-enclave.service").write_text(
        (ROOT / "deploy" / "sidecar-enclave.service").read_text().replace("/usr/bin/nitro-cli", "/bin/true")
    )
    # A stand-in for the unit the Nitro Enclaves CLI package installs.
    (tmp_path / "nitro-enclaves-allocator.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n"
    )
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "sidecar-host.service"),
            str(tmp_path / "sidecar-enclave.service"),
        ],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stderr + done.stdout
    )


# --------------------------------------------------------------------------- the guide's numbers


def test_deploying_guide_uses_the_manifest_defaults_and_the_unit_cid() -> None:
    """The nitro-cli command in the guide reserves what enclaver.yaml declares, on the units' CID."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    runs = [
        words
        for language, body, _ in code_blocks(text)
        if language == "sh"
        for line, _ in logical_lines(body)
        for words in simple_commands(line)
        if words[:2] == ["nitro-cli", "run-enclave"]
    ]
    assert runs
    cid = option(shlex.split(unit("sidecar-enclave.service")["Service"]["ExecStart"]), "--enclave-cid")
    for words in runs:
        for name, value in manifest_defaults().items():
            assert int(option(words, name)) == value
        assert option(words, "--enclave-cid") == cid
    allocator = re.search(r"memory_mib: (\d+)/; s/\^cpu_count:\.\*/cpu_count: (\d+)/", text)
    assert allocator, "the guide no longer sets the allocator"
    assert (int(allocator.group(1)), int(allocator.group(2))) == (
        manifest_defaults()["--memory"],
        manifest_defaults()["--cpu-count"],
    )


# --------------------------------------------------------------------------- loopback

UNSHARE = shutil.which("unshare")

PROBE = """
import socket, sys
from sidecar.loopback import bring_up_loopback, loopback_is_up

def reachable():
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        try:
            client.connect(server.getsockname())
            return True
        except OSError:
            return False

print(loopback_is_up(), reachable(), bring_up_loopback(), loopback_is_up(), reachable(), bring_up_loopback())
"""


@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare(1)")
def test_loopback_comes_up_in_a_fresh_network_namespace() -> None:
    """A fresh network namespace starts like an enclave: `lo` down, 127.0.0.1 unreachable although
    binding it works. After bring_up_loopback, connections succeed; a second call changes nothing."""
    done = subprocess.run(
        [str(UNSHARE), "--net", sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True", "True", "True", "False"]


@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs root, unshare(1) and setpriv(1)")
def test_loopback_without_privilege_is_a_clear_oserror() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv(1) is not installed")
    code = (
        "from sidecar.loopback import bring_up_loopback\n"
        "try:\n bring_up_loopback()\nexcept PermissionError:\n print('EPERM')"
    )
    done = subprocess.run(
        [
            str(UNSHARE),
            "--net",
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.stdout.strip() == "EPERM", done.stderr


def test_loopback_already_up_needs_no_privilege() -> None:
    from sidecar.loopback import bring_up_loopback, loopback_is_up

    assert loopback_is_up()
    assert bring_up_loopback() is False
    with pytest.raises(ValueError, match="1 to 15 bytes"):
        loopback_is_up("x" * 16)
    with pytest.raises(OSError):
        loopback_is_up("nosuchif0")
