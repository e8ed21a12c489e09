"""A gRPC server and client with grpcio from PyPI, no generated code (methods handle raw
bytes), over h2c: the HTTP/2 test's real gRPC peer.
Usage: grpc_peer.py server PORT | grpc_peer.py client PORT
The server's demo.Greeter has SayHello (unary; the name "missing" answers NOT_FOUND) and
Count (server streaming: three messages); the client calls each, then five SayHello at once.
"""
import sys
import time
from concurrent import futures

import grpc

MODE, PORT = sys.argv[1], int(sys.argv[2])


def say_hello(request, context):
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such name")
    return b"hello " + request


def count(request, context):
    for i in range(3):
        yield b"%d" % i


if MODE == "server":
    handler = grpc.method_handlers_generic_handler(
        "demo.Greeter",
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()
else:
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        hello = channel.unary_unary("/demo.Greeter/SayHello")
        print(hello(b"world", timeout=5).decode())
        try:
            hello(b"missing", timeout=5)
        except grpc.RpcError as e:
            print(e.code().name)
        stream = channel.unary_stream("/demo.Greeter/Count")
        print(",".join(m.decode() for m in stream(b"", timeout=5)))
        # Five calls in flight at once: interleaved streams on the one connection.
        calls = [hello.future(b"n%d" % i, timeout=5) for i in range(5)]
        print(",".join(c.result().decode() for c in calls))
        time.sleep(0.2)
