"""uvicorn's HTTP protocol, with its own 400 in OpenAI's error format. No torch.

A request uvicorn cannot parse (a malformed request line, header or chunk, an unsupported
HTTP version) never reaches the app: uvicorn answers it itself, with a plain-text 400 and the
connection closed. Here that answer carries the error body every other error of this server
carries (`{"error": {...}}`, as JSON), so that a client reading `error.message` reads it too.
"""

from __future__ import annotations

from typing import Any

from server.protocol import ErrorResponse


class _OpenAIErrors:
    """Mixed in before uvicorn's protocol class (httptools or h11: both answer through
    `send_400_response` and close the connection after it)."""

    transport: Any
    server_state: Any

    def send_400_response(self, msg: str) -> None:
        # uvicorn's message: "Invalid HTTP request received."
        body = ErrorResponse.of(msg, "invalid_request_error").model_dump_json().encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:  # server, date
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def http_protocol() -> type:
    """The protocol class for uvicorn.Config(http=...): uvicorn's own choice ("auto":
    httptools where it is installed, else h11), answering its 400s in OpenAI's format."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # no httptools: uvicorn's pure-Python h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type("OpenAIErrorsProtocol", (_OpenAIErrors, base), {})
