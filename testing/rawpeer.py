"""A hand-driven peer connection for attack tests and benches: the real handshake and record
layer over plain asyncio streams, but the caller decides what to send and whether to read.

``RawPeer.connect`` runs the initiator side of :class:`peer.handshake.Handshake`; afterwards
``send`` seals any frame (valid or hostile) into a record and ``write`` puts it on the socket
without waiting for the kernel, so a test can flood a peer and never read its replies (the
socket's receive window then fills up, which is the point).
"""
from __future__ import annotations

import asyncio

from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake
from peer.identity import Identity
from peer.messages import Message, OutgoingMessage, Request
from peer.secure import SecureChannel
from peer.transport import split_address
from peer.wire import FrameType


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: SecureChannel,
                 peer_id: str) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = channel
        self.peer_id = peer_id  # the remote side's

    @classmethod
    async def connect(cls, address: str, identity: Identity | None = None, token: bytes | None = None,
                      *, local_ip: str | None = None, timeout: float = 10.0, **handshake_kw) -> "RawPeer":
        """Dial ``address`` and complete the handshake (AuthError / ProtocolError if refused)."""
        host, port = split_address(address)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(local_ip, 0) if local_ip else None), timeout)
        hs = Handshake(identity or Identity.generate(), token, initiator=True, **handshake_kw)
        try:
            async with asyncio.timeout(timeout):
                writer.write(hs.data_to_send())
                while not hs.done:
                    data = await reader.read(65536)
                    if not data:
                        raise AuthError(f"{address} closed the connection during the handshake")
                    try:
                        hs.receive_data(data)
                    finally:
                        writer.write(hs.data_to_send())
        except BaseException:
            writer.close()
            raise
        assert hs.result is not None
        channel = SecureChannel(hs.result.send_key, hs.result.recv_key)
        trailing = hs.take_trailing_data()
        if trailing:
            channel.feed(trailing)
        return cls(reader, writer, channel, hs.result.peer_id)

    def write(self, type_: int, header: dict, payload: bytes = b"", flags: int = 0) -> None:
        """Seal one frame and hand it to the socket's buffer (no drain: a flood never waits)."""
        self.writer.write(bytes(self.channel.seal_frame(type_, header, payload, flags)))

    def ping(self, pid: object = 0) -> None:
        self.write(FrameType.PING, {"p": pid})

    def message(self, mid: int, msg: Message, payload: bytes = b"", chunk_size: int = 1 << 20,
                chunks: slice = slice(None)) -> None:
        """Write a message's DATA chunks (``chunks``: only these, e.g. never the last one)."""
        for header, chunk in list(OutgoingMessage(mid, msg, payload, chunk_size).lane(0, 1))[chunks]:
            self.write(FrameType.DATA, header, bytes(chunk))

    def request(self, call_id: int, method: str, header: dict | None = None, payload: bytes = b"") -> None:
        self.message(call_id, Request(call_id, method, header or {}), payload)

    def unsent(self) -> int:
        """Bytes written here that the remote side has not read yet beyond the kernel's buffers."""
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    async def read_frames(self, timeout: float) -> list:
        """Frames that arrive within ``timeout`` (empty list on EOF)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except asyncio.TimeoutError:
            return []
        return self.channel.feed(data) if data else []

    async def closed_by_peer(self, timeout: float) -> bool:
        """True once the remote side has closed or reset the connection (reads and drops data)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                data = await asyncio.wait_for(self.reader.read(1 << 20), deadline - loop.time())
                if not data:
                    return True
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, ProtocolError):
            return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()
