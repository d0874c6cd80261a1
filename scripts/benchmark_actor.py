"""Actor benchmark on CPU: the new path (chunked log-prob head, token-budget micro-batches, padding-free
packing) against today's padded path, on rows with the length distribution of recorded trajectory-mode
ALFWorld rollouts. Prints one JSON object.

    python scripts/benchmark_actor.py [--rows 16] [--max-row-tokens 512] [--seed 0]

Workload (both paths, the same rows, the same initial weights): one actor update (one mini-batch,
DAPO loss, AdamW) and one log-prob pass. Old path = the seed's `_forward` (full logits[:, P-1:P+R-1]
in fp32 over the batch-wide padded response, entropy always) with fixed row micro-batches; new path =
het_actor with use_remove_padding and use_dynamic_bsz. Model: Qwen2, hidden 128, 2 layers, the real
Qwen2.5 vocabulary (151 936), tied embeddings. Row lengths are drawn from
scripts/data/alfworld_traj_lengths.json and scaled so the longest drawn row has --max-row-tokens
tokens (a CPU-sized copy of the distribution: its shape, hence the padding waste, is kept).

update_speedup = useful (response_mask) tokens / s, new / old. logprob_peak_mem_ratio = peak live
tensor bytes of the log-prob pass (torch.distributed._tools.MemTracker, model weights included), new /
old. max_abs_logp_diff over valid response tokens; grad_rel_diff = ‖g_new - g_old‖ / ‖g_old‖ of the
accumulated gradient the optimizer steps with.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentevolver.module.exp_manager import het_actor
from agentevolver.protocol import Batch

VOCAB = 151936
LENGTHS = REPO / "scripts" / "data" / "alfworld_traj_lengths.json"


def legacy_forward(module, mb, temperature, entropy, packing):
    """The seed's padded path, verbatim: full (b, R, V) logits in fp32; entropy whenever asked (the seed's
    update always asked for it)."""
    resp = mb["responses"]
    r = resp.shape[1]
    out = module(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                 position_ids=mb["position_ids"], use_cache=False, logits_to_keep=r + 1)
    logits = out.logits[:, :-1].float() / temperature
    logp = logits.gather(-1, resp.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    ent = None
    if entropy != "none":
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            probs = torch.softmax(logits, dim=-1)
            ent = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, ent


def make_rows(n: int, max_row_tokens: int, seed: int, lengths: Path = LENGTHS) -> tuple[Batch, dict]:
    data = json.loads(Path(lengths).read_text())
    rec = np.array(data["rows"])  # [prompt_len, response_len, model_tokens]
    rng = np.random.default_rng(seed)
    drawn = rec[rng.choice(len(rec), size=n, replace=True)]
    scale = max_row_tokens / float((drawn[:, 0] + drawn[:, 1]).max())
    p_len = np.maximum(1, np.round(drawn[:, 0] * scale)).astype(int)
    r_len = np.maximum(1, np.round(drawn[:, 1] * scale)).astype(int)
    model_frac = drawn[:, 2] / np.maximum(drawn[:, 1], 1)
    P, R = int(p_len.max()), int(r_len.max())
    g = torch.Generator().manual_seed(seed)
    prompts, responses = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)
    pam, ram = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)
    rmask = torch.zeros(n, R)
    for i in range(n):
        prompts[i, P - p_len[i]:] = torch.randint(3, VOCAB, (p_len[i],), generator=g)
        pam[i, P - p_len[i]:] = 1
        responses[i, :r_len[i]] = torch.randint(3, VOCAB, (r_len[i],), generator=g)
        ram[i, :r_len[i]] = 1
        rmask[i, :r_len[i]] = (torch.rand(r_len[i], generator=g) < model_frac[i]).float()  # action tokens
    adv = torch.randn(n, 1, generator=g).expand(n, R) * rmask
    old = (-11.0 - torch.rand(n, R, generator=g)) * rmask
    batch = Batch({"prompts": prompts, "responses": responses, "prompt_attention_mask": pam,
                   "response_attention_mask": ram, "response_mask": rmask, "advantages": adv.contiguous(),
                   "old_log_probs": old}, {"traj_id": np.array([f"r{i}" for i in range(n)])})
    resp = rec[:, 1]
    stats = {"recorded_rows": len(rec), "recorded_response_mean": round(float(resp.mean()), 1),
             "recorded_response_max": int(resp.max()), "recorded_prompt_mean": round(float(rec[:, 0].mean()), 1),
             "scale": round(scale, 4), "bench_rows": n, "bench_row_tokens_mean": round(float((p_len + r_len).mean()), 1),
             "bench_row_tokens_max": int((p_len + r_len).max()),
             "padding_waste_old": round(1 - float((p_len + r_len).sum()) / (n * (P + R)), 3)}
    return batch, stats


def actor_config(mbs: int):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "config" / "base.yaml").actor_rollout_ref.actor
    cfg.ppo_mini_batch_size, cfg.ppo_micro_batch_size_per_gpu, cfg.grad_clip = 10**6, mbs, 1e9
    return cfg


def run(model, batch, cfg, packing, legacy: bool, lp_mbs: int) -> dict:
    forward = het_actor._forward
    if legacy:
        het_actor._forward = legacy_forward
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        grads = []
        step = opt.step

        def recording_step(*a, **k):
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            return step(*a, **k)

        opt.step = recording_step
        t0 = time.perf_counter()
        het_actor.update_policy(model, opt, None, batch, cfg, 1.0, packing=packing, device="cpu")
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        logp, _ = het_actor.compute_log_prob(model, batch, 1.0, lp_mbs, packing=packing, device="cpu")
        t_logprob = time.perf_counter() - t0
        from torch.distributed._tools.mem_tracker import MemTracker

        class Pass(torch.nn.Module):  # MemTracker refuses repeated top-level calls: one outer call
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self):
                return het_actor.compute_log_prob(self.model, batch, 1.0, lp_mbs, packing=packing, device="cpu")

        runner = Pass()
        tracker = MemTracker()
        tracker.track_external(runner)
        with tracker:
            runner()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        het_actor._forward = forward
    return {"t_update": t_update, "t_logprob": t_logprob, "grad": grads[0], "logp": logp, "peak": peak}


def main() -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-row-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-mbs", type=int, default=2, help="old path: rows per update micro-batch")
    ap.add_argument("--logprob-mbs", type=int, default=4, help="old path: rows per log-prob micro-batch")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lengths", default=str(LENGTHS), help="recorded [prompt, response, model] row lengths")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    batch, stats = make_rows(args.rows, args.max_row_tokens, args.seed, args.lengths)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    init = Qwen2ForCausalLM(cfg).float()
    # the new path's token budgets = the old micro-batches' padded token counts (same memory class)
    row_max = stats["bench_row_tokens_max"]
    new = het_actor.Packing(chunk_size=args.chunk, remove_padding=True, max_token_len=args.update_mbs * row_max)
    new_lp = het_actor.Packing(chunk_size=args.chunk, remove_padding=True, max_token_len=args.logprob_mbs * row_max)
    res = {}
    for name, packing, lp_packing, legacy in (("old", het_actor.Packing(), het_actor.Packing(), True),
                                               ("new", new, new_lp, False)):
        model = copy.deepcopy(init)
        r = run(model, batch, actor_config(args.update_mbs), packing, legacy, args.logprob_mbs)
        if name == "new" and lp_packing is not packing:  # log-prob pass with its own (larger) budget
            r2 = run(copy.deepcopy(init), batch, actor_config(args.update_mbs), lp_packing, legacy, args.logprob_mbs)
            r.update(t_logprob=r2["t_logprob"], logp=r2["logp"], peak=r2["peak"])
        res[name] = r
    valid = batch["response_attention_mask"].bool()
    useful = float(batch["response_mask"].sum())
    old, nw = res["old"], res["new"]
    out = {
        "update_speedup": round(old["t_update"] / nw["t_update"], 3),
        "logprob_speedup": round(old["t_logprob"] / nw["t_logprob"], 3),
        "logprob_peak_mem_ratio": round(nw["peak"] / old["peak"], 4),
        "max_abs_logp_diff": float((old["logp"] - nw["logp"])[valid].abs().max()),
        "grad_rel_diff": float((nw["grad"] - old["grad"]).norm() / old["grad"].norm()),
        "useful_tokens_per_s_old": round(useful / old["t_update"], 1),
        "useful_tokens_per_s_new": round(useful / nw["t_update"], 1),
        "logprob_peak_mib_old": round(old["peak"] / 2**20, 1), "logprob_peak_mib_new": round(nw["peak"] / 2**20, 1),
        "vocab": VOCAB, "hidden": 128, "chunk": args.chunk, "update_token_budget": new.max_token_len,
        "logprob_token_budget": new_lp.max_token_len, "old_update_mbs": args.update_mbs,
        "old_logprob_mbs": args.logprob_mbs,
    } | stats
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
