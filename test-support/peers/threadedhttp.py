"""What the ThreadingHTTPServer peers (the data service, the threaded service) share: a
keep-alive handler that answers in one write, and a server with a deep accept backlog."""
import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the head and the body leave in one write (flushed after each request). Two
    # writes meet Nagle's algorithm and the peer's delayed ACK: 40 ms a response.
    wbufsize = -1

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # 64 clients connect at once; the default backlog of 5 drops SYNs (a 1 s retransmit).
    request_queue_size = 256


def serve(addr, port, handler):
    Server((addr, int(port)), handler).serve_forever()
