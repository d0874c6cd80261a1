"""Process-group, device, seeding and RNG-state helpers shared by the workers and the tests."""
from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that is free right now on this host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This host's address as other nodes see it (falls back to loopback on an offline box)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


DEVICES = ("auto", "cuda", "cpu")  # trainer.device
# actor_rollout_ref.actor.fsdp_config.dtype (besides auto). No fp16: FSDP2 here has no loss scaler.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. 'cuda' without a GPU is a user error."""
    if device not in DEVICES:
        raise ValueError(f"trainer.device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def process_group_backend(device: str, gpu_backend: str = "nccl") -> str:
    """The backend string of the trainer's process group.

    CPU: "gloo". CUDA: "cpu:gloo,cuda:nccl" (as verl does): CPU tensors -- the actor's row / token counts,
    n_micro, metric sums, DCP's and barrier's object collectives -- go through gloo, CUDA tensors (FSDP2
    all-gather / reduce-scatter, grad-norm, full state-dict gathers) through NCCL. A plain "nccl" group
    has no backend for CPU tensors: `RuntimeError: No backend type associated with device type cpu`.
    `gpu_backend` exists so that a CPU-only test can build the same two-device layout with gloo.
    """
    return f"cpu:gloo,cuda:{gpu_backend}" if device == "cuda" else "gloo"


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: str,
                       timeout_s: int = 1800, gpu_backend: str = "nccl") -> None:
    """One process per rank (on CUDA each sees its own GPU as cuda:0 under Ray); backend per
    `process_group_backend`."""
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    backend = process_group_backend(device, gpu_backend)
    if device == "cuda":
        torch.cuda.set_device(0 if torch.cuda.device_count() == 1 else rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max) when a process group exists; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) RNG states of this process, for exact resumption."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Run a block that reseeds the process's global RNGs (vLLM's worker init calls
    set_random_seed(model_config.seed), vllm/v1/worker/gpu_worker.py:522 and :1062) and put this
    process's Python / NumPy / torch (CPU + CUDA) RNG states back afterwards."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
