"""Attestation: the NSM device and its emulator, COSE documents, verification, the attestation API."""
