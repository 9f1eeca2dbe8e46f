"""vault_like ACL policies: parsing (HCL/JSON), validation, and Vault's path matching and priority."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vault_auth_support import bao_call, bao_dev_server

from plugins.vault_like.acl import ACL, CAPABILITIES, DEFAULT_POLICY, Policy, PolicyError, parse_policy
from plugins.vault_like.logical import Operation


def acl_of(*policies: str) -> ACL:
    return ACL([parse_policy(f"p{i}", text) for i, text in enumerate(policies)])


def rule(path: str, *caps: str) -> str:
    quoted = ", ".join(f'"{c}"' for c in caps)
    return f'path "{path}" {{\n  capabilities = [{quoted}]\n}}\n'


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parses_hcl_with_comments_and_duplicate_paths() -> None:
    text = """
    # a comment
    path "secret/data/*" {
      capabilities = ["create", "read"]
    }
    // another
    path "secret/data/*" { capabilities = ["list"] }
    """
    p = parse_policy("app", text)
    assert p.name == "app" and p.raw == text
    assert [(r.path, r.capabilities) for r in p.rules] == [
        ("secret/data/*", frozenset({"create", "read"})),
        ("secret/data/*", frozenset({"list"})),
    ]
    # duplicate stanzas merge, as in Vault
    assert acl_of(text).capabilities("secret/data/x") == {"create", "read", "list"}


def test_parses_json_policy() -> None:
    p = parse_policy("j", '{"path": {"a/*": {"capabilities": ["read"]}, "b": {"policy": "write"}}}')
    assert {r.path: r.capabilities for r in p.rules} == {
        "a/*": frozenset({"read"}),
        "b": frozenset({"create", "read", "update", "delete", "list"}),
    }


def test_quoted_labels_and_escapes_are_decoded() -> None:
    """python-hcl2 keeps the quotes (and escapes) of block labels; the pattern must not."""
    p = parse_policy("q", 'path "a\\"b/\\u00e9" { capabilities = ["read"] }')
    assert p.rules[0].path == 'a"b/é'


def test_leading_slash_is_stripped() -> None:
    assert acl_of(rule("/secret/x", "read")).allowed("secret/x", "read")


def test_old_style_policy_shorthand() -> None:
    a = acl_of('path "x" { policy = "read" }\npath "y" { policy = "sudo" }\npath "z" { policy = "deny" }')
    assert a.capabilities("x") == {"read", "list"}
    assert a.capabilities("y") == {"create", "read", "update", "delete", "list", "sudo"}
    assert a.capabilities("z") == {"deny"}


def test_deny_is_exclusive_within_a_rule() -> None:
    p = parse_policy("d", rule("x", "read", "deny", "update"))
    assert p.rules[0].capabilities == frozenset({"deny"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (rule("a", "read", "bogus"), 'path "a": invalid capability "bogus"'),
        (rule("a", "READ"), 'path "a": invalid capability "READ"'),
        ('path "a" { capabilities = ["read"]\n foo = 1 }', 'path "a": invalid key "foo"'),
        ('path "a" { capabilities = ["read"] }\nbar "x" {}', 'invalid key "bar"'),
        ('path "a" { capabilities = ["read"', "at line 1, column 34: unexpected end of input"),
        ('path "a" {\n capabilities = ["read"] }}', "at line 2"),
        ('path "a" { capabilities = [read] }', "must be a quoted string"),
        ('path "a" { capabilities = "read" }', "must be a list of strings"),
        ('path { capabilities = ["read"] }', "exactly one label"),
        ('path "a" "b" { capabilities = ["read"] }', "exactly one label"),
        ("path = 1", '"path" must be a block'),
        ('path "a" { policy = "all" }', 'path "a": invalid policy "all"'),
        ('path "a/+*" {}', "'+*' is forbidden"),
        ('path "${var.x}" {}', "template expressions are not supported"),
        ('path "a" { capabilities = ["${x}"] }', "template expressions are not supported"),
        ('{"path": {"a": {"capabilities": ["read"]}, "a": {}}}', "duplicate key"),
        ('{"path": {"a": {"capabilities": ["nope"]}}}', 'invalid capability "nope"'),
        ('{"nope": 1}', 'invalid key "nope"'),
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "at line 1"),
    ],
)
def test_invalid_policies_are_rejected_with_a_specific_error(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("bad", text)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "key",
    ["allowed_parameters", "denied_parameters", "required_parameters", "min_wrapping_ttl", "control_group"],
)
def test_restricting_options_are_refused_not_ignored(key: str) -> None:
    """Threat: a policy meant to *restrict* (e.g. denied_parameters) silently granting the whole path.

    These options are not enforced here, so accepting them would grant more than written.
    """
    with pytest.raises(PolicyError, match=f"{key}.*not supported"):
        parse_policy("r", f'path "secret/*" {{\n capabilities = ["update"]\n {key} = {{}}\n}}')


def test_oversized_and_nul_policies_are_rejected() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy("big", "#" * (300 * 1024))
    with pytest.raises(PolicyError, match="NUL"):
        parse_policy("nul", 'path "a\x00" {}')


def test_parse_errors_do_not_echo_long_input() -> None:
    """The error names the position, not the whole offending text (errors go back to clients)."""
    with pytest.raises(PolicyError) as err:
        parse_policy("x", 'path "a" { capabilities = ["read"] } ' + "@" * 5000)
    assert len(str(err.value)) < 200


# ---------------------------------------------------------------------------------------------
# The default and root policies


def test_default_policy_grants_token_self_service_only() -> None:
    policy = parse_policy("default", DEFAULT_POLICY)
    a = ACL([policy])
    assert a.allowed("auth/token/lookup-self", "read")
    assert a.allowed("auth/token/renew-self", "update")
    assert a.allowed("auth/token/revoke-self", "update")
    assert a.allowed("sys/capabilities-self", "update")
    assert a.allowed("sys/internal/ui/resultant-acl", "read")
    assert a.allowed("cubbyhole/anything", "create")
    assert a.allowed("identity/oidc/provider/p1/authorize", "read")
    # threats: default must not reach secrets, policies, or other tokens
    assert not a.allowed("secret/data/x", "read")
    assert not a.allowed("sys/policy/default", "update")
    assert not a.allowed("auth/token/create", "update")
    assert not a.allowed("auth/token/lookup", "update")
    assert not a.allowed("identity/oidc/provider/p1/x/authorize", "read")


def test_identity_templated_rules_are_skipped_without_an_entity() -> None:
    """Threat: a literal "{{identity.entity.id}}" path being grantable by a crafted request path."""
    a = ACL([parse_policy("default", DEFAULT_POLICY)])
    assert a.capabilities("identity/entity/id/{{identity.entity.id}}") == {"deny"}


def test_root_policy_grants_everything() -> None:
    a = ACL([Policy("root", "", ())])
    assert a.root
    assert a.allowed("sys/anything", "delete", sudo=True)
    assert a.capabilities("x/y") == {"root"}


# ---------------------------------------------------------------------------------------------
# Matching


def test_exact_rule_beats_globs() -> None:
    a = acl_of(rule("secret/foo", "read"), rule("secret/*", "list", "update"))
    assert a.capabilities("secret/foo") == {"read"}
    assert a.capabilities("secret/foobar") == {"list", "update"}


def test_glob_is_a_plain_prefix_and_star_elsewhere_is_literal() -> None:
    a = acl_of(rule("secret/zip-*", "read"), rule("a*b", "list"))
    assert a.allowed("secret/zip-zap/zong", "read")
    assert not a.allowed("secret/zip/zap", "read")
    assert a.allowed("a*b", "list")
    assert not a.allowed("aXb", "list")


def test_plus_matches_exactly_one_whole_segment() -> None:
    """Threat: a `+` rule granting a deeper (or shallower) path than written."""
    a = acl_of(rule("secret/+/teamb", "read"))
    assert a.allowed("secret/x/teamb", "read")
    assert not a.allowed("secret/x/y/teamb", "read")
    assert not a.allowed("secret/x/teamb/more", "read")
    assert not a.allowed("secret/teamb", "read")
    assert not a.allowed("secret//teamb/x", "read")
    b = acl_of(rule("secret/+", "read"))
    assert b.allowed("secret/x", "read")
    assert not b.allowed("secret/x/y", "read")


def test_plus_with_trailing_glob() -> None:
    a = acl_of(rule("secret/+/ab*", "read"))
    assert a.allowed("secret/x/abc", "read")
    assert a.allowed("secret/x/ab/c/d", "read")
    assert not a.allowed("secret/x/b", "read")
    assert not a.allowed("secret/x", "read")


# (rules with distinct capabilities, path, the capabilities of the rule Vault must choose)
PRIORITY_CASES = [
    # 1. the first wildcard or glob later in the path wins
    ([("secret/+/foo", "read"), ("secret/a/+", "list")], "secret/a/foo", {"list"}),
    ([("secret/a*", "read"), ("secret/+/b", "list")], "secret/a/b", {"read"}),
    ([("secret/*", "read"), ("secret/a/+", "list")], "secret/a/b", {"list"}),
    # 2. at the same position, not a glob beats a glob
    ([("secret/+/b", "read"), ("secret/+/*", "list")], "secret/a/b", {"read"}),
    ([("secret/+", "read"), ("secret/*", "list")], "secret/a", {"read"}),
    # 3. then fewer `+` segments win (the docs' example: secret/* over secret/+/*)
    ([("secret/*", "read"), ("secret/+/*", "list")], "secret/a/b", {"read"}),
    ([("a/+/b/c", "read"), ("a/+/+/c", "list")], "a/x/b/c", {"read"}),
    # 4. then the longer pattern wins
    ([("secret/+/ab*", "read"), ("secret/+/a*", "list")], "secret/x/abc", {"read"}),
    ([("secret/ab*", "read"), ("secret/a*", "list")], "secret/abc", {"read"}),
    # 5. then the lexically larger pattern wins
    ([("a/+/x/+/c", "read"), ("a/+/+/y/c", "list")], "a/1/x/y/c", {"read"}),
    # the chosen rule alone decides: no union with other matching rules
    ([("secret/*", "read"), ("secret/+/x", "list")], "secret/a/x", {"list"}),
    ([("secret/*", "deny"), ("secret/+/x", "read")], "secret/a/x", {"read"}),
    ([("secret/+/x", "deny"), ("secret/*", "read")], "secret/a/x", {"deny"}),
]


@pytest.mark.parametrize(("rules", "path", "expected"), PRIORITY_CASES)
def test_priority_between_matching_globs(rules: list[tuple[str, str]], path: str, expected: set[str]) -> None:
    a = acl_of("".join(rule(p, c) for p, c in rules))
    assert a.capabilities(path) == expected
    # the order of the stanzas must not matter
    b = acl_of("".join(rule(p, c) for p, c in reversed(rules)))
    assert b.capabilities(path) == expected


def test_same_path_across_policies_is_unioned_and_deny_anywhere_wins() -> None:
    assert acl_of(rule("s/x", "read"), rule("s/x", "list")).capabilities("s/x") == {"read", "list"}
    assert acl_of(rule("s/*", "read"), rule("s/*", "update")).capabilities("s/y") == {"read", "update"}
    for order in itertools.permutations([rule("s/x", "read"), rule("s/x", "deny"), rule("s/x", "list")]):
        a = acl_of(*order)
        assert a.capabilities("s/x") == {"deny"}
        assert not a.allowed("s/x", "read")


def test_list_on_a_trailing_slash_uses_the_rule_without_it() -> None:
    a = acl_of(rule("secret/metadata", "list"), rule("kv/+/dir", "list"))
    assert a.allowed("secret/metadata/", "list")
    assert not a.allowed("secret/metadata/", "read")
    assert a.allowed("kv/a/dir", "list")
    assert not a.allowed("kv/a/dir/x/", "list")  # a `+` rule still keeps its segment count


def test_list_falls_back_to_the_globs_without_the_slash() -> None:
    # OpenBao does: when no glob or `+` rule matches "dir/", a LIST is judged on "dir" (checked
    # against bao 2.7.2: `secret/metadata/+` grants `bao kv list secret/app`).
    a = acl_of(rule("kv/+/dir", "list"), rule("secret/metadata/+", "list", "read"))
    assert a.allowed("kv/a/dir/", "list")
    assert a.allowed("secret/metadata/app/", "list")
    assert a.capabilities("secret/metadata/app/") == {"list", "read"}
    assert not a.allowed("secret/metadata/app/", "read")  # only a list gets the fallback
    # Threat: the fallback must never override a rule that matches "dir/" itself, a deny above all.
    b = acl_of(rule("secret/metadata/+", "list"), rule("secret/metadata/app/*", "deny"))
    assert not b.allowed("secret/metadata/app/", "list")
    c = acl_of(rule("secret/metadata/+", "list"), rule("secret/*", "deny"))
    assert not c.allowed("secret/metadata/app/", "list")


def test_operations_map_to_their_capability() -> None:
    a = acl_of(rule("x", "create", "patch"))
    assert a.allowed("x", "create") and a.allowed("x", "patch")
    ops: tuple[Operation, ...] = ("read", "update", "delete", "list")
    for op in ops:
        assert not a.allowed("x", op)


def test_sudo_required_paths() -> None:
    a = acl_of(rule("sys/rotate", "update"), rule("sys/seal", "update", "sudo"))
    assert a.allowed("sys/rotate", "update")
    assert not a.allowed("sys/rotate", "update", sudo=True)
    assert a.allowed("sys/seal", "update", sudo=True)
    assert a.has_sudo("sys/seal") and not a.has_sudo("sys/rotate")


def test_no_rule_means_deny() -> None:
    a = acl_of(rule("secret/a", "read"))
    assert not a.allowed("secret/b", "read")
    assert a.capabilities("secret/b") == {"deny"}
    assert acl_of(rule("e", *[])).capabilities("e") == {"deny"}


# ---------------------------------------------------------------------------------------------
# Properties

SEGMENTS = st.sampled_from(["a", "b", "ab", "+"])
PATTERNS = st.builds(
    lambda segs, glob: "/".join(segs) + ("*" if glob and segs[-1] != "+" else ""),
    st.lists(SEGMENTS, min_size=1, max_size=4),
    st.booleans(),
)
PATHS = st.builds("/".join, st.lists(st.sampled_from(["a", "b", "ab", "abc"]), min_size=1, max_size=5))
CAPS = st.lists(st.sampled_from(sorted(CAPABILITIES - {"deny"})), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PATTERNS, CAPS), min_size=1, max_size=6), st.lists(PATHS, min_size=1, max_size=5))
def test_property_policy_order_never_matters(rules: list[tuple[str, list[str]]], paths: list[str]) -> None:
    texts = [rule(p, *c) for p, c in rules]
    forward, backward = acl_of(*texts), acl_of(*reversed(texts))
    for path in paths:
        assert forward.capabilities(path) == backward.capabilities(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(SEGMENTS, min_size=1, max_size=4), PATHS)
def test_property_plus_never_crosses_segments(segs: list[str], path: str) -> None:
    """A pattern without a trailing glob only ever matches paths with the same number of segments."""
    a = acl_of(rule("/".join(segs), "read"))
    if len(path.split("/")) != len(segs):
        assert not a.allowed(path, "read")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PATTERNS, CAPS), min_size=1, max_size=5), PATHS)
def test_property_denying_the_chosen_pattern_denies(rules: list[tuple[str, list[str]]], path: str) -> None:
    """Adding a policy that denies every pattern can only take capabilities away, never add."""
    texts = [rule(p, *c) for p, c in rules]
    with_deny = acl_of(*texts, "".join(rule(p, "deny") for p, _ in rules))
    assert with_deny.capabilities(path) == {"deny"}


# ---------------------------------------------------------------------------------------------
# Differential check against a real OpenBao server

BAO_PATTERNS = [
    "a",
    "a/b",
    "a/*",
    "a/b*",
    "a/+",
    "a/+/b",
    "a/+/*",
    "+/b",
    "+/b*",
    "a/+/+",
    "a/b/+",
    "+",
    "+/+/b",
    "a/+/ab*",
    "b/+/b/+",
    "+/*",
    "ab*",
    "b/ab/b",
]
NON_DENY = ["create", "read", "update", "delete", "list", "sudo", "patch"]


def _caps_for(i: int) -> list[str]:
    n = i * 37 % 127 + 1  # distinct non-empty subsets, so the winning rule is identifiable
    return [c for bit, c in enumerate(NON_DENY) if n >> bit & 1]


@pytest.mark.slow
def test_matching_agrees_with_openbao(tmp_path: Path) -> None:
    """Every path's capabilities, as decided by a real OpenBao, equal ours (priorities included)."""
    text = "".join(rule(p, *_caps_for(i)) for i, p in enumerate(BAO_PATTERNS))
    text += rule("b/+", "deny") + rule("b/+", "read")
    segs = ["a", "b", "ab", "abc"]
    paths = ["/".join(p) for n in range(1, 5) for p in itertools.product(segs, repeat=n)]
    paths += [p + "/" for p in paths[:40]]
    ours = acl_of(text)
    with bao_dev_server(tmp_path) as url:
        status, _ = bao_call(url, "root", "PUT", "sys/policy/diff", {"policy": text})
        assert status == 204
        status, created = bao_call(
            url, "root", "POST", "auth/token/create", {"policies": ["diff"], "no_default_policy": True}
        )
        assert status == 200
        token = created["auth"]["client_token"]
        status, answer = bao_call(url, "root", "POST", "sys/capabilities", {"token": token, "paths": paths})
        assert status == 200
        # the default policy as well, checked on paths it mentions
        default_paths = [
            "auth/token/lookup-self",
            "cubbyhole/x",
            "sys/tools/hash/x",
            "identity/oidc/provider/p/authorize",
        ]
        status, dflt = bao_call(url, "root", "POST", "auth/token/create", {"policies": ["default"]})
        token = dflt["auth"]["client_token"]
        status, dflt_answer = bao_call(url, token, "POST", "sys/capabilities-self", {"paths": default_paths})
    mismatches = {p: (sorted(ours.capabilities(p)), answer["data"][p]) for p in paths}
    mismatches = {p: v for p, v in mismatches.items() if v[0] != sorted(v[1])}
    assert mismatches == {}
    default_acl = ACL([parse_policy("default", DEFAULT_POLICY)])
    for p in default_paths:
        assert sorted(default_acl.capabilities(p)) == sorted(dflt_answer["data"][p]), p
