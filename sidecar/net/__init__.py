"""Networking inside the enclave: egress policy and proxy, vsock transports, ingress bridges."""
