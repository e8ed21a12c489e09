"""A server that keeps every byte it receives, for the context-injection test: each accepted
connection's bytes go to DIR/conn-<n>.bin (n counts connections, from 1), and each complete
request (Content-Length or chunked body) gets a small 200. It never parses more than it must,
so what it stores is exactly what arrived. Usage: wire_sink.py PORT DIR
"""
import os
import socket
import sys
import threading

PORT, DIR = int(sys.argv[1]), sys.argv[2]
count = 0
lock = threading.Lock()
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def request_end(data):
    """Where the first complete request in `data` ends, or None."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = data[: head_end + 4].lower()
    body = head_end + 4
    if b"\ntransfer-encoding: chunked" in head:
        end = data.find(b"\r\n0\r\n\r\n", body - 2)
        return None if end < 0 else end + 7
    length = 0
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return body + length if len(data) >= body + length else None


def serve(conn, n):
    path = os.path.join(DIR, f"conn-{n}.bin")
    pending = b""
    with open(path, "wb") as out:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            pending += chunk
            while (end := request_end(pending)) is not None:
                pending = pending[end:]
                conn.sendall(OK)
    conn.close()


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", PORT))
srv.listen(64)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    with lock:
        count += 1
        n = count
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
