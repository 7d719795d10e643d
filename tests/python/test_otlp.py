"""Where traces go: a real OTLP/gRPC receiver (grpcio with the opentelemetry-proto
stubs) sees the spans of a live splitserve. The standard OTEL_EXPORTER_OTLP_ENDPOINT
is used when --otlp-endpoint is absent; the flag wins when both are set; with
neither, nothing is exported."""

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace collector on a loopback port."""

    def __init__(self):
        self.spans = []
        self.services = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                for kv in rs.resource.attributes:
                    if kv.key == "service.name":
                        self.services.append(kv.value.string_value)
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def names_in_trace(self, trace_id: str) -> set[str]:
        with self.lock:
            return {s.name for s in self.spans if s.trace_id.hex() == trace_id}

    def stop(self):
        self.server.stop(grace=None)


@pytest.fixture
def receivers():
    made = []

    def make():
        r = Receiver()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def traced_call(pb, server):
    """One Compute in the caller's trace (a W3C traceparent header)."""
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(server.channel())
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    reply = stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 2]), timeout=30,
                         metadata=[("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01")])
    assert np.frombuffer(reply.data, dtype=np.float32).tolist() == [2.0, 4.0]


def env_without_otlp(**extra):
    """The test's environment may carry its own OTEL/SPLITSERVE settings: blank them."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_SERVICE_NAME": ""}
    env.update(extra)
    return env


def test_otel_exporter_otlp_endpoint_is_used_without_the_flag(pb, server_factory, receivers):
    receiver = receivers()
    s = server_factory("--model", "k=builtin:scale:2",
                       env=env_without_otlp(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint))
    s.wait_ok(pb)
    traced_call(pb, s)
    # SIGTERM flushes the batch exporter before the process exits.
    assert s.terminate() == 0
    assert {"Compute", "queue", "forward"} <= receiver.names_in_trace(TRACE_ID), \
        f"spans received: {[sp.name for sp in receiver.spans]}"
    assert receiver.services and set(receiver.services) == {"splitserve"}, receiver.services


def test_the_flag_wins_over_the_variable(pb, server_factory, receivers):
    by_flag, by_env = receivers(), receivers()
    s = server_factory("--model", "k=builtin:scale:2", "--otlp-endpoint", by_flag.endpoint,
                       env=env_without_otlp(OTEL_EXPORTER_OTLP_ENDPOINT=by_env.endpoint))
    s.wait_ok(pb)
    traced_call(pb, s)
    assert s.terminate() == 0
    assert "Compute" in by_flag.names_in_trace(TRACE_ID)
    assert by_env.spans == []


def test_no_endpoint_exports_nothing(pb, server_factory, receivers):
    """The control: the receiver above gets spans only because it was named."""
    receiver = receivers()
    s = server_factory("--model", "k=builtin:scale:2", env=env_without_otlp())
    s.wait_ok(pb)
    traced_call(pb, s)
    assert s.terminate() == 0
    assert receiver.spans == []


def test_a_wrong_endpoint_is_named_at_start_and_when_exports_fail(pb, server_factory):
    """A collector that is not there: the start-up line names the endpoint, and the
    first failed export says so (the server keeps serving)."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s = server_factory("--model", "k=builtin:scale:2", "--otlp-endpoint", endpoint,
                       env=env_without_otlp(OTEL_BSP_SCHEDULE_DELAY="100"))
    s.wait_ok(pb)
    assert endpoint in s.wait_log("traces: spans are exported over OTLP/gRPC")
    traced_call(pb, s)
    line = s.wait_log("exporting traces over OTLP/gRPC")
    assert endpoint in line and "failed" in line, line
    traced_call(pb, s)
    assert s.terminate() == 0
