"""The data service of the topology: GET /data/<rid> on a ThreadingHTTPServer (keep-alive).

The rid's first letter says what happens: "e" answers 500, "s" answers after 50 ms (the slow
hop), anything else answers 200 at once. Usage: data.py ADDR PORT
"""
import http.server
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the head and the body leave in one write (flushed after each request). Two
    # writes meet Nagle's algorithm and the peer's delayed ACK: 40 ms a response.
    wbufsize = -1

    def do_GET(self):
        if not self.path.startswith("/data/"):
            self.answer(404, b"no such path\n")
            return
        rid = self.path[len("/data/"):]
        if rid.startswith("s"):
            time.sleep(0.05)
        self.answer(500 if rid.startswith("e") else 200, f"data {rid}\n".encode())

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


Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
