"""A small read-only HTTP/1.1 server on its own thread and event loop, hardened against slow and hostile clients.

The node's metrics port serves Prometheus text, health, status, the dashboard page and its JSON endpoints. The
round loop must never wait for a browser, and a client that opens many connections and sends nothing, sends a
request byte by byte, or never reads its answer must not stall the node or lock other clients out. So:

- the server runs on a daemon thread with its own asyncio loop: an idle connection costs a socket and a small
  coroutine, not a thread (unlike `http.server`'s thread per connection);
- each connection gets `head_timeout_s` to deliver its request head (at most `max_head_bytes`), and
  `write_timeout_s` to take the answer; then it is closed;
- at most `max_connections` connections are open at once; a connection over the limit is closed at once;
- one request per connection (`Connection: close`), GET and HEAD only, no request body;
- the route function only reads snapshots the node prepared (swarm_node/dashboard/api.py): no lock is held
  while a socket is read or written.

HTTP parsing is h11's (a sans-I/O HTTP/1.1 library), not home-made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import h11

log = logging.getLogger("swarm_node.dashboard")


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


Route = Callable[[str], Response]  # request target (path and query) -> response


class HttpServer:
    """Serve `route` on (host, port) from a daemon thread. `start()` returns the bound port; `close()` stops it.

    Args:
        route: request target (e.g. "/api/rounds?last=50") -> Response; exceptions become a 500 answer.
        head_timeout_s: seconds a client has to send its whole request head.
        write_timeout_s: seconds a client has to read the whole answer.
        max_connections: connections open at once; more are closed on accept.
        max_head_bytes: largest request head accepted (request line and headers), bytes.
    """

    def __init__(self, route: Route, head_timeout_s: float = 5.0, write_timeout_s: float = 10.0,
                 max_connections: int = 512, max_head_bytes: int = 16384):
        self.route = route
        self.head_timeout_s, self.write_timeout_s = head_timeout_s, write_timeout_s
        self.max_connections, self.max_head_bytes = max_connections, max_head_bytes
        self.open_connections = 0
        self.refused_connections = 0  # closed on accept because max_connections were open
        self.timed_out_connections = 0  # closed because the head or the answer took too long
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve on a daemon thread; port 0 picks a free port. Returns the bound port.

        Raises:
            OSError: the address cannot be bound (in use, not local, permission).
        """
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(host, port, bound), name="telemetry-http",
                                        daemon=True)
        self._thread.start()  # the loop is created and bound on its own thread: the caller's loop may be running
        return bound.result()

    def _run(self, host: str, port: int, bound: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve_client, host, port, backlog=256, limit=self.max_head_bytes))
        except BaseException as e:
            loop.close()
            bound.set_exception(e)
            return
        self._loop = loop
        bound.set_result(self._server.sockets[0].getsockname()[1])
        loop.run_forever()
        loop.close()

    def close(self) -> None:
        if self._loop is None:
            return
        loop, server = self._loop, self._server

        async def shutdown():
            server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
        except Exception as e:  # the loop may already be gone at interpreter exit
            log.debug("http server shutdown: %r", e)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)  # the thread closes its loop
        self._loop = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            writer.transport.abort()
            return
        self.open_connections += 1
        answered = False
        try:
            await self._exchange(reader, writer)
            answered = True
        except (asyncio.TimeoutError, TimeoutError):
            self.timed_out_connections += 1
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            if answered:
                writer.close()  # the answer is with the kernel: a normal close sends it, then FIN
            else:
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        request = await asyncio.wait_for(self._read_request(reader, conn), self.head_timeout_s)
        if request is None:
            return
        method = request.method.decode("ascii", "replace")
        if method not in ("GET", "HEAD"):
            response = Response(405, "text/plain", b"read-only: GET or HEAD\n", [("Allow", "GET, HEAD")])
        else:
            try:
                response = self.route(request.target.decode("ascii", "replace"))
            except Exception as e:  # a bug in one endpoint answers 500 and is logged; the server keeps serving
                log.warning("dashboard endpoint %s failed: %r", request.target[:100], e)
                response = Response(500, "text/plain", b"internal error\n")
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("Connection", "close"), *response.headers]
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if method != "HEAD":
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        writer.transport.set_write_buffer_limits(high=0)  # drain() returns once all of it is with the kernel
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.write_timeout_s)

    async def _read_request(self, reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Request | None:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                chunk = await reader.read(4096)
                conn.receive_data(chunk)  # b"" marks the end of the stream
                if not chunk and conn.their_state is h11.IDLE:
                    return None
                continue
            return None  # ConnectionClosed or anything unexpected before a request
