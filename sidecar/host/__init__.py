"""The parts that run outside the enclave, on the parent instance: ``sidecar host``."""
