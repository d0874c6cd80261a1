"""The analytic memory plan (agentevolver/utils/memory_plan.py) against measured peaks on CPU.

Peak = the largest total of live tensor storage that torch.distributed._tools.MemTracker saw (it
hooks every tensor allocation and module / optimizer step; CPU tensors included). Measured: one
update step (forward with gradient checkpointing, chunked log-prob head, backward, AdamW step; Adam
state already initialised by a warm-up step) and one no-grad log-prob pass, fp32, one process.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from agentevolver.module.exp_manager import het_actor
from agentevolver.utils import memory_plan as mp
from tests.helpers import REPO

SHAPES = {  # (hidden, layers, intermediate, vocab, heads, kv_heads, rows, prompt, response)
    "tiny": (64, 2, 128, 256, 4, 2, 2, 64, 128),
    "qwen2_55m": (640, 8, 1728, 32768, 10, 2, 2, 64, 448),
}
CHUNK = 256


def measure(hidden, layers, inter, vocab, heads, kv, b, p, r) -> tuple[dict, mp.ModelShape]:
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, vocab, (b, p + r), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    mb = {"input_ids": ids, "attention_mask": am, "position_ids": am.cumsum(-1) - 1, "responses": ids[:, p:]}
    packing = het_actor.Packing(chunk_size=CHUNK)

    def update():
        model.train()
        logp, _ = het_actor._forward(model, mb, 1.0, "metric", packing)
        logp.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def log_prob():
        model.eval()
        with torch.no_grad():
            het_actor._forward(model, mb, 1.0, "metric", packing)

    update()  # Adam state exists from here on, as in every step but the first
    peaks = {}
    for name, fn in (("update", update), ("log_prob", log_prob)):
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            fn()
        peaks[name] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / mp.GIB
    return peaks, mp.ModelShape.from_hf_config(cfg.to_dict())


@pytest.mark.parametrize("name", list(SHAPES))
def test_plan_within_25_percent_of_measured_peaks(name):
    *dims, b, p, r = SHAPES[name]
    measured, shape = measure(*dims, b, p, r)
    est = mp.plan(shape, world=1, c=4, fsdp=False, update_tokens=b * (p + r), logprob_tokens=b * (p + r),
                  ref_tokens=0, chunk=CHUNK, checkpointing=True, rollout=False, overhead_gib=0.0)["phases_bytes"]
    est = {k: v / mp.GIB for k, v in est.items()}
    print(f"{name} ({shape.params / 1e6:.1f} M params): measured {measured}, planned "
          f"update {est['update']:.4f} / log_prob {est['log_prob']:.4f} GiB")
    for phase in ("update", "log_prob"):
        assert abs(est[phase] - measured[phase]) <= 0.25 * measured[phase], (phase, est[phase], measured[phase])


def test_3b_recipe_plans_under_90_percent_of_80_gb():
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose(config_name="alfworld_dapo_3b")
    out = mp.plan_config(cfg, 80.0)
    print(out)
    assert out["per_gpu_peak_gib"] < 0.9 * 80
    assert mp.over_budget_warning(cfg, 80.0) is None
    # the seed's path: whole-response logits (one chunk = every token) in 8-row log-prob micro-batches
    seed = OmegaConf.merge(cfg, {"actor_rollout_ref": {
        "actor": {"use_dynamic_bsz": False}, "model": {"logprob_chunk_size": 10**9}}})
    plan = mp.plan_config(seed, 80.0)
    print(plan)
    assert plan["peak_phase"] == "log_prob" and plan["per_gpu_peak_gib"] > 200
    warning = mp.over_budget_warning(seed, 80.0)
    assert warning is not None and warning.startswith("memory plan:") and "\n" not in warning


def test_plan_memory_script_prints_one_json_line(capsys):
    import json
    import runpy


    script = runpy.run_path(str(REPO / "scripts" / "plan_memory.py"))
    script["main"](["--config-name", "alfworld_dapo_3b", "--gpu-memory-gib", "141",
                    "actor_rollout_ref.rollout.gpu_memory_utilization=0.5"])
    line = capsys.readouterr().out.strip()
    out = json.loads(line)
    assert "\n" not in line and out["gpu_memory_gib"] == 141.0
    assert out["parts_gib"]["vllm"] == 70.5
    for part in ("params", "grads", "optimizer", "activations", "logits_chunk", "vllm", "weight_sync", "reference"):
        assert part in out["parts_gib"]
