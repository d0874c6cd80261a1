"""Driver side of the hybrid engine: one `ActorRolloutRefWorker` Ray actor per rank, and the dispatch
that splits work over ranks and joins the results back by traj_id.

Placement: a Ray placement group with one bundle PER NODE (`trainer.nnodes` bundles of
`n_gpus_per_node` ranks each), STRICT_SPREAD when nnodes > 1 so every bundle lands on a different Ray
node; rank r runs in bundle r // n_gpus_per_node, so ranks 0..g-1 share node 0 (which hosts rank 0's
TCPStore), ranks g..2g-1 node 1, and so on (verl's layout). Per rank: {"GPU": 1, "CPU": 1} on CUDA
(actor, reference and rollout engine colocated on that GPU), {"CPU": 0.5} on CPU (a fractional CPU so
the workers fit beside the env pool on a small box; gloo ranks need no exclusive core). One bundle per
rank under PACK (the old layout) lets Ray put ranks wherever they fit, e.g. both on the head node.

Metrics: `update_policy` all-reduces its metrics, so `actor/*` values are already global and
identical on every rank — the group reports rank 0's. Any other key is averaged over ranks.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from agentevolver.protocol import Batch
from agentevolver.utils.dist import resolve_device
from agentevolver.utils.seqlen_balancing import balanced_rank_shards
from agentevolver.workers.fsdp_worker import ActorRolloutRefWorker

CPU_PER_RANK_ON_CPU = 0.5
_GLOBAL_METRIC_PREFIXES = ("actor/",)
# After a failed collective: how long the other ranks' results may take to settle (a surviving rank's
# gloo op fails within seconds once its peer's sockets close).
DEAD_RANK_WAIT_S = 20.0
SHUTDOWN_TIMEOUT_S = 60.0


class WorkerDiedError(RuntimeError):
    """An actor rank's process died (kill -9, out of memory, a crash); one line naming rank(s) and phase."""


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges whose sizes differ by at most one (as Batch.chunk)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def node_bundles(per_rank: dict[str, float], nnodes: int, per_node: int) -> list[dict[str, float]]:
    """One placement-group bundle per node holding that node's `per_node` ranks."""
    return [{k: v * per_node for k, v in per_rank.items()} for _ in range(nnodes)]


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank 0's value for already-global metrics (actor/*), the mean over ranks for the rest."""
    out = {}
    for k, v in per_rank[0].items():
        out[k] = v if k.startswith(_GLOBAL_METRIC_PREFIXES) else float(np.mean([m[k] for m in per_rank]))
    return out


class ActorRolloutRefGroup:
    """`world_size = trainer.nnodes * trainer.n_gpus_per_node` hybrid-engine workers. Needs ray.init()."""

    def __init__(self, config: Any, enable_rollout: bool = True, enable_ref: bool | None = None):
        if not ray.is_initialized():
            raise RuntimeError("ActorRolloutRefGroup needs a running Ray (call ray.init first)")
        self.config = config
        self.world_size = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
        if self.world_size < 1:
            raise ValueError(f"trainer.nnodes * trainer.n_gpus_per_node must be >= 1, got {self.world_size}")
        device = resolve_device(config.trainer.device)
        per_rank = {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": CPU_PER_RANK_ON_CPU}
        nnodes, per_node = int(config.trainer.nnodes), int(config.trainer.n_gpus_per_node)
        self._pg = placement_group(node_bundles(per_rank, nnodes, per_node),
                                   strategy="STRICT_SPREAD" if nnodes > 1 else "PACK")
        try:
            ray.get(self._pg.ready(), timeout=600)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            raise RuntimeError(f"Ray could not place {nnodes} node(s) x {per_node} rank(s) of {per_rank} in 600 s "
                               f"(cluster: {ray.cluster_resources()}); start a Ray node per trainer.nnodes") from None
        remote_cls = ray.remote(ActorRolloutRefWorker)
        self.workers = []
        self.dead_ranks: list[int] = []
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank // per_node)
            opts = {"num_cpus": per_rank["CPU"], "num_gpus": per_rank.get("GPU", 0), "scheduling_strategy": strategy,
                    "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}}
            self.workers.append(remote_cls.options(**opts).remote(config, rank, self.world_size,
                                                                  enable_rollout=enable_rollout, enable_ref=enable_ref))
        addr, port = ray.get(self.workers[0].master_endpoint.remote())  # rank 0's node hosts the TCPStore
        self.master_endpoint = (addr, port)
        self.placement = self._all("placement")
        for p in self.placement:
            print(f"worker_group: rank {p['rank']} on node {p['node_id']} ({p['ip']}, pid {p['pid']})", flush=True)
        print(f"worker_group: TCPStore at {addr}:{port} (rank 0's node)", flush=True)
        self._all("init_model", addr, port)

    # ------------------------------------------------------------------ plumbing
    def _all(self, method: str, *args: Any) -> list:
        """Call `method(*args)` on every rank (a collective) and wait for all."""
        return self._get(method, [getattr(w, method).remote(*args) for w in self.workers])

    def _per_rank(self, method: str, batch: Batch, *args: Any) -> list:
        """Rank r gets the r-th contiguous chunk of rows; with token-budget micro-batches
        (actor.use_dynamic_bsz) token-balanced shards instead (row counts still differ by at most one),
        so that no rank runs far more micro-batches than the others wait for."""
        chunks = batch.chunk(self.world_size)
        if self.config.actor_rollout_ref.actor.use_dynamic_bsz and self.world_size > 1 and len(batch):
            tokens = (batch["prompt_attention_mask"].sum(1) + batch["response_attention_mask"].sum(1)).tolist()
            chunks = [batch.select(rows) for rows in balanced_rank_shards(tokens, self.world_size)]
        return self._get(method, [getattr(w, method).remote(c, *args) for w, c in zip(self.workers, chunks)])

    def _get(self, method: str, refs: list) -> list:
        """ray.get of one call per rank; a rank whose process died becomes one WorkerDiedError naming it
        and `method` (the phase), not a rank's traceback nor a survivor's gloo error."""
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError):
            dead = self._dead_ranks(refs)
            if not dead:
                raise
            self.dead_ranks = dead
            plural = "s" if len(dead) > 1 else ""
            raise WorkerDiedError(f"actor rank{plural} {', '.join(map(str, dead))} of {self.world_size} died during "
                                  f"{method} (the process exited: killed, out of memory, or crashed)") from None

    @staticmethod
    def _dead_ranks(refs: list) -> list[int]:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=DEAD_RANK_WAIT_S)
        dead = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(rank)
                except RayTaskError:  # a survivor whose collective failed with its peer
                    pass
        return dead

    def _joined(self, method: str, batch: Batch, *args: Any) -> Batch:
        """Per-rank results concatenated and re-ordered to `batch`'s traj_id order."""
        batch.require("traj_id")
        return Batch.concat(self._per_rank(method, batch, *args)).align_to(batch)

    # ------------------------------------------------------------------ rollout
    def generate(self, prompts: list[list[int]], params: Any) -> list[list[Any]]:
        """Prompts split into contiguous chunks over ranks; outputs in the prompts' order."""
        ranges = split_evenly(len(prompts), self.world_size)
        parts = self._get("generate", [w.generate.remote(prompts[a:b], params)
                                       for w, (a, b) in zip(self.workers, ranges)])
        return [out for part in parts for out in part]

    def sync_weights(self) -> int:
        """Actor -> rollout engines on every rank; returns the new policy version."""
        versions = set(self._all("sync_weights"))
        assert len(versions) == 1, f"ranks disagree on the policy version: {versions}"
        return versions.pop()

    def get_policy_version(self) -> int:
        return ray.get(self.workers[0].get_policy_version.remote())

    # ------------------------------------------------------------------ actor / reference
    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Batch:
        """Batch(traj_id, old_log_probs[, entropys]) in `batch`'s row order; `batch.union(...)` it."""
        return self._joined("compute_log_prob", batch, calculate_entropy)

    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        """Batch(traj_id, ref_log_prob) in `batch`'s row order."""
        return self._joined("compute_ref_log_prob", batch)

    def update_actor(self, batch: Batch, loss: str = "ppo", progress: float = 0.0) -> dict[str, float]:
        return reduce_metrics(self._per_rank("update_actor", batch, loss, progress))

    # ------------------------------------------------------------------ checkpoints / export
    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its shard into `path` (the driver makes it atomic: temp dir + rename)."""
        self._all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self._all("load_checkpoint", path)

    def export_hf(self, path: str) -> None:
        self._all("export_hf", path)

    def get_full_state_dict(self) -> dict:
        return self._all("get_full_state_dict")[0]

    def shutdown(self) -> None:
        """The ranks' collective shutdown, then their processes; after a rank died, the survivors are
        killed without the collective (its barrier would wait for the dead rank)."""
        try:
            if not self.dead_ranks and self.workers:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=SHUTDOWN_TIMEOUT_S)
        finally:
            for w in self.workers:
                ray.kill(w)
            remove_placement_group(self._pg)
            self.workers = []
