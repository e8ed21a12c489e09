"""A service with no tracing code at all: each GET calls DOWNSTREAM (urllib, a new connection
per call) and answers with what it got. Thread per request. Usage: plain_caller.py PORT DOWNSTREAM
"""
import http.server
import sys
import urllib.request

PORT, DOWNSTREAM = int(sys.argv[1]), sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        with urllib.request.urlopen(DOWNSTREAM + self.path, timeout=5) as r:
            body = r.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print("listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
