"""gunicorn's gthread worker, with request reading moved off the threads.

Why: gthread hands a connection to a thread as soon as its first byte arrives,
and the thread then blocks reading the request. Forty clients sending one
header byte per second (or half a body) held every thread, and /health and
chat timed out for everyone (issue 9). Here the worker's event loop reads the
request head (and a body of up to PREFETCH_BODY bytes) without blocking, and
only a complete request takes a thread. A request that is not complete within
LLMHOST_READ_TIMEOUT seconds is dropped, and once a thread holds the
connection the socket has the same timeout for every read and write, so a
client that goes silent frees its thread. Production should still run nginx
in front (docs/deploying.md), which buffers requests the same way.

Used through gunicorn.conf.py (``worker_class``); TLS terminated by gunicorn
itself is left to the plain gthread path.
"""
from __future__ import annotations

import errno
import os
import re
import select
import selectors
import socket
import time
from functools import partial

from gunicorn.workers import gthread

PREFETCH_BODY = 1 << 20        # larger bodies stream into the thread (with the socket timeout)
MAX_HEAD = 64 * 1024           # past this, the parser answers the client's error itself
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.IGNORECASE)
_STREAMED = re.compile(rb"\r\n(transfer-encoding|expect):", re.IGNORECASE)


class _PrefetchedSocket:
    """The client socket, with the bytes the event loop already read served
    first, and a read/write timeout whenever gunicorn makes it blocking."""

    def __init__(self, sock, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self.buffer = b""

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.buffer:
            if flags & socket.MSG_PEEK:   # sse.client_disconnected peeks: consume nothing
                return self.buffer[:size]
            data, self.buffer = self.buffer[:size], self.buffer[size:]
            return data
        if flags & socket.MSG_DONTWAIT and not select.select([self._sock], [], [], 0)[0]:
            # A socket with a timeout waits for data before a recv, even one with
            # MSG_DONTWAIT: answer "nothing yet" at once, as a blocking socket does.
            raise BlockingIOError(errno.EAGAIN, "no data")
        return self._sock.recv(size, flags)

    def setblocking(self, flag: bool) -> None:
        self._sock.settimeout(self._timeout if flag else 0.0)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _complete(buffer: bytes) -> bool:
    """A whole request head, and the body too when it is small and sized."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return len(buffer) > MAX_HEAD
    head = buffer[:end + 2]
    if _STREAMED.search(head):
        return True
    match = _LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    return length > PREFETCH_BODY or len(buffer) >= end + 4 + length


class GuardedThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ..config import Config
        self.read_timeout = float(Config().READ_TIMEOUT)
        self.reading: dict = {}        # conn -> deadline, in deadline order

    def init_process(self) -> None:
        # Before the app loads: the addresses gunicorn really bound (`-b` included) name this
        # server for its model journal and its response leases (config.server_id), so two
        # servers sharing a state folder never share a journal.
        if not os.environ.get("LLMHOST_SERVER_ID"):
            bound = "+".join(str(sock) for sock in self.sockets)
            os.environ["LLMHOST_SERVER_ID"] = f"{socket.gethostname()}@{bound}"
        super().init_process()

    # -- connections waiting for a whole request ---------------------------------
    def _start_reading(self, conn) -> None:
        if self.cfg.is_ssl or not self.read_timeout:
            self.enqueue_req(conn)
            return
        if not isinstance(conn.sock, _PrefetchedSocket):
            conn.sock = _PrefetchedSocket(conn.sock, self.read_timeout)
        conn.sock.setblocking(False)
        self.reading[conn] = time.monotonic() + self.read_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if _complete(conn.sock.buffer):         # a pipelined request already read
            self._on_ready(conn)

    def _on_readable(self, conn, client) -> None:
        try:
            data = conn.sock._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                            # the client went away
            self._drop(conn)
            return
        conn.sock.buffer += data
        if _complete(conn.sock.buffer):
            self._on_ready(conn)

    def _on_ready(self, conn) -> None:
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop(self, conn) -> None:
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()

    # -- gthread hooks --------------------------------------------------------------
    def accept(self, listener) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (gthread.errno.EAGAIN, gthread.errno.ECONNABORTED,
                                 gthread.errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = gthread.TConn(self.cfg, client, address, listener.getsockname())
        self._start_reading(conn)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection has a next request: read it here too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.reading.items()):
            if deadline > now and self.alive:    # shutting down: no request is coming
                break
            self.log.info("dropped a connection that sent no whole request in %gs "
                          "(LLMHOST_READ_TIMEOUT)", self.read_timeout)
            self._drop(conn)
