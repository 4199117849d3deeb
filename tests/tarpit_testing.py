"""A tarpit git HTTP server for tests: it answers git's first request, then sends one byte a
second until stopped, so that a fetch from it neither fails nor finishes (git's low-speed
limit ends it)."""

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Tarpit(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 and then one byte a second until ``stop`` is set."""

    stop: threading.Event

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.end_headers()
        try:
            while not self.stop.wait(1.0):
                self.wfile.write(b"0")
                self.wfile.flush()
        except OSError:
            return  # git gave up

    def log_message(self, format: str, *args: object) -> None:
        return


@contextmanager
def tarpit_server() -> Iterator[str]:
    """Run a tarpit on loopback; yields its base URL (``http://127.0.0.1:PORT``)."""
    stop = threading.Event()
    handler = type("Tarpit", (_Tarpit,), {"stop": stop})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
