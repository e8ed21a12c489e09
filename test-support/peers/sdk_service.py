"""The overhead bench's realistic service, Python: Flask on its threaded server.

GET /work calls the data service (data.py) for /data/w over a keep-alive connection (a requests
Session per thread), then builds, serialises and re-reads a JSON document of 200 items and answers
a small JSON summary: about half a millisecond of work a request. The bench runs it plain, traced by
the agent, and under `opentelemetry-instrument` (the OpenTelemetry SDK's zero-code
instrumentation: Flask and requests spans exported as OTLP). Usage: sdk_service.py PORT DATA_ADDR:PORT
"""
import json
import logging
import signal
import sys
import threading

import requests
from flask import Flask, Response

# The bench stops the service with SIGINT (the SDK flushes on the KeyboardInterrupt). A shell
# starting the bench in the background (`nohup ... &`) leaves SIGINT ignored in every child, and
# Python keeps an ignored SIGINT ignored: the service would never stop.
signal.signal(signal.SIGINT, signal.default_int_handler)

PORT, DATA = int(sys.argv[1]), sys.argv[2]
ITEMS = [
    {"id": i, "name": f"item-{i}", "tags": ["red", "green", "blue"], "price": i * 1.25}
    for i in range(200)
]

app = Flask(__name__)
local = threading.local()


def session():
    if not hasattr(local, "session"):
        local.session = requests.Session()
    return local.session


@app.get("/work")
def work():
    upstream = session().get(f"http://{DATA}/data/w", timeout=5)
    doc = json.loads(json.dumps({"items": ITEMS, "data": upstream.text}))
    body = json.dumps(
        {"count": len(doc["items"]), "total": sum(item["price"] for item in doc["items"])}
    )
    status = 200 if upstream.status_code == 200 else 502
    return Response(body, status=status, mimetype="application/json")


# The development server logs every request to stderr: a cost no service pays in production.
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app.run(host="127.0.0.1", port=PORT, threaded=True)
