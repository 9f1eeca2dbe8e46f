"""The docs stay true: every `sidecar ...` command they show exists and parses, and the hook reference
matches sidecar/hookspecs.py.

Threat: an operator following docs/deploying.md runs a command that no longer exists, or with an
option that was renamed, in the middle of creating a KMS key policy; or a plugin author codes
against a hook signature the sidecar no longer calls. Each of these must fail here first.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path

import click
import pytest

from sidecar import hookspecs, schema, testing
from sidecar.cli import build_cli, main
from sidecar.context import PluginContext
from sidecar.routes import Listener, Route
from tests.conftest import ROOT

DOCS = (ROOT / "docs" / "deploying.md", ROOT / "docs" / "plugins.md", ROOT / "README.md")
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
# Control operators end a simple command; `$(` opens a command substitution.
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", "$(", "`"}
REDIRECTIONS = re.compile(r"^\d*(>>?|<<?-?|>&|<&|&>)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PREFIXES = ("sudo", "env", "exec", "time", "nohup", "xargs", "watch")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

# Sample values for the shell variables the docs use, so options parse with realistic input.
SAMPLE_KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SAMPLES = {
    "PCR0": "ab" * 48,
    "NEW_PCR0": "cd" * 48,
    "ACCOUNT": "111122223333",
    "REGION": "us-east-1",
    "BUCKET": "no-fly-list-111122223333",
    "KEY_ARN": SAMPLE_KEY_ARN,
    "NEW_KEY_ARN": SAMPLE_KEY_ARN,
}


# --------------------------------------------------------------------------- markdown and shell


def code_blocks(text: str) -> Iterator[tuple[str, str, int]]:
    """Fenced code blocks (CommonMark: ``` or ~~~, 3 or more, closed by the same or longer fence):
    (info string's first word, body, line number of the body's first line)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        start = i + 2
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        yield language, "\n".join(body), start


def logical_lines(body: str) -> Iterator[tuple[str, int]]:
    """Shell input as complete commands: backslash continuations joined, quotes that span lines
    kept together, prompts (`$ `) dropped, here-document bodies skipped."""
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        number = i
        text = lines[i].removeprefix("$ ")
        i += 1
        while True:
            if text.endswith("\\") and i < len(lines):
                text = text[:-1] + " " + lines[i].strip()
                i += 1
                continue
            try:
                shlex.split(text, comments=True)
            except ValueError:  # a quote still open: the string goes on on the next line
                if i < len(lines):
                    text += "\n" + lines[i]
                    i += 1
                    continue
                raise
            break
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        yield text, number
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1


def simple_commands(line: str) -> list[list[str]]:
    """Split one command line (already complete) into simple commands' words, without expansion:
    control operators and command substitutions separate them; redirections are dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    commands: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word.endswith("$") and word != "$" and commands[-1] is not None:
            # `KEY=$(` lexes as `KEY=$` then `(`: the assignment ends here.
            commands[-1].append(word[:-1])
            commands.append([])
            continue
        if word in SEPARATORS or word == "$":
            commands.append([])
            continue
        if REDIRECTIONS.match(word):
            skip_next = True
            continue
        commands[-1].append(word)
    return [c for c in commands if c]


def sidecar_argv(words: list[str]) -> list[str] | None:
    """The arguments after `sidecar` when ``words`` runs it (after assignments and sudo), else None."""
    rest = list(words)
    while rest and (ASSIGNMENT.match(rest[0]) or rest[0] in PREFIXES):
        rest.pop(0)
    if rest and rest[0].rsplit("/", 1)[-1] == "sidecar":
        return rest[1:]
    return None


def doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Every `sidecar` command in a document's shell blocks: (where, arguments after `sidecar`)."""
    found: list[tuple[str, list[str]]] = []
    text = path.read_text(encoding="utf-8")
    for language, body, start in code_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        for line, offset in logical_lines(body):
            where = f"{path.relative_to(ROOT)}:{start + offset}"
            for words in simple_commands(line):
                argv = sidecar_argv(words)
                if argv is None:
                    # A bare `sidecar` word that is not the command: a way of running it this
                    # extractor does not know, which would otherwise go unchecked.
                    assert "sidecar" not in words, (
                        f"{where}: `sidecar` is run in a way not recognised: {line!r}"
                    )
                    continue
                found.append((where, argv))
    return found


def substitute(argv: list[str], where: str) -> list[str]:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in SAMPLES, f"{where}: shell variable ${name} has no sample value in tests/test_docs.py"
        return SAMPLES[name]

    return [VARIABLE.sub(value, word) for word in argv]


# --------------------------------------------------------------------------- checking a command


@pytest.fixture(scope="module")
def root() -> click.Group:
    return build_cli()


def resolve(group: click.Group, argv: list[str], where: str) -> tuple[list[str], click.Command, list[str]]:
    """Walk subcommand names: (the command path, the command, its own arguments)."""
    path: list[str] = []
    command: click.Command = group
    rest = list(argv)
    ctx = click.Context(group, info_name="sidecar")
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"{where}: `sidecar {' '.join(path + rest[:1])}` is not a command"
        path.append(rest.pop(0))
        command = sub
    return path, command, rest


def help_text(path: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    out = capsys.readouterr()
    assert exit_info.value.code == 0, (
        f"`sidecar {' '.join(path)} --help` exited {exit_info.value.code}: {out.err}"
    )
    return out.out


def check_command(
    group: click.Group, argv: list[str], where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command exists (`--help` exits 0), each option it uses is in its help, and the whole
    command line parses with click (types, required options and arguments included)."""
    argv = substitute(argv, where)
    path, command, rest = resolve(group, argv, where)
    text = help_text(path, capsys)
    for word in rest:
        if word == "--":
            break
        if word.startswith("-") and word not in ("-", "--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{where}: `sidecar {' '.join(path)}` has no option {option}"
            )
    try:
        command.make_context(" ".join(["sidecar", *path]), list(rest))
    except click.exceptions.Exit as exc:  # an eager option such as --version
        assert exc.exit_code == 0, f"{where}: exited {exc.exit_code}"
    except click.ClickException as exc:
        pytest.fail(f"{where}: `sidecar {' '.join(argv)}` does not parse: {exc.format_message()}")
    capsys.readouterr()


ALL_COMMANDS = [(where, argv) for doc in DOCS for where, argv in doc_commands(doc)]


def test_the_docs_show_sidecar_commands() -> None:
    """The extraction itself works: the deployment guide's key steps are found."""
    shown = {tuple(argv[:2]) for _, argv in ALL_COMMANDS}
    for expected in [("policy", "--pcr0"), ("no-fly", "seal"), ("host", "--manifest"), ("trust",)]:
        assert any(s[: len(expected)] == expected for s in shown), f"docs lack `sidecar {' '.join(expected)}`"


@pytest.mark.parametrize(("where", "argv"), ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_doc_command_exists_and_parses(
    where: str, argv: list[str], root: click.Group, capsys: pytest.CaptureFixture[str]
) -> None:
    check_command(root, argv, where, capsys)


def test_a_wrong_command_or_option_is_caught(root: click.Group, capsys: pytest.CaptureFixture[str]) -> None:
    """The checker can fail: a renamed option, a missing subcommand and a bad value are all reported."""
    with pytest.raises(AssertionError, match="no option --pcr-zero"):
        check_command(root, ["policy", "--pcr-zero", "ab"], "x", capsys)
    with pytest.raises(AssertionError, match="is not a command"):
        check_command(root, ["no-fly", "seel", "--key-id", "k"], "x", capsys)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(root, ["host", "--cid", "two"], "x", capsys)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(root, ["no-fly", "seal", "--in", "names.txt"], "x", capsys)  # --key-id is required
    with pytest.raises(AssertionError, match="no sample value"):
        check_command(root, ["trust", "--expect-pcr", "0=$PRC0"], "x", capsys)


def test_shell_splitting() -> None:
    line = (
        'KEY_ARN=$(aws kms create-key --policy file://p.json) && sudo sidecar policy --pcr0 "$X" > out.json'
    )
    assert simple_commands(line) == [
        ["KEY_ARN="],
        ["aws", "kms", "create-key", "--policy", "file://p.json"],
        ["sudo", "sidecar", "policy", "--pcr0", "$X"],
    ]
    assert sidecar_argv(["sudo", "/opt/x/bin/sidecar", "host"]) == ["host"]
    assert sidecar_argv(["docker", "build", "-t", "enclave-sidecar-odyn-shim:latest", "."]) is None
    body = (
        "jq '.a += [{\n  \"b\": 1}]' \\\n  in.json > out.json\n"
        "cat > f <<'EOF'\nsidecar nonsense\nEOF\n"
        "sidecar trust"
    )
    assert [line for line, _ in logical_lines(body)] == [
        "jq '.a += [{\n  \"b\": 1}]'  in.json > out.json",
        "cat > f <<'EOF'",
        "sidecar trust",
    ]


# --------------------------------------------------------------------------- the hook reference

PLUGINS_MD = ROOT / "docs" / "plugins.md"


def hookspec_functions() -> dict[str, object]:
    return {name: f for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "sidecar_spec")}


def expected_heading(function: object) -> str:
    """``name(param: Annotation, ...) -> Return``, from the annotations as written (they are strings
    under ``from __future__ import annotations``)."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{function.__name__}({params}) -> {signature.return_annotation}"  # type: ignore[attr-defined]


def hook_sections() -> dict[str, str]:
    """Heading text (between backticks) -> the section's body, for the `### ` headings under "The hooks"."""
    text = PLUGINS_MD.read_text(encoding="utf-8")
    part = text.split("\n## The hooks\n", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, str] = {}
    for chunk in re.split(r"\n(?=### )", part)[1:]:
        heading, _, body = chunk.partition("\n")
        match = re.fullmatch(r"### `(.+)`", heading.strip())
        assert match, f"hook heading is not one code span: {heading!r}"
        assert match.group(1) not in sections, f"hook documented twice: {match.group(1)}"
        sections[match.group(1)] = body
    return sections


def test_every_hook_is_documented_with_its_exact_signature() -> None:
    specs = hookspec_functions()
    assert len(specs) >= 6
    documented = hook_sections()
    expected = {expected_heading(f) for f in specs.values()}
    missing = expected - set(documented)
    stale = set(documented) - expected
    assert not missing, f"docs/plugins.md lacks (or misstates) these hooks: {sorted(missing)}"
    assert not stale, f"docs/plugins.md documents signatures hookspecs.py does not have: {sorted(stale)}"


def test_signature_check_notices_a_change() -> None:
    """The comparison is strict: a renamed parameter or a changed annotation is a different heading."""

    def register_routes(listener: Listener, ctx: PluginContext) -> Iterable[Route] | None:
        return None

    assert expected_heading(register_routes) not in hook_sections()


def test_each_hook_section_has_parameters_returns_and_an_example() -> None:
    for heading, body in hook_sections().items():
        name = heading.split("(", 1)[0]
        for part in ("**When**", "**Parameters**", "**Returns**"):
            assert part in body, f"{name}: no {part}"
        examples = [b for lang, b, _ in code_blocks(body) if lang == "python"]
        assert examples, f"{name}: no python example"
        assert any("@hookimpl" in b and re.search(rf"def {name}\(", b) for b in examples), (
            f"{name}: the example does not implement the hook"
        )


def test_python_examples_are_valid_python() -> None:
    for doc in (PLUGINS_MD, ROOT / "docs" / "deploying.md"):
        for language, body, start in code_blocks(doc.read_text(encoding="utf-8")):
            if language == "python":
                try:
                    ast.parse(body)
                except SyntaxError as exc:
                    pytest.fail(f"{doc.name}:{start + (exc.lineno or 1) - 1}: {exc.msg}")


def test_context_services_are_documented() -> None:
    """Every public attribute of PluginContext appears in the context table (``services`` is the
    runtime's internal wiring; plugins use the properties in front of it)."""
    text = PLUGINS_MD.read_text(encoding="utf-8")
    table = text.split("## The context object", 1)[1].split("\n## ", 1)[0]
    names = {f.name for f in dataclasses.fields(PluginContext)} | {
        n
        for n, v in vars(PluginContext).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, property))
    }
    names.discard("services")
    for name in sorted(names):
        assert re.search(rf"`(await )?{name}\b", table), f"PluginContext.{name} is not documented"


def test_schema_types_are_documented() -> None:
    text = PLUGINS_MD.read_text(encoding="utf-8")
    section = text.split("## The config schema", 1)[1].split("\n## ", 1)[0]
    types = [
        n
        for n, v in vars(schema).items()
        if inspect.isclass(v) and issubclass(v, schema.Field) and v is not schema.Field
    ]
    assert len(types) >= 9
    for name in [*types, "Port"]:
        assert f"`{name}" in section, f"sidecar.schema.{name} is not documented"
    assert "secret=True" in section


def test_testing_fixtures_are_documented() -> None:
    text = PLUGINS_MD.read_text(encoding="utf-8")
    section = text.split("## Testing a plugin", 1)[1].split("\n## ", 1)[0]
    for name in (
        "sidecar_factory",
        "SidecarHarness",
        "run_sidecar",
        "emulated_services",
        "minimal_manifest",
        "free_port",
    ):
        assert hasattr(testing, name), f"sidecar.testing.{name} no longer exists; update docs/plugins.md"
        assert f"`{name}" in section, f"sidecar.testing.{name} is not documented"


def test_security_rules_cover_the_essentials() -> None:
    text = PLUGINS_MD.read_text(encoding="utf-8")
    section = text.split("## Security rules for plugin authors", 1)[1].split("\n## ", 1)[0]
    for must in (
        "Never log",
        "sensitive=True",
        "secret=True",
        "compare_digest",
        "context.http",
        "asyncio.to_thread",
        "Fail closed",
        "PluginStartupError",
        "Readiness reasons",
    ):
        assert must in section, f"the security rules do not mention {must}"


# --------------------------------------------------------------------------- curl against the demo


def curl_targets(path: Path) -> list[tuple[str, str, int, str]]:
    """(where, method, port, path) of every `curl` to localhost in a document's shell blocks."""
    found = []
    for language, body, start in code_blocks(path.read_text(encoding="utf-8")):
        if language not in SHELL_LANGUAGES:
            continue
        for line, offset in logical_lines(body):
            for words in simple_commands(line):
                if not words or words[0] != "curl":
                    continue
                method = words[words.index("-X") + 1] if "-X" in words else "GET"
                for word in words[1:]:
                    match = re.match(r"^(?:http://)?(?:localhost|127\.0\.0\.1):(\d+)(/[^?\s]*)", word)
                    if match:
                        where = f"{path.relative_to(ROOT)}:{start + offset}"
                        found.append((where, method, int(match.group(1)), match.group(2)))
    return found


def test_curl_lines_hit_routes_the_demo_serves() -> None:
    """Every `curl localhost:PORT/path` in the docs names a listener of the demo enclaver.yaml and a
    route something on it serves (a plugin's, or the sidecar's own health and readiness)."""
    from sidecar.config import load_manifest, load_settings
    from sidecar.server import HEALTH_PATH, READY_PATH, build_runtime

    manifest = load_manifest(ROOT / "enclaver.yaml")
    runtime = build_runtime(manifest, load_settings(ROOT / "sidecar.yaml", manifest))
    served = {
        (route.method.upper(), listener.port, route.path)
        for listener, items in runtime.routes.items()
        for _, route in items
    }
    served |= {("GET", li.port, p) for li in runtime.routes for p in (HEALTH_PATH, READY_PATH)}
    targets = [t for doc in DOCS for t in curl_targets(doc)]
    assert len(targets) >= 3
    for where, method, port, path in targets:
        assert any((m, p) == (method, port) and route_matches(pattern, path) for m, p, pattern in served), (
            f"{where}: nothing serves {method} {path} on port {port}"
        )


def route_matches(pattern: str, path: str) -> bool:
    """aiohttp's route syntax: ``{name}`` is one segment, ``{name:regex}`` the regex."""
    parts = re.split(r"\{\w+(?::(.*?))?\}", pattern)
    # re.split alternates literal text and the captured regex (None for a plain `{name}`).
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?:{part or '[^/]+'})" for i, part in enumerate(parts)
    )
    return re.fullmatch(regex, path) is not None


def test_route_matching_follows_aiohttp() -> None:
    assert route_matches("/v1/{path:.*}", "/v1/secret/data/app")
    assert route_matches("/enclave/passenger", "/enclave/passenger")
    assert not route_matches("/enclave/passenger", "/enclave/passengers")
    assert route_matches("/items/{id}", "/items/7") and not route_matches("/items/{id}", "/items/7/x")
