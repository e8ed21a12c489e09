"""A service instrumented with the OpenTelemetry SDK by hand (no agent involved): it continues
the W3C context of each request it receives (the SDK's own propagator) in a SERVER span, which
the SDK exports as OTLP/HTTP to ENDPOINT. For the context-injection test: the caller is traced
only by the agent, so the only way this span can join the caller's trace is the traceparent the
agent's probes put on the wire. Usage: sdk_server.py PORT ENDPOINT
"""
import http.server
import sys

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

PORT, ENDPOINT = int(sys.argv[1]), sys.argv[2]
provider = TracerProvider(resource=Resource.create({"service.name": "sdk-service"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=ENDPOINT + "/v1/traces")))
tracer = provider.get_tracer("sdk-server")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        ctx = propagate.extract(dict(self.headers))
        with tracer.start_as_current_span("sdk-handler", context=ctx, kind=trace.SpanKind.SERVER):
            body = b"from sdk\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


print("listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
