"""OpenTelemetry traces (--otlp-endpoint), checked against a real OTLP/gRPC receiver: a
`TraceService` (opentelemetry.proto.collector.trace.v1, the official `opentelemetry-proto`
package) on a free port, which keeps every span visionserve exports.

Requests on /v1, v2 REST and gRPC carry a client's `traceparent`; the exported spans must
continue that trace under the client's span, form the tree (request -> body read, decode,
preprocess, queue wait, inference), carry the request's attributes, and the batch spans must
link to request spans that were exported. At --trace-sample-ratio 0, requests without a
sampled parent export nothing.
"""
import json
import os
import secrets
import threading
import time
from concurrent import futures

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server import MODEL, start_server, stop_server
from v2helpers import PHOTOS, photo_bytes

SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
INTERNAL = trace_pb2.Span.SpanKind.SPAN_KIND_INTERNAL
STAGES = {"body read", "decode", "preprocess", "queue wait", "inference"}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps what it is sent: [(resource, span)]."""

    def __init__(self):
        self.spans = []
        self.changed = threading.Condition()

    def Export(self, request, context):
        with self.changed:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource_spans.resource, span))
            self.changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout=20.0):
        """The spans once `predicate(spans)` holds (or, after `timeout`, whatever came)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate([s for _, s in self.spans]) and time.monotonic() < deadline:
                self.changed.wait(0.2)
            return [s for _, s in self.spans]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(0)


def _traced_server(receiver, service, *args):
    # Export every 100 ms instead of the batch processor's default 5 s (an OTel SDK variable).
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        return start_server(["--otlp-endpoint", receiver.endpoint, "--otlp-service-name",
                             service, "--cache-bytes", "16MiB", *args])
    finally:
        if saved is None:
            del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


@pytest.fixture(scope="module")
def traced(receiver):
    srv = _traced_server(receiver, "visionserve-test")
    yield srv
    stop_server(srv)


def new_parent(sampled=True):
    """A client's span: (trace id hex, span id hex, traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


def of_trace(spans, trace_id):
    return [s for s in spans if s.trace_id.hex() == trace_id]


def server_span(spans, trace_id):
    servers = [s for s in of_trace(spans, trace_id) if s.kind == SERVER]
    assert len(servers) == 1, f"expected one server span in trace {trace_id}, got {servers}"
    return servers[0]


def post_v1(addr, photo, traceparent, cache="no-store"):
    """/v1 with one image; by default past the response cache, so that it runs on the model."""
    return requests.post(f"http://{addr}/v1/models/{MODEL}/classify", data=photo_bytes(photo),
                         headers={"Content-Type": "application/octet-stream",
                                  "traceparent": traceparent, "tracestate": "client=1",
                                  "Cache-Control": cache},
                         timeout=60)


def post_v2(addr, photo, traceparent):
    image = photo_bytes(photo)
    raw = len(image).to_bytes(4, "little") + image
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return requests.post(f"http://{addr}/v2/models/{MODEL}/infer", data=header + raw, timeout=60,
                         headers={"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream",
                                  "traceparent": traceparent, "Cache-Control": "no-store"})


def grpc_infer(addr, photos, traceparent):
    """ModelInfer with a BYTES image tensor; returns (response, the call's initial metadata)."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(photos)])
    tensor.contents.bytes_contents.extend(photo_bytes(p) for p in photos)
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=[("traceparent", traceparent), ("cache-control", "no-store")],
                                                   timeout=60)
        return response, dict(call.initial_metadata())


def assert_request_tree(spans, trace_id, parent_id, protocol, images, encoded=True):
    """The server span continues the client's span; its children are the stages."""
    server = server_span(spans, trace_id)
    assert server.parent_span_id.hex() == parent_id, "the server span's parent is the client's span"
    a = attrs(server)
    assert a.get("protocol") == protocol, a
    assert a.get("model") == MODEL, a
    assert a.get("version") == "1", a
    assert a.get("images") == images, a
    assert a.get("bytes_in", 0) > 0, a
    assert a.get("cache") == "miss", a
    children = [s for s in of_trace(spans, trace_id) if s.parent_span_id == server.span_id]
    names = {s.name for s in children}
    expected = STAGES if encoded else STAGES - {"decode", "preprocess"}
    assert expected <= names, f"stages under the {protocol} request span: {sorted(names)}"
    assert sum(1 for s in children if s.name == "queue wait") == images
    for child in children:
        assert child.kind == INTERNAL, child
        assert server.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= server.end_time_unix_nano, child.name
    return server


def test_http_and_grpc_requests_continue_the_clients_trace(receiver, traced):
    cases = []
    trace_id, parent, header = new_parent()
    r = post_v1(traced.http, PHOTOS[0], header)
    assert r.status_code == 200, r.text
    cases.append((trace_id, parent, "v1", 1, r.headers.get("traceparent")))

    trace_id, parent, header = new_parent()
    r = post_v2(traced.http, PHOTOS[1], header)
    assert r.status_code == 200, r.text[:300]
    cases.append((trace_id, parent, "v2", 1, r.headers.get("traceparent")))

    trace_id, parent, header = new_parent()
    _, metadata = grpc_infer(traced.grpc, PHOTOS[2:4], header)
    cases.append((trace_id, parent, "grpc", 2, metadata.get("traceparent")))

    def complete(spans):
        # A request span ends after its stages, and the exporter sends spans in the order they
        # end: once it is here, so are they.
        return all(any(s.kind == SERVER for s in of_trace(spans, t)) for t, *_ in cases)

    spans = receiver.wait_for(complete)
    for trace_id, parent, protocol, images, answered in cases:
        server = assert_request_tree(spans, trace_id, parent, protocol, images)
        # The answer names the server span: the client can find the trace.
        assert answered == f"00-{trace_id}-{server.span_id.hex()}-01", (protocol, answered)
        if protocol == "v1":  # it sent a tracestate too: the trace carries it on
            assert server.trace_state == "client=1", server.trace_state
    names = {kv.value.string_value for res, _ in receiver.spans for kv in res.attributes
             if kv.key == "service.name"}
    assert "visionserve-test" in names, names


def test_batch_spans_link_to_the_request_spans_they_served(receiver, traced):
    trace_id, parent, header = new_parent()
    # Several images in one request and two requests at once: a batch may serve both.
    with futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(post_v1, traced.http, photo, header) for photo in PHOTOS[:2]]
        assert all(c.result().status_code == 200 for c in calls)

    def linked(spans):
        ours = {s.span_id for s in of_trace(spans, trace_id) if s.kind == SERVER}
        links = {l.span_id for s in spans if s.name == "batch" for l in s.links}
        return len(ours) == 2 and ours <= links

    spans = receiver.wait_for(linked)
    request_ids = {(s.trace_id, s.span_id) for s in spans if s.kind == SERVER}
    batches = [s for s in spans if s.name == "batch"]
    assert batches, "no batch span exported"
    served = set()
    for batch in batches:
        a = attrs(batch)
        assert a.get("batch_size", 0) >= 1 and a.get("device") == "cpu", a
        assert a.get("model") == MODEL, a
        assert batch.links, "a batch span links to the requests it served"
        assert batch.parent_span_id == b"", "a batch span is a root: it serves many traces"
        for link in batch.links:
            assert (link.trace_id, link.span_id) in request_ids, "links point at exported request spans"
            served.add(link.span_id)
    ours = {s.span_id for s in of_trace(spans, trace_id) if s.kind == SERVER}
    assert ours <= served, "every request's span is linked from the batch that ran it"


def test_cache_hits_and_errors_are_attributes(receiver, traced):
    trace_id, parent, header = new_parent()
    # The first fills the cache (if no earlier request did); the second is a hit.
    assert post_v1(traced.http, PHOTOS[0], header, cache="").status_code == 200
    hit_trace, hit_parent, hit_header = new_parent()
    assert post_v1(traced.http, PHOTOS[0], hit_header, cache="").status_code == 200
    bad_trace, _, bad_header = new_parent()
    r = requests.post(f"http://{traced.http}/v1/models/{MODEL}/classify", data=b"not an image",
                      headers={"Content-Type": "application/octet-stream",
                               "traceparent": bad_header}, timeout=60)
    assert 400 <= r.status_code < 500, r.status_code
    spans = receiver.wait_for(lambda spans: all(
        any(s.kind == SERVER for s in of_trace(spans, t)) for t in (hit_trace, bad_trace)))
    assert attrs(server_span(spans, hit_trace)).get("cache") == "hit"
    bad = attrs(server_span(spans, bad_trace))
    assert bad.get("status") == r.status_code and bad.get("error_type"), bad
    # A client's error is not the server's: the span's status stays unset.
    assert server_span(spans, bad_trace).status.code == trace_pb2.Status.STATUS_CODE_UNSET


def test_ratio_zero_exports_nothing(receiver):
    srv = _traced_server(receiver, "visionserve-ratio-0", "--trace-sample-ratio", "0")
    try:
        trace_id, _, header = new_parent(sampled=False)
        r = post_v1(srv.http, PHOTOS[1], header)
        assert r.status_code == 200
        assert "traceparent" in r.headers, "the trace id is answered even when not sampled"
        assert r.headers["traceparent"].endswith("-00")
        assert post_v1(srv.http, PHOTOS[2], new_parent(sampled=False)[2]).status_code == 200
        r = requests.post(f"http://{srv.http}/v1/models/{MODEL}/classify", data=photo_bytes(PHOTOS[3]),
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 200
    finally:
        stop_server(srv)  # flushes the exporter: anything sampled would have been sent by now
    exported = [span.name for resource, span in receiver.spans
                if any(kv.value.string_value == "visionserve-ratio-0" for kv in resource.attributes)]
    assert exported == [], "ratio 0 exported spans"


def test_latency_buckets_carry_trace_id_exemplars(traced):
    trace_id, _, header = new_parent()
    assert post_v1(traced.http, PHOTOS[3], header).status_code == 200
    r = requests.get(f"http://{traced.http}/metrics", timeout=10,
                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    exemplars = [line for line in r.text.splitlines()
                 if line.startswith("visionserve_request_duration_seconds_bucket") and "# {" in line]
    assert any(f'trace_id="{trace_id}"' in line for line in exemplars), exemplars
    # The Prometheus text format has no exemplars: it must stay parseable by older scrapers.
    plain = requests.get(f"http://{traced.http}/metrics", timeout=10).text
    assert "# {" not in plain
