"""The AWS client factory: configuration of the clients it builds, caching, and real round trips.

The round trips go to moto's server on loopback, once directly and once through a small recording
HTTP proxy standing in for the egress proxy.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.session
import pytest
from botocore.config import Config
from botocore.credentials import CredentialResolver, ReadOnlyCredentials
from botocore.exceptions import NoCredentialsError

from sidecar.aws.clients import USER_AGENT_EXTRA, ClientFactory


@pytest.fixture(autouse=True)
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient AWS configuration (profiles, endpoint overrides) may leak into these tests."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def static_session() -> botocore.session.Session:
    session = botocore.session.Session()
    session.set_credentials("sidecar-akid", "sidecar-secret", "sidecar-token")
    return session


class RecordingProxy:
    """A forward HTTP proxy for absolute-form requests (what botocore sends for http:// endpoints)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._relay()

            def do_PUT(self) -> None:
                self._relay()

            def _relay(self) -> None:
                proxy.seen.append(f"{self.command} {self.path}")
                target = urlsplit(self.path)  # absolute form: http://host:port/path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(target.netloc, timeout=10)
                path = target.path + (f"?{target.query}" if target.query else "")
                headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"}
                upstream.request(self.command, path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def recording_proxy() -> Iterator[RecordingProxy]:
    proxy = RecordingProxy()
    try:
        yield proxy
    finally:
        proxy.close()


# ---------------------------------------------------------------------- configuration


def test_client_config_region_retries_timeouts_and_user_agent() -> None:
    factory = ClientFactory(static_session(), "eu-west-1", max_attempts=7, connect_timeout=2, read_timeout=9)
    s3 = factory.client("s3")
    config = s3.meta.config
    assert s3.meta.region_name == "eu-west-1"
    assert config.region_name == "eu-west-1"
    assert config.retries == {"mode": "standard", "total_max_attempts": 7}
    assert config.connect_timeout == 2
    assert config.read_timeout == 9
    assert config.proxies is None  # no egress proxy: direct
    assert USER_AGENT_EXTRA in config.user_agent_extra
    assert USER_AGENT_EXTRA.startswith("enclave-sidecar/")
    # Without an override, AWS's own regional endpoint.
    assert s3.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert factory.client("kms").meta.endpoint_url == "https://kms.eu-west-1.amazonaws.com"


def test_default_retry_policy_is_standard_with_five_attempts() -> None:
    factory = ClientFactory(static_session(), "us-east-2")
    assert factory.client("kms").meta.config.retries == {"mode": "standard", "total_max_attempts": 5}


def test_proxy_and_dev_endpoint_override() -> None:
    factory = ClientFactory(
        static_session(),
        "eu-west-1",
        proxy="http://127.0.0.1:10000",
        endpoints={"s3": "http://127.0.0.1:4566"},
    )
    s3 = factory.client("s3")
    assert s3.meta.config.proxies == {"http": "http://127.0.0.1:10000", "https": "http://127.0.0.1:10000"}
    assert s3.meta.endpoint_url == "http://127.0.0.1:4566"
    # The override is per service: KMS still goes to AWS, through the proxy.
    kms = factory.client("kms")
    assert kms.meta.endpoint_url == "https://kms.eu-west-1.amazonaws.com"
    assert kms.meta.config.proxies == s3.meta.config.proxies
    assert dict(factory.endpoints) == {"s3": "http://127.0.0.1:4566"}
    with pytest.raises(TypeError):
        factory.endpoints["kms"] = "http://elsewhere"  # type: ignore[index]


def test_clients_are_cached_per_service_region_endpoint_and_overrides() -> None:
    factory = ClientFactory(static_session(), "eu-west-1")
    s3 = factory.client("s3")
    assert factory.client("s3") is s3
    assert factory.client("s3", region_name="eu-west-1") is s3
    assert factory.client("kms") is not s3

    other_region = factory.client("s3", region_name="us-west-2")
    assert other_region is not s3
    assert other_region.meta.region_name == "us-west-2"
    assert other_region.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert factory.client("s3", region_name="us-west-2") is other_region

    local = factory.client("s3", endpoint_url="http://127.0.0.1:9")
    assert local.meta.endpoint_url == "http://127.0.0.1:9"
    assert local is not s3

    path_style = factory.client("s3", s3={"addressing_style": "path"})
    assert path_style.meta.config.s3 == {"addressing_style": "path"}
    assert path_style is not s3
    assert factory.client("s3", s3={"addressing_style": "path"}) is path_style

    explicit = factory.client("s3", config=Config(read_timeout=1))
    assert explicit.meta.config.read_timeout == 1
    assert explicit.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}


def test_clients_from_many_threads_share_one_client() -> None:
    factory = ClientFactory(static_session(), "eu-west-1")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(factory.client("sqs"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in results}) == 1


def test_unknown_config_option_is_an_error() -> None:
    factory = ClientFactory(static_session(), "eu-west-1")
    with pytest.raises(TypeError):
        factory.client("s3", no_such_option=True)


def test_boto3_session_accepted_and_credentials_frozen() -> None:
    session = boto3.Session(aws_access_key_id="AKID", aws_secret_access_key="SECRET", aws_session_token="TOK")
    factory = ClientFactory(session, "eu-west-1")
    assert factory.session is session
    credentials = factory.credentials()
    assert isinstance(credentials, ReadOnlyCredentials)
    assert (credentials.access_key, credentials.secret_key, credentials.token) == ("AKID", "SECRET", "TOK")
    assert factory.service_model("kms").metadata["targetPrefix"] == "TrentService"


def test_credentials_missing_raises() -> None:
    session = botocore.session.Session()
    session.register_component("credential_provider", CredentialResolver([]))  # no env, no IMDS
    factory = ClientFactory(session, "eu-west-1")
    with pytest.raises(NoCredentialsError):
        factory.credentials()


def test_repr_has_no_credentials() -> None:
    factory = ClientFactory(static_session(), "eu-west-1", endpoints={"s3": "http://127.0.0.1:1"})
    text = repr(factory)
    assert "eu-west-1" in text and "127.0.0.1:1" in text
    assert "sidecar-secret" not in text and "sidecar-akid" not in text


# ---------------------------------------------------------------------- round trips against moto


def test_s3_round_trip_against_moto(moto_url: str) -> None:
    factory = ClientFactory(static_session(), "eu-west-1", endpoints={"s3": moto_url}, max_attempts=2)
    s3 = factory.client("s3")
    s3.create_bucket(Bucket="clients-direct", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="clients-direct", Key="list.json", Body=b'{"names": []}')
    body = s3.get_object(Bucket="clients-direct", Key="list.json")["Body"].read()
    assert body == b'{"names": []}'
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="clients-direct")["Contents"]] == ["list.json"]


def test_s3_round_trip_through_the_egress_proxy(moto_url: str, recording_proxy: RecordingProxy) -> None:
    factory = ClientFactory(
        static_session(),
        "eu-west-1",
        proxy=recording_proxy.url,
        endpoints={"s3": moto_url},
        max_attempts=2,
    )
    s3 = factory.client("s3")
    s3.create_bucket(Bucket="clients-proxied", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="clients-proxied", Key="k", Body=b"through the proxy")
    assert s3.get_object(Bucket="clients-proxied", Key="k")["Body"].read() == b"through the proxy"
    # Every request went through the proxy, in absolute form, to moto.
    assert len(recording_proxy.seen) == 3
    assert all(line.split(" ")[1].startswith(moto_url) for line in recording_proxy.seen)
