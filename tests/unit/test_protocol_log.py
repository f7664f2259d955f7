"""aiohttp's protocol-error records become one WARNING line without a traceback."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from proxy.edge.reqlog import ProtocolErrorFilter


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                             "Error handling request from %s", ("127.0.0.1",), info)


def test_a_malformed_request_is_one_warning_line() -> None:
    rec = _record(BadHttpMessage("Invalid header value char"))
    assert ProtocolErrorFilter().filter(rec)
    assert rec.levelno == logging.WARNING and rec.exc_info is None
    assert "Invalid header value char" in rec.getMessage()


def test_other_errors_keep_their_traceback() -> None:
    rec = _record(RuntimeError("a bug"))
    assert ProtocolErrorFilter().filter(rec)
    assert rec.levelno == logging.ERROR and rec.exc_info is not None
