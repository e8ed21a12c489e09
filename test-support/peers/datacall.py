"""What the Python services share: the id their data call carries, and the data call itself on a
keep-alive connection of the calling thread."""
import http.client
import os
import threading

_local = threading.local()


def data_id(rid):
    """The id the data call carries: the rid itself, or with TOPOLOGY_DOWNSTREAM=opaque a token
    that shares no id with it (first letter kept for the data service, "o", the rest reversed),
    as a service that looks its data up under another key would."""
    if os.environ.get("TOPOLOGY_DOWNSTREAM") == "opaque":
        return rid[0] + "o" + rid[1:][::-1]
    return rid


def fetch(data_addr, rid):
    """GET /data/<id> on this thread's keep-alive connection (reopened once if it was closed)."""
    for attempt in (0, 1):
        conn = getattr(_local, "conn", None)
        if conn is None:
            conn = _local.conn = http.client.HTTPConnection(data_addr, timeout=10)
        try:
            conn.request("GET", f"/data/{data_id(rid)}")
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (ConnectionError, http.client.HTTPException):
            conn.close()
            _local.conn = None
            if attempt:
                raise
