"""The service, work handed to a pool: one thread accepts and reads every connection (selectors)
and hands each complete request to a concurrent.futures.ThreadPoolExecutor; a pool thread calls
the data service for /data/<rid> (its own keep-alive connection) and writes the response. The
thread that read a request is never the one that calls out or answers.

Answers 200 when the data service did, 502 otherwise.
Usage: service_pool.py ADDR PORT DATA_ADDR:PORT [WORKERS]
"""
import concurrent.futures
import selectors
import socket
import sys

import datacall

DATA = sys.argv[3]
WORKERS = int(sys.argv[4]) if len(sys.argv) > 4 else 8


def fetch(rid):
    return datacall.fetch(DATA, rid)


REASONS = {200: "OK", 404: "Not Found", 502: "Bad Gateway"}


def handle(sock, path):
    if path.startswith("/api/"):
        status, body = fetch(path[len("/api/"):])
        status = 200 if status == 200 else 502
    else:
        status, body = 404, b"no such path\n"
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        sock.sendall(head + body)
    except OSError:
        pass


def main():
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
    listener = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=256)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    buffers = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ, True)
                buffers[conn] = b""
                continue
            conn = key.fileobj
            try:
                chunk = conn.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(conn)
                buffers.pop(conn, None)
                conn.close()
                continue
            buf = buffers[conn] + chunk
            # GET requests without bodies: each head ends at a blank line.
            while b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                pool.submit(handle, conn, path)
            buffers[conn] = buf


main()
