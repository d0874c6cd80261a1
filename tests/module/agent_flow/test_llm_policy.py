"""LLMPolicy token bookkeeping in both rollout modes, on the project's tiny tokenizer.

The generate function is a deterministic stand-in for the rollout engine (the engine has its own
tests); what is under test is the policy: prompts, rows, masks, log-probs, ids and rewards.
"""
from __future__ import annotations

import pytest

from agentevolver.alfworld.agent import (
    SYSTEM_PROMPT,
    TurnView,
    build_messages,
    format_observation_turn,
    system_prompt,
)
from agentevolver.module.agent_flow.llm_policy import ChatTemplateError, LLMPolicy, chat_turns
from agentevolver.workers.rollout.base import GenOutput, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def episode(traj_id: str, uid: str, reward: float) -> dict:
    """An episode's ids as the trainer hands them over (protocol.EPISODE_IDS) plus its reward."""
    return {"traj_id": traj_id, "uid": uid, "task_id": "t", "task_type": "pick_and_place_simple",
            "finish_reason": "success" if reward > 0 else "max_steps", "won": reward > 0, "steps": 3,
            "format_errors": 0, "invalid_actions": 0, "projected_actions": 0, "exp_replayed": False,
            "reward": reward}


def make_policy(tokenizer, mode: str, window=None, max_prompt_length: int = 4096, system: str = SYSTEM_PROMPT):
    calls = []

    def generate(prompts, params):
        calls.append([list(p) for p in prompts])
        ids = tokenizer.encode("<action>look</action>", add_special_tokens=False) + [tokenizer.eos_token_id]
        return [[GenOutput(ids, [-0.5] * len(ids), "stop", 3)] for _ in prompts]

    policy = LLMPolicy(tokenizer, generate, SamplingParams(max_tokens=16), max_prompt_length, 2048,
                       mode=mode, history_window=window, system=system)
    return policy, calls


def play(policy, turns: int) -> None:
    """Two episodes; episode b ends one turn early. Histories grow as run_episodes grows them."""
    history = {"a": [], "b": []}
    for t in range(turns):
        views = [TurnView(eid, "put a cd in desk.", f"obs {eid} {t}", ["look", "go to desk 1"], list(history[eid]),
                          t, {}) for eid in ("a", "b") if not (eid == "b" and t == turns - 1)]
        for view, out in zip(views, policy.act(views)):
            assert out.text == "<action>look</action>"
            history[view.episode_id].append((view.observation, "look"))


def test_step_mode_rows_per_turn_with_windowed_prompts(tokenizer):
    policy, calls = make_policy(tokenizer, "step", window=1)
    play(policy, 3)
    # each turn's prompt is built fresh: task + last 1 (observation, action) pair + current observation
    views_a2 = build_messages("put a cd in desk.", "obs a 2", ["look", "go to desk 1"],
                              [("obs a 0", "look"), ("obs a 1", "look")], history_window=1)
    expected = tokenizer.encode(tokenizer.apply_chat_template(views_a2, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)
    assert calls[2][0] == expected
    batch = policy.to_batch([episode("a", "g", 1.0), episode("b", "g", 0.0)])
    assert batch.ids["traj_id"].tolist() == ["a/t0", "a/t1", "a/t2", "b/t0", "b/t1"]
    assert batch.ids["episode_id"].tolist() == ["a", "a", "a", "b", "b"]
    assert batch.ids["is_last"].tolist() == [False, False, True, False, True]
    assert batch.ids["anchor"].tolist() == ["obs a 0", "obs a 1", "obs a 2", "obs b 0", "obs b 1"]  # GiGPO's states
    assert batch.ids["num_turns"].tolist() == [3, 3, 3, 2, 2]
    action_len = len(tokenizer.encode("<action>look</action>", add_special_tokens=False)) + 1
    assert batch["response_mask"].sum(-1).tolist() == [action_len] * 5  # only model tokens, every row
    # every row carries its episode's reward on its last model token; log-probs are the engine's
    assert batch["token_level_rewards"].sum(-1).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert batch["rollout_log_probs"][0, :action_len].tolist() == [-0.5] * action_len
    assert policy.response_length("a") == action_len


def test_the_brief_system_message_replaces_the_full_one_in_every_prompt(tokenizer):
    """env.system_prompt=brief: the same prompts with the other system message, so the same tokens fewer in each."""
    brief = system_prompt("move", "brief")
    prompts = {}
    for system in (SYSTEM_PROMPT, brief):
        policy, calls = make_policy(tokenizer, "step", window=2, system=system)
        play(policy, 2)
        prompts[system] = [p for call in calls for p in call]
        assert [tokenizer.decode(p).count(system) for p in prompts[system]] == [1, 1, 1]
    assert SYSTEM_PROMPT not in tokenizer.decode(prompts[brief][0])
    saved = {len(full) - len(short) for full, short in zip(prompts[SYSTEM_PROMPT], prompts[brief])}
    assert len(saved) == 1 and saved.pop() > 50


def test_trajectory_mode_one_row_per_episode(tokenizer):
    policy, calls = make_policy(tokenizer, "trajectory")
    play(policy, 3)
    assert calls[1][0][:len(calls[0][0])] == calls[0][0]  # each prompt extends the previous one
    batch = policy.to_batch([episode("a", "g", 1.0), episode("b", "g", 0.0)])
    assert batch.ids["traj_id"].tolist() == ["a", "b"] and batch.ids["is_last"].tolist() == [True, True]
    action_len = len(tokenizer.encode("<action>look</action>", add_special_tokens=False)) + 1
    assert batch["response_mask"].sum(-1).tolist() == [3 * action_len, 2 * action_len]


def test_step_mode_prompt_over_budget_ends_the_episode(tokenizer):
    policy, calls = make_policy(tokenizer, "step", window=None, max_prompt_length=10)
    out = policy.act([TurnView("a", "task", "obs", ["look"], [], 0, {})])
    assert out[0].finish_reason == "prompt_too_long" and calls == []
    batch = policy.to_batch([episode("a", "g", 0.0)])
    assert len(batch) == 1 and batch["response_mask"].sum() == 0  # one empty row: counted, never trained on


# ----------------------------------------------------------------------------- chat template turns
# Not ChatML: "role: content" turns closed by <|endoftext|> (appends, with other delimiters).
OTHER_APPENDING = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + ': ' + message['content'] + "
    "'<|endoftext|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant: ' }}{%- endif %}"
)


def with_template(tokenizer, template: str):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_turn_delimiters_come_from_the_template(tokenizer):
    turns = chat_turns(tokenizer)
    assert turns.appends and turns.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turns.next_turn == ("\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")  # ChatML, derived
    other = with_template(tokenizer, OTHER_APPENDING)
    turns = chat_turns(other)
    assert turns.appends and turns.end_of_turn_id == other.convert_tokens_to_ids("<|endoftext|>")
    assert turns.next_turn == ("<|im_start|>user: ", "<|endoftext|><|im_start|>assistant: ")


def test_trajectory_tokens_equal_the_re_rendered_conversation_under_another_template(tokenizer):
    tok = with_template(tokenizer, OTHER_APPENDING)
    eot = chat_turns(tok).end_of_turn_id
    calls, params_seen = [], []
    action = tok.encode("<action>look</action>", add_special_tokens=False)

    def generate(prompts, params):
        calls.append([list(p) for p in prompts])
        params_seen.append(params)
        return [[GenOutput(action + [eot], [-0.5] * (len(action) + 1), "stop", 0)] for _ in prompts]

    policy = LLMPolicy(tok, generate, SamplingParams(max_tokens=16, stop_token_ids=[7]), 4096, 2048,
                       mode="trajectory")
    for t in range(2):
        policy.act([TurnView("a", "put a cd in desk.", f"obs {t}", ["look"], [], t, {})])
    messages = build_messages("put a cd in desk.", "obs 0", ["look"], []) + [
        {"role": "assistant", "content": "<action>look</action>"},
        {"role": "user", "content": format_observation_turn("obs 1", ["look"])}]
    rendered = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    assert calls[1][0] == rendered  # token for token what the template would have built
    assert params_seen[0].stop_token_ids == sorted({7, eot})  # the template's end-of-turn always stops a turn


def test_a_template_that_does_not_append_is_refused_in_trajectory_mode(tokenizer, drops_think_template):
    tok = with_template(tokenizer, drops_think_template)
    turns = chat_turns(tok)
    assert not turns.appends and "drops its <think> block" in turns.why_not
    with pytest.raises(ChatTemplateError, match="trajectory mode needs a chat template that appends"):
        LLMPolicy(tok, None, SamplingParams(), 4096, 2048, mode="trajectory")
    LLMPolicy(tok, None, SamplingParams(), 4096, 2048, mode="step")  # step mode renders every prompt afresh


def test_a_response_without_end_of_turn_is_closed_before_the_next_turn(tokenizer):
    eot = chat_turns(tokenizer).end_of_turn_id
    action = tokenizer.encode("<action>look</action>", add_special_tokens=False)

    def generate(prompts, params):  # stopped on another eos id (<|endoftext|>), not the template's
        return [[GenOutput(action + [tokenizer.pad_token_id], [-0.5] * (len(action) + 1), "stop", 0)]]

    policy = LLMPolicy(tokenizer, generate, SamplingParams(max_tokens=16), 4096, 2048, mode="trajectory")
    for t in range(2):
        policy.act([TurnView("a", "task", f"obs {t}", ["look"], [], t, {})])
    row = policy.trajectory("a")
    n = len(action) + 1
    assert row.response_ids[:n + 1] == action + [tokenizer.pad_token_id, eot]  # the sampled ids, then eot
    assert row.response_mask[:n + 1] == [1] * n + [0]  # the added eot is not the model's
