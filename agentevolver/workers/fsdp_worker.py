"""One rank of the hybrid engine: FSDP2 actor + frozen FSDP2 reference + rollout engine in one process.

`ActorRolloutRefWorker` is a plain class; `worker_group.ActorRolloutRefGroup` runs one per rank as a Ray
actor (tests may also run it directly in `torch.multiprocessing` processes). Every method that touches
the actor or the reference is a collective: all ranks call it, each with ITS shard of rows.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from agentevolver.module.exp_manager import het_actor
from agentevolver.protocol import Batch
from agentevolver.utils.dist import (
    free_port,
    get_rng_state,
    init_process_group,
    node_ip,
    resolve_device,
    resolve_dtype,
    seed_everything,
    set_rng_state,
)
from agentevolver.workers.rollout.base import resolve_attn_implementation, rollout_max_model_len

REF_ENABLE = ("auto", True, False)  # actor_rollout_ref.ref.enable
_SHUTDOWN_KEY = "agentevolver/shutdown_checked_in"  # the store counter of shutdown's check-ins
_SHUTDOWN_WAIT_S = 60.0  # rank 0's wait for the other ranks' teardown (a dead rank never checks in)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def ref_enabled(config: Any) -> bool:
    """ref.enable: auto = needed by the KL loss or the KL-in-reward penalty."""
    enable = config.actor_rollout_ref.ref.enable
    if enable == "auto":
        return bool(config.actor_rollout_ref.actor.use_kl_loss or config.algorithm.use_kl_in_reward)
    if not isinstance(enable, bool):
        raise TypeError(f"actor_rollout_ref.ref.enable must be one of {REF_ENABLE}, got {enable!r}")
    return enable


def build_fsdp_model(path: str, device: str, dtype: torch.dtype, *, train: bool, param_offload: bool = False,
                     gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                     attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Load an HF causal LM and wrap it with FSDP2: `fully_shard` per decoder layer, then the root.

    Trained models keep fp32 master params and compute in `dtype` through MixedPrecisionPolicy
    (reduce in fp32); the frozen reference is simply loaded in `dtype`. `attn_implementation` is a
    resolved name (rollout.base.resolve_attn_implementation).
    """
    from transformers import AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise ValueError(f"actor_rollout_ref.model.path={path!r} is not an HF model folder (no config.json)")
    load_dtype = torch.float32 if train else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    if gradient_checkpointing and train:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not train:
        model.requires_grad_(False)
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(device, (dist.get_world_size(),))}
    if train and dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if param_offload and device == "cuda":  # on CPU the params already live in host memory
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if device == "cuda" and not param_offload:
        model.to("cuda")
    model.train(train)
    return model


def packing(config: Any, role: str) -> het_actor.Packing:
    """Micro-batching of one pass: role = actor (update) | rollout (old log-probs) | ref (verl's names)."""
    arr = config.actor_rollout_ref
    if role == "actor":
        return het_actor.Packing.from_config(arr.model, arr.actor.use_dynamic_bsz, arr.actor.ppo_max_token_len_per_gpu)
    sub = arr[role]
    return het_actor.Packing.from_config(arr.model, sub.log_prob_use_dynamic_bsz, sub.log_prob_max_token_len_per_gpu)


def warmup_lambda(warmup_steps: int, decay: Callable[[], float] = lambda: 1.0):
    """Linear warm-up from 0 to the base lr over `warmup_steps` optimizer steps, times the current
    `decay()` factor of the training-step schedule."""
    def fn(step: int) -> float:
        return (min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0) * decay()
    return fn


def _constant_decay(progress: float, min_lr_ratio: float) -> float:
    """1."""
    return 1.0


def _cosine_decay(progress: float, min_lr_ratio: float) -> float:
    """min_lr_ratio + (1 - min_lr_ratio) · ½(1 + cos(π · progress)): 1 at the first step, min_lr_ratio at
    the end of the run (verl's half-cycle cosine)."""
    p = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


# actor_rollout_ref.actor.optim.lr_scheduler_type -> decay(progress, min_lr_ratio)
LR_SCHEDULERS: dict[str, Callable[[float, float], float]] = {"constant": _constant_decay, "cosine": _cosine_decay}


def lr_decay_factor(scheduler_type: str, progress: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at `progress` = finished training steps / total training steps."""
    decay = LR_SCHEDULERS.get(scheduler_type)
    if decay is None:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {scheduler_type!r}")
    return decay(progress, min_lr_ratio)


def gather_full_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One state-dict entry unsharded (an all-gather for an FSDP2 DTensor) and cast to `dtype`.
    A CPU-offloaded shard is moved to its mesh's device first, as torch's own state-dict gather does
    (torch/distributed/_state_dict_utils.py, `_gather_state_dict`), so the gather runs on NCCL."""
    if hasattr(t, "full_tensor"):
        if t.device.type != t.device_mesh.device_type:
            t = t.to(t.device_mesh.device_type)
        t = t.full_tensor()
    return t.detach().to(dtype)


class ActorRolloutRefWorker:
    """Actor (trained), reference (frozen, optional) and rollout engine (optional) of one rank."""

    def __init__(self, config: Any, rank: int, world_size: int, master_addr: str | None = None,
                 master_port: int | None = None, enable_rollout: bool = True, enable_ref: bool | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.master_addr, self.master_port = master_addr, master_port
        self.enable_rollout = enable_rollout
        self.enable_ref = ref_enabled(config) if enable_ref is None else enable_ref
        self.device = resolve_device(config.trainer.device)
        self.dtype = resolve_dtype(config.actor_rollout_ref.actor.fsdp_config.dtype, self.device)
        self.actor = self.ref = self.optimizer = self.scheduler = self.rollout = None
        self.version = 0
        self._rollout_asleep = False

    # ------------------------------------------------------------------ set-up
    def master_endpoint(self) -> tuple[str, int]:
        """(address, free port) of this process's host: asked of rank 0 before init_model."""
        return node_ip(), free_port()

    def placement(self) -> dict[str, Any]:
        """Where this rank runs: its Ray node id (None outside Ray), host address and pid."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"rank": self.rank, "node_id": node, "ip": node_ip(), "pid": os.getpid()}

    def init_model(self, master_addr: str | None = None, master_port: int | None = None) -> None:
        addr, port = master_addr or self.master_addr, master_port or self.master_port
        if addr is None or port is None:
            raise ValueError("init_model needs master_addr and master_port")
        if self.device == "cpu":
            torch.set_num_threads(1)
        init_process_group(self.rank, self.world_size, addr, int(port), self.device)
        seed_everything(int(self.config.trainer.seed) + self.rank)
        arr = self.config.actor_rollout_ref
        path, remote = str(arr.model.path), bool(arr.model.trust_remote_code)
        attn = resolve_attn_implementation(str(arr.model.attn_implementation), self.device)
        self.attn_implementation = attn
        self.actor = build_fsdp_model(path, self.device, self.dtype, train=True,
                                      param_offload=arr.actor.fsdp_config.param_offload,
                                      gradient_checkpointing=arr.model.enable_gradient_checkpointing,
                                      trust_remote_code=remote, attn_implementation=attn)
        optim = arr.actor.optim
        self.optimizer = torch.optim.AdamW(self.actor.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                           betas=tuple(optim.betas))
        self.lr_decay = 1.0  # the training-step schedule's factor, set by update_actor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_lambda(int(optim.lr_warmup_steps), lambda: self.lr_decay))
        if self.enable_ref:
            self.ref = build_fsdp_model(path, self.device, self.dtype, train=False,
                                        param_offload=arr.ref.param_offload, trust_remote_code=remote,
                                        attn_implementation=attn)
        if self.enable_rollout:
            from agentevolver.workers.rollout import make_rollout_engine

            self.rollout = make_rollout_engine(arr.rollout.name, path, arr.rollout, self.device, self.dtype,
                                               **self.rollout_options())

    def rollout_options(self) -> dict[str, Any]:
        """This rank's engine options: its own seed (trainer.seed + rank), its rank (per-rank caches),
        the longest sequence the config allows, the attention kernel."""
        cfg = self.config
        return {"seed": int(cfg.trainer.seed) + self.rank, "rank": self.rank,
                "max_model_len": rollout_max_model_len(cfg.data.max_prompt_length, cfg.data.max_response_length,
                                                       cfg.actor_rollout_ref.rollout.response_length,
                                                       cfg.env.rollout_mode),
                "attn_implementation": getattr(self, "attn_implementation", "sdpa")}

    # ------------------------------------------------------------------ rollout
    def generate(self, prompts: list[list[int]], params: Any) -> list:
        self._wake_rollout()
        return self.rollout.generate(prompts, params) if prompts else []

    def _sleep_rollout(self) -> None:
        """Free the engine's memory (vLLM KV cache / weights) while the actor trains."""
        if self.rollout is not None and not self._rollout_asleep and self.config.actor_rollout_ref.rollout.free_cache_engine:
            self.rollout.sleep()
            self._rollout_asleep = True

    def _wake_rollout(self, tags: list[str] | None = None) -> None:
        if self.rollout is not None and self._rollout_asleep:
            self.rollout.wake_up(tags)
            self._rollout_asleep = tags is not None and "kv_cache" not in tags

    def _gather_full(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) actor weights on every rank. A collective (all-gathers).
        cpu_offload=False: with it, only rank 0 would receive the full dict, and every rank hosts an engine."""
        return get_model_state_dict(self.actor, options=StateDictOptions(full_state_dict=True, cpu_offload=False))

    def iter_rollout_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor in the ROLLOUT dtype), one state-dict entry at a time. A collective: every
        rank must consume it to the end, in the same order (each entry is an all-gather).

        Each entry is gathered and cast right away, so at most ONE full fp32 tensor exists at a time
        (3B: the 1.2 GiB embedding), never the whole fp32 master copy (~11.5 GiB). Tied weights are
        gathered once; the shared tensor is kept only until its last name is yielded."""
        sd = self.actor.state_dict()
        remaining = Counter(id(t) for t in sd.values())
        shared: dict[int, torch.Tensor] = {}
        for name, t in sd.items():
            key = id(t)
            full = shared.pop(key) if key in shared else gather_full_tensor(t, self.dtype)
            remaining[key] -= 1
            if remaining[key]:
                shared[key] = full
            yield name, full
            del full

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """The full actor weights in the rollout dtype as one dict (engines that need them all at once:
        hf's load_state_dict, vLLM's rebuild). Transient: the rollout-dtype model (3B bf16: ~5.8 GiB)
        plus one fp32 tensor. A collective."""
        return dict(self.iter_rollout_weights())

    def _push_weights(self, version: int) -> None:
        """Full actor weights -> this rank's rollout engine: wake the engine's weights, load, then its KV
        cache, so the KV cache is not resident while the new weights are in flight. An engine that
        streams (vLLM's in-place reload) gets the per-tensor iterator: nothing beyond one tensor is
        materialised next to its own weights."""
        self._wake_rollout(["weights"])
        self.version = version
        if self.rollout is not None and self.rollout.streams_weights:
            stream = self.iter_rollout_weights()
            self.rollout.load_weights(stream, version)
            for _ in stream:  # the gathers are collectives: finish them whatever the engine consumed
                pass
        else:
            sd = self.rollout_state_dict()  # every rank gathers (a collective), engine or not
            if self.rollout is not None:
                self.rollout.load_weights(sd, version)
            del sd
        self._wake_rollout(["kv_cache"])

    def sync_weights(self) -> int:
        """Push the current actor weights to the rollout engine as policy version + 1."""
        self._push_weights(self.version + 1)
        return self.version

    def get_policy_version(self) -> int:
        return self.rollout.policy_version if self.rollout is not None else self.version

    # ------------------------------------------------------------------ actor / reference
    def _temperature(self, batch: Batch) -> float:
        return float(batch.meta.get("temperature", self.config.actor_rollout_ref.rollout.temperature))

    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Batch:
        """Batch(traj_id, old_log_probs[, entropys]) for this rank's rows, under the current actor."""
        self._sleep_rollout()
        mbs = int(self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu)
        logp, ent = het_actor.compute_log_prob(self.actor, batch, self._temperature(batch), mbs, calculate_entropy,
                                               packing(self.config, "rollout"), device=self.device)
        tensors = {"old_log_probs": logp} | ({"entropys": ent} if ent is not None else {})
        return Batch(tensors, {"traj_id": batch.ids["traj_id"]})

    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        if self.ref is None:
            raise ValueError("compute_ref_log_prob needs the reference policy (actor_rollout_ref.ref.enable)")
        self._sleep_rollout()
        mbs = int(self.config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu)
        logp, _ = het_actor.compute_log_prob(self.ref, batch, self._temperature(batch), mbs,
                                             packing=packing(self.config, "ref"), device=self.device)
        return Batch({"ref_log_prob": logp}, {"traj_id": batch.ids["traj_id"]})

    def update_actor(self, batch: Batch, loss: str = "ppo", progress: float = 0.0) -> dict[str, float]:
        """One training step's optimizer steps; `progress` (finished / total training steps) sets the lr decay."""
        self._sleep_rollout()
        self._optimizer_to(self.device)
        optim = self.config.actor_rollout_ref.actor.optim
        self.lr_decay = lr_decay_factor(optim.lr_scheduler_type, progress, float(optim.min_lr_ratio))
        # the scheduler computed the current lr at its last step(): apply the new factor now
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        metrics = het_actor.update_policy(self.actor, self.optimizer, self.scheduler, batch,
                                          self.config.actor_rollout_ref.actor, self._temperature(batch), loss,
                                          packing(self.config, "actor"), device=self.device)
        if self.config.actor_rollout_ref.actor.fsdp_config.optimizer_offload:
            self._optimizer_to("cpu")
        return metrics

    def _optimizer_to(self, device: str) -> None:
        """Optimizer-state offload (GPU only): Adam moments live on the host between updates."""
        if self.device != "cuda":
            return
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(device, non_blocking=True)

    def get_full_state_dict(self) -> dict[str, torch.Tensor]:
        """The actor's full weights on CPU (every rank gets them; a collective)."""
        return {k: v.detach().cpu().clone() for k, v in self._gather_full().items()}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str) -> None:
        """Sharded model + optimizer (DCP), and per rank: scheduler, RNG states, policy version.
        Writes into `path` as given; the driver writes to a temp dir and renames it for atomicity."""
        self._optimizer_to(self.device)
        optim_empty = not self.optimizer.state
        model_sd, optim_sd = get_state_dict(self.actor, self.optimizer)
        if optim_empty:  # get_state_dict initialised Adam with a zero-lr step: undo it (bias correction)
            self.optimizer.state.clear()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "actor"))
        extra = {"scheduler": self.scheduler.state_dict(), "rng": get_rng_state(), "version": self.version,
                 "world_size": self.world_size, "optim_empty": optim_empty}
        torch.save(extra, os.path.join(path, f"extra_state_rank{self.rank}.pt"))
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        """Restore what save_checkpoint wrote (DCP reshards to this world size) and re-sync the rollout."""
        if not os.path.isdir(os.path.join(path, "actor")):
            raise ValueError(f"no actor checkpoint in {path!r} (expected {path}/actor)")
        model_sd, optim_sd = get_state_dict(self.actor, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "actor"))
        set_state_dict(self.actor, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra_path = os.path.join(path, f"extra_state_rank{self.rank}.pt")
        if not os.path.isfile(extra_path):  # resumed with more ranks than were saved: rank 0's schedule
            extra_path = os.path.join(path, "extra_state_rank0.pt")
        extra = torch.load(extra_path, weights_only=False)
        if extra["optim_empty"]:
            self.optimizer.state.clear()
        self.scheduler.load_state_dict(extra["scheduler"])
        self._push_weights(int(extra["version"]))
        set_rng_state(extra["rng"])

    def export_hf(self, path: str) -> None:
        """Rank 0 writes an HF folder (weights in the source dtype + config + tokenizer files of model.path)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        sd = get_model_state_dict(self.actor, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            src = Path(self.config.actor_rollout_ref.model.path)
            cfg = AutoConfig.from_pretrained(src, trust_remote_code=self.config.actor_rollout_ref.model.trust_remote_code)
            dtype = getattr(cfg, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # HF names: torch's ("bfloat16")
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False,
                                                        assign=True)
            tied = set(getattr(model, "_tied_weights_keys", None) or {})
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"export_hf: state dict mismatch (missing {missing}, unexpected {unexpected})")
            model.tie_weights()
            model.save_pretrained(path)
            for f in src.iterdir():
                # tokenizer files, chat template, generation_config (keeps the source's eos ids)
                if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_SUFFIXES):
                    shutil.copy2(f, Path(path) / f.name)
        dist.barrier()

    def shutdown(self) -> None:
        """Collective teardown in a fixed order (issue 14 item 8: an intermittent SIGABRT at the end of a
        2-rank spawn). A barrier alone let rank 0 (the TCPStore host) destroy its group and exit while
        another rank was still tearing its own down against that store. Now: barrier (all work done) ->
        ranks > 0 destroy their group and check in on the store -> rank 0 waits for every check-in, then
        destroys its group; its process, and with it the store, ends last."""
        if not dist.is_initialized():
            return
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        if self.rank != 0:
            dist.destroy_process_group()
            store.add(_SHUTDOWN_KEY, 1)
            return
        deadline = time.monotonic() + _SHUTDOWN_WAIT_S
        while store.add(_SHUTDOWN_KEY, 0) < self.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        dist.destroy_process_group()
