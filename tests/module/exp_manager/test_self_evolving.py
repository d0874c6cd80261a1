"""Issue 16 units: curriculum weights, experience pool / summariser / template stripping, exp_mask on
guided and replayed rows, the HET loss on a mixed batch against a plain loop, the on/off loss split.

No Ray here: the policy's rollout engine is a fixed-token generator (the engine is not under test; the
token bookkeeping, prompts and masks are)."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agentevolver.alfworld.agent import TurnView, accepted_actions, build_messages
from agentevolver.module.agent_flow.llm_policy import LLMPolicy
from agentevolver.module.exp_manager.experience import (
    EpisodeRecord,
    Experience,
    ExperiencePool,
    allocate_modes,
    inject_experience,
    strip_experience,
    summarise_rule,
)
from agentevolver.module.exp_manager.het_actor import _ppo_micro_loss
from agentevolver.module.exp_manager.het_core_algos import (
    AGG_LOSS_MODES,
    count_tokens_and_seqs,
    dapo_compute_policy_loss,
)
from agentevolver.module.exp_manager.replay import SuccessReplay
from agentevolver.module.trainer.task_source import Curriculum, success_pq_weights
from agentevolver.workers.rollout.base import GenOutput, SamplingParams

TEMPLATE = OmegaConf.load("config/base.yaml").exp_manager.experience_template


# ----------------------------------------------------------------------------- curriculum
def test_success_pq_weights_peak_mid_range():
    w = success_pq_weights(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]), 0.02)
    # p̂ = 1/12, 6/12, 11/12, 1/2 -> p̂(1-p̂)
    assert w == pytest.approx([max(1 / 12 * 11 / 12, 0.02), 0.25, max(11 / 12 / 12, 0.02), 0.25])
    assert success_pq_weights(np.array([0]), np.array([1000]), 0.02)[0] == pytest.approx(0.02)


def test_curriculum_weights_follow_success_and_roundtrip():
    c = Curriculum("success_pq", ["a", "b", "c"], {"receptacles": 2}, window=4, min_weight=0.01)
    for _ in range(4):
        c.observe("a", {"receptacles": 0}, True)   # solved
        c.observe("b", {"receptacles": 1}, False)  # hopeless
    c.observe("c", {"receptacles": 1}, True)
    c.observe("c", {"receptacles": 1}, False)       # mid-range
    p = c.probs("type")
    assert p.argmax() == 2 and p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(p[1])  # 5/6·1/6 both
    m = c.metrics()
    assert m["curriculum/weight/c"] == pytest.approx(p[2]) and m["curriculum/success/a"] == 1.0
    assert "curriculum/weight/receptacles/1" in m
    c.observe("a", {"receptacles": 0}, False)  # window 4: the oldest win falls out
    assert list(c.recent["type:a"]) == [1, 1, 1, 0]
    d = Curriculum("success_pq", ["a", "b", "c"], {"receptacles": 2}, window=4, min_weight=0.01)
    d.load_state_dict(c.state_dict())
    assert np.array_equal(d.probs("type"), c.probs("type")) and np.array_equal(d.probs("receptacles"),
                                                                               c.probs("receptacles"))


# ----------------------------------------------------------------------------- experiences
def test_rule_summary_and_accepted_actions():
    hist = [("You are in the middle of a room.", "go to countertop 1"), ("On the countertop 1, you see an apple 1.",
            "take apple 1 from countertop 1"), ("You pick up the apple 1.", "go to cabinet 2"),
            ("Nothing happens.", "go to sinkbasin 1"), ("On the sinkbasin 1, you see nothing.", "clean apple 1 with sinkbasin 1"),
            ("You clean the apple 1.", "go to fridge 1"), ("The fridge 1 is open.", "move apple 1 to fridge 1")]
    actions = accepted_actions(hist)
    assert "go to cabinet 2" not in actions and len(actions) == 6
    rec = EpisodeRecord("t1", "pick_clean_then_place_in_recep", "put a clean apple in fridge.", actions, True)
    text = summarise_rule([rec, EpisodeRecord("t2", "x", "y", actions, False)])
    assert text == [("to put a clean apple in fridge: go to countertop, take the apple from the countertop; "
                    "go to sinkbasin, clean the apple with the sinkbasin; go to fridge, move the apple to the fridge"),
                    None]


def test_pool_bounded_and_retrieval_by_type_and_similarity():
    pool = ExperiencePool(max_size=3, max_per_task=1)
    pool.add(Experience("t1", "clean", "put a clean apple in fridge.", "A"))
    pool.add(Experience("t2", "clean", "put a clean mug in coffeemachine.", "B"))
    pool.add(Experience("t3", "heat", "put a hot apple in fridge.", "C"))
    assert pool.retrieve("clean", "put a clean apple in countertop.", 2) == ["A", "B"]
    assert pool.retrieve("heat", "put a clean apple in fridge.", 2) == ["C"]
    assert not pool.add(Experience("t1", "clean", "put a clean apple in fridge.", "A"))  # duplicate
    pool.add(Experience("t1", "clean", "put a clean apple in fridge.", "A2"))  # per task: newest only
    assert [e.content for e in pool.items] == ["B", "C", "A2"]
    pool.add(Experience("t4", "cool", "cool", "D"))  # size 3: the oldest goes
    assert [e.content for e in pool.items] == ["C", "A2", "D"]
    again = ExperiencePool(3, 1)
    again.load_state_dict(pool.state_dict())
    assert [e.content for e in again.items] == ["C", "A2", "D"]


def test_allocate_modes():
    guided, keep = allocate_modes(4, 4, "mixed", 0.5, "hybrid", 0.5)
    assert guided == [[True, True, False, False]] * 4 and keep == [True, True, False, False]
    assert allocate_modes(2, 3, "woexp", 0.5, "alldiscard", 0.0) == ([[False] * 3] * 2, [False, False])
    with pytest.raises(ValueError, match="valid: woexp, mixed, all"):
        allocate_modes(1, 1, "some", 0.5, "allkeep", 0)


# ----------------------------------------------------------------------------- prompts and masks
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_strip_gives_the_byte_identical_unguided_prompt(tokenizer):
    msgs = build_messages("put a clean apple in fridge.", "You are in the middle of a room.",
                          ["go to fridge 1", "go to sinkbasin 1"], [("obs 0", "go to fridge 1")], 2)
    plain = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    guided = tokenizer.apply_chat_template(inject_experience(msgs, TEMPLATE, ["to do x: go to a, take the b",
                                                                            "second tip"]),
                                           add_generation_prompt=True, tokenize=False)
    assert "second tip" in guided and guided != plain
    assert strip_experience(guided, TEMPLATE) == plain
    assert strip_experience(plain, TEMPLATE) == plain  # nothing to strip


class FixedEngine:
    """Answers every prompt with the same ids (`<action>go to fridge 1</action>` + eos)."""

    def __init__(self, tokenizer):
        self.ids = tokenizer.encode("<action>go to fridge 1</action>", add_special_tokens=False) + [
            tokenizer.eos_token_id]
        self.prompts: list[list[int]] = []

    def __call__(self, prompts, params):
        self.prompts += prompts
        return [[GenOutput(list(self.ids), [-0.5] * len(self.ids), "stop", 0)] for _ in prompts]


def _play(tokenizer, mode: str, guide, turns: int = 2, eids=("e0", "e1", "e2")):
    engine = FixedEngine(tokenizer)
    policy = LLMPolicy(tokenizer, engine, SamplingParams(max_tokens=16), 1024, 512, mode=mode,
                       history_window=2 if mode == "step" else None, guide=guide, experience_template=TEMPLATE)
    views = {e: TurnView(e, "put a clean apple in fridge.", "You are in a room.", ["go to fridge 1"], [], 0,
                         {"task_type": "pick_clean_then_place_in_recep"}) for e in eids}
    for t in range(turns):
        policy.act(list(views.values()))
        for v in views.values():
            v.history = v.history + [(v.observation, "go to fridge 1")]
            v.observation, v.step = f"observation {t + 1}", t + 1
    rows = [{"traj_id": e, "uid": "g", "task_id": "t", "task_type": "x", "reward": 1.0, "won": True,
             "exp_replayed": False, "finish_reason": "success", "steps": turns, "format_errors": 0,
             "invalid_actions": 0, "projected_actions": 0} for e in eids]
    return policy.to_batch(rows), engine


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_exp_mask_exactly_on_discarded_guided_rows(tokenizer, mode):
    plan = {"e0": False, "e1": True}  # e0 guided + stripped (off-policy), e1 guided + kept, e2 unguided
    batch, engine = _play(tokenizer, mode, lambda v: (["tip one"], plan[v.episode_id]) if v.episode_id in plan else None)
    plain, _ = _play(tokenizer, mode, None)
    eid = batch.ids["episode_id"]
    off = torch.as_tensor(eid == "e0")
    expected = batch["response_mask"] * off[:, None].float()
    assert torch.equal(batch["exp_mask"], expected) and expected.sum() > 0
    # the stripped training prompt is token-identical to the unguided run's; the kept one is not
    def prompt(b, i):  # the row's prompt ids without left padding
        return b["prompts"][i][b["prompt_attention_mask"][i].bool()].tolist()

    assert plain.ids["traj_id"].tolist() == batch.ids["traj_id"].tolist()
    for i, e in enumerate(eid.tolist()):
        assert (prompt(batch, i) == prompt(plain, i)) == (e != "e1"), (i, e)  # only the kept row differs
    has_tip = ["- tip one" in tokenizer.decode(p) for p in engine.prompts]
    assert sum(has_tip) == 4  # e0 and e1 sampled under the guided prompt at both turns, e2 never
    assert batch.ids["exp_guided"].tolist() == [e in plan for e in eid.tolist()]


def test_dagger_relabel_rows_answer_the_turns_prompts_with_the_expert(tokenizer):
    engine = FixedEngine(tokenizer)
    expert = {0: "take apple 1 from fridge 1", 1: None, 2: "go to sinkbasin 1"}  # turn 1: the expert cannot tell
    policy = LLMPolicy(tokenizer, engine, SamplingParams(max_tokens=16), 1024, 512, mode="step", history_window=2,
                       expert=lambda v: expert[v.step])
    views = [TurnView(e, "put a clean apple in fridge.", "You are in a room.", ["go to fridge 1"], [], 0, {})
             for e in ("e0", "e1")]
    for t in range(3):
        policy.act(views)
        for v in views:
            v.history = v.history + [(v.observation, "go to fridge 1")]
            v.observation, v.step = f"observation {t + 1}", t + 1
    assert policy.relabel("e0", "e0~dagger") == 2 and policy.relabel("nobody", "x") == 0
    rows = [{"traj_id": e, "uid": "g", "task_id": "t", "task_type": "x", "reward": r, "won": bool(r),
             "exp_replayed": e.endswith("~dagger"), "finish_reason": "dagger" if r else "max_steps", "steps": 3,
             "format_errors": 0, "invalid_actions": 0, "projected_actions": 0}
            for e, r in (("e0", 0.0), ("e1", 0.0), ("e0~dagger", 1.0))]
    batch = policy.to_batch(rows)
    dagger = batch.ids["episode_id"] == "e0~dagger"
    assert dagger.sum() == 2 and batch.ids["is_last"][dagger].tolist() == [False, True]
    assert torch.equal(batch["exp_mask"], batch["response_mask"] * torch.as_tensor(dagger)[:, None].float())
    assert batch.ids["turn"][dagger].tolist() == [0, 1]

    def prompt(i):
        return batch["prompts"][i][batch["prompt_attention_mask"][i].bool()].tolist()

    def response(i):
        return tokenizer.decode(batch["responses"][i][batch["response_mask"][i].bool()].tolist(),
                                skip_special_tokens=True)

    source = {t: i for i, (e, t) in enumerate(zip(batch.ids["episode_id"], batch.ids["turn"])) if e == "e0"}
    relabelled = np.flatnonzero(dagger)
    for i, turn in zip(relabelled, (0, 2)):  # the turns the expert labelled, under exactly their prompts
        assert prompt(i) == prompt(source[turn])
        assert response(i) == f"<action>{expert[turn]}</action>"
    assert (batch["token_level_rewards"][relabelled].sum(-1) == 1.0).all()


def test_replay_marks_replayed_rows_and_joins_the_group(tokenizer):
    won, _ = _play(tokenizer, "step", None, eids=("a0",))
    replay = SuccessReplay(max_tasks=4, max_per_task=2)
    assert replay.add_successes(won) == 1
    batch, _ = _play(tokenizer, "step", None, eids=("b0", "b1", "b2"))
    batch.ids["won"][:] = False
    batch.ids["uid"] = np.array(["s1-0"] * len(batch))
    out, rows = replay.replace_failures(batch, success_threshold=0.5, max_per_group=1)
    replayed = out.ids["exp_replayed"].astype(bool)
    assert rows == len(won) == replayed.sum()
    assert set(out.ids["episode_id"][replayed]) == {"b2~replay"} and "b2" not in set(out.ids["episode_id"])
    assert (out.ids["uid"] == "s1-0").all() and out.ids["won"][replayed].all()
    assert torch.equal(out["exp_mask"], out["response_mask"] * torch.as_tensor(replayed)[:, None].float())
    assert len(set(out.ids["traj_id"])) == len(out)
    again = SuccessReplay(4, 2)
    again.load_state_dict(replay.state_dict())
    assert torch.equal(again.replace_failures(batch, 0.5, 1)[0]["responses"], out["responses"])
    by_type = SuccessReplay(4, 2, match="task_type")
    by_type.add_successes(won)
    other = batch.select(np.arange(len(batch)))
    other.ids["task_id"] = np.array(["another game"] * len(other))
    assert replay.replace_failures(other, 0.5, 1)[1] == 0  # task_id: nothing stored for that game
    assert replay.wanting(other, 0.5) == ["another game"] and replay.wanting(batch, 0.5) == []
    assert by_type.wanting(other, 0.5) == []  # the type has a stored success
    assert by_type.replace_failures(other, 0.5, 1)[1] == len(won)  # task_type: the type's success
    # a group at or above the threshold is left alone
    batch.ids["won"][:] = True
    assert replay.replace_failures(batch, 0.5, 1)[1] == 0


# ----------------------------------------------------------------------------- the HET loss
def _reference(old, new, adv, mask, exp, low, high, off_high, c, mode):
    """Plain loop: per token the DAPO loss with eps_high = off_high on exp tokens, then aggregation."""
    B, T = mask.shape
    per = [[0.0] * T for _ in range(B)]
    for i, t in itertools.product(range(B), range(T)):
        r = float(torch.exp(torch.clamp(new[i, t] - old[i, t], -20, 20)))
        a = float(adv[i, t])
        h = off_high if exp[i, t] else high
        l_clip = max(-a * r, -a * min(max(r, 1 - low), 1 + h))
        per[i][t] = min(l_clip, -a * c) if a < 0 else l_clip
    rows = [i for i in range(B) if mask[i].sum() > 0]
    if mode == "token-mean":
        return sum(per[i][t] * float(mask[i, t]) for i in range(B) for t in range(T)) / float(mask.sum())
    if mode == "seq-mean-token-sum":
        return sum(sum(per[i][t] * float(mask[i, t]) for t in range(T)) for i in rows) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(per[i][t] * float(mask[i, t]) for t in range(T)) / float(mask[i].sum()) for i in rows) / len(rows)
    return sum(sum(per[i][t] * float(mask[i, t]) for t in range(T)) for i in rows) / len(rows) / T


def _actor_config(mode: str, imitation_coef: float) -> SimpleNamespace:
    """The actor settings `_ppo_micro_loss` reads: vanilla DAPO, off-policy tokens clipped at 0.6."""
    return SimpleNamespace(loss_agg_mode=mode, loss_scale_factor=None, clip_ratio_low=0.2, clip_ratio_high=0.28,
                           clip_ratio_c=3.0, off_cliprange_high=0.6, use_kl_loss=False, imitation_coef=imitation_coef,
                           policy_loss=SimpleNamespace(loss_mode="vanilla", clip_cov_ratio=0.0002, clip_cov_lb=1.0,
                                                       clip_cov_ub=5.0, kl_cov_ratio=0.0002, ppo_kl_coef=0.1))


@pytest.mark.parametrize("mode", AGG_LOSS_MODES)
@pytest.mark.parametrize("split", [[8], [3, 5], [1, 2, 2, 3]])
def test_het_loss_mixed_batch_equals_plain_loop(mode, split):
    g = torch.Generator().manual_seed(7)
    B, T = 8, 6
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    new = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[5] = 0  # an empty row
    exp = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float64)[:, None] * mask
    kw = {"cliprange_low": 0.2, "cliprange_high": 0.28, "clip_ratio_c": 3.0, "off_cliprange_high": 0.6, "loss_agg_mode": mode}
    tokens, seqs = count_tokens_and_seqs(mask)
    want = _reference(old, new, adv, mask, exp, 0.2, 0.28, 0.6, 3.0, mode)
    total, start = 0.0, 0
    on_off = [0.0, 0.0]
    config = _actor_config(mode, imitation_coef=0.0)
    for size in split:
        sl = slice(start, start + size)
        start += size
        out = dapo_compute_policy_loss(old[sl], new[sl], adv[sl], mask[sl], exp_mask=exp[sl], global_tokens=tokens,
                                       global_seqs=seqs, **kw)
        total += out["pg_loss"].item()
        mb = {"old_log_probs": old[sl], "advantages": adv[sl], "exp_mask": exp[sl]}
        _, parts = _ppo_micro_loss(config, mb, mask[sl], new[sl], torch.zeros_like(new[sl]), tokens, seqs, 0.0)
        assert parts[6] + parts[7] == pytest.approx(parts[0], abs=1e-12)
        on_off[0], on_off[1] = on_off[0] + parts[6], on_off[1] + parts[7]
    assert total == pytest.approx(want, rel=1e-10, abs=1e-12)
    off_rows = exp.sum(-1) > 0
    want_off = _reference(old, new, adv, mask * off_rows[:, None], exp, 0.2, 0.28, 0.6, 3.0, mode) if mode == \
        "token-mean" else None
    if want_off is not None:  # token-mean: the off share is Σ_off / N_all
        assert on_off[1] == pytest.approx(want_off * float((mask * off_rows[:, None]).sum()) / float(mask.sum()))
    # on-policy tokens really clip at clip_ratio_high: the same batch without exp_mask differs
    plain = dapo_compute_policy_loss(old, new, adv, mask, global_tokens=tokens, global_seqs=seqs, **kw)["pg_loss"]
    assert plain.item() == pytest.approx(_reference(old, new, adv, mask, exp * 0, 0.2, 0.28, 0.6, 3.0, mode))


@pytest.mark.parametrize("mode", AGG_LOSS_MODES)
@pytest.mark.parametrize("split", [[8], [3, 5], [1, 2, 2, 3]])
def test_self_imitation_term_equals_plain_loop(mode, split):
    """actor.imitation_coef: + coef · NLL over off-policy tokens with A > 0, on pg_loss's denominators, for
    any micro-batch split (value and gradient), and nothing from on-policy or negative-advantage tokens."""
    g = torch.Generator().manual_seed(11)
    B, T, coef = 8, 6, 0.5
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[5] = 0
    exp = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float64)[:, None] * mask
    tokens, seqs = count_tokens_and_seqs(mask)
    imitate = mask * exp * (adv > 0)
    nll = [[0.0] * T for _ in range(B)]  # the plain loop: -logp on imitated tokens, then the mode's mean
    base = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    for i, t in itertools.product(range(B), range(T)):
        nll[i][t] = -float(base[i, t]) * float(imitate[i, t])
    tot = sum(map(sum, nll))
    if mode == "token-mean":
        want = tot / float(mask.sum())
    elif mode == "seq-mean-token-mean":
        want = sum(sum(nll[i]) / float(imitate[i].sum()) for i in range(B) if imitate[i].sum()) / float(seqs)
    else:
        want = tot / float(seqs) / (T if mode == "seq-mean-token-sum-norm" else 1)
    assert 0 < imitate.sum() < (mask * exp).sum()  # some off-policy tokens have A <= 0: they are not imitated
    config = _actor_config(mode, imitation_coef=coef)
    new = base.clone().requires_grad_(True)
    imit_sum, extra, start = 0.0, 0.0, 0
    for size in split:
        sl = slice(start, start + size)
        start += size
        mb = {"old_log_probs": old[sl], "advantages": adv[sl], "exp_mask": exp[sl]}
        total, parts = _ppo_micro_loss(config, mb, mask[sl], new[sl], torch.zeros_like(old[sl]), tokens, seqs, 0.0)
        total.backward()
        imit_sum += parts[8]
        extra += total.item() - parts[0]
    assert imit_sum == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert extra == pytest.approx(coef * want, rel=1e-9, abs=1e-12)
    whole = new.detach().clone().requires_grad_(True)
    config.imitation_coef = 0.0
    plain, _ = _ppo_micro_loss(config, {"old_log_probs": old, "advantages": adv, "exp_mask": exp}, mask, whole,
                               torch.zeros_like(old), tokens, seqs, 0.0)
    plain.backward()
    # the gradient difference is exactly the imitation term's: -coef / denominator on imitated tokens only
    diff = new.grad - whole.grad
    assert torch.all(diff[imitate == 0] == 0)
    assert torch.all(diff[imitate > 0] < 0)


def test_llm_summariser_runs_on_the_tiny_model(tiny_model_dir, tokenizer):
    """The `llm` summariser through the real HF engine (the tiny model writes noise, but it runs,
    one tip per success, greedy so repeatable)."""
    from agentevolver.module.exp_manager.experience import SummaryContext, get_summarizer
    from agentevolver.workers.rollout import make_rollout_engine

    cfg = OmegaConf.load("config/base.yaml").actor_rollout_ref.rollout
    engine = make_rollout_engine("hf", str(tiny_model_dir), cfg, "cpu", torch.float32)
    ctx = SummaryContext(tokenizer, engine.generate, max_tokens=12, seed=3)
    actions = ["go to sinkbasin 1", "clean apple 1 with sinkbasin 1"]
    recs = [EpisodeRecord("t", "clean", "put a clean apple in fridge.", actions, True),
            EpisodeRecord("u", "clean", "x", ["go to a 1"], False)]
    first = get_summarizer("llm")(recs, ctx)
    assert isinstance(first[0], str) and first[0] and first[1] is None and "\n" not in first[0]
    assert get_summarizer("llm")(recs, ctx) == first
    with pytest.raises(ValueError, match="valid: rule, llm"):
        get_summarizer("gpt")


@pytest.mark.parametrize("key,value,message", [
    ("data.task_source", "online", "must be one of fixed, generated"),
    ("data.task_gen.curriculum", "hard_first", "must be one of uniform, success_pq"),
    ("data.task_gen.receptacles", [[4, 3]], "each [lo, hi] with lo <= hi"),
    ("data.task_gen.receptacles", [[2, 3]], "an integer >= 3 and <= 25"),
    ("exp_manager.train_rollout_expmode", "some", "must be one of woexp, mixed, all"),
    ("exp_manager.train_sample_expmode", "keep", "must be one of allkeep, alldiscard, hybrid"),
    ("exp_manager.summarizer", "gpt", "must be one of rule, llm"),
    ("exp_manager.experience_template", "Tips: {experience}", "must contain {experience} exactly once, followed"),
    ("exp_manager.replay.match", "room", "must be one of task_id, task_type"),
    ("exp_manager.replay.teacher", "oracle", "must be one of walkthrough, explore, or null"),
    ("exp_manager.replay.teacher", "explore", "needs exp_manager.replay.enable=true"),
    ("exp_manager.rollout_expratio", 1.5, "<= 1"),
    ("actor_rollout_ref.actor.imitation_coef", 0.5, "needs off-policy tokens: exp_manager.replay.enable=true"),
    ("actor_rollout_ref.actor.imitation_coef", -1, ">= 0"),
    ("exp_manager.dagger.enable", True, "needs env.rollout_mode=step"),
    ("exp_manager.dagger.max_per_group", 0, ">= 1"),
])
def test_config_check_one_line(key, value, message):
    from agentevolver.module.trainer.config_check import ConfigError, check_values

    def cfg_with(**over):
        cfg = OmegaConf.load("config/base.yaml")
        cfg.actor_rollout_ref.model.path = "/some/model"
        cfg.trainer.total_training_steps = 3
        for k, v in over.items():
            OmegaConf.update(cfg, k, v)
        return cfg

    check_values(cfg_with())  # the defaults pass
    with pytest.raises(ConfigError) as err:
        check_values(cfg_with(**{key: value}))
    assert str(err.value).startswith(key) and message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="trainer.total_training_steps=None is invalid: data.task_source=generated"):
        check_values(cfg_with(**{"data.task_source": "generated", "trainer.total_training_steps": None}))
