# syntax=docker/dockerfile:1.7
#
# splitserve container image.
#
#   docker build -t splitserve:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t splitserve:0.1.0-cuda .
#
# VARIANT=cpu|cuda. Both build against the torch wheel that scripts/setup.sh
# installs (requirements.txt: torch==2.13.0, PyPI's CUDA build). The cuda
# variant links libtorch_cuda (build.rs) and ships all of torch/lib and the
# wheel's nvidia/ libraries; it also sets the NVIDIA container runtime
# variables. The cpu variant builds with SPLITSERVE_LINK_CUDA=0, so the binary
# never loads libtorch_cuda, and ships only the libraries it loads
# (scripts/image/stage-libs.sh): libtorch_cpu, libc10, libgomp, the two
# nvidia/ libraries libtorch_cpu itself needs (libcudart, libcupti), and an
# empty libtorch.so of its own (the wheel's names libtorch_cuda): 445 MB instead
# of 3.88 GB, a 0.56 GB image. TORCH_INDEX_URL may still point at an index that
# serves the CPU-only torch 2.13.0 wheel:
#
#   docker build --build-arg TORCH_INDEX_URL=<cpu wheel index> -t splitserve:0.1.0-cpu .
#
# Behind a TLS-intercepting proxy, give pip and cargo its CA as the build secret
# build_ca (a PEM file; it is added to the system's CAs for the downloads of the
# build and never lands in a layer):
#
#   docker build --secret id=build_ca,src=/path/to/proxy-ca.pem -t splitserve:0.1.0-cpu .
#
# `make image` builds with podman and passes the host's CA bundle as build_ca;
# where no registry is reachable it makes the base images locally first
# (docs/image.md).

ARG VARIANT=cpu
ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm

# ---------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS builder
ARG TORCH_INDEX_URL=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# bookworm's python3 is 3.11: the library paths below (python3.11) depend on it.
# Unpinned: the suite pins the versions, and security updates should land.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates binutils \
 && rm -rf /var/lib/apt/lists/*

# The binary gets an rpath to the absolute path of torch/lib inside this venv, so
# the runtime stage puts the libraries at exactly the same path.
WORKDIR /opt/splitserve
ENV LIBTORCH_USE_PYTORCH=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The venv (torch is a multi-GB download) in its own layer, rebuilt only when the
# requirements, the set-up script or TORCH_INDEX_URL change. Both variants build
# on the same venv: VARIANT is declared only after this step, because every RUN
# after an ARG has it in its environment and so in its cache key. Otherwise a
# cuda build next to a cpu one downloads torch again and stores a second copy
# of the same 5.6 GB venv.
COPY requirements.txt ./
COPY scripts/setup.sh scripts/setup.sh
RUN --mount=type=cache,id=splitserve-pip,target=/root/.cache/pip \
    --mount=type=secret,id=build_ca \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
 && if [ -f /run/secrets/build_ca ]; then \
      cat /etc/ssl/certs/ca-certificates.crt /run/secrets/build_ca >/tmp/build-ca.pem; \
      export PIP_CERT=/tmp/build-ca.pem; \
    fi \
 && SPLITSERVE_CACHE='' bash scripts/setup.sh \
 && rm -f /tmp/build-ca.pem

# torch-sys asks the venv's python where torch is (LIBTORCH_USE_PYTORCH=1).
ENV VIRTUAL_ENV=/opt/splitserve/.venv \
    PATH=/opt/splitserve/.venv/bin:${PATH}

COPY . .
ARG VARIANT
# target/ is a cache mount, so the binary is copied out of it in the same step,
# together with the shared libraries, into /staging: the runtime stage copies
# exactly that. Both variants share it, as they share the wheel the crates were
# compiled against: switching variants reruns build.rs (SPLITSERVE_LINK_CUDA)
# and relinks, instead of a cold build of every crate. torch-sys does not notice
# a different wheel at the same path, so a TORCH_INDEX_URL build gets a target
# of its own.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,id=splitserve-target${TORCH_INDEX_URL:+-torch-index},target=/opt/splitserve/target \
    --mount=type=secret,id=build_ca \
    set -eux; \
    if [ -f /run/secrets/build_ca ]; then \
      cat /etc/ssl/certs/ca-certificates.crt /run/secrets/build_ca >/tmp/build-ca.pem; \
      export CARGO_HTTP_CAINFO=/tmp/build-ca.pem; \
    fi; \
    # The cpu variant's binary leaves libtorch_cuda out (build.rs).
    if [ "${VARIANT}" = cuda ]; then link_cuda=1; else link_cuda=0; fi; \
    SPLITSERVE_LINK_CUDA="${link_cuda}" cargo build --release --locked; \
    rm -f /tmp/build-ca.pem; \
    site=/opt/splitserve/.venv/lib/python3.11/site-packages; \
    torch_lib="${site}/torch/lib"; \
    test -f "${torch_lib}/libtorch_cpu.so"; \
    # The rpath must name this directory, or the runtime image would not find libtorch.
    readelf -d target/release/splitserve >/tmp/dynamic.txt; \
    grep -E 'R(UN)?PATH' /tmp/dynamic.txt | grep -F "${torch_lib}" >/dev/null; \
    if [ "${VARIANT}" = cuda ] && [ ! -f "${torch_lib}/libtorch_cuda.so" ]; then \
      echo "VARIANT=cuda needs a CUDA build of torch (drop TORCH_INDEX_URL)" >&2; exit 1; \
    fi; \
    install -D -m 0755 target/release/splitserve /staging/usr/local/bin/splitserve; \
    # probe and bench without libtorch: the HEALTHCHECK and the Helm test.
    install -D -m 0755 target/release/splitserve-client /staging/usr/local/bin/splitserve-client; \
    mkdir -p "/staging${torch_lib}"; \
    # cuda: all of torch/lib and nvidia/ (found through $ORIGIN/../../nvidia/*/lib),
    # without headers or static archives; cpu: only the libraries the binary loads.
    bash scripts/image/stage-libs.sh target/release/splitserve "${site}" /staging "${VARIANT}"

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_SUITE}-slim AS runtime-base
ARG VARIANT

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ca-certificates: TLS to an OTLP collector. libstdc++ and libgcc come with the
# base image; libgomp ships inside torch/lib.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 splitserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin splitserve

COPY --from=builder /staging/ /

# Fail the build, not the pod, if a shared library is missing.
RUN set -eux; \
    if ldd /usr/local/bin/splitserve | grep 'not found'; then exit 1; fi; \
    splitserve --version

LABEL org.opencontainers.image.title="splitserve" \
      org.opencontainers.image.description="gRPC compute service (splitlearn.comm.ComputeService) on libtorch" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

EXPOSE 50051 8000 9090
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["splitserve-client", "probe", "--addr", "127.0.0.1:50051"]
ENTRYPOINT ["splitserve"]
CMD ["serve"]

FROM runtime-base AS runtime-cpu
ENV SPLITSERVE_DEVICE=cpu

FROM runtime-base AS runtime-cuda
# Read by the NVIDIA container runtime; Kubernetes' device plugin narrows
# NVIDIA_VISIBLE_DEVICES to the GPUs it allocates. SPLITSERVE_DEVICE=cuda: a
# pod that cannot start CUDA (no NVIDIA runtime, a driver older than CUDA 13
# needs) exits at start saying why, rather than serving on its CPU.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SPLITSERVE_DEVICE=cuda

# The image that `docker build` produces: runtime-cpu or runtime-cuda (a stage
# of this file, not an image to pin).
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
