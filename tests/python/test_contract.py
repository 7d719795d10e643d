"""The wire contract and the binary's linkage, checked against fixed expectations:
splitlearn_comm 1.0 clients depend on these exact names and field numbers."""

import os
import re
import subprocess
from pathlib import Path

from conftest import BIN, ROOT

# name -> (number, label) for every message, as splitlearn_comm 1.0 defines them.
CONTRACT = {
    "KVCacheEntry": {"key_data": 1, "key_shape": 2, "value_data": 3, "value_shape": 4},
    "ComputeRequest": {"data": 1, "shape": 2, "request_id": 3, "metadata": 4, "model_id": 5,
                       "forward_id": 6, "training_mode": 7, "past_key_values": 8, "use_cache": 9},
    "MonitoringSnapshot": {"timestamp": 1, "cpu_percent": 2, "memory_mb": 3, "memory_percent": 4,
                           "gpu_available": 5, "gpu_utilization": 6, "gpu_memory_used_mb": 7,
                           "gpu_memory_total_mb": 8},
    "ComputeResponse": {"data": 1, "shape": 2, "request_id": 3, "compute_time_ms": 4,
                        "monitoring_data": 5, "forward_id": 6, "present_key_values": 7},
    "HealthRequest": {},
    "HealthResponse": {"status": 1, "message": 2, "version": 3, "uptime_seconds": 4},
    "ServiceInfoRequest": {},
    "ServiceInfoResponse": {"service_name": 1, "version": 2, "device": 3, "uptime_seconds": 4,
                            "total_requests": 5, "custom_info": 6},
    "BackwardRequest": {"grad_output_data": 1, "grad_output_shape": 2, "forward_id": 3, "model_id": 4,
                        "learning_rate": 5, "accumulation_step": 6},
    "BackwardResponse": {"grad_input_data": 1, "grad_input_shape": 2, "forward_id": 3,
                         "backward_time_ms": 4, "monitoring_data": 5},
    "MonitoringStreamRequest": {"sampling_interval": 1},
    "MonitoringSnapshotResponse": {"snapshot": 1},
}
OPTIONAL = {
    ("ComputeRequest", "request_id"), ("ComputeRequest", "forward_id"), ("ComputeRequest", "training_mode"),
    ("ComputeRequest", "use_cache"), ("MonitoringSnapshot", "gpu_utilization"),
    ("MonitoringSnapshot", "gpu_memory_used_mb"), ("MonitoringSnapshot", "gpu_memory_total_mb"),
    ("ComputeResponse", "request_id"), ("ComputeResponse", "compute_time_ms"),
    ("ComputeResponse", "monitoring_data"), ("ComputeResponse", "forward_id"),
    ("HealthResponse", "uptime_seconds"), ("ServiceInfoResponse", "uptime_seconds"),
    ("BackwardRequest", "model_id"), ("BackwardRequest", "learning_rate"),
    ("BackwardRequest", "accumulation_step"), ("BackwardResponse", "backward_time_ms"),
    ("BackwardResponse", "monitoring_data"), ("MonitoringStreamRequest", "sampling_interval"),
}
RPCS = {
    "Compute": ("ComputeRequest", "ComputeResponse", False),
    "ComputeBackward": ("BackwardRequest", "BackwardResponse", False),
    "HealthCheck": ("HealthRequest", "HealthResponse", False),
    "GetServiceInfo": ("ServiceInfoRequest", "ServiceInfoResponse", False),
    "StreamMonitoring": ("MonitoringStreamRequest", "MonitoringSnapshotResponse", True),
}


def test_messages_fields_and_rpcs_match_splitlearn_comm(pb):
    pb2, _ = pb
    desc = pb2.DESCRIPTOR
    assert desc.package == "splitlearn.comm"
    assert set(desc.message_types_by_name) == set(CONTRACT)
    for name, fields in CONTRACT.items():
        message = desc.message_types_by_name[name]
        assert {f.name: f.number for f in message.fields} == fields, name
        for f in message.fields:
            explicit = f.has_presence and f.containing_oneof is not None
            if (name, f.name) in OPTIONAL:
                assert explicit, f"{name}.{f.name} must be proto3 optional"
    service = desc.services_by_name["ComputeService"]
    assert service.full_name == "splitlearn.comm.ComputeService"
    got = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert got == RPCS


def test_binary_finds_libtorch_alone_and_links_libtorch_cuda():
    import torch  # the venv's torch: where the build found libtorch

    torch_lib = Path(torch.__file__).parent / "lib"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ldd = subprocess.run(["ldd", str(BIN)], capture_output=True, text=True, env=env, check=True).stdout
    assert "not found" not in ldd, ldd
    assert re.search(r"libtorch_cpu\.so => \S*torch/lib/libtorch_cpu\.so", ldd), ldd
    if (torch_lib / "libtorch_cuda.so").exists():
        assert "libtorch_cuda.so" in ldd, "the build must keep libtorch_cuda (the linker's --as-needed drops it)"
    r = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("splitserve "), r.stdout + r.stderr
