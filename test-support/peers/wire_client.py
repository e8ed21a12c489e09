"""Sends chosen byte sequences on one connection, send() call by send() call, and reads the
responses; writes what it sent to OUT, for the context-injection test to compare with what the
server received. Usage: wire_client.py PORT SCENARIO OUT [--wait]
With --wait it connects, prints "connected" and sends only once a line arrives on stdin (a
connection made before the agent started).
"""
import socket
import sys

PORT, SCENARIO, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
WAIT = "--wait" in sys.argv


def head(method, path, extra=b""):
    return method + b" " + path + b" HTTP/1.1\r\nHost: sink\r\nUser-Agent: wire-client\r\n" + extra + b"\r\n"


def body(n, seed):
    # Letters only: no CRLF inside, so the sink's naive chunked parser stays right.
    letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return bytes(letters[(i * 7 + seed) % len(letters)] for i in range(n))


def looks_like_requests(n):
    # A body made of request heads: only framing tells it from requests.
    return (b"GET /inside-a-body HTTP/1.1\r\nHost: x\r\n\r\n" * n)


# Each scenario: a list of (bytes for one send() call, responses to read after it).
SCENARIOS = {
    "keepalive": [
        (head(b"GET", b"/k1"), 1),
        (head(b"POST", b"/k2", b"Content-Length: 200000\r\n") + body(200000, 1), 1),
        (head(b"GET", b"/k3"), 1),
    ],
    "bigpost": [
        (head(b"POST", b"/big", b"Content-Length: 3000000\r\n") + body(3000000, 2), 1),
        (head(b"GET", b"/after-big"), 1),
    ],
    "split": [
        (head(b"PUT", b"/split", b"Content-Length: 120\r\n"), 0),
        (looks_like_requests(3)[:60], 0),
        (looks_like_requests(3)[60:120], 1),
        (head(b"GET", b"/after-split"), 1),
    ],
    "chunked": [
        (head(b"POST", b"/chunked", b"Transfer-Encoding: chunked\r\n"), 0),
        (b"10\r\n" + body(16, 3) + b"\r\n", 0),
        (b"28\r\n" + looks_like_requests(1)[:40] + b"\r\n", 0),
        (b"0\r\n\r\n", 1),
        (head(b"GET", b"/after-chunked"), 1),
    ],
    "pipelined": [
        (head(b"GET", b"/p1") + head(b"GET", b"/p2"), 2),
        (head(b"GET", b"/after-pipelined"), 1),
    ],
    "has-context": [
        (head(b"GET", b"/ctx", b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"), 1),
    ],
    "preexisting": [
        (head(b"GET", b"/old1"), 1),
        (head(b"POST", b"/old2", b"Content-Length: 5\r\n") + b"hello", 1),
    ],
}

s = socket.create_connection(("127.0.0.1", PORT))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if WAIT:
    print("connected", flush=True)
    sys.stdin.readline()
sent = b""
buf = b""
for data, responses in SCENARIOS[SCENARIO]:
    s.sendall(data)
    sent += data
    while buf.count(b"\r\n\r\nok") < responses:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("the sink closed the connection")
        buf += chunk
    buf = buf.replace(b"\r\n\r\nok", b"", responses)
s.close()
with open(OUT, "wb") as f:
    f.write(sent)
