"""The trainer's process group carries CPU-tensor collectives on CUDA too (issue 13 item 1).

A CPU box has no NCCL, so the CUDA layout is built with gloo standing in for NCCL on the cuda side:
the failure mode (a group without a cpu backend) and the fix (cpu:gloo beside the cuda backend) are
the same dispatch in c10d (ProcessGroup::getBackend(device_type)).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from agentevolver.utils.dist import free_port, process_group_backend


def _group(backend: str) -> None:
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=30))
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))


def _cpu_collectives() -> None:
    """What het_actor and the checkpoint path issue on CPU tensors: all_reduce sum / max, barrier,
    and the object collectives DCP uses."""
    n = torch.tensor([3])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    sums = torch.zeros(7, dtype=torch.float64) + 1.5
    dist.all_reduce(sums)
    assert n.item() == 3 and sums.sum().item() == 10.5
    dist.barrier()
    objs = [None]
    dist.all_gather_object(objs, {"rank": 0})
    assert objs == [{"rank": 0}]


def test_backend_strings() -> None:
    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"


def test_cuda_only_group_cannot_reduce_cpu_tensors() -> None:
    """The defect: a group with only a cuda backend (what "nccl" is) rejects a CPU tensor."""
    _group("cuda:gloo")
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.tensor([1]))
    finally:
        dist.destroy_process_group()


def test_project_cuda_layout_reduces_cpu_tensors() -> None:
    """The fix: the project's CUDA layout (gloo substituted for nccl) serves CPU-tensor collectives."""
    backend = process_group_backend("cuda", gpu_backend="gloo")
    assert backend == "cpu:gloo,cuda:gloo"
    _group(backend)
    try:
        _cpu_collectives()
    finally:
        dist.destroy_process_group()
