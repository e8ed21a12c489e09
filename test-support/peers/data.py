"""The data service of the topology: GET /data/<rid> on a ThreadingHTTPServer (keep-alive).

The rid's first letter says what happens: "e" answers 500, "s" answers after 50 ms (the slow
hop), anything else answers 200 at once. Usage: data.py ADDR PORT
"""
import sys
import time

import threadedhttp


class Handler(threadedhttp.Handler):
    def do_GET(self):
        if not self.path.startswith("/data/"):
            self.answer(404, b"no such path\n")
            return
        rid = self.path[len("/data/"):]
        if rid.startswith("s"):
            time.sleep(0.05)
        self.answer(500 if rid.startswith("e") else 200, f"data {rid}\n".encode())


threadedhttp.serve(sys.argv[1], sys.argv[2], Handler)
