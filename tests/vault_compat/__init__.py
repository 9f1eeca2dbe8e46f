"""The Vault compatibility suite: every test runs against a real OpenBao and against vault_like."""
