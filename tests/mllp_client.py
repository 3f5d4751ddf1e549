"""A small MLLP client for the HL7 tests: what an interface engine does (a message, then wait for its
ACK)."""

from __future__ import annotations

import socket

START, END = b"\x0b", b"\x1c\r"


class MllpClient:
    """One TCP connection to the archive's MLLP port; blocking, so tests call it from any thread."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, message: bytes, *, framed: bool = True) -> bytes:
        """Send one message (MLLP framing added unless `framed` is False) and return its ACK, unframed."""
        self.sock.sendall(START + message + END if framed else message)
        return self.read_ack()

    def read_ack(self) -> bytes:
        while END not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the archive closed the connection")
            self.buffer += chunk
        block, _, self.buffer = self.buffer.partition(END)
        assert block.startswith(START), block
        return block[1:]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ack_fields(ack: bytes) -> dict[str, list[str]]:
    """Segments of an ACK by ID, each split into fields (MSH-n at index n, other segments' field n at n)."""
    out: dict[str, list[str]] = {}
    for line in ack.decode("utf-8", "replace").split("\r"):
        if not line:
            continue
        fields = line.split("|")
        if fields[0] == "MSH":
            fields = ["MSH", "|", *fields[1:]]
        out[fields[0]] = fields
    return out
