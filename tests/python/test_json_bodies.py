"""HTTP request bodies of the Open Inference Protocol as a stranger sends them:
large JSON tensors, values outside their datatype, bodies that never arrive or
arrive too slowly, one connection asking for more than its share of memory.
The server answers each with a clear status, its memory stays in proportion to
what it was sent, and health keeps answering throughout."""

import http.client
import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import Server, wait_until

TIMEOUT = 30  # seconds, for every call


def start(pb, *args: str) -> Server:
    s = Server(*args)
    s.wait_ok(pb)
    s.wait_http_listening()
    return s


@pytest.fixture(scope="module")
def mlp_server(pb):
    """The default model (`mlp`, input [-1, 512]) and default limits."""
    s = start(pb)
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def body_server(pb):
    """Small limits: 1 MiB messages, 4 MiB in flight, 960 KiB per connection,
    bodies must average 1 KiB/s after a 1 s grace (the overall timeout, 30 s,
    is far later)."""
    s = start(
        pb,
        "--model", "id=builtin:identity",
        "--max-message-bytes", "1MiB",
        "--max-inflight-bytes", "4MiB",
        "--max-inflight-bytes-per-connection", "960KiB",
        "--http-min-body-rate", "1KiB",
        "--http-body-rate-grace", "1s",
        "--request-body-timeout", "30s",
    )
    yield s
    assert s.terminate() == 0


def post(s: Server, path: str, body: bytes, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=timeout)
    try:
        try:
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before the whole body was sent: read the answer
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def zeros(datatype: str, n: int, **extra) -> bytes:
    """A request with one input of n zeros as JSON text (2 bytes a value)."""
    head = json.dumps({"name": "INPUT__0", "datatype": datatype, "shape": [n]})[:-1]
    tail = "}]" + ("," + json.dumps(extra)[1:] if extra else "}")
    return f'{{"inputs":[{head},"data":[{"0," * (n - 1)}0]{tail}'.encode()


def hwm_bytes(s: Server) -> int:
    """The server's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{s.proc.pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def cpu_seconds_by_thread(s: Server) -> dict[str, float]:
    """CPU time (user + system) of the server's threads, summed by thread name."""
    import os
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{s.proc.pid}/task"):
        try:
            with open(f"/proc/{s.proc.pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def limit_count(s: Server, which: str) -> float:
    return s.metric("splitserve_limit_rejections_total", limit=which) or 0.0


def test_json_bodies_cost_memory_in_proportion_and_health_stays_fast(mlp_server):
    """Two 16 MiB JSON tensors at once: the server's peak memory grows by at
    most ~3x their bytes (the body plus the FP32 tensor it decodes to), not by a
    generic JSON tree, and liveness answers fast while they parse."""
    s = mlp_server
    n = 8 * 1024 * 1024  # 16 MiB of "0,"; FP32 makes it 32 MiB of tensor
    body = zeros("FP32", n)
    before = hwm_bytes(s)
    cpu_before = cpu_seconds_by_thread(s)
    answers = []

    def send():
        answers.append(post(s, "/v2/models/mlp/infer", body))

    senders = [threading.Thread(target=send) for _ in range(2)]
    for t in senders:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in senders):
        started = time.monotonic()
        c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=TIMEOUT)
        c.request("GET", "/v2/health/live")
        assert c.getresponse().status == 200
        c.close()
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.02)
    for t in senders:
        t.join()
    # Parsed whole, then refused for its shape (the model takes [-1, 512]).
    assert [a[0] for a in answers] == [400, 400], answers
    assert all(b"expects [-1,512]" in a[1] for a in answers), answers
    cpu = cpu_seconds_by_thread(s)
    spent = {name: cpu.get(name, 0.0) - cpu_before.get(name, 0.0) for name in cpu}
    # The parse ran on the codec thread; the I/O threads only read the bytes.
    codec, io = spent.get("splitserve-code", 0.0), spent.get("splitserve-io", 0.0)
    assert codec > 2 * io, f"JSON parsed on the I/O threads: CPU seconds {spent}"
    grew = hwm_bytes(s) - before
    assert grew < 3 * 2 * len(body), f"peak memory grew by {grew >> 20} MiB for two {len(body) >> 20} MiB bodies"
    # Generous: the parse runs off the I/O threads (it took seconds on them).
    assert worst < 1.0, f"/v2/health/live took {worst:.2f} s while JSON bodies parsed"


OUT_OF_RANGE = [
    ("INT8", 1000), ("INT8", -129), ("UINT8", 256), ("UINT8", -1), ("INT16", 40000),
    ("INT32", 2 ** 31), ("INT64", 2 ** 63), ("FP16", 1e300), ("FP16", 70000.0),
    ("BF16", 1e300), ("FP32", 1e300),
]


@pytest.mark.parametrize("datatype,value", OUT_OF_RANGE)
def test_json_values_outside_their_datatype_are_invalid_argument(body_server, datatype, value):
    """INT8 1000 is not -24, FP16 1e300 is not infinity: 400 with a short message."""
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": datatype, "shape": [2], "data": [0, value]}]})
    status, reply = post(body_server, "/v2/models/id/infer", body.encode())
    assert status == 400, reply
    msg = json.loads(reply)["error"]
    assert "out of the range" in msg and datatype in msg and len(msg) < 200, msg


def test_typed_grpc_contents_outside_their_datatype_are_invalid_argument(body_server):
    with grpc.insecure_channel(body_server.addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for datatype, field, value in [("INT8", "int_contents", 1000), ("UINT8", "uint_contents", 256),
                                       ("FP16", "fp32_contents", 1e30)]:
            req = service_pb2.ModelInferRequest(model_name="id")
            t = req.inputs.add(name="INPUT__0", datatype=datatype, shape=[1])
            getattr(t.contents, field).append(value)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (datatype, e.value)
            assert "out of the range" in e.value.details(), e.value.details()


def test_the_edges_of_each_datatype_round_trip_as_numbers(body_server):
    """Finite values at a datatype's limits come back as the same numbers, never null."""
    for datatype, values in [("INT8", [-128, 127]), ("UINT8", [0, 255]), ("FP16", [65504.0, -65504.0]),
                             ("FP32", [3.4028234663852886e38, -1.5]), ("INT64", [-(2 ** 63), 2 ** 63 - 1])]:
        body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": datatype, "shape": [2], "data": values}]})
        status, reply = post(body_server, "/v2/models/id/infer", body.encode())
        assert status == 200, reply
        got = json.loads(reply)["outputs"][0]["data"]
        if datatype == "FP32":
            # Written in float32's shortest form: the same float32 values.
            got, values = np.float32(got).tolist(), np.float32(values).tolist()
        assert got == values, (datatype, reply)


def test_a_json_tensor_is_charged_for_what_it_decodes_to(body_server):
    """~900 KB of FP64 zeros decode to 3.6 MB: with the body, more than the
    4 MiB budget, so 429 before decoding; the same values as FP16 fit."""
    s = body_server
    n = 450_000
    refused_before = limit_count(s, "inflight_bytes")
    status, reply = post(s, "/v2/models/id/infer", zeros("FP64", n))
    assert status == 429, reply[:300]
    assert b"--max-inflight-bytes" in reply, reply
    assert limit_count(s, "inflight_bytes") > refused_before
    status, reply = post(s, "/v2/models/id/infer", zeros("FP16", n, parameters={"binary_data_output": True}))
    assert status == 200, reply[:300]


def stalled(s: Server, headers: str, path: str = "/v2/models/id/infer") -> socket.socket:
    """An HTTP/1.1 request whose headers are sent and body never is."""
    sock = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode())
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and what followed it, as the server answered and closed."""
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return int(data.split(b" ", 2)[1]), data


def test_stalled_chunked_bodies_hold_no_budget_and_are_cut_at_the_minimum_rate(body_server):
    """Ten chunked bodies that never send a byte: they reserve nothing (they
    used to reserve --max-message-bytes each, the whole budget after four), so
    others are served; past the grace they get 400 naming the minimum rate."""
    s = body_server
    cut_before = limit_count(s, "body_rate")
    refused_before = limit_count(s, "inflight_bytes")
    socks = [stalled(s, "Transfer-Encoding: chunked\r\n") for _ in range(10)]
    # Each is being read, or was refused for want of budget.
    wait_until(lambda: (s.metric("splitserve_inflight_requests") or 0)
               + limit_count(s, "inflight_bytes") - refused_before >= 10, 10, "the stalled requests handled")
    status, reply = post(s, "/v2/models/id/infer", zeros("FP16", 450_000, parameters={"binary_data_output": True}))
    assert status == 200, reply[:300]
    for sock in socks:
        status, reply = answer(sock)
        assert status == 400 and b"--http-min-body-rate" in reply, reply
    # The repository routes read their (small) bodies the same way.
    sock = stalled(s, "Content-Length: 2\r\n", "/v2/repository/index")
    status, reply = answer(sock)
    assert status == 400 and b"--http-min-body-rate" in reply, reply
    assert limit_count(s, "body_rate") >= cut_before + 11
    wait_until(lambda: s.metric("splitserve_inflight_request_bytes") == 0, 10, "the budget to be free")


def test_one_request_cannot_claim_more_than_a_connections_share(body_server):
    """A body claiming 1,000,000 bytes (under --max-message-bytes, over the
    960 KiB share) is refused at once, before a byte of it is read."""
    s = body_server
    before = limit_count(s, "inflight_bytes_per_connection")
    sock = stalled(s, "Content-Length: 1000000\r\n")
    status, reply = answer(sock)
    assert status == 429 and b"--max-inflight-bytes-per-connection" in reply, reply
    # And a chunked body that grows past the share as it arrives.
    sock = stalled(s, "Transfer-Encoding: chunked\r\n")
    chunk = b"%x\r\n%s\r\n" % (100_000, b" " * 100_000)
    try:
        for _ in range(10):
            sock.sendall(chunk)
    except OSError:
        pass  # the server answered and closed before the rest was sent
    status, reply = answer(sock)
    assert status == 429 and b"--max-inflight-bytes-per-connection" in reply, reply
    assert limit_count(s, "inflight_bytes_per_connection") >= before + 2
