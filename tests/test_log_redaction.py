"""What the log must never hold, whatever ``log.level`` says."""

from __future__ import annotations

import io
import logging

from sidecar.logs import configure


def test_debug_logging_never_lets_aws_libraries_write_credentials() -> None:
    # Threat: at log.level debug, botocore logs signed headers (X-Amz-Security-Token) and response
    # bodies (a GenerateDataKey Plaintext). Those loggers stay at INFO whatever the sidecar's level.
    stream = io.StringIO()
    configure("debug", stream)
    try:
        logging.getLogger("botocore.endpoint").debug("headers: X-Amz-Security-Token=SECRETTOKEN")
        logging.getLogger("urllib3.connectionpool").debug("body SECRETBODY")
        logging.getLogger("sidecar.test").debug("ours still at debug")
        logging.getLogger("botocore.credentials").warning("warnings still pass")
        text = stream.getvalue()
        assert "SECRET" not in text
        assert "ours still at debug" in text and "warnings still pass" in text
    finally:
        configure("info")
