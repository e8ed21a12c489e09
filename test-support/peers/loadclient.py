"""The load client of the topology: CONCURRENCY threads, each with its own keep-alive
http.client connection, send GET /api/<rid> with unique rids and record the ground truth.

Each thread cycles through PATTERN, one letter a request, which becomes the rid's first letter
(the data service answers "e" with 500 and "s" after 50 ms): "rrer" makes every fourth request
fail. rid = <letter><tag>x<thread>x<n>. Requests are paced to RATE a second in total (0: as
fast as each thread can), and stop after SECONDS or after COUNT requests a thread.

Writes {"requests": [{"rid", "start_ns", "end_ns", "status", "thread", "local_port"}],
"seconds", "rate"} to OUT (times: time.time_ns(), this host's clock).
Usage: loadclient.py TARGET_ADDR:PORT OUT --concurrency N [--rate R] [--seconds S | --count C]
       [--pattern P] [--tag T]
"""
import argparse
import http.client
import json
import threading
import time

p = argparse.ArgumentParser()
p.add_argument("target")
p.add_argument("out")
p.add_argument("--concurrency", type=int, default=1)
p.add_argument("--rate", type=float, default=0)
p.add_argument("--seconds", type=float, default=0)
p.add_argument("--count", type=int, default=0)
p.add_argument("--pattern", default="r")
p.add_argument("--tag", default="")
args = p.parse_args()
if args.seconds <= 0 and args.count <= 0:
    p.error("give --seconds or --count")

results = [[] for _ in range(args.concurrency)]
errors = []
barrier = threading.Barrier(args.concurrency)


def client(i):
    conn = http.client.HTTPConnection(args.target, timeout=30)
    conn.connect()
    out = results[i]
    interval = args.concurrency / args.rate if args.rate > 0 else 0
    barrier.wait()
    t0 = time.monotonic()
    # Threads start spread over one interval, so the load is even rather than in bursts.
    next_at = t0 + interval * i / args.concurrency
    n = 0
    while True:
        if args.count and n >= args.count:
            break
        if args.seconds and time.monotonic() - t0 >= args.seconds:
            break
        if interval:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # A thread that fell behind does not burst to catch up.
            next_at = max(next_at + interval, time.monotonic())
        rid = f"{args.pattern[n % len(args.pattern)]}{args.tag}x{i}x{n}"
        start = time.time_ns()
        try:
            conn.request("GET", f"/api/{rid}")
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{rid}: {e!r}")
            status = 0
            conn.close()
            conn = http.client.HTTPConnection(args.target, timeout=30)
        end = time.time_ns()
        sock = conn.sock
        port = sock.getsockname()[1] if sock else 0
        out.append(
            {"rid": rid, "start_ns": start, "end_ns": end, "status": status, "thread": i,
             "local_port": port}
        )
        n += 1
    conn.close()


threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
began = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - began
requests = [r for rs in results for r in rs]
with open(args.out, "w") as f:
    json.dump(
        {"requests": requests, "seconds": elapsed, "rate": len(requests) / elapsed,
         "errors": errors},
        f,
    )
