"""The HTTP/1.1 protocol the server speaks: uvicorn's (on httptools), but for its answer
to a request too malformed to reach the application at all (a request line, header or
body framing that does not parse: a ``Content-Length`` of a hundred digits, a bad chunk
size). uvicorn gives that one as plain text; every error leaves the API as
``application/problem+json``, so this one does too.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ondeck.api.problems import MEDIA_TYPE, problem_body

# uvicorn's messages, and what they mean to a client.
_DETAILS = {
    "Invalid HTTP request received.": "the request is not valid HTTP/1.1 and could not be parsed",
}


class HttpProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        detail = _DETAILS.get(msg, f"the request cannot be served: {msg.rstrip('.').lower()}")
        body = json.dumps(problem_body(400, "malformed-request", "Malformed request", detail)).encode()
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: " + MEDIA_TYPE.encode() + b"\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
