"""Token auth and ACL policies, against OpenBao and vault_like alike.

Permission failures are 403 with ``{"errors": [...]}``, never 401: hvac's ``is_authenticated()``
returns False on 403 but raises on 401.
"""

from __future__ import annotations

import json

import hvac
import hvac.exceptions
import pytest

from .compat import (
    TOKEN_AUTH,
    TOKEN_LOOKUP,
    data_of,
    denied,
    envelope,
    errors,
    keys_between,
    no_content,
)
from .servers import VaultServer

pytestmark = pytest.mark.slow


def put_policy(server: VaultServer, name: str, text: str) -> None:
    no_content(server.request("PUT", f"sys/policies/acl/{name}", {"policy": text}))


def new_token(server: VaultServer, token: str = "", **body: object) -> dict[str, object]:
    """auth/token/create with ``body``; the "auth" block."""
    reply = envelope(server.request("POST", "auth/token/create", body, token=token))
    auth: dict[str, object] = reply["auth"]
    return auth


def read_policy(name: str) -> str:
    return f'path "secret/data/{name}/*" {{\n  capabilities = ["read"]\n}}\n'


# ---------------------------------------------------------------------------------- tokens


def test_token_create_shape(server: VaultServer, client: hvac.Client, name: str) -> None:
    put_policy(server, name, read_policy(name))
    reply = envelope(
        server.request(
            "POST", "auth/token/create",
            {"policies": [name], "ttl": "1h", "num_uses": 3, "meta": {"team": "blue"}, "display_name": "ci"},
        )
    )  # fmt: skip
    assert reply["data"] is None
    auth = reply["auth"]
    keys_between(auth, TOKEN_AUTH)
    assert isinstance(auth["client_token"], str) and len(auth["client_token"]) >= 20
    assert isinstance(auth["accessor"], str) and auth["accessor"] and auth["accessor"] != auth["client_token"]
    assert auth["policies"] == ["default", name] and auth["token_policies"] == ["default", name]
    assert auth["lease_duration"] == 3600 and auth["renewable"] is True
    assert (auth["token_type"], auth["orphan"], auth["num_uses"]) == ("service", False, 3)
    assert auth["metadata"] == {"team": "blue"}
    # hvac's view of the same operation.
    made = client.auth.token.create(policies=[name], ttl="30m")["auth"]
    assert made["lease_duration"] == 1800 and made["policies"] == ["default", name]


def test_create_orphan(server: VaultServer, client: hvac.Client) -> None:
    auth = client.auth.token.create_orphan(policies=["default"], ttl="10m")["auth"]
    keys_between(auth, TOKEN_AUTH)
    assert auth["orphan"] is True and auth["policies"] == ["default"]
    assert client.auth.token.lookup(auth["client_token"])["data"]["orphan"] is True
    # A token made by a parent is not an orphan.
    assert new_token(server, policies=["default"])["orphan"] is False


# Token TTLs go through Vault's ParseDurationSecond: a bare number is seconds, "Nd" alone is days,
# anything else is Go's time.ParseDuration (truncated to whole seconds). vault_like parses every
# engine's durations with one parser (plugins/vault_like/durations.py); this pins it to the real one.
@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        ("90", 90),
        (90, 90),
        ("2d", 172800),
        ("1.5h", 5400),
        ("1h30m", 5400),
        ("90s500ms", 90),
    ],
)
def test_ttl_durations_parse_as_vault_does(server: VaultServer, ttl: object, seconds: int) -> None:
    assert new_token(server, ttl=ttl)["lease_duration"] == seconds


@pytest.mark.parametrize("ttl", ["bogus", "1d12h", "1h2", "h", "1x", " 45m "])
def test_ttl_that_is_not_a_duration_is_400(server: VaultServer, ttl: str) -> None:
    assert errors(server.request("POST", "auth/token/create", {"ttl": ttl}), 400)


def test_lookup_self_and_lookup(server: VaultServer, name: str) -> None:
    put_policy(server, name, read_policy(name))
    auth = new_token(server, policies=[name], ttl="1h", num_uses=0, meta={"k": "v"})
    token = str(auth["client_token"])
    mine = data_of(server.request("GET", "auth/token/lookup-self", token=token))
    keys_between(mine, TOKEN_LOOKUP)
    assert mine["id"] == token and mine["accessor"] == auth["accessor"]
    assert mine["policies"] == ["default", name] and mine["meta"] == {"k": "v"}
    assert mine["creation_ttl"] == 3600 and 3500 <= mine["ttl"] <= 3600
    assert mine["num_uses"] == 0 and mine["orphan"] is False and mine["renewable"] is True
    assert mine["type"] == "service" and mine["path"] == "auth/token/create"
    assert isinstance(mine["creation_time"], int) and isinstance(mine["expire_time"], str)
    # The root token never expires.
    root = data_of(server.request("GET", "auth/token/lookup-self"))
    assert root["policies"] == ["root"] and root["ttl"] == 0 and root["expire_time"] is None
    # lookup (a token in the body) shows the same entry to a caller allowed to look it up.
    other = data_of(server.request("POST", "auth/token/lookup", {"token": token}))
    assert {k: other[k] for k in ("id", "accessor", "policies", "meta")} == {
        k: mine[k] for k in ("id", "accessor", "policies", "meta")
    }
    unknown = errors(server.request("POST", "auth/token/lookup", {"token": "hvs.not-a-token"}), 403)
    assert unknown  # OpenBao says "bad token"; the status and the error list are what clients use


def test_renew_self(server: VaultServer) -> None:
    token = str(new_token(server, policies=["default"], ttl="1h")["client_token"])
    renewed = server.client(token).auth.token.renew_self(increment="30m")["auth"]
    keys_between(renewed, TOKEN_AUTH)
    assert renewed["client_token"] == token and renewed["lease_duration"] == 1800
    assert 1700 <= data_of(server.request("GET", "auth/token/lookup-self", token=token))["ttl"] <= 1800


def test_revoke_revokes_the_subtree(server: VaultServer, client: hvac.Client, name: str) -> None:
    # Threat: a revoked credential (or one derived from it) that still works.
    put_policy(server, f"{name}-maker", 'path "auth/token/create" { capabilities = ["create", "update"] }')
    parent = str(new_token(server, policies=[f"{name}-maker"], ttl="1h")["client_token"])
    child = str(new_token(server, token=parent, policies=["default"])["client_token"])
    orphan = str(client.auth.token.create_orphan(policies=["default"])["auth"]["client_token"])
    assert server.request("GET", "auth/token/lookup-self", token=child).status_code == 200
    assert client.auth.token.revoke(parent).status_code == 204
    denied(server.request("GET", "auth/token/lookup-self", token=parent))
    denied(server.request("GET", "auth/token/lookup-self", token=child))
    assert server.request("GET", "auth/token/lookup-self", token=orphan).status_code == 200


def test_revoke_self(server: VaultServer) -> None:
    token = str(new_token(server, policies=["default"])["client_token"])
    no_content(server.request("POST", "auth/token/revoke-self", token=token))
    denied(server.request("GET", "auth/token/lookup-self", token=token))
    denied(server.request("GET", "secret/data/anything", token=token))
    assert server.client(token).is_authenticated() is False


def test_child_policies_must_be_a_subset(server: VaultServer, name: str) -> None:
    # Threat: privilege escalation by minting a child token with policies the parent lacks.
    put_policy(server, f"{name}-maker", 'path "auth/token/create" { capabilities = ["create", "update"] }')
    put_policy(server, name, read_policy(name))
    put_policy(server, f"{name}-other", read_policy(f"{name}-other"))
    parent = str(new_token(server, policies=[f"{name}-maker", name])["client_token"])
    found = errors(
        server.request("POST", "auth/token/create", {"policies": [name, f"{name}-other"]}, token=parent), 400
    )
    assert any("subset" in e for e in found), found
    # Asking for "root": OpenBao words it as the subset rule, Vault as "root tokens may not be created
    # without parent token being root"; both are 400.
    assert errors(server.request("POST", "auth/token/create", {"policies": ["root"]}, token=parent), 400)
    child = new_token(server, token=parent, policies=[name])
    assert child["policies"] == ["default", name]


def test_num_uses_are_consumed(server: VaultServer, name: str) -> None:
    # Threat: a use-limited token that can be used more often than it was issued for.
    put_policy(server, name, read_policy(name))
    no_content(server.request("POST", f"sys/policies/acl/{name}-w", {"policy": read_policy(name)}))
    data_of(server.request("POST", f"secret/data/{name}/x", {"data": {"a": 1}}))
    token = str(new_token(server, policies=[name], num_uses=2)["client_token"])
    for _ in range(2):
        assert data_of(server.request("GET", f"secret/data/{name}/x", token=token))["data"] == {"a": 1}
    denied(server.request("GET", f"secret/data/{name}/x", token=token))
    errors(server.request("POST", "auth/token/create", {"policies": ["default"], "num_uses": -1}), 400)


@pytest.mark.parametrize("token", ["hvs.AAAAAAAAAAAAAAAAAAAAAAAA", "not a token at all", "s.x"])
def test_bad_token_is_403(server: VaultServer, token: str) -> None:
    denied(server.request("GET", "secret/data/anything", token=token))
    denied(server.request("GET", "auth/token/lookup-self", token=token))
    assert server.client(token).is_authenticated() is False  # raises on a 401


def test_missing_token_is_403(server: VaultServer) -> None:
    denied(server.request("GET", "secret/data/anything", token=None))
    denied(server.request("LIST", "secret/metadata/", token=None))
    denied(server.request("GET", "sys/mounts", token=None))
    denied(server.request("GET", "auth/token/lookup-self", token=None))


def test_bearer_header(server: VaultServer) -> None:
    ok = server.request(
        "GET", "auth/token/lookup-self", token=None, headers={"Authorization": f"Bearer {server.root_token}"}
    )
    assert data_of(ok)["policies"] == ["root"]
    bad = server.request(
        "GET", "auth/token/lookup-self", token=None, headers={"Authorization": "Bearer hvs.nope"}
    )
    denied(bad)


# -------------------------------------------------------------------------------- policies


def test_hcl_policy_write_read_list_delete(server: VaultServer, client: hvac.Client, name: str) -> None:
    text = f'# comment\npath "secret/data/{name}/*" {{\n  capabilities = ["read", "list"]\n}}\n'
    client.sys.create_or_update_acl_policy(name, text)
    read = data_of(server.request("GET", f"sys/policies/acl/{name}"))
    # OpenBao adds cas_required, modified, version and identity-template flags; Vault sends name and policy.
    assert {"name", "policy"} <= set(read)
    assert read["name"] == name and read["policy"] == text
    assert client.sys.read_acl_policy(name)["data"]["policy"] == text
    listed = data_of(server.request("LIST", "sys/policies/acl"))["keys"]
    assert name in listed and "default" in listed
    assert name in client.sys.list_acl_policies()["data"]["keys"]
    assert data_of(server.request("GET", "sys/policies/acl", params={"list": "true"}))["keys"] == listed
    assert client.sys.delete_acl_policy(name).status_code == 204
    assert errors(server.request("GET", f"sys/policies/acl/{name}"), 404) == []
    assert name not in data_of(server.request("LIST", "sys/policies/acl"))["keys"]
    no_content(server.request("DELETE", f"sys/policies/acl/{name}"))  # already gone: not an error


def test_json_policy_and_the_legacy_path(server: VaultServer, client: hvac.Client, name: str) -> None:
    text = json.dumps({"path": {f"secret/data/{name}/*": {"capabilities": ["read"]}}})
    put_policy(server, name, text)
    assert data_of(server.request("GET", f"sys/policies/acl/{name}"))["policy"] == text
    # sys/policy/NAME: the older API, which calls the text "rules".
    client.sys.create_or_update_policy(f"{name}-legacy", read_policy(name))
    legacy = data_of(server.request("GET", f"sys/policy/{name}-legacy"), legacy=True)
    assert legacy["name"] == f"{name}-legacy" and legacy["rules"] == read_policy(name)
    token = str(new_token(server, policies=[name])["client_token"])
    data_of(server.request("POST", f"secret/data/{name}/k", {"data": {"a": 1}}))
    assert data_of(server.request("GET", f"secret/data/{name}/k", token=token))["data"] == {"a": 1}
    denied(server.request("POST", f"secret/data/{name}/k", {"data": {"a": 2}}, token=token))


@pytest.mark.parametrize(
    "text",
    [
        'path "secret/*" { capabilities = ["fly"] }',  # no such capability
        'path "secret/*" { capabilities = ',  # HCL syntax error
        '{"path": {"secret/*": {"capabilities": "read"}}}',  # capabilities must be a list
    ],
)
def test_invalid_policy_is_400(server: VaultServer, name: str, text: str) -> None:
    assert errors(server.request("PUT", f"sys/policies/acl/{name}", {"policy": text}), 400)
    assert errors(server.request("GET", f"sys/policies/acl/{name}"), 404) == []


def test_root_and_default_policies_are_protected(server: VaultServer) -> None:
    # Threat: rewriting "root" (or removing "default", which every token carries) through the API.
    errors(
        server.request("PUT", "sys/policies/acl/root", {"policy": 'path "x" { capabilities = ["read"] }'}),
        400,
    )
    errors(server.request("DELETE", "sys/policies/acl/root"), 400)
    errors(server.request("DELETE", "sys/policies/acl/default"), 400)
    default = data_of(server.request("GET", "sys/policies/acl/default"))
    assert "auth/token/lookup-self" in default["policy"]


def test_read_only_policy(server: VaultServer, name: str) -> None:
    # Threat: a reader writing, deleting or listing beyond its grant.
    put_policy(server, name, read_policy(name))
    data_of(server.request("POST", f"secret/data/{name}/k", {"data": {"a": 1}}))
    token = str(new_token(server, policies=[name])["client_token"])
    reader = server.client(token)
    secret = reader.secrets.kv.v2.read_secret_version(f"{name}/k", raise_on_deleted_version=True)
    assert secret["data"]["data"] == {"a": 1}
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.secrets.kv.v2.create_or_update_secret(f"{name}/k", {"a": 2})
    denied(server.request("POST", f"secret/data/{name}/new", {"data": {"a": 1}}, token=token))
    denied(server.request("DELETE", f"secret/data/{name}/k", token=token))
    denied(server.request("LIST", f"secret/metadata/{name}/", token=token))
    denied(server.request("GET", f"secret/metadata/{name}/k", token=token))
    denied(server.request("GET", "secret/data/elsewhere", token=token))
    denied(server.request("PUT", f"sys/policies/acl/{name}", {"policy": 'path "*" {}'}, token=token))
    assert data_of(server.request("GET", f"secret/data/{name}/k"))["metadata"]["version"] == 1


def test_globs_deny_and_union(server: VaultServer, name: str) -> None:
    """`+` matches one segment, `*` a suffix; deny wins; capabilities of several policies add up."""
    base = f"secret/data/{name}"
    globs = f"""
path "{base}/+/leaf" {{ capabilities = ["read"] }}
path "{base}/open/*" {{ capabilities = ["create", "read", "update", "list"] }}
path "{base}/open/closed" {{ capabilities = ["deny"] }}
path "{base}/open/sec*" {{ capabilities = ["read"] }}
path "secret/metadata/{name}/*" {{ capabilities = ["list"] }}
"""
    more = f"""
path "{base}/both" {{ capabilities = ["read"] }}
path "{base}/open/closed" {{ capabilities = ["read", "update"] }}
"""
    update = json.dumps({"path": {f"{base}/both": {"capabilities": ["update"]}}})
    put_policy(server, f"{name}-g", globs)
    put_policy(server, f"{name}-m", more)
    put_policy(server, f"{name}-u", update)
    for key in ("a/leaf", "a/b/leaf", "open/x", "open/closed", "open/secret", "both"):
        data_of(server.request("POST", f"{base}/{key}", {"data": {"k": key}}))
    token = str(new_token(server, policies=[f"{name}-g", f"{name}-m", f"{name}-u"])["client_token"])

    def get(key: str) -> int:
        return server.request("GET", f"{base}/{key}", token=token).status_code

    def post(key: str) -> int:
        return server.request("POST", f"{base}/{key}", {"data": {"a": 1}}, token=token).status_code

    assert get("a/leaf") == 200  # `+` matches exactly one segment
    denied(server.request("GET", f"{base}/a/b/leaf", token=token))  # ... not two
    assert post("open/new") == 200 and get("open/new") == 200
    assert (get("open/closed"), post("open/closed")) == (403, 403)  # deny beats another policy's grant
    assert (get("open/secret"), post("open/secret")) == (200, 403)  # the longer glob is the rule that applies
    assert (get("both"), post("both")) == (200, 200)  # read from one policy, update from another
    denied(server.request("DELETE", f"{base}/both", token=token))
    assert data_of(server.request("LIST", f"secret/metadata/{name}/open", token=token))["keys"] == [
        "closed", "new", "secret", "x",
    ]  # fmt: skip

    paths = [f"{base}/a/leaf", f"{base}/open/x", f"{base}/open/closed", f"{base}/open/secret", f"{base}/both"]
    caps = data_of(
        server.request(
            "POST", "sys/capabilities-self", {"paths": [*paths, "secret/data/other"]}, token=token
        ),
        legacy=True,
    )
    assert {p: sorted(c) for p, c in caps.items()} == {
        f"{base}/a/leaf": ["read"],
        f"{base}/open/x": ["create", "list", "read", "update"],
        f"{base}/open/closed": ["deny"],
        f"{base}/open/secret": ["read"],
        f"{base}/both": ["read", "update"],
        "secret/data/other": ["deny"],
    }


def test_capabilities_self_of_root(server: VaultServer, client: hvac.Client) -> None:
    reply = server.request("POST", "sys/capabilities-self", {"paths": ["secret/data/x", "sys/mounts"]})
    assert data_of(reply, legacy=True) == {"secret/data/x": ["root"], "sys/mounts": ["root"]}
    # With one path, Vault also answers under "capabilities" (what its Go API client reads).
    assert client.sys.get_capabilities(["secret/data/y"])["data"] == {
        "capabilities": ["root"],
        "secret/data/y": ["root"],
    }


# ------------------------------------------------------------- paths the ACL must judge as served


@pytest.mark.parametrize(
    "path",
    ["auth/token/create/", "sys/policies/acl/x/", "secret/data/x/", "sys/mounts/x/", "sys/audit-hash/file/"],
)
def test_a_write_to_a_path_ending_in_a_slash_is_refused(server: VaultServer, path: str) -> None:
    # Threat: a backend that trims the slash serves auth/token/create while the ACL judged
    # auth/token/create/, so `deny` on the exact path would not hold (a token minting tokens).
    assert errors(server.request("POST", path, {"policy": "", "data": {}}), 400) == [
        "cannot write to a path ending in '/'"
    ]


def test_an_exact_deny_holds_against_a_trailing_slash(server: VaultServer, name: str) -> None:
    put_policy(
        server,
        name,
        'path "auth/token/*" { capabilities = ["create", "read", "update", "delete", "list"] }\n'
        'path "auth/token/create" { capabilities = ["deny"] }\n'
        'path "auth/token/lookup-self" { capabilities = ["deny"] }\n',
    )
    token = str(new_token(server, policies=[name], no_parent=True)["client_token"])
    denied(server.request("POST", "auth/token/create", {}, token=token))
    assert server.request("POST", "auth/token/create/", {}, token=token).status_code == 400
    denied(server.request("GET", "auth/token/lookup-self", token=token))
    assert server.request("GET", "auth/token/lookup-self/", token=token).status_code == 404


def test_a_list_is_judged_without_its_slash_when_no_glob_matches_it(server: VaultServer, name: str) -> None:
    # OpenBao does: `secret/metadata/NAME/+` grants the LIST of secret/metadata/NAME/app/ (the
    # rule matches "…/app", not "…/app/"), unless a rule matching "…/app/" itself says otherwise.
    data_of(server.request("POST", f"secret/data/{name}/app/k", {"data": {"k": 1}}))
    data_of(server.request("POST", f"secret/data/{name}/closed/k", {"data": {"k": 1}}))
    put_policy(
        server,
        name,
        f'path "secret/metadata/{name}/+" {{ capabilities = ["list"] }}\n'
        f'path "secret/metadata/{name}/closed/*" {{ capabilities = ["deny"] }}\n',
    )
    token = str(new_token(server, policies=[name])["client_token"])
    assert data_of(server.request("LIST", f"secret/metadata/{name}/app/", token=token))["keys"] == ["k"]
    denied(server.request("LIST", f"secret/metadata/{name}/closed/", token=token))
    denied(server.request("GET", f"secret/metadata/{name}/app/", token=token))


@pytest.mark.parametrize("spelling", ["{name}-ADMIN", "{name}-admin%20"])
def test_a_deny_on_a_policy_holds_for_other_spellings_of_its_name(
    server: VaultServer, name: str, spelling: str
) -> None:
    # Threat: policy names are stored lower-cased and trimmed; a token allowed sys/policies/acl/*
    # but denied one policy must not overwrite it by spelling its name differently (privilege
    # escalation: the policy it rewrites may be its own).
    target = f"{name}-admin"
    put_policy(server, target, read_policy(name))
    put_policy(
        server,
        name,
        'path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete"] }\n'
        f'path "sys/policies/acl/{target}" {{ capabilities = ["deny"] }}\n',
    )
    token = str(new_token(server, policies=[name], no_parent=True)["client_token"])
    evil = 'path "*" { capabilities = ["create", "read", "update", "delete", "list", "sudo"] }'
    path = "sys/policies/acl/" + spelling.format(name=name)
    denied(server.request("PUT", path, {"policy": evil}, token=token))
    assert data_of(server.request("GET", f"sys/policies/acl/{target}"))["policy"] == read_policy(name)
