"""Errors of the KServe v2 protocol: one kind per status, rendered for HTTP and for gRPC.

Every message names the field at fault (``inputs[1] (stream): datatype must be BOOL, got INT32``).
HTTP answers ``{"error": message}`` with the status below; gRPC ends the call with the code below
(on ``ModelStreamInfer`` the error comes back as the response's ``error_message`` instead, and the
stream goes on).
"""

from __future__ import annotations

from typing import Any

# kind -> (HTTP status, name of the gRPC status code); grpc itself is imported only by the gRPC server
KINDS: dict[str, tuple[int, str]] = {
    "invalid": (400, "INVALID_ARGUMENT"),
    "unauthenticated": (401, "UNAUTHENTICATED"),
    "not_found": (404, "NOT_FOUND"),
    "unsupported": (400, "UNIMPLEMENTED"),
    "internal": (500, "INTERNAL"),
    "unavailable": (503, "UNAVAILABLE"),
    "timeout": (504, "DEADLINE_EXCEEDED"),
}


class KServeError(Exception):
    """A request the protocol answers with an error; ``kind`` is a key of :data:`KINDS`."""

    def __init__(self, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        return KINDS[self.kind][0]

    @property
    def grpc_code(self) -> Any:
        import grpc  # optional dependency (serve extra): only the gRPC server asks

        return grpc.StatusCode[KINDS[self.kind][1]]


def invalid(message: str) -> KServeError:
    return KServeError("invalid", message)


_STATUS_KINDS = {400: "invalid", 401: "unauthenticated", 404: "not_found", 503: "unavailable", 504: "timeout"}


def from_status(status: int, message: str, headers: dict[str, str] | None = None) -> KServeError:
    """Map an HTTP-status error of the shared server code (admission: 503 at capacity) to a protocol error."""
    return KServeError(_STATUS_KINDS.get(status, "internal"), message, headers)
