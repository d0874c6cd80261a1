"""GPU smoke test of the training step, without Ray: the project's `ActorRolloutRefWorker` in ONE process.

    bash scripts/gpu_smoke.sh                 # Qwen2.5-3B shape, random weights, on the visible GPU
    GPU_SMOKE_SHAPE=tiny bash scripts/gpu_smoke.sh   # a 2-layer model on CPU in seconds (tests/scripts/test_gpu_smoke.py)

What it runs (issue 13 item 12): a random-weight model of Qwen2.5-3B's real shape (hidden 2048, 36
layers, 16 query / 2 KV heads, intermediate 11008, vocabulary 151 936, tied embeddings) written as an
HF folder, then the worker exactly as one rank of the 3B recipe builds it (config/base.yaml +
config/alfworld_dapo_3b.yaml: bf16, gradient checkpointing, the recipe's attention kernel, its
micro-batches) on a world-size-1 process group (`cpu:gloo,cuda:nccl` on CUDA), and 2 rounds of
    generate (hf engine) -> old log-probs -> DAPO update -> weight sync
on synthetic token rows of one rank's share of a 3B step (8 tasks x n=8 / 4 GPUs = 16 trajectory-mode
rows; prompt and response lengths below). The rollout engine is `hf`: the lent GPU machine has no
vLLM (nor Ray, hydra, omegaconf, wandb, alfworld), and nothing here imports them. Needs only torch,
transformers (and its pyyaml, to read the recipe) and numpy; downloads nothing.

Prints ONE JSON line on stdout (progress goes to stderr): per-phase times and peak
torch.cuda.max_memory_allocated (null on CPU) of the last round, step time, generated tokens/s,
probs_diff_mean (|exp(old_log_prob) - exp(rollout_log_prob)| over the generated tokens, as the
trainer's rollout/probs_diff_mean) and `plan_memory` (null: issue 15's memory planner fills it).
Env overrides: GPU_SMOKE_ROWS, GPU_SMOKE_PROMPT_LEN, GPU_SMOKE_RESPONSE_LEN, GPU_SMOKE_GEN_TOKENS,
GPU_SMOKE_DIR (where the random model is written; default a temp dir).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-3B-Instruct's config.json, and a 2-layer stand-in for CPU
SHAPES: dict[str, dict[str, Any]] = {
    "3b": {"model": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                     "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
                     "rms_norm_eps": 1e-6},
           # one rank of the 3B recipe: 8 tasks x n=8 rollouts / 4 GPUs = 16 rows; a long ALFWorld trajectory
           # row (prompt ~1k tokens, 20-30 turns of action + observation); gen_tokens None = rollout.response_length
           "rows": 16, "prompt_len": 1024, "response_len": 4096, "gen_tokens": None},
    "tiny": {"model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": True,
                       "max_position_embeddings": 4096, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6},
             "rows": 4, "prompt_len": 16, "response_len": 48, "gen_tokens": 8},
}
N_GPUS_RECIPE = 4
UNAVAILABLE = ("ray", "hydra", "omegaconf", "wandb", "alfworld", "textworld", "vllm")  # the recipe's trainer.n_gpus_per_node: one rank's share of the mini-batch


def log(msg: str) -> None:
    print(f"[gpu_smoke] {msg}", file=sys.stderr, flush=True)


class Node(dict):
    """A nested dict with attribute access: the config the worker reads, without omegaconf."""

    def __init__(self, data: dict) -> None:
        super().__init__({k: Node(v) if isinstance(v, dict) else v for k, v in data.items()})

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_REF = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")  # a plain `${a.b.c}` reference (not a resolver like oc.env)


def _resolve_refs(node: dict, root: dict) -> None:
    """Resolve base.yaml's key-to-key interpolations (e.g. rollout.log_prob_use_dynamic_bsz) in place."""
    for k, v in node.items():
        if isinstance(v, dict):
            _resolve_refs(v, root)
        elif isinstance(v, str) and (m := _REF.match(v)):
            target: Any = root
            for part in m.group(1).split("."):
                target = target[part]
            node[k] = target


def recipe_config(model_path: str, device: str) -> Node:
    """config/base.yaml + config/alfworld_dapo_3b.yaml (the recipe), with the smoke's few overrides."""
    import yaml  # a transformers dependency

    base = yaml.safe_load((REPO / "config" / "base.yaml").read_text())
    recipe = yaml.safe_load((REPO / "config" / "alfworld_dapo_3b.yaml").read_text())
    recipe.pop("defaults", None)
    merged = _merge(base, recipe)
    _resolve_refs(merged, merged)
    cfg = Node(merged)
    cfg.actor_rollout_ref.model.path = model_path
    cfg.trainer.device = device
    cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes = 1, 1  # one process on one GPU (what plan_memory plans)
    cfg.actor_rollout_ref.rollout.name = "hf"  # no vLLM on the lent machine
    return cfg


def _plan_memory(cfg: Node) -> dict:
    from agentevolver.utils.memory_plan import plan_config

    out = plan_config(cfg, float(os.environ.get("GPU_SMOKE_GPU_MEMORY_GIB", "80")))
    out.pop("phases_bytes", None)
    return out


def write_random_model(out: Path, shape: dict, device: str) -> Path:
    """A random-init Qwen2ForCausalLM (bf16 on CUDA) + a minimal tokenizer, as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialise on the GPU: a 3B CPU init takes minutes
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    del model
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, 64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(out)
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def synthetic_rows(gen: list, prompts: list[list[int]], prompt_len: int, response_len: int, vocab: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """Trajectory-mode rows: left-padded prompt, then the generated first turn (loss mask 1, its rollout
    log-probs), then later turns as alternating observation (mask 0) / action (mask 1) chunks, right-padded."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    t = {k: torch.zeros(n, prompt_len, dtype=torch.long) for k in ("prompts", "prompt_attention_mask")}
    for k in ("responses", "response_attention_mask", "response_mask"):
        t[k] = torch.zeros(n, response_len, dtype=torch.long)
    t["rollout_log_probs"] = torch.zeros(n, response_len)
    t["gen_mask"] = torch.zeros(n, response_len, dtype=torch.long)
    for i, (p, outs) in enumerate(zip(prompts, gen)):
        t["prompts"][i, prompt_len - len(p):] = torch.tensor(p)
        t["prompt_attention_mask"][i, prompt_len - len(p):] = 1
        ids, lps = outs[0].token_ids[:response_len], outs[0].log_probs[:response_len]
        length = int(torch.randint(max(len(ids), response_len // 2), response_len + 1, (1,), generator=g))
        t["responses"][i, :length] = torch.randint(3, vocab, (length,), generator=g)
        t["response_attention_mask"][i, :length] = 1
        pos, obs = len(ids), True
        while pos < length:  # later turns: ~3:1 observation : action tokens
            chunk = int(torch.randint(16, 96, (1,), generator=g)) * (3 if obs else 1)
            t["response_mask"][i, pos:min(pos + chunk, length)] = 0 if obs else 1
            pos, obs = pos + chunk, not obs
        t["responses"][i, :len(ids)] = torch.tensor(ids)
        t["response_mask"][i, :len(ids)] = 1
        t["gen_mask"][i, :len(ids)] = 1
        t["rollout_log_probs"][i, :len(ids)] = torch.tensor(lps)
    return t


class Phases:
    """Wall time and peak CUDA memory (max_memory_allocated, reset per phase) of named phases."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.time_s: dict[str, float] = {}
        self.peak_gib: dict[str, float | None] = {}

    def run(self, name: str, fn, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.time_s[name] = round(time.perf_counter() - t0, 3)
        self.peak_gib[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None
        log(f"{name}: {self.time_s[name]} s, peak {self.peak_gib[name]} GiB")
        return out


def main() -> dict:
    from agentevolver.protocol import Batch
    from agentevolver.utils.dist import free_port
    from agentevolver.workers.fsdp_worker import ActorRolloutRefWorker
    from agentevolver.workers.rollout import SamplingParams

    shape_name = os.environ.get("GPU_SMOKE_SHAPE", "3b")
    if shape_name not in SHAPES:
        raise SystemExit(f"GPU_SMOKE_SHAPE={shape_name!r}: valid values are {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if shape_name == "3b" and device != "cuda":
        raise SystemExit("GPU_SMOKE_SHAPE=3b needs a CUDA GPU; use GPU_SMOKE_SHAPE=tiny on CPU")
    rows = int(os.environ.get("GPU_SMOKE_ROWS", shape["rows"]))
    prompt_len = int(os.environ.get("GPU_SMOKE_PROMPT_LEN", shape["prompt_len"]))
    response_len = int(os.environ.get("GPU_SMOKE_RESPONSE_LEN", shape["response_len"]))
    if device == "cpu":
        torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory(prefix="ae_gpu_smoke_", dir=os.environ.get("GPU_SMOKE_DIR"))
    t0 = time.perf_counter()
    model_dir = write_random_model(Path(tmp.name) / "model", shape["model"], device)
    cfg = recipe_config(str(model_dir), device)
    arr = cfg.actor_rollout_ref
    # one rank's share of the recipe's optimizer steps: mini-batch rows per GPU, its micro-batches
    arr.actor.ppo_mini_batch_size = max(1, int(arr.actor.ppo_mini_batch_size) // N_GPUS_RECIPE)
    gen_tokens = int(os.environ.get("GPU_SMOKE_GEN_TOKENS", shape["gen_tokens"] or arr.rollout.response_length))
    plan = _plan_memory(cfg)  # while the model folder (its config.json) exists
    worker = ActorRolloutRefWorker(cfg, 0, 1, "127.0.0.1", free_port())
    worker.init_model()
    build_s = time.perf_counter() - t0
    log(f"built {shape_name} on {device} in {build_s:.1f} s (attn {worker.attn_implementation}, {worker.dtype})")

    vocab = shape["model"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    rounds = []
    try:
        for rnd in range(2):
            ph = Phases(device)
            t_step = time.perf_counter()
            prompts = [torch.randint(3, vocab, (int(torch.randint(prompt_len // 2, prompt_len + 1, (1,),
                                                                   generator=g)),), generator=g).tolist()
                       for _ in range(rows)]
            params = SamplingParams(temperature=float(arr.rollout.temperature), max_tokens=gen_tokens,
                                    seed=rnd)
            gen = ph.run("gen", worker.generate, prompts, params)
            n_gen = sum(len(o[0].token_ids) for o in gen)
            t = synthetic_rows(gen, prompts, prompt_len, response_len, vocab, seed=rnd)
            gen_mask = t.pop("gen_mask").bool()
            batch = Batch(t, {"traj_id": [f"r{rnd}_{i}" for i in range(rows)]},
                          {"temperature": float(arr.rollout.temperature)})
            old = ph.run("old_log_prob", worker.compute_log_prob, batch)
            old_lp = old["old_log_probs"]
            diff = (old_lp.exp() - t["rollout_log_probs"].exp()).abs()[gen_mask]
            lp_diff = (old_lp - t["rollout_log_probs"]).abs()[gen_mask]
            adv = torch.randn(rows, 1, generator=g).expand(rows, response_len) * t["response_mask"]
            train = Batch({**t, "old_log_probs": old_lp, "advantages": adv.contiguous()}, batch.ids, batch.meta)
            metrics = ph.run("update_actor", worker.update_actor, train, "ppo", rnd / 2)
            ph.run("sync_weights", worker.sync_weights)
            step_s = time.perf_counter() - t_step
            rounds.append({"step_time_s": round(step_s, 3), "phase_time_s": ph.time_s, "peak_mem_gib": ph.peak_gib,
                           "gen_tokens": n_gen, "gen_tokens_per_s": round(n_gen / ph.time_s["gen"], 1),
                           "probs_diff_mean": diff.mean().item(), "probs_diff_max": diff.max().item(),
                           "log_probs_diff_mean": lp_diff.mean().item(),
                           "pg_loss": metrics.get("actor/pg_loss"), "grad_norm": metrics.get("actor/grad_norm")})
            log(f"round {rnd}: {json.dumps(rounds[-1])}")
    finally:
        worker.shutdown()
        tmp.cleanup()
    last = rounds[-1]
    return {
        "shape": shape_name, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "attn_implementation": worker.attn_implementation, "dtype": str(worker.dtype).removeprefix("torch."),
        "rows": rows, "prompt_len": prompt_len, "response_len": response_len, "gen_max_tokens": gen_tokens,
        "ppo_micro_batch_size_per_gpu": int(arr.actor.ppo_micro_batch_size_per_gpu),
        "log_prob_micro_batch_size_per_gpu": int(arr.rollout.log_prob_micro_batch_size_per_gpu),
        "build_s": round(build_s, 3),
        "step_time_s": last["step_time_s"], "phase_time_s": last["phase_time_s"], "peak_mem_gib": last["peak_mem_gib"],
        "gen_tokens_per_s": last["gen_tokens_per_s"], "probs_diff_mean": last["probs_diff_mean"],
        "probs_diff_max": last["probs_diff_max"], "log_probs_diff_mean": last["log_probs_diff_mean"],
        "pg_loss": last["pg_loss"], "rounds": rounds,
        # must stay empty: the lent GPU machine has none of these
        "unavailable_imports": sorted({m.split(".")[0] for m in sys.modules} & set(UNAVAILABLE)),
        # the analytic per-GPU plan (utils/memory_plan.py) of this config, beside the measured peaks
        # (world size 1 as run; vLLM's share is 0 here since the smoke runs the hf engine)
        "plan_memory": plan,
    }


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
