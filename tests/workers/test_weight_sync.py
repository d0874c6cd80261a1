"""Weight sync on a real (world-size 1) gloo group: what the rollout engine is handed is in the ROLLOUT
dtype (bf16 here, as on CUDA), gathered per tensor, and the engine ends up with exactly the actor's
weights; the engine gets its per-rank seed, max_model_len and attention kernel (issue 13 items 2, 5, 8, 9)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from agentevolver.utils.dist import free_port
from agentevolver.workers.fsdp_worker import ActorRolloutRefWorker
from agentevolver.workers.rollout import SamplingParams
from tests.helpers import REPO


def test_rollout_gets_rollout_dtype_weights(tiny_model_dir: Path) -> None:
    cfg = OmegaConf.load(REPO / "config" / "base.yaml")
    cfg.actor_rollout_ref.model.path = str(tiny_model_dir)
    cfg.trainer.device, cfg.trainer.seed = "cpu", 5
    cfg.actor_rollout_ref.actor.fsdp_config.dtype = "bf16"  # fp32 master, bf16 compute + rollout (the CUDA set-up)
    cfg.actor_rollout_ref.rollout.name = "hf"
    w = ActorRolloutRefWorker(cfg, 0, 1, "127.0.0.1", free_port(), enable_ref=False)
    w.init_model()
    try:
        eng = w.rollout
        assert eng.streams_weights  # the sync below hands it the per-tensor stream
        assert (eng.seed, eng.rank, eng.max_model_len) == (5, 0, 1024 + 4096 + 256)
        assert eng.attn_implementation == "sdpa" and eng.model.config._attn_implementation == "sdpa"
        assert w.actor.config._attn_implementation == "sdpa"
        master = w.get_full_state_dict()  # fp32 master weights
        assert {v.dtype for v in master.values()} == {torch.float32}
        handed = w.rollout_state_dict()
        assert {v.dtype for v in handed.values()} == {torch.bfloat16}
        assert handed.keys() == master.keys()
        for k, v in master.items():
            assert torch.equal(handed[k], v.to(torch.bfloat16)), k
        # move the actor away from the engine's weights, then sync: the engine holds the new weights
        with torch.no_grad():
            for p in w.actor.parameters():
                p.add_(0.01)
        w.sync_weights()
        new = w.get_full_state_dict()
        engine_sd = eng.model.state_dict()
        for k, v in new.items():
            assert torch.equal(engine_sd[k], v.to(torch.bfloat16)), k
        assert eng.policy_version == 1
        out = w.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))
        assert len(out[0][0].token_ids) >= 1
    finally:
        w.shutdown()
