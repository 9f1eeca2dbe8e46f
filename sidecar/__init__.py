"""enclave-sidecar: an attested secrets sidecar for AWS Nitro Enclaves, extended by plugins.

Plugin authors need only what this module exports::

    from sidecar import hookimpl, Route, PluginContext
"""

from importlib.metadata import PackageNotFoundError, version

from sidecar.context import PluginContext, ServiceNotConfigured
from sidecar.hookspecs import hookimpl
from sidecar.routes import Listener, Route
from sidecar.server import PluginStartupError

try:
    __version__ = version("enclave-sidecar")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Listener",
    "PluginContext",
    "PluginStartupError",
    "Route",
    "ServiceNotConfigured",
    "__version__",
    "hookimpl",
]
