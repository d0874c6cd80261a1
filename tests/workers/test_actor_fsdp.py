"""The FSDP2 actor on real gloo process groups (torch.multiprocessing spawn), tiny random Qwen2."""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from agentevolver.protocol import Batch, with_model_inputs
from agentevolver.utils.dist import free_port
from tests.helpers import make_batch, make_config, make_tiny_model


def _spawn_target(rank: int, world: int, port: int, scenario: str, args: dict, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from agentevolver.workers.fsdp_worker import ActorRolloutRefWorker

    w = ActorRolloutRefWorker(args["config"], rank, world, "127.0.0.1", port, enable_rollout=False)
    w.init_model()
    batch = args["batch"]
    shard = batch.chunk(world)[rank]
    result = SCENARIOS[scenario](w, shard, args)
    if rank == 0:
        torch.save(result, out)
    w.shutdown()


def run_ranks(world: int, scenario: str, tmp_path: Path, **args: object) -> dict:
    out = tmp_path / f"{scenario}_{world}_{free_port()}.pt"
    mp.spawn(_spawn_target, args=(world, free_port(), scenario, args, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------- scenarios (run inside every rank)
def _set_mbs(w, mbs: int) -> None:
    w.config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu = mbs


def sc_update(w, shard, args):
    """Micro-batching variants from the same initial state (restored from an init checkpoint): an int is
    ppo_micro_batch_size_per_gpu; a dict holds actor_rollout_ref overrides (token budgets, packing)."""
    res = {}
    if len(args["mbs"]) > 1:
        w.save_checkpoint(args["ckpt"])
    for i, mbs in enumerate(args["mbs"]):
        if i:
            w.load_checkpoint(args["ckpt"])
        if isinstance(mbs, dict):
            for k, v in mbs.items():
                OmegaConf.update(w.config, f"actor_rollout_ref.{k}", v)
            mbs = ",".join(f"{k}={v}" for k, v in mbs.items())
        else:
            _set_mbs(w, mbs)
        grads = _record_grads(w)
        metrics = w.update_actor(shard)
        res[mbs] = (w.get_full_state_dict(), metrics, grads)
    return res


def _record_grads(w) -> list:
    """The full accumulated gradient of every optimizer step (a collective, like the step itself)."""
    grads, step = [], type(w.optimizer).step

    def recording_step(*a, **k):
        grads.append(torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten()
                                for p in w.actor.parameters()]))
        return step(w.optimizer, *a, **k)

    w.optimizer.step = recording_step
    return grads


def sc_checkpoint(w, shard, args):
    w.update_actor(shard)
    w.save_checkpoint(args["ckpt"])
    m1 = w.update_actor(shard)
    a = w.get_full_state_dict()
    w.load_checkpoint(args["ckpt"])
    m2 = w.update_actor(shard)
    w.export_hf(args["export"])  # tied embeddings: lm_head must come back as the embedding
    return {"a": a, "b": w.get_full_state_dict(), "m1": m1, "m2": m2}


def sc_misc(w, shard, args):
    """Log-probs (rows reversed within the shard), a NaN update, a good update, SFT steps."""
    out = w.compute_log_prob(shard.select(np.arange(len(shard))[::-1].copy()), calculate_entropy=True)
    gathered = [None] * w.world_size
    torch.distributed.all_gather_object(gathered, out)
    ref = w.compute_ref_log_prob(shard)["ref_log_prob"] - w.compute_log_prob(shard)["old_log_probs"]
    # bypass_mode recomputes only the exp_mask rows: a rank may then hold none, and must still take part
    lone = w.compute_log_prob(shard.select(np.arange(1 if w.rank == 0 else 0)))
    res = {"logprob": Batch.concat(gathered), "before": w.get_full_state_dict(), "ref_vs_actor": ref.abs().max(),
           "lone": lone}
    res["nan"] = w.update_actor(args["bad"].chunk(w.world_size)[w.rank])
    res["after"] = w.get_full_state_dict()
    res["good"] = w.update_actor(shard)  # the run goes on
    res["final"] = w.get_full_state_dict()
    res["sft"] = [w.update_actor(shard, loss="sft")["actor/sft_loss"] for _ in range(args["sft_steps"])]
    return res


SCENARIOS = {"update": sc_update, "checkpoint": sc_checkpoint, "misc": sc_misc}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.mark.slow
def test_update_same_on_1_and_2_ranks_and_any_micro_batch(model_dir, tmp_path):
    # ppo_epochs=2: Adam's first step is ~lr·sign(g); the second depends on the gradient values
    cfg = make_config(model_dir, **{"actor.use_kl_loss": True, "actor.entropy_coeff": 0.01,
                                    "actor.grad_clip": 1e9, "actor.ppo_epochs": 2})
    batch = make_batch(7)  # odd: rank 0 holds 4 rows, rank 1 holds 3 (padded with a dummy row)
    one = run_ranks(1, "update", tmp_path, config=cfg, batch=batch, mbs=[4, 1], ckpt=str(tmp_path / "c1"))
    # 2 ranks: fixed rows, then token budgets (10 < the longest row of 14 tokens: rows run alone; 30:
    # uneven micro-batches, rank 1 with a dummy) with padding-free packing
    budgets = [{"actor.use_dynamic_bsz": True, "actor.ppo_max_token_len_per_gpu": b, "model.use_remove_padding": rp,
                "model.logprob_chunk_size": c} for b, rp, c in ((10, True, 3), (30, True, 1024), (30, False, 5))]
    two = run_ranks(2, "update", tmp_path, config=cfg, batch=batch, mbs=[1, *budgets], ckpt=str(tmp_path / "c2"))
    # Exactness is checked on the accumulated gradients of both optimizer steps (relative 1e-6). The
    # parameters after two AdamW steps at lr 1e-2 get a looser bound: Adam divides by sqrt(v), so the
    # elements whose gradient cancels to ~1e-8 turn fp32 rounding of differently-shaped (trimmed /
    # packed) micro-batches into ~1e-5 steps.
    for name, res in [("1 rank mbs 1", one[1])] + [(f"2 ranks {k}", v) for k, v in two.items()]:
        d = max_diff(one[4][0], res[0])
        g_rel = max(((a - b).norm() / a.norm()).item() for a, b in zip(one[4][2], res[2]))
        print(f"1 rank mbs 4 vs {name}: max|Δθ| {d:.3g}, grad rel diff {g_rel:.3g}")
        assert len(res[2]) == 2 and g_rel < 1e-6, name
        assert d < 5e-5, name
    for name, (state, metrics, _) in two.items():
        for k in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "actor/pg_clipfrac"):
            assert math.isclose(one[4][1][k], metrics[k], rel_tol=1e-5, abs_tol=1e-7), (name, k)
    m1 = one[4][1]
    assert m1["actor/skipped_steps"] == 0 and m1["actor/grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss_mode", ["gspo", "cispo"])
def test_loss_mode_and_is_weights_through_the_actor_on_any_split(model_dir, tmp_path, loss_mode):
    """policy_loss.loss_mode and the trainer's rollout_is_weights reach the loss through the real actor:
    the same update on 1 rank (micro-batches 4 and 1) and on 2 ranks, and the weights change it."""
    cfg = make_config(model_dir, **{"actor.policy_loss.loss_mode": loss_mode, "actor.grad_clip": 1e9,
                                    "actor.ppo_epochs": 2})
    batch = make_batch(7)
    g = torch.Generator().manual_seed(3)
    weights = (0.2 + 1.8 * torch.rand(batch["response_mask"].shape, generator=g)) * batch["response_mask"]
    weighted = Batch(batch.tensors | {"rollout_is_weights": weights}, batch.ids)
    one = run_ranks(1, "update", tmp_path, config=cfg, batch=weighted, mbs=[4, 1], ckpt=str(tmp_path / "c1"))
    two = run_ranks(2, "update", tmp_path, config=cfg, batch=weighted, mbs=[1], ckpt=str(tmp_path / "c2"))
    plain = run_ranks(1, "update", tmp_path, config=cfg, batch=batch, mbs=[4], ckpt=str(tmp_path / "c3"))
    # exact on the accumulated gradients; the parameters after two AdamW steps get the looser bound
    # explained in test_update_same_on_1_and_2_ranks_and_any_micro_batch (Adam's 1/sqrt(v) on ~0 grads)
    def grad_rel(a, b) -> float:
        return max(((x - y).norm() / x.norm()).item() for x, y in zip(a[2], b[2]))

    # (the second step's gradient is taken at parameters that already differ by that fp32 rounding)
    assert grad_rel(one[4], one[1]) < 1e-5 and grad_rel(one[4], two[1]) < 1e-5
    assert max_diff(one[4][0], one[1][0]) < 1e-4 and max_diff(one[4][0], two[1][0]) < 1e-4
    assert grad_rel(one[4], plain[4]) > 1e-2  # the weights are applied
    for k in ("actor/pg_loss", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl"):
        assert math.isclose(one[4][1][k], two[1][1][k], rel_tol=1e-5, abs_tol=1e-7), k


@pytest.mark.slow
def test_self_imitation_term_through_the_actor_on_any_split(model_dir, tmp_path):
    """actor.imitation_coef on off-policy rows (exp_mask) through the real actor: the same gradient and
    actor/imitation_loss on 1 rank (micro-batches 4) and 2 ranks (1), and the term changes the gradient."""
    cfg = make_config(model_dir, **{"actor.grad_clip": 1e9, "actor.imitation_coef": 0.5})
    batch = make_batch(7)
    exp_mask = torch.tensor([0, 1, 1, 0, 0, 1, 1])[:, None] * batch["response_mask"]  # row 1 has A > 0
    batch = Batch(batch.tensors | {"exp_mask": exp_mask}, batch.ids)
    one = run_ranks(1, "update", tmp_path, config=cfg, batch=batch, mbs=[4], ckpt=str(tmp_path / "c1"))[4]
    two = run_ranks(2, "update", tmp_path, config=cfg, batch=batch, mbs=[1], ckpt=str(tmp_path / "c2"))[1]
    cfg.actor_rollout_ref.actor.imitation_coef = 0.0
    plain = run_ranks(1, "update", tmp_path, config=cfg, batch=batch, mbs=[4], ckpt=str(tmp_path / "c3"))[4]
    rel = ((one[2][0] - two[2][0]).norm() / one[2][0].norm()).item()
    assert rel < 1e-6
    assert ((one[2][0] - plain[2][0]).norm() / one[2][0].norm()).item() > 1e-2
    assert math.isclose(one[1]["actor/imitation_loss"], two[1]["actor/imitation_loss"], rel_tol=1e-6)
    assert one[1]["actor/imitation_loss"] > 0 and "actor/imitation_loss" not in plain[1]


def test_checkpoint_resume_gives_identical_next_update(model_dir, tmp_path):
    cfg = make_config(model_dir, **{"actor.optim.lr_warmup_steps": 3, "actor.loss_agg_mode": "seq-mean-token-mean"})
    res = run_ranks(2, "checkpoint", tmp_path, config=cfg, batch=make_batch(6), ckpt=str(tmp_path / "ckpt"),
                    export=str(tmp_path / "hf"))
    d = max_diff(res["a"], res["b"])
    print(f"max|Δθ| uninterrupted vs resumed: {d:.3g}; lr {res['m1']['actor/lr']} vs {res['m2']['actor/lr']}")
    assert d == 0.0
    assert res["m1"] == res["m2"]
    assert math.isclose(res["m1"]["actor/lr"], 1e-2 / 3)  # warm-up: second step runs at 1/3 of the lr
    assert (tmp_path / "ckpt" / "extra_state_rank1.pt").is_file()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    assert max_diff({k: exported[k] for k in res["b"]}, res["b"]) == 0.0
    assert torch.equal(exported["lm_head.weight"], res["b"]["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def misc(model_dir, tmp_path_factory) -> tuple[Batch, dict]:
    """One 2-rank run shared by the log-prob, NaN and SFT tests (process start-up dominates)."""
    # the old-log-prob pass packs padding-free under a 15-token budget; the reference runs 1 row at a time
    cfg = make_config(model_dir, **{"actor.optim.lr": 3e-3, "rollout.temperature": 0.7,
                                    "rollout.log_prob_micro_batch_size_per_gpu": 2, "ref.enable": True,
                                    "ref.log_prob_micro_batch_size_per_gpu": 1, "model.use_remove_padding": True,
                                    "rollout.log_prob_use_dynamic_bsz": True,
                                    "rollout.log_prob_max_token_len_per_gpu": 15, "model.logprob_chunk_size": 4})
    batch = make_batch(6)
    bad = Batch(dict(batch.tensors), batch.ids)
    bad.tensors["advantages"] = batch["advantages"].clone()
    bad.tensors["advantages"][4, 0] = float("nan")  # row 4 lives on rank 1
    bad.tensors["response_mask"] = batch["response_mask"].clone()
    bad.tensors["response_mask"][4, 0] = 1
    return batch, run_ranks(2, "misc", tmp_path_factory.mktemp("misc"), config=cfg, batch=batch, bad=bad,
                            sft_steps=5)


def test_nan_loss_skips_the_step_on_all_ranks(misc):
    _, res = misc
    print("nan metrics:", res["nan"])
    assert res["nan"]["actor/skipped_steps"] == 1.0
    assert max_diff(res["before"], res["after"]) == 0.0
    assert res["good"]["actor/skipped_steps"] == 0.0 and max_diff(res["after"], res["final"]) > 0


def test_sft_loss_decreases_on_a_repeated_batch(misc):
    losses = misc[1]["sft"]
    print("sft losses:", [round(x, 4) for x in losses])
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < losses[0] - 0.3


def test_actor_log_probs_match_a_plain_hf_forward(model_dir, misc):
    from transformers import AutoModelForCausalLM

    batch, res = misc
    got = res["logprob"].align_to(batch)
    lone = res["lone"]  # rank 0's one row while rank 1 held none
    assert len(lone) == 1
    torch.testing.assert_close(lone["old_log_probs"], got.select([list(batch.ids["traj_id"]).index(
        lone.ids["traj_id"][0])])["old_log_probs"], rtol=0, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    full = with_model_inputs(batch)
    worst = 0.0
    for i in range(len(batch)):  # one row at a time, without any padding
        ids = full["input_ids"][i][full["attention_mask"][i].bool()][None]
        n_prompt = int(batch["prompt_attention_mask"][i].sum())
        n_resp = int(batch["response_attention_mask"][i].sum())
        with torch.no_grad():
            logits = model(ids).logits[0, n_prompt - 1:n_prompt + n_resp - 1].float() / 0.7
        ref = logits.log_softmax(-1).gather(-1, ids[0, n_prompt:, None]).squeeze(-1)
        worst = max(worst, (got["old_log_probs"][i, :n_resp] - ref).abs().max().item())
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        assert torch.allclose(got["entropys"][i, :n_resp], ent, atol=1e-4)
    print(f"max|Δ logp| actor (2 ranks, packed, 15-token budget) vs plain HF: {worst:.3g}; "
          f"frozen ref vs initial actor: {res['ref_vs_actor']:.3g}")
    assert res["ref_vs_actor"] < 1e-5
    assert worst < 1e-4
    assert got["old_log_probs"].shape == batch["responses"].shape


def test_lr_decay_factor_cosine_and_constant():
    from agentevolver.workers.fsdp_worker import lr_decay_factor, warmup_lambda

    assert [lr_decay_factor("cosine", p, 0.0) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, 0.0], abs=1e-12)
    assert lr_decay_factor("cosine", 0.5, min_lr_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_decay_factor("cosine", 1.0, min_lr_ratio=0.2) == pytest.approx(0.2)
    assert lr_decay_factor("constant", 0.9, 0.0) == 1.0
    assert warmup_lambda(4, lambda: 0.5)(2) == 0.25  # warm-up (optimizer steps) × decay (training steps)
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        lr_decay_factor("linear", 0.5, 0.0)


def test_actor_computes_on_the_device_it_is_given(tmp_path, monkeypatch):
    """trainer.device=cpu on a machine that shows CUDA: the actor must not move micro-batches to cuda
    (het_actor used to pick cuda whenever torch saw one; the worker now passes its resolved device)."""
    from transformers import AutoModelForCausalLM

    from agentevolver.module.exp_manager import het_actor

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    batch = make_batch(4)
    cfg = make_config(tmp_path / "m").actor_rollout_ref.actor
    expected, _ = het_actor.compute_log_prob(model, batch, 1.0, 2, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as torch reports it
    logp, _ = het_actor.compute_log_prob(model, batch, 1.0, 2, device="cpu")
    torch.testing.assert_close(logp, expected)
    optim = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = het_actor.update_policy(model, optim, None, batch, cfg, 1.0, "ppo", device="cpu")
    assert metrics["actor/skipped_steps"] == 0.0 and set(het_actor.LOSSES) == {"ppo", "sft"}
