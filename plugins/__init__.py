"""The builtin plugins. Each is registered through the `sidecar` entry-point group, like any other."""
