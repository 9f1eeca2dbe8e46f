"""The AWS path: IMDSv2 credentials, attested KMS, the KMS proxy, client factory."""
