"""``python -m sidecar.host``: the ``sidecar host`` command on its own (tests run it in namespaces)."""

import sidecar.cli  # noqa: F401  (first: sidecar.cli may import sidecar.host.command itself)
from sidecar.host.command import host

host(prog_name="sidecar host")
