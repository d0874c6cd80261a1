"""The `hf` rollout engine on the tiny model: batching, log-prob convention, sampling, stop, weight sync."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from agentevolver.models.build_tiny import build_tiny_model
from agentevolver.workers.rollout import ROLLOUT_ENGINES, SamplingParams, make_rollout_engine
from tests.helpers import BASE_YAML as CONFIG

MESSAGES = [
    "look",
    "You arrive at countertop 1. On the countertop 1, you see a apple 1, a bread 2, and a mug 3.",
    "Your task is to: put a hot potato in fridge.",
    "go to sinkbasin 1",
]


def rollout_cfg(**overrides):
    cfg = OmegaConf.load(CONFIG).actor_rollout_ref.rollout
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.getbasetemp() / "tiny-qwen2-seed0"  # shared with test_tiny_model
    if not (out / "model.safetensors").exists():
        build_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_rollout_engine("hf", str(tiny_dir), rollout_cfg(), "cpu", torch.float32)


@pytest.fixture(scope="module")
def prompts(tiny_dir) -> list[list[int]]:
    """Chat prompts of different lengths (so a batch needs left padding)."""
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    out = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=True, add_generation_prompt=True,
                                   return_dict=False) for m in MESSAGES]
    assert len({len(p) for p in out}) == len(out)
    return [list(p) for p in out]


def full_forward_log_probs(model, prompt: list[int], response: list[int], T: float) -> torch.Tensor:
    """Reference: one unpadded forward over prompt+response, log_softmax(logits / T) of each token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # (R, V)
    return torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def eos_loving_state_dict(state_dict: dict, eos: int) -> dict:
    """Weights whose greedy continuation is <|im_end|> at every step.

    Last layer: v_proj weight 0 and a large bias make the attention output a constant vector c,
    which dominates the residual stream; lm_head's eos row is set along o_proj(c).
    """
    sd = {k: v.clone() for k, v in state_dict.items()}
    last = max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    pre = f"model.layers.{last}.self_attn."
    sd[pre + "v_proj.weight"].zero_()
    sd[pre + "v_proj.bias"].fill_(50.0)
    c = sd[pre + "o_proj.weight"] @ sd[pre + "v_proj.bias"].repeat(
        sd[pre + "o_proj.weight"].shape[1] // sd[pre + "v_proj.bias"].shape[0])
    sd["lm_head.weight"][eos] = 10.0 * c / c.norm() * sd["model.norm.weight"].sign()
    return sd


def test_batched_greedy_equals_unbatched(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    batched = engine.generate(prompts, params)
    for p, outs in zip(prompts, batched):
        (single,) = engine.generate([p], params)[0]
        assert outs[0].token_ids == single.token_ids
        assert outs[0].log_probs == pytest.approx(single.log_probs, abs=1e-5)
        assert len(outs[0].token_ids) == len(outs[0].log_probs)


def test_chunking_by_max_num_seqs_keeps_outputs(tiny_dir, engine, prompts):
    small = make_rollout_engine("hf", str(tiny_dir), rollout_cfg(max_num_seqs=2), "cpu", torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=12, n=2)
    a, b = engine.generate(prompts, params), small.generate(prompts, params)
    assert [[o.token_ids for o in outs] for outs in a] == [[o.token_ids for o in outs] for outs in b]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, -1), (1.0, 1.0, -1), (0.7, 0.9, 50), (1.3, 1.0, 20)])
def test_log_probs_match_full_forward(engine, prompts, temperature, top_p, top_k):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=32, n=2, seed=7)
    T = temperature if temperature > 0 else 1.0
    diffs = []
    for p, outs in zip(prompts, engine.generate(prompts, params)):
        for o in outs:
            ref = full_forward_log_probs(engine.model, p, o.token_ids, T)
            diffs.append((ref - torch.tensor(o.log_probs)).abs().mean().item())
    mean_diff = sum(diffs) / len(diffs)
    print(f"T={temperature} top_p={top_p} top_k={top_k}: mean |logp_rollout - logp_forward| = {mean_diff:.3e}")
    assert mean_diff < 1e-4


def test_n_samples_and_seeded_sampling(engine, prompts):
    params = SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=123)
    rng_before = torch.get_rng_state()
    a = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a seeded call leaves the global RNG alone
    assert [len(outs) for outs in a] == [4] * len(prompts)
    assert len({tuple(o.token_ids) for o in a[0]}) > 1  # the n samples differ
    b = engine.generate(prompts, params)
    assert [[o.token_ids for o in outs] for outs in a] == [[o.token_ids for o in outs] for outs in b]
    c = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=124))
    assert [[o.token_ids for o in outs] for outs in a] != [[o.token_ids for o in outs] for outs in c]


def test_top_k_1_is_greedy(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10))
    top1 = engine.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=10, seed=0))
    assert [o[0].token_ids for o in greedy] == [o[0].token_ids for o in top1]


def test_length_and_stop_token_ids(engine, prompts):
    (out,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    stop_at = out.token_ids[2]
    (cut,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=5,
                                                         stop_token_ids=[stop_at]))[0]
    first = out.token_ids.index(stop_at)
    assert cut.finish_reason == "stop" and cut.token_ids == out.token_ids[:first + 1]  # stop token kept


def test_load_weights_changes_outputs_and_eos_stops(tiny_dir, prompts):
    eng = make_rollout_engine("hf", str(tiny_dir), rollout_cfg(), "cpu", torch.float32)
    eos = AutoTokenizer.from_pretrained(str(tiny_dir)).eos_token_id
    assert eos in eng.eos_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=8)
    before = eng.generate(prompts, params)
    assert all(o[0].policy_version == 0 and o[0].finish_reason == "length" for o in before)

    sd = eos_loving_state_dict(eng.model.state_dict(), eos)
    eng.load_weights(sd, version=3)
    assert eng.policy_version == 3
    after = eng.generate(prompts, params)
    for b, a in zip(before, after):
        o = a[0]
        assert o.policy_version == 3 and o.finish_reason == "stop"
        assert o.token_ids[-1] == eos and len(o.token_ids) < 8 and o.token_ids != b[0].token_ids
    with pytest.raises(ValueError, match="unexpected"):
        eng.load_weights({**sd, "not.a.weight": torch.zeros(1)}, version=4)


def test_sampling_params_and_registry():
    cfg = rollout_cfg()
    p = SamplingParams.from_rollout_config(cfg)
    assert (p.temperature, p.n, p.max_tokens) == (cfg.temperature, cfg.n, cfg.response_length)
    v = SamplingParams.from_rollout_config(cfg, validate=True)
    assert (v.temperature, v.n) == (0.0, 1) and v.logprob_temperature == 1.0
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)
    assert {"hf", "vllm"} <= set(ROLLOUT_ENGINES)
    with pytest.raises(ValueError, match=r"unknown rollout engine 'sglang'; valid names: \['hf', 'vllm'\]"):
        make_rollout_engine("sglang", "unused", cfg)


def test_trim_at_stop_keeps_the_stop_token_and_nothing_after():
    from agentevolver.workers.rollout.base import trim_at_stop

    assert trim_at_stop([5, 6, 2, 0, 0], [-1.0, -2.0, -3.0, 0.0, 0.0], {2, 0}) == ([5, 6, 2], [-1.0, -2.0, -3.0], "stop")
    assert trim_at_stop([5, 6, 7], [-1.0, -2.0, -3.0], [2]) == ([5, 6, 7], [-1.0, -2.0, -3.0], "length")
    assert trim_at_stop([5, 2], [-1.0], [2]) == ([5], [-1.0], "length")  # one log-prob per id, always


@pytest.fixture(scope="module")
def base_model_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model as a *base* model declares itself: eos = <|endoftext|> (a Qwen2.5 base model's eos),
    while its ChatML template closes turns with <|im_end|>; weights that emit <|im_end|> greedily."""
    import json
    import shutil

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_dir, out)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):
        data = json.loads((out / name).read_text())
        data[key] = "<|endoftext|>" if key == "eos_token" else endoftext
        (out / name).write_text(json.dumps(data))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    sd = eos_loving_state_dict(model.state_dict(), im_end)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_im_end_stops_a_turn_even_where_eos_is_endoftext(base_model_dir):
    from agentevolver.alfworld.agent import TurnView
    from agentevolver.module.agent_flow.llm_policy import LLMPolicy

    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eng = make_rollout_engine("hf", str(base_model_dir), rollout_cfg(), "cpu", torch.float32)
    assert eng.eos_token_ids == [tok.convert_tokens_to_ids("<|endoftext|>")] and im_end not in eng.eos_token_ids
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "look"}], add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False)
    (raw,) = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert raw.token_ids == [im_end] * 6 and raw.finish_reason == "length"  # eos alone never ends the turn
    policy = LLMPolicy(tok, eng.generate, SamplingParams(temperature=0.0, max_tokens=6), 4096, 64, mode="trajectory")
    for t in range(2):
        policy.act([TurnView("a", "put a cd in desk.", f"obs {t}", ["look"], [], t, {})])
    row = policy.trajectory("a")
    model_ids = [i for i, m in zip(row.response_ids, row.response_mask) if m]
    assert model_ids == [im_end, im_end]  # each turn: exactly the one token up to and including <|im_end|>
    assert len(row.log_probs) == len(row.response_ids) and row.log_probs[0] == pytest.approx(raw.log_probs[0])
    turn_two = row.response_ids[1:row.response_mask.index(1, 1)]
    assert tok.decode(turn_two).startswith("\n<|im_start|>user\n")  # no second <|im_end|> added: it was sampled
