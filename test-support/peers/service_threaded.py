"""The service, thread per connection: a ThreadingHTTPServer answering GET /api/<rid> by calling
the data service for /data/<rid> on a keep-alive connection of the handling thread.

Answers 200 when the data service did, 502 otherwise. Usage: service_threaded.py ADDR PORT DATA_ADDR:PORT
"""
import http.server
import sys

import datacall

DATA = sys.argv[3]


def fetch(rid):
    return datacall.fetch(DATA, rid)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the head and the body leave in one write (flushed after each request). Two
    # writes meet Nagle's algorithm and the peer's delayed ACK: 40 ms a response.
    wbufsize = -1

    def do_GET(self):
        if not self.path.startswith("/api/"):
            self.answer(404, b"no such path\n")
            return
        rid = self.path[len("/api/"):]
        status, body = fetch(rid)
        self.answer(200 if status == 200 else 502, body)

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
    request_queue_size = 256


Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
