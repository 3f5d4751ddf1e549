"""The MLLP listener: HL7 v2 messages over TCP (HL7 v2.5 Appendix C, Minimal Lower Layer Protocol), on the
process's event loop.

A message is a block <VT> message <FS><CR>; each is answered with its ACK, in the same framing, before the
next one of the connection is read (MLLP is strictly one message at a time, which keeps a sender's
messages in order). Every server process listens on the same port (SO_REUSEPORT), as the DIMSE listener
does: the kernel spreads connections over them.

The framing is these few lines rather than a library's: hl7apy's MLLP server is a thread-per-connection
socketserver, and the archive's services live on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from access.service import Network, address_within
from hl7.message import AR, SEGMENT_SEQUENCE_ERROR, HL7Error
from hl7.service import Hl7Service

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\r"
# A block is read up to its <FS>: the <CR> after it is then noise before the next block, and a sender that
# ends blocks with <FS> alone (and waits for the ACK) is answered rather than left waiting for a <CR>.
END_BYTE = END[:1]
MAX_MESSAGE = 4 << 20  # larger blocks are refused (AR); ADT and order messages are a few KiB


def frame(message: bytes) -> bytes:
    return START + message + END


class MllpServer:
    """The listener of one process; started and stopped by the app's lifespan."""

    def __init__(
        self, service: Hl7Service, host: str, port: int, allowed: tuple[Network, ...] | None = None
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.allowed = allowed  # senders' addresses and networks; None: any
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection,
            self.host,
            self.port,
            reuse_port=hasattr(socket, "SO_REUSEPORT"),
            limit=MAX_MESSAGE,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HL7 (MLLP) listener on %s:%s, partition %s", self.host, self.port, self.service.partition)

    async def stop(self) -> None:
        """Stop accepting and end the connections (a message being handled finishes or rolls back whole)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else None
        if self.allowed is not None and not address_within(address or "", self.allowed):
            # HL7 v2 carries no credentials: a sender is admitted by its address, or not at all
            log.warning("HL7 connection from %s refused: not an allowed sender", address)
            self.service.audit_connection(
                address, f"{address} is not an allowed sender (DICOMWEB_HL7_ALLOWED_HOSTS)"
            )
            self._connections.discard(task)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                block = await self._read_block(reader, address)
                if block is None:
                    break
                raw, refusal = block
                if refusal is not None:
                    handled = await self.service.refuse(raw, address, refusal)
                else:
                    handled = await self.service.handle(raw, address)
                writer.write(frame(handled.ack))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_block(
        reader: asyncio.StreamReader, address: str | None
    ) -> tuple[bytes, HL7Error | None] | None:
        """(message, None), or (what came, the reason it is refused); None at the end of the connection.
        Bytes before a block's <VT> are noise between blocks (MLLP) and are skipped; so is a block begun
        and not ended: the message starts after the last <VT> (no HL7 text holds one)."""
        try:
            block = await reader.readuntil(END_BYTE)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                log.info("HL7 connection from %s closed in the middle of a message", address)
            return None
        except asyncio.LimitOverrunError:
            while True:  # skip to the end of the oversized block
                try:
                    await reader.readuntil(END_BYTE)
                    break
                except asyncio.LimitOverrunError as exc:
                    await reader.readexactly(exc.consumed)
            too_large = f"the message is larger than {MAX_MESSAGE >> 20} MiB"
            return b"", HL7Error(AR, SEGMENT_SEQUENCE_ERROR, too_large)
        start = block.rfind(START)
        if start < 0:
            return block[:-1].lstrip(b"\r\n"), HL7Error(
                AR, SEGMENT_SEQUENCE_ERROR, "not an MLLP block: no <VT> (0x0B) before the message"
            )
        return block[start + 1 : -1], None
