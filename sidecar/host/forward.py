"""TCP -> enclave forwarders for the ingress ports (Enclaver's ``HostProxy``).

For each ``ingress`` ``listen_port`` the parent listens on TCP ``listen_host:listen_port`` and relays
every connection to the enclave's vsock port ``listen_port`` (CID = the enclave's). The enclave side
(:mod:`sidecar.net.ingress`) bridges it on to the app's TCP listener. Bytes are not inspected: TLS,
where configured, ends inside the enclave.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.net.ingress import DEFAULT_CONNECT_TIMEOUT, IngressBridges, start_bridges
from sidecar.net.vsock import Endpoint, parse_endpoint

DEFAULT_ENCLAVE_TEMPLATE = "vsock:{cid}:{port}"


def expand(template: str, *, port: int, cid: int | None) -> Endpoint:
    """Turn ``vsock:{cid}:{port}`` / ``tcp:10.0.0.2:{port}`` / ``unix:/run/e/{port}.sock`` into an Endpoint.

    ValueError names the template when it needs a CID that was not given, or is not an endpoint.
    """
    if "{cid}" in template:
        if cid is None:
            raise ValueError(f"endpoint template {template!r} needs the enclave's CID (--cid)")
        template = template.replace("{cid}", str(cid))
    text = template.replace("{port}", str(port))
    if "{" in text or "}" in text:
        raise ValueError(f"endpoint template {template!r}: only {{cid}} and {{port}} may be substituted")
    return parse_endpoint(text)


def forward_pairs(
    ports: Sequence[int], *, listen_host: str, enclave_template: str, cid: int | None
) -> list[tuple[Endpoint, Endpoint]]:
    """(tcp listen_host:port, enclave endpoint for port) for each ingress port."""
    return [
        (Endpoint("tcp", host=listen_host, port=p), expand(enclave_template, port=p, cid=cid)) for p in ports
    ]


async def start_forwarders(
    pairs: Sequence[tuple[Endpoint, Endpoint]],
    *,
    idle_timeout: float | None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int | None = None,
) -> IngressBridges:
    return await start_bridges(
        pairs,
        idle_timeout,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
        name="forward",
    )
