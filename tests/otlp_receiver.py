"""An OTLP/HTTP traces receiver for tests/deploy/otlp_traces.rs.

Owns: decoding what an exporter POSTs to /v1/traces with the real OTLP
protobuf classes (PyPI's opentelemetry-proto, in target/otel-venv as
.ci/run makes it) and writing each span as one JSON line to OUT:
trace_id, span_id, parent_span_id (hex), name, kind, start/end (ns),
attributes (key -> value), status code and message, service.name.
Must not touch: the server under test.

    python otlp_receiver.py OUT

Listens on 127.0.0.1, port 0, and prints `listening on PORT` once ready.
Answers 200 with an empty ExportTraceServiceResponse. OUT = /dev/null (the
CPU benchmark, benches/server_cpu.sh): each request is decoded and its
spans counted, not converted, so the receiver keeps up with the server.
"""

import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def any_value(v):
    kind = v.WhichOneof("value")
    if kind in ("string_value", "bool_value", "int_value", "double_value"):
        return getattr(v, kind)
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    return None


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def spans_of(request):
    for rs in request.resource_spans:
        service = attributes(rs.resource.attributes).get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "service": service,
                    "scope": ss.scope.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                    "attributes": attributes(s.attributes),
                    "status_code": s.status.code,
                    "status_message": s.status.message,
                }


def main():
    out = open(sys.argv[1], "a", encoding="utf-8")
    discard = sys.argv[1] == "/dev/null"

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or "protobuf" not in self.headers.get("Content-Type", ""):
                self.send_error(404 if self.path != "/v1/traces" else 415)
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            if discard:
                sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            else:
                for span in spans_of(request):
                    out.write(json.dumps(span) + "\n")
                out.flush()
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
