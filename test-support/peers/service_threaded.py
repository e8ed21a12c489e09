"""The service, thread per connection: a ThreadingHTTPServer answering GET /api/<rid> by calling
the data service for /data/<rid> on a keep-alive connection of the handling thread.

Answers 200 when the data service did, 502 otherwise. Usage: service_threaded.py ADDR PORT DATA_ADDR:PORT
"""
import sys

import datacall
import threadedhttp

DATA = sys.argv[3]


def fetch(rid):
    return datacall.fetch(DATA, rid)


class Handler(threadedhttp.Handler):
    def do_GET(self):
        if not self.path.startswith("/api/"):
            self.answer(404, b"no such path\n")
            return
        rid = self.path[len("/api/"):]
        status, body = fetch(rid)
        self.answer(200 if status == 200 else 502, body)


threadedhttp.serve(sys.argv[1], sys.argv[2], Handler)
