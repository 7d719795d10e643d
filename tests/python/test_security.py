"""Safe to expose: TLS and mTLS with certificate rotation, bearer tokens with
scopes, training only where it was opted into, and bounded, well-formed answers
to hostile requests. Real grpcio clients and Python's ssl against the real
binary; certificates are made here with `cryptography`."""

import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import secrets
import ssl
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CLIENT, fixture_path, probe, wait_until

SERVICE = "splitlearn.comm.ComputeService"
RELOAD = ("--credentials-reload-interval", "200ms")
TIMEOUT = 30  # seconds, for every RPC


# --- certificates -------------------------------------------------------------


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Issued:
    """A certificate and its private key, as PEM."""

    def __init__(self, cert: x509.Certificate, key):
        self.cert = cert
        self.key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = _pem_key(key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool, serial: int | None = None,
              not_before=None, not_after=None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before or _now() - datetime.timedelta(days=1))
            .not_valid_after(not_after or _now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return Issued(builder.sign(self.key, hashes.SHA256()), key)


SERIAL_A, SERIAL_B = 0x5EC0A, 0x5EC0B


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate (A) and its successor (B), a valid and an
    expired client certificate, and a client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = Authority("splitserve test CA"), Authority("some other CA")
    (d / "ca.pem").write_bytes(ca.pem)
    pki = types.SimpleNamespace()
    pki.dir, pki.ca, pki.ca_path = d, ca, d / "ca.pem"
    pki.server_a = ca.issue("splitserve A", server=True, serial=SERIAL_A)
    pki.server_b = ca.issue("splitserve B", server=True, serial=SERIAL_B)
    pki.cert, pki.key = pki.server_a.write(d, "server")
    pki.client = ca.issue("good client", server=False)
    pki.foreign_client = other.issue("foreign client", server=False)
    pki.foreign_ca_pem = other.pem
    pki.expired_client = ca.issue(
        "expired client", server=False,
        not_before=_now() - datetime.timedelta(days=10),
        not_after=_now() - datetime.timedelta(days=1),
    )
    return pki


def tls(pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


def peer_certificate(port: int, ca_path: Path) -> x509.Certificate:
    """The certificate a NEW TLS connection to the port is shown (ALPN h2)."""
    ctx = ssl.create_default_context(cafile=str(ca_path))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.selected_alpn_protocol() == "h2"
            der = conn.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


# --- helpers ------------------------------------------------------------------


def tensor(a) -> dict:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return dict(data=a.tobytes(), shape=list(a.shape))


def decode(data: bytes, shape) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(tuple(shape))


def outcome(call):
    """(status code, details) of a call; StatusCode.OK and its reply when it succeeds."""
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as e:
        return e.code(), e.details()


def poll(call, want, timeout=15.0):
    """Repeats call() until its outcome's code is `want`, up to a deadline; returns
    the last outcome, whatever it was."""
    deadline = time.monotonic() + timeout
    while True:
        got = outcome(call)
        if got[0] == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def bearer(token: str):
    return [("authorization", "Bearer " + token)]


def http_get(url: str, context=None) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5, context=context) as r:
        return r.status, r.read().decode()


def metric_sum(text: str, name: str, **labels) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def health_status(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
    ).status


# --- TLS ----------------------------------------------------------------------


def test_tls_port_answers_tls_clients_only(pb, server_factory, pki):
    pb2, pb2_grpc = pb
    s = server_factory("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), credentials=tls(pki))
    s.wait_serving()

    # The default model (builtin:mlp:512x1024x512) over TLS, trusting only our CA.
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    x = np.random.default_rng(0).standard_normal((1, 512))
    reply = stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT)
    assert list(reply.shape) == [1, 512]
    assert np.isfinite(decode(reply.data, reply.shape)).all()
    assert stub.HealthCheck(pb2.HealthRequest(), timeout=TIMEOUT).status == "ok"
    # What a TLS client is shown: our server certificate, negotiated as h2.
    assert peer_certificate(s.port, pki.ca_path).serial_number == SERIAL_A

    # Plaintext gRPC to the TLS port gets nothing.
    plain = pb2_grpc.ComputeServiceStub(grpc.insecure_channel(s.addr))
    code, _ = outcome(lambda: plain.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNAVAILABLE

    # Without --admin-tls-cert the admin port stays plaintext HTTP (kubelet, Prometheus).
    assert http_get(f"{s.metrics_url}/livez")[0] == 200
    # And the TLS server keeps answering TLS clients.
    assert list(stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT).shape) == [1, 512]


def test_a_tls_handshake_not_done_in_time_is_closed_and_counted(pb, server_factory, pki):
    """--tls-handshake-timeout (the alias of --handshake-timeout): a client that
    opens the TLS port and never finishes its handshake, silent or after half a
    ClientHello, is closed once the timeout passes and counted in
    splitserve_tls_handshake_failures_total{port="grpc"} and
    limit="handshake"; TLS clients are served meanwhile."""
    pb2, pb2_grpc = pb
    s = server_factory("--model", "m=builtin:scale:2", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                       "--tls-handshake-timeout", "1s", credentials=tls(pki))
    s.wait_serving()
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    x = np.arange(4, dtype=np.float32)
    assert stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT).data == (2 * x).tobytes()

    def counts():
        text = s.metrics()
        return (metric_sum(text, "splitserve_tls_handshake_failures_total", port="grpc"),
                metric_sum(text, "splitserve_limit_rejections_total", limit="handshake"))

    def steady():
        first = counts()
        return first if counts() == first else None

    # wait_serving's own port probe (a connect and close) is counted too: settle first.
    before = wait_until(steady, 10, "steady counts")
    silent = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    half = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    # A TLS handshake record that announces 512 bytes, and the first 5 of them.
    half.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]))
    assert stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT).data == (2 * x).tobytes()
    for sock in (silent, half):
        try:
            got = sock.recv(1)
        except ConnectionResetError:
            got = b""
        except TimeoutError:
            got = None
        sock.close()
        assert got == b"", "an unfinished TLS handshake was kept open"
    wait_until(lambda: counts() == (before[0] + 2, before[1] + 2), 10,
               f"both closed handshakes counted (before: {before}, now: {counts()})")
    assert stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT).data == (2 * x).tobytes()


def test_admin_port_speaks_tls_when_given_a_certificate(pb, server_factory, pki):
    s = server_factory(
        "--model", "m=builtin:scale:2",
        "--admin-tls-cert", str(pki.cert), "--admin-tls-key", str(pki.key),
    )
    s.wait_serving()
    https = s.metrics_url.replace("http://", "https://")
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    status, body = http_get(f"{https}/metrics", context=ctx)
    assert status == 200 and "splitserve_" in body
    assert http_get(f"{https}/readyz", context=ctx)[0] == 200
    try:
        plain = http_get(f"{s.metrics_url}/metrics")
    except (OSError, urllib.error.URLError, http.client.HTTPException):
        plain = None
    assert plain is None or plain[0] != 200, "the admin port still answers plaintext HTTP"


# --- mTLS ---------------------------------------------------------------------


def test_mtls_refuses_clients_without_a_valid_certificate(pb, server_factory, pki, tmp_path):
    pb2, pb2_grpc = pb
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(pki.ca.pem)
    s = server_factory(
        "--model", "m=builtin:scale:2",
        "--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-client-ca", str(client_ca), *RELOAD,
        credentials=tls(pki, pki.client),
    )
    s.wait_serving()
    x = np.arange(6).reshape(2, 3)

    def compute(credentials):
        stub = pb2_grpc.ComputeServiceStub(s.channel(credentials=credentials))
        return outcome(lambda: stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT))

    began = time.monotonic()
    for who, creds in (
        ("no client certificate", tls(pki)),
        ("a certificate from another CA", tls(pki, pki.foreign_client)),
        ("an expired certificate", tls(pki, pki.expired_client)),
    ):
        code, details = compute(creds)
        assert code == grpc.StatusCode.UNAVAILABLE, f"{who}: {code} {details}"

    # The operator learns why from the log, once per 10 s however many clients fail.
    first = s.wait_log("TLS handshake failed:")
    assert "no certificates" in first and "X.509 v3" in first, first
    failures = metric_sum(s.metrics(), "splitserve_tls_handshake_failures_total")
    warned = s.log_so_far().count("TLS handshake failed:")
    # Three clients failed (grpcio may retry each): one warning per 10 s, not one each.
    allowed = 1 + int((time.monotonic() - began) / 10)
    assert failures >= 3 and 1 <= warned <= allowed, f"{warned} warnings for {failures} failed handshakes"

    code, reply = compute(tls(pki, pki.client))
    assert code == grpc.StatusCode.OK, reply
    assert np.array_equal(decode(reply.data, reply.shape), x * 2)

    # The exec probe / HEALTHCHECK: plaintext says what to pass; with the CA and a
    # client certificate (and the name the certificate carries) it answers SERVING.
    client_crt, client_key = pki.client.write(pki.dir, "probe-client")
    r = probe(CLIENT, s.addr)
    assert r.returncode == 1 and "--tls-ca" in r.stderr, r.stderr
    r = probe(CLIENT, f"localhost:{s.port}", "--tls-ca", str(pki.ca_path))
    assert r.returncode == 1, r  # mTLS: no client certificate
    r = probe(CLIENT, s.addr, "--tls-ca", str(pki.ca_path), "--tls-server-name", "localhost",
              "--tls-cert", str(client_crt), "--tls-key", str(client_key))
    assert r.returncode == 0 and r.stdout.strip().endswith("SERVING"), r

    # The client CA is reloaded like the certificate: swapped for the other CA, its
    # clients get in and the first CA's are refused, on new connections.
    write_atomically(client_ca, pki.foreign_ca_pem.decode())
    code, reply = poll(lambda: pb2_grpc.ComputeServiceStub(s.channel(credentials=tls(pki, pki.foreign_client)))
                       .Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT), grpc.StatusCode.OK)
    assert code == grpc.StatusCode.OK, f"a client of the new CA after the reload: {code} {reply}"
    code, details = compute(tls(pki, pki.client))
    assert code == grpc.StatusCode.UNAVAILABLE, f"a client of the replaced CA: {code} {details}"
    assert s.metric("splitserve_credential_reloads_total", kind="tls") == 1


# --- rotation -----------------------------------------------------------------


def test_rotated_certificate_reaches_new_connections_and_spares_open_ones(pb, server_factory, pki, tmp_path):
    pb2, pb2_grpc = pb
    cert, key = pki.server_a.write(tmp_path, "server")
    s = server_factory(
        "--model", "m=builtin:scale:2", "--tls-cert", str(cert), "--tls-key", str(key), *RELOAD,
        credentials=tls(pki),
    )
    s.wait_serving()
    pid = s.proc.pid
    x = np.arange(4).reshape(1, 4)

    # A channel connected before the rotation, watched for any reconnect.
    channel = s.channel()
    stub = pb2_grpc.ComputeServiceStub(channel)
    reply = stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT)
    assert np.array_equal(decode(reply.data, reply.shape), x * 2)
    states, lock = [], threading.Lock()

    def watch(state):
        with lock:
            states.append(state)

    channel.subscribe(watch, try_to_connect=False)
    uptime_before = stub.HealthCheck(pb2.HealthRequest(), timeout=TIMEOUT).uptime_seconds
    assert peer_certificate(s.port, pki.ca_path).serial_number == SERIAL_A

    # Half a rotation (B's certificate with A's key) does not load: A stays in service.
    write_atomically(cert, pki.server_b.cert_pem.decode())
    s.wait_log("TLS files changed but do not load; keeping the previous certificate")
    assert peer_certificate(s.port, pki.ca_path).serial_number == SERIAL_A

    # Rotate: certificate B (same CA) replaces A in the same files.
    for path, pem in ((key, pki.server_b.key_pem), (cert, pki.server_b.cert_pem)):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(pem)
        os.replace(tmp, path)

    deadline = time.monotonic() + 15
    serial = None
    while time.monotonic() < deadline:
        serial = peer_certificate(s.port, pki.ca_path).serial_number
        if serial == SERIAL_B:
            break
        time.sleep(0.05)
    assert serial == SERIAL_B, f"new connections still see serial {serial:#x}, not B's {SERIAL_B:#x}"

    # The connection opened before the rotation still answers, on that connection.
    for _ in range(3):
        reply = stub.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT)
        assert np.array_equal(decode(reply.data, reply.shape), x * 2)
    with lock:
        seen = list(states)
    assert seen and all(st == grpc.ChannelConnectivity.READY for st in seen), (
        f"the open connection was dropped during the rotation: {seen}"
    )
    channel.unsubscribe(watch)

    # A fresh grpc channel also works (and verifies B against the CA).
    fresh = pb2_grpc.ComputeServiceStub(s.channel(credentials=tls(pki)))
    assert list(fresh.Compute(pb2.ComputeRequest(**tensor(x)), timeout=TIMEOUT).shape) == [1, 4]

    # The same process all along: never restarted.
    assert s.proc.poll() is None and s.proc.pid == pid
    assert stub.HealthCheck(pb2.HealthRequest(), timeout=TIMEOUT).uptime_seconds >= uptime_before


# --- tokens -------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_tokens_authenticate_and_scopes_authorize(pb, server_factory, tmp_path):
    pb2, pb2_grpc = pb
    # Tokens as a user would make them (secrets.token_hex): long and random.
    infer_tok, train_tok, none_tok, new_tok, unknown_tok, train_only_tok, repo_tok = (
        f"{name}-{secrets.token_hex(16)}"
        for name in ("infer", "train", "none", "new", "unknown", "trainonly", "repo"))
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "# token scopes\n"
        "\n"
        f"{infer_tok} infer\n"
        f"{train_tok} infer,train\n"
        f"{none_tok}\n"
        f"{train_only_tok} train\n"
        f"{repo_tok} repository\n"
    )
    s = server_factory("--model", "m=builtin:mlp:4x8x4", "--auth-token-file", str(tokens), *RELOAD)
    s.wait_serving()  # grpc.health.v1 needs no token
    channel = s.channel()
    stub = pb2_grpc.ComputeServiceStub(channel)
    x = tensor(np.ones((2, 4)))

    def infer(metadata=None):
        return outcome(lambda: stub.Compute(pb2.ComputeRequest(**x), metadata=metadata, timeout=TIMEOUT))

    def train_forward(metadata=None):
        return outcome(lambda: stub.Compute(
            pb2.ComputeRequest(**x, training_mode=True), metadata=metadata, timeout=TIMEOUT))

    code, details = infer()
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"no token: {code} {details}"
    assert "requires a token" in details, details
    code, details = infer(bearer(unknown_tok))
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"unknown token: {code} {details}"
    assert "not valid" in details and unknown_tok not in details, details
    code, details = outcome(lambda: stub.HealthCheck(pb2.HealthRequest(), timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"HealthCheck without a token: {code} {details}"
    # Each refusal is counted for the alert on failed authentication.
    assert s.metric("splitserve_auth_failures_total", reason="unauthenticated") == 3

    # infer: inference, HealthCheck and GetServiceInfo; not training.
    code, reply = infer(bearer(infer_tok))
    assert code == grpc.StatusCode.OK, reply
    assert list(reply.shape) == [2, 4]
    assert stub.HealthCheck(pb2.HealthRequest(), metadata=bearer(infer_tok), timeout=TIMEOUT).status == "ok"
    assert stub.GetServiceInfo(pb2.ServiceInfoRequest(), metadata=bearer(infer_tok), timeout=TIMEOUT).service_name
    code, details = train_forward(bearer(infer_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"training with an infer token: {code} {details}"

    # train: a training forward and its (gradient-only) backward.
    code, fwd = train_forward(bearer(train_tok))
    assert code == grpc.StatusCode.OK, fwd
    assert fwd.forward_id and list(fwd.shape) == [2, 4]
    back = stub.ComputeBackward(
        pb2.BackwardRequest(grad_output_data=tensor(np.ones((2, 4)))["data"], grad_output_shape=[2, 4],
                            forward_id=fwd.forward_id),
        metadata=bearer(train_tok), timeout=TIMEOUT,
    )
    assert list(back.grad_input_shape) == [2, 4]

    # The backward asks for train itself: an infer token is refused it, a train-only token gets it.
    def backward(forward_id, metadata):
        return outcome(lambda: stub.ComputeBackward(
            pb2.BackwardRequest(grad_output_data=tensor(np.ones((2, 4)))["data"], grad_output_shape=[2, 4],
                                forward_id=forward_id), metadata=metadata, timeout=TIMEOUT))

    code, fwd = train_forward(bearer(train_tok))
    assert code == grpc.StatusCode.OK, fwd
    code, details = backward(fwd.forward_id, bearer(infer_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "train" in details, f"backward, infer token: {code} {details}"
    code, details = train_forward(bearer(train_only_tok))
    assert code == grpc.StatusCode.OK, f"training forward, train-only token: {code} {details}"
    code, back = backward(details.forward_id, bearer(train_only_tok))
    assert code == grpc.StatusCode.OK and list(back.grad_input_shape) == [2, 4], f"backward, train-only: {code} {back}"
    code, details = infer(bearer(train_only_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"inference, train-only token: {code} {details}"

    # Listed without a scope: known, but allowed nothing.
    code, details = infer(bearer(none_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"no-scope token: {code} {details}"
    # The repository scope grants the repository calls and nothing else.
    code, details = train_forward(bearer(repo_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"training, repository token: {code} {details}"
    code, details = infer(bearer(repo_tok))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"inference, repository token: {code} {details}"
    # The scheme's name is case-insensitive (RFC 6750): "bearer" is accepted as "Bearer".
    code, reply = infer([("authorization", "bearer " + infer_tok)])
    assert code == grpc.StatusCode.OK, f"lower-case scheme: {code} {reply}"

    # Reflection (what grpcurl asks first) describes every service: the infer scope's.
    def reflect(metadata=None, version="v1"):
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        list_services = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}
        return outcome(lambda: next(iter(call(iter([list_services]), metadata=metadata, timeout=TIMEOUT))))

    for version in ("v1", "v1alpha"):
        code, details = reflect(bearer(none_tok), version)
        assert code == grpc.StatusCode.PERMISSION_DENIED, f"reflection, no-scope token: {code} {details}"
        assert "infer" in details
        assert reflect(None, version)[0] == grpc.StatusCode.UNAUTHENTICATED
        code, reply = reflect(bearer(infer_tok), version)
        assert code == grpc.StatusCode.OK and b"splitlearn.comm.ComputeService" in reply, (code, reply)

    # grpc.health.v1 needs no token.
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING

    # A file that stops parsing (a short token) keeps the tokens in force, with a warning,
    # and no reload counted.
    reloads = s.metric("splitserve_credential_reloads_total", kind="tokens") or 0
    write_atomically(tokens, f"{new_tok} infer\nshort infer\n")
    s.wait_log("does not parse; keeping the previous tokens")
    assert infer(bearer(infer_tok))[0] == grpc.StatusCode.OK, "a broken token file cleared the tokens"
    assert infer(bearer(new_tok))[0] == grpc.StatusCode.UNAUTHENTICATED, "a broken token file was half applied"
    assert (s.metric("splitserve_credential_reloads_total", kind="tokens") or 0) == reloads

    # The file is re-read: a new token works, a removed one no longer does.
    write_atomically(tokens, f"{new_tok} infer\n{train_tok} infer,train\n")
    code, reply = poll(lambda: stub.Compute(pb2.ComputeRequest(**x), metadata=bearer(new_tok), timeout=TIMEOUT),
                       grpc.StatusCode.OK)
    assert code == grpc.StatusCode.OK, f"the added token: {code} {reply}"
    code, details = poll(lambda: stub.Compute(pb2.ComputeRequest(**x), metadata=bearer(infer_tok),
                                              timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"the removed token: {code} {details}"
    assert infer(bearer(train_tok))[0] == grpc.StatusCode.OK
    assert s.proc.poll() is None


def test_a_hash_inside_a_token_or_a_huge_warm_up_stops_the_start_with_exit_64(server_factory, tmp_path):
    # Cut at '#', this token would silently be "ops-token-0123456789": refused instead.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# ops\nops-token-0123456789#{secrets.token_hex(16)} infer  # dashboard\n")
    s = server_factory("--model", "m=builtin:scale:2", "--auth-token-file", str(tokens))
    assert s.proc.wait(timeout=30) == 64
    out = s.output()
    assert "line 2: '#' inside a token" in out and "ops-token" not in out, out
    # A warm-up input of 10^12 elements: one sentence, before anything is allocated.
    s = server_factory("--model", "m=builtin:scale:2", "--warmup-shape", "m=1000000x1000000")
    assert s.proc.wait(timeout=30) == 64
    out = s.output()
    assert "1000000000000 elements" in out and "at most 268435456" in out, out
    assert "frame #" not in out, out


# --- training opt-in ----------------------------------------------------------


def start_mlp(pb, server_factory, *flags):
    s = server_factory("--model", "m=builtin:mlp:4x8x4", *flags)
    s.wait_serving()
    return s, pb[1].ComputeServiceStub(s.channel())


PROBE = np.linspace(-1.0, 1.0, 12).reshape(3, 4)


def inference(stub, pb2) -> bytes:
    reply = stub.Compute(pb2.ComputeRequest(**tensor(PROBE)), timeout=TIMEOUT)
    assert list(reply.shape) == [3, 4]
    return reply.data


def train_forward(stub, pb2, x) -> str:
    reply = stub.Compute(pb2.ComputeRequest(**tensor(x), training_mode=True), timeout=TIMEOUT)
    assert reply.forward_id
    return reply.forward_id


def backward_request(pb2, grad, forward_id, **kw):
    g = tensor(grad)
    return pb2.BackwardRequest(grad_output_data=g["data"], grad_output_shape=g["shape"],
                               forward_id=forward_id, **kw)


def test_parameters_change_only_on_models_opted_in_with_trainable(pb, server_factory):
    pb2, _ = pb
    _, stub = start_mlp(pb, server_factory)
    before = inference(stub, pb2)
    x = np.ones((2, 4))

    # The attack: a training forward, then a huge step on a model never made trainable.
    fid = train_forward(stub, pb2, x)
    code, details = outcome(lambda: stub.ComputeBackward(
        backward_request(pb2, np.full((2, 4), 1e30), fid, learning_rate=3.4e38), timeout=TIMEOUT))
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"{code} {details}"
    assert "--trainable" in details, details

    # Gradient-only backward (split inference needs dLoss/dInput) still works.
    fid = train_forward(stub, pb2, x)
    back = stub.ComputeBackward(backward_request(pb2, np.ones((2, 4)), fid), timeout=TIMEOUT)
    assert list(back.grad_input_shape) == [2, 4]
    assert np.isfinite(decode(back.grad_input_data, back.grad_input_shape)).all()

    assert inference(stub, pb2) == before, "the weights changed"


def test_trainable_model_rejects_steps_that_would_break_it(pb, server_factory):
    pb2, _ = pb
    s, stub = start_mlp(pb, server_factory, "--trainable", "m", "--max-learning-rate", "10",
                        "--max-accumulation-steps", "4")
    # No --learning-rate: unchanged clients' backwards would never step; the start says so.
    assert "--learning-rate m=F" in s.wait_log("is trainable but has no --learning-rate")
    before = inference(stub, pb2)
    x = np.ones((2, 4))

    def step(grad, **kw):
        fid = train_forward(stub, pb2, x)
        return outcome(lambda: stub.ComputeBackward(backward_request(pb2, grad, fid, **kw), timeout=TIMEOUT))

    nan_grad = np.ones((2, 4))
    nan_grad[1, 2] = np.nan
    code, details = step(nan_grad, learning_rate=0.01)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"NaN gradient: {code} {details}"
    inf_grad = np.ones((2, 4))
    inf_grad[0, 0] = np.inf
    code, details = step(inf_grad, learning_rate=0.01)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"Inf gradient: {code} {details}"

    code, details = step(np.ones((2, 4)), learning_rate=11.0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"learning_rate above --max-learning-rate: {code} {details}"

    # Finite grad_output, allowed learning rate, overflowing gradient: the last
    # layer's bias gradient alone is 2 rows x 3e38, past float32's range.
    code, details = step(np.full((2, 4), 3e38), learning_rate=9.0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"overflowing step: {code} {details}"
    assert "refused" in details, details
    metrics = http_get(f"{s.metrics_url}/metrics")[1]
    rejected = metric_sum(metrics, "splitserve_training_events_total", event="step_rejected")
    assert rejected >= 1, [ln for ln in metrics.splitlines() if "training_events" in ln]

    after = inference(stub, pb2)
    assert np.isfinite(decode(after, [3, 4])).all()
    assert after == before, "a rejected step changed the weights"

    # A gradient that stays finite (2 x 1e38) but would overflow the update is
    # clipped to --max-grad-norm: the step is taken, and the model stays finite.
    code, details = step(np.full((2, 4), 1e38), learning_rate=9.0)
    assert code == grpc.StatusCode.OK, f"clipped step: {code} {details}"
    metrics = http_get(f"{s.metrics_url}/metrics")[1]
    assert metric_sum(metrics, "splitserve_training_events_total", event="grad_clipped") == 1
    before = inference(stub, pb2)
    assert np.isfinite(decode(before, [3, 4])).all()

    # An ordinary step on the opted-in model still trains it.
    code, reply = step(np.ones((2, 4)), learning_rate=0.01)
    assert code == grpc.StatusCode.OK, reply
    trained = inference(stub, pb2)
    assert trained != before and np.isfinite(decode(trained, [3, 4])).all()

    # --max-accumulation-steps 4: an accumulation of 5 is refused and counted, of 4 accepted.
    code, details = step(np.ones((2, 4)), learning_rate=0.01, accumulation_step=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-accumulation-steps 4" in details, (code, details)
    metrics = http_get(f"{s.metrics_url}/metrics")[1]
    assert metric_sum(metrics, "splitserve_limit_rejections_total", limit="accumulation_steps") == 1
    # Accumulating up to the limit is allowed; the step waits for its 4 backwards, so
    # this one leaves the weights as they are.
    code, details = step(np.ones((2, 4)), learning_rate=0.01, accumulation_step=4)
    assert code == grpc.StatusCode.OK, (code, details)


# --- limits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_server(pb):
    from conftest import Server

    s = Server("--model", f"top={fixture_path('top.pt')}", "--trainable", "top")
    s.wait_serving()
    yield s
    assert s.terminate() == 0


def test_oversized_client_strings_get_short_clear_statuses(pb, limits_server):
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(limits_server.channel())
    x = np.ones((2, 8))

    code, details = outcome(lambda: stub.Compute(
        pb2.ComputeRequest(**tensor(x), training_mode=True, forward_id="f" * 129), timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"129-byte forward_id: {code} {details}"
    code, details = outcome(lambda: stub.ComputeBackward(
        backward_request(pb2, np.ones((2, 4)), "b" * 129), timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"129-byte forward_id in a backward: {code} {details}"
    # 128 bytes is still fine.
    fid = "g" * 128
    reply = stub.Compute(pb2.ComputeRequest(**tensor(x), training_mode=True, forward_id=fid), timeout=TIMEOUT)
    assert reply.forward_id == fid

    code, details = outcome(lambda: stub.ComputeBackward(
        backward_request(pb2, np.ones((2, 4)), fid, learning_rate=0.01, accumulation_step=1025),
        timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"accumulation_step 1025 > 1024: {code} {details}"

    code, details = outcome(lambda: stub.Compute(
        pb2.ComputeRequest(**tensor(x), model_id="q" * 100_000), timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND, f"{code} {details[:300]}"
    assert len(details.encode()) < 1024, len(details)
    assert "q" * 129 not in details, "the client's model_id is not cut to 128 characters"


def test_a_5000_dimension_shape_gets_a_short_invalid_argument(pb, limits_server):
    pb2, pb2_grpc = pb
    # grpc-python's default channel options: a huge status message would not even arrive.
    stub = pb2_grpc.ComputeServiceStub(grpc.insecure_channel(limits_server.addr))
    code, details = outcome(lambda: stub.Compute(
        pb2.ComputeRequest(data=np.ones(1, np.float32).tobytes(), shape=[1] * 5000), timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code} {details[:300]}"
    assert len(details.encode()) < 1024, len(details)


def test_garbage_and_truncated_bodies_are_invalid_argument_and_the_server_keeps_serving(pb, limits_server):
    pb2, pb2_grpc = pb
    channel = limits_server.channel()
    raw = channel.unary_unary(f"/{SERVICE}/Compute", request_serializer=None, response_deserializer=None)
    rng = random.Random(7)
    while True:
        garbage = bytes(rng.getrandbits(8) for _ in range(256))
        try:
            pb2.ComputeRequest.FromString(garbage)
        except DecodeError:
            break  # bytes that are not a ComputeRequest, as protobuf itself says
    valid = pb2.ComputeRequest(**tensor(np.ones((2, 8)))).SerializeToString()
    truncated = valid[: len(valid) // 2]
    with pytest.raises(DecodeError):
        pb2.ComputeRequest.FromString(truncated)

    for what, body in (("garbage", garbage), ("truncated", truncated)):
        code, details = outcome(lambda: raw(body, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{what} body: {code} {details}"

    reply = raw(valid, timeout=TIMEOUT)
    assert list(pb2.ComputeResponse.FromString(reply).shape) == [2, 4]
    assert limits_server.proc.poll() is None


def test_model_sources_show_a_digest_not_a_path(pb, limits_server):
    pb2, pb2_grpc = pb
    path = fixture_path("top.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stub = pb2_grpc.ComputeServiceStub(limits_server.channel())
    info = dict(stub.GetServiceInfo(pb2.ServiceInfoRequest(), timeout=TIMEOUT).custom_info)
    leaks = {k: v for k, v in info.items() if str(path.parent) in v}
    assert not leaks, f"custom_info shows the model's path: {leaks}"
    source = info.get("model.top.source", "")
    m = re.search(r"sha256:([0-9a-f]+)", source)
    assert m and digest.startswith(m.group(1)), f"model.top.source = {source!r}, file sha256 {digest}"

    status, plan = http_get(f"{limits_server.metrics_url}/debug/plan")
    assert status == 200
    assert str(path.parent) not in plan, "/debug/plan shows the model's path"
    assert f"sha256:{m.group(1)}" in plan


# --- connections --------------------------------------------------------------


@pytest.fixture(scope="module")
def conn_server(pb):
    """Short connection timers, a model that computes for 2.5 s and one that
    doubles (a large reply for a large request)."""
    from conftest import Server

    s = Server("--model", "slow=builtin:delay:2500", "--model", "double=builtin:scale:2",
               "--idle-connection-timeout", "1s", "--http-header-read-timeout", "500ms",
               "--write-stall-timeout", "1s")
    s.wait_serving()
    s.wait_http_listening()
    yield s
    assert s.terminate() == 0


def http_infer(conn: http.client.HTTPConnection, model: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]})
    conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    reply = r.read()
    assert r.status == 200, (r.status, reply[:300])
    out = json.loads(reply)["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_http_requests_keep_their_connection_busy_past_the_idle_timeout(conn_server):
    """A 2.5 s request on a connection with a 1 s idle limit is answered, and
    the connection serves the next one: a request in flight is not idle."""
    conn = http.client.HTTPConnection(conn_server.http_addr, timeout=TIMEOUT)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for _ in range(2):
        np.testing.assert_array_equal(http_infer(conn, "slow", x), x)
    conn.close()
    # Idle for longer than the limit, the connection is closed by the server.
    idle = socket.create_connection(("127.0.0.1", conn_server.http_port), timeout=TIMEOUT)
    idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200")
    assert idle.recv(4096) == b"", "an idle keep-alive connection stayed open"
    idle.close()


def test_slow_http_request_heads_are_cut_by_the_header_read_timeout(conn_server):
    """A client that sends its request head one line at a time, each line
    in time for any idle timer, is closed after --http-header-read-timeout."""
    before = metric_sum(conn_server.metrics(), "splitserve_limit_rejections_total",
                        limit="header_read_timeout")
    s = socket.create_connection(("127.0.0.1", conn_server.http_port), timeout=TIMEOUT)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    for i in range(40):  # up to 12 s of header lines
        time.sleep(0.3)
        try:
            s.sendall(f"x-slow-{i}: {i}\r\n".encode())
        except OSError:
            closed = True
            break
        s.setblocking(False)
        try:
            if s.recv(4096) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        finally:
            s.setblocking(True)
    held = time.monotonic() - started
    s.close()
    assert closed, f"a slow request head held its connection for {held:.1f} s"
    assert held < 10, held
    wait_until(lambda: metric_sum(conn_server.metrics(), "splitserve_limit_rejections_total",
                                  limit="header_read_timeout") > before,
               15, "limit_rejections_total{limit=header_read_timeout} to count it")


def test_a_client_that_does_not_read_its_reply_is_closed(conn_server):
    """A 32 MiB reply to a client that reads none of it: the write stalls, the
    connection is closed after --write-stall-timeout and counted."""
    before = metric_sum(conn_server.metrics(), "splitserve_limit_rejections_total", limit="write_stall")
    x = np.ones((8, 1024 * 1024), np.float32)
    head = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    s = socket.create_connection(("127.0.0.1", conn_server.http_port), timeout=TIMEOUT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/octet-stream\r\n"
              + f"Inference-Header-Content-Length: {len(head)}\r\n"
                f"Content-Length: {len(head) + x.nbytes}\r\n\r\n".encode()
              + head + x.tobytes())
    # Read nothing: the server's writes stall once the socket buffers are full.
    wait_until(lambda: metric_sum(conn_server.metrics(), "splitserve_limit_rejections_total",
                                  limit="write_stall") > before,
               20, "limit_rejections_total{limit=write_stall} to count the stalled reply")
    # The connection is gone: what is left to read ends (or is reset) soon.
    s.settimeout(10)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    s.close()
    assert conn_server.proc.poll() is None
    assert http_get(f"{conn_server.http_url}/v2/health/live")[0] == 200
