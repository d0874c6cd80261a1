"""The Ray trainer (single controller): DAPO / GRPO on ALFWorld, driven by one validated config.

One step (`fit`, one line per stage): sample tasks → multi-turn rollouts on the env pool (each task n times = one
GRPO group) → reward shaping → dynamic sampling (drop zero-variance groups, refill) → old / ref
log-probs → advantages → FSDP2 actor update (token-mean over the mini-batch's global token count)
→ weight sync to the rollout engines → metrics, validation, checkpoint.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import DictConfig

from agentevolver.alfworld.agent import episode_reward, run_episodes, system_prompt
from agentevolver.alfworld.data import (
    GameSpec,
    check_broken_games,
    detect_command_wording,
    resolve_data_dir,
    scan_split,
    write_broken_games,
)
from agentevolver.alfworld.pool import EnvPool
from agentevolver.module.agent_flow.llm_policy import LLMPolicy
from agentevolver.module.exp_manager import advantages as estimators
from agentevolver.module.exp_manager import het_core_algos as algos
from agentevolver.module.exp_manager import rollout_corr
from agentevolver.module.trainer.checkpoint_manager import CheckpointManager
from agentevolver.module.trainer.interrupts import SigintAtSafePoints, sigint_deferred
from agentevolver.module.trainer.self_evolving import SelfEvolvingLoop
from agentevolver.module.trainer.tracking import Tracking, timer
from agentevolver.protocol import Batch
from agentevolver.workers.fsdp_worker import ref_enabled
from agentevolver.workers.rollout.base import SamplingParams
from agentevolver.workers.worker_group import ActorRolloutRefGroup

TIMED_PHASES = ("gen", "env", "reward", "task_gen", "experience", "old_log_prob", "ref", "adv", "update_actor",
                "sync_weights", "testing", "save_checkpoint")


class RayTrainer(SelfEvolvingLoop):
    def __init__(self, cfg: DictConfig, resume: bool = True) -> None:
        """`cfg` must already be validated (`main_ppo.validated`), before anything here starts.
        resume=False never looks at checkpoints (the SFT driver: it does not continue RL runs)."""
        self.cfg = cfg
        self.out_dir = Path(cfg.trainer.default_local_dir)
        self._seed_everything(cfg.trainer.seed)
        if not ray.is_initialized():
            ray.init(address=cfg.trainer.ray.address, num_cpus=cfg.trainer.ray.num_cpus,
                     include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                               "TOKENIZERS_PARALLELISM": "false"}})
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
        self._scan_games()
        self.system_prompt = system_prompt(detect_command_wording(self.val_games or self.train_games),
                                           cfg.env.system_prompt)
        self.pool = EnvPool(num_workers=cfg.env.pool.num_workers, num_cpus_per_worker=cfg.env.pool.num_cpus_per_worker,
                            step_timeout_s=cfg.env.pool.step_timeout_s, reset_timeout_s=cfg.env.pool.reset_timeout_s)
        self.workers = ActorRolloutRefGroup(cfg)
        self.use_ref = ref_enabled(cfg)
        self.ckpt = CheckpointManager(self.out_dir, cfg.trainer.max_ckpt_to_keep)
        self.global_step, self.epoch, self.cursor = 0, 0, 0
        self.empty_steps = 0  # steps whose whole batch dynamic sampling dropped (no update), kept across resumes
        self.order: list[int] = []
        self.batches_per_epoch = max(1, len(self.train_games) // cfg.data.train_batch_size)
        self.total_steps = cfg.trainer.total_training_steps or self.batches_per_epoch * cfg.trainer.total_epochs
        self._init_self_evolving()
        wandb_id = self._maybe_resume() if resume else None
        if self.task_source is not None:
            self.task_source.start()  # after a resume restored its pending requests
        self.tracker = Tracking(cfg, self.out_dir, wandb_run_id=wandb_id)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg.trainer
        last: dict = {}
        if (cfg.val_before_train and self.global_step == 0) or cfg.val_only:
            timings: dict[str, float] = {}
            with timer("testing", timings):
                last = self._validate()
            self.tracker.log(last | {f"timing/{k}": v for k, v in timings.items()}, step=self.global_step)
            if cfg.val_only:
                return last
        from tqdm import tqdm

        self._init_experience_before_training()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True)
        first_step, first_empty = self.global_step, self.empty_steps
        with SigintAtSafePoints() as sigint:  # Ctrl-C stops at the next phase boundary, before the save
            while self.global_step < self.total_steps:
                sigint.check()  # a Ctrl-C during the last step's validation / save: stop before the next rollout
                timings = {"ref": 0.0}  # logged every step; stays 0 when no reference policy is configured
                metrics: dict = {}
                with timer("step", timings):
                    batch, gen_metrics = self._generate_train_batch(timings)
                    sigint.check()
                    metrics |= gen_metrics
                    if len(batch):
                        with timer("old_log_prob", timings):
                            batch = self._compute_old_log_prob(batch, metrics)
                        if self.use_ref:
                            with timer("ref", timings):
                                batch = batch.union(self.workers.compute_ref_log_prob(batch))
                        with timer("adv", timings):
                            batch = self._compute_advantage(batch, metrics)
                        with timer("update_actor", timings):
                            metrics |= self.workers.update_actor(batch, progress=self.global_step / self.total_steps)
                        with timer("sync_weights", timings):
                            self.workers.sync_weights()
                        sigint.check()
                    else:
                        self._warn_empty_step(metrics)
                    metrics["dynamic_sampling/empty_step"] = float(not len(batch))
                    metrics["dynamic_sampling/empty_steps"] = self.empty_steps
                    self.global_step += 1
                    is_last = self.global_step >= self.total_steps
                    if cfg.test_freq > 0 and (self.global_step % cfg.test_freq == 0 or is_last):
                        with timer("testing", timings):
                            metrics |= self._validate()
                    if cfg.save_freq > 0 and (self.global_step % cfg.save_freq == 0 or is_last):
                        with timer("save_checkpoint", timings):
                            self._save_checkpoint()
                metrics |= self._timing_metrics(timings, metrics.get("perf/generated_tokens", 0))
                self.tracker.log(metrics, step=self.global_step)
                bar.update(1)
                bar.set_postfix(success=f"{metrics.get('train/success_rate', float('nan')):.2f}")
                last = metrics
        bar.close()
        self._warn_empty_run(self.global_step - first_step, self.empty_steps - first_empty)
        if self.cfg.trainer.export_hf:
            self.workers.export_hf(str(self.out_dir / "hf_actor"))
        return last

    # ------------------------------------------------------------------ rollout
    def _scan_games(self) -> None:
        """Train / val games; broken ones are skipped, listed in broken_games.txt and counted
        (`data/skipped_games`). config_check already refused a start with too many of them."""
        alf = self.cfg.env.alfworld
        data_dir = resolve_data_dir(alf.data_dir)
        fixed_train = not self.cfg.trainer.val_only and self.cfg.data.task_source == "fixed"
        splits = [alf.val_split] + ([alf.train_split] if fixed_train else [])  # generated: no train split
        scans = [scan_split(data_dir, split, alf.task_types) for split in splits]
        note = check_broken_games(scans, self.cfg.data.max_broken_game_frac, "data.max_broken_game_frac")
        if note:
            write_broken_games(scans, self.out_dir)
            print(note, flush=True)
        self.skipped_games = len({b.game_dir for scan in scans for b in scan.broken})
        self.val_games = scans[0].games
        self.train_games = scans[1].games if len(scans) > 1 else []

    def _next_games(self) -> list[GameSpec]:
        """The next train_batch_size games of a seeded per-epoch permutation (resumable by cursor)."""
        games = []
        while len(games) < self.cfg.data.train_batch_size:
            if not self.order or self.cursor >= len(self.order):
                if self.order:
                    self.epoch += 1
                rng = np.random.default_rng(self.cfg.data.seed + self.epoch)
                n = len(self.train_games)
                self.order = (rng.permutation(n) if self.cfg.data.shuffle else np.arange(n)).tolist()
                self.cursor = 0
            games.append(self.train_games[self.order[self.cursor]])
            self.cursor += 1
        return games

    def rollout(self, games: list[GameSpec], n: int, sampling: SamplingParams, tag: str,
                 timings: dict[str, float], teacher=None, validate: bool = False, relabel: bool = False) -> Batch:
        """Play every game n times; one Batch row per episode, rewards shaped, ids attached. relabel: also
        the expert-relabelled episodes of failed ones (exp_manager.dagger; exp_replayed rows)."""
        cfg = self.cfg
        guide = self._experience_guide(games, n, tag, validate) if teacher is None else None
        policy = LLMPolicy(self.tokenizer, self.workers.generate, sampling, cfg.data.max_prompt_length,
                           cfg.data.max_response_length, system=self.system_prompt, teacher=teacher,
                           mode=cfg.env.rollout_mode, history_window=cfg.env.history_window, guide=guide,
                           experience_template=cfg.exp_manager.experience_template,
                           expert=self._expert() if relabel else None)
        episodes, meta = [], {}
        for i, game in enumerate(games):
            for j in range(n):
                eid = f"{tag}-{i}-{j}"
                episodes.append((eid, game))
                meta[eid] = {"traj_id": eid, "uid": f"{tag}-{i}", "task_id": game.task_id,
                             "task_type": game.task_type}
        stats = run_episodes(self.pool, episodes, policy, max_steps=cfg.env.max_steps, timing=timings,
                             projection=cfg.env.action_projection)
        timings["gen"] = timings.get("gen", 0.0) + policy.timing_gen_s
        if self.exp is not None and not validate and teacher is None:  # what the pool update summarises
            self._step_records += self.exp.records(episodes, stats, policy.tasks)
        with timer("reward", timings):
            rows = []
            for eid, _ in episodes:
                st = stats[eid]
                reason = policy.trajectory(eid).finish_reason or st.finish_reason
                rows.append(meta[eid] | {"exp_replayed": False, "finish_reason": reason, "won": bool(st.won), "steps": st.steps,
                                         "format_errors": st.format_errors, "invalid_actions": st.invalid_actions,
                                         "projected_actions": st.projected_actions,
                                         "reward": episode_reward(st, cfg.env.reward.success,
                                                                  cfg.env.reward.format_penalty,
                                                                  cfg.env.reward.inadmissible_penalty)})
            lengths = np.array([policy.response_length(eid) for eid, _ in episodes])
            self._shape_rewards(rows, lengths)
            if relabel:
                rows += self._dagger_rows(policy, rows)
            return policy.to_batch(rows)

    def _shape_rewards(self, rows: list[dict], lengths: np.ndarray) -> None:
        shaping = self.cfg.algorithm.dapo.overlong_reward_shaping
        if not shaping.enable:
            return
        penalty = algos.overlong_penalty(torch.as_tensor(lengths, dtype=torch.float32),
                                         self.cfg.data.max_response_length, shaping.buffer_length,
                                         shaping.penalty_factor)
        truncated = torch.tensor([r["finish_reason"] in ("max_steps", "context_limit") for r in rows])
        penalty = penalty - shaping.truncation_penalty * truncated.float()
        scores = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        shaped = algos.apply_reward_shaping(scores, penalty, shaping.mode)
        for r, s in zip(rows, shaped.tolist()):
            r["reward"] = s

    def _generate_train_batch(self, timings: dict[str, float]) -> tuple[Batch, dict]:
        """Generation batches until train_batch_size groups survive dynamic sampling (or the cap)."""
        cfg, ds = self.cfg, self.cfg.algorithm.dapo.dynamic_sampling
        roll = cfg.actor_rollout_ref.rollout
        kept: list[Batch] = []
        generated: list[Batch] = []
        num_groups, gen_batches = 0, 0
        replay_stats = {"rows": 0, "teacher_episodes": 0}
        self._step_records = []
        max_batches = ds.max_num_gen_batches if ds.enable else 1
        while num_groups < cfg.data.train_batch_size and gen_batches < max_batches:
            sampling = SamplingParams.from_rollout_config(roll, n=1, seed=self._seed(self.global_step, gen_batches))
            games, tag = self._draw_games(timings), f"s{self.global_step}g{gen_batches}"
            batch = self.rollout(games, roll.n, sampling, tag, timings, relabel=cfg.exp_manager.dagger.enable)
            gen_batches += 1
            batch.require("finish_reason", "uid", "won" if ds.metric == "acc" else "score")
            generated.append(batch.select(~batch.ids["exp_replayed"]))  # what the policy played
            # a crashed env is not the policy's doing: such episodes are counted, never trained on
            batch = batch.select(batch.ids["finish_reason"] != "env_error")
            batch = self._replay_successes(batch, replay_stats, games, tag, timings)
            if ds.enable:
                signal = batch.ids[algos.DYNAMIC_SAMPLING_METRICS[ds.metric]].astype(np.float32)
                keep, _ = algos.filter_groups(signal, batch.ids["uid"], ds.mode)
                batch = batch.select(np.asarray(keep, dtype=bool))
            kept.append(batch)
            num_groups += len(set(batch.ids["uid"].tolist()))
        batch = Batch.concat(kept)
        if num_groups > cfg.data.train_batch_size:  # keep whole groups, first come first kept
            uids = list(dict.fromkeys(batch.ids["uid"].tolist()))[: cfg.data.train_batch_size]
            batch = batch.select(np.isin(batch.ids["uid"], uids))
            num_groups = cfg.data.train_batch_size
        all_rows = Batch.concat(generated)  # every episode played this step, kept or not
        metrics = {f"train/{k}" if k.startswith("success_rate") else k: v for k, v in episode_metrics(all_rows).items()}
        metrics |= {"dynamic_sampling/kept_groups": num_groups, "dynamic_sampling/num_gen_batches": gen_batches,
                    "dynamic_sampling/kept_rows": len(batch), "data/skipped_games": self.skipped_games,
                    "perf/generated_tokens": int(all_rows["response_mask"].sum())}
        metrics |= self._self_evolving_metrics(all_rows, batch, replay_stats, timings)
        return batch, metrics

    # ------------------------------------------------------------------ learning
    def _compute_old_log_prob(self, batch: Batch, metrics: dict) -> Batch:
        """old_log_probs from the actor — or, in bypass_mode, the rollout's own (the actor's pass only over
        the rows the sampler did not sample as trained) — then rollout correction: IS weights and the
        rejection mask (`rollout_corr`)."""
        batch.require("response_mask", "rollout_log_probs")  # the actor's own inputs: het_actor checks them
        corr = self.cfg.algorithm.rollout_correction
        if corr.bypass_mode:  # π_old := π_rollout: the PPO ratio is taken against the sampler itself
            return self._bypass_old_log_prob(batch, metrics)
        batch = batch.union(self.workers.compute_log_prob(batch))
        mask = batch["response_mask"]
        if "exp_mask" in batch:  # guided / replayed rows were sampled under another prompt or policy
            mask = mask * (1 - batch["exp_mask"])
        diff = (batch["old_log_probs"].exp() - batch["rollout_log_probs"].exp()).abs()
        metrics["rollout/probs_diff_mean"] = algos.masked_mean(diff, mask).item()
        metrics["rollout/probs_diff_max"] = (diff * mask).max().item() if mask.any() else 0.0
        metrics["rollout/log_probs_diff_mean"] = algos.masked_mean(
            (batch["old_log_probs"] - batch["rollout_log_probs"]).abs(), mask).item()
        return self._rollout_correction(batch, metrics)

    def _bypass_old_log_prob(self, batch: Batch, metrics: dict) -> Batch:
        """rollout_log_probs as old_log_probs, except on rows with exp_mask: their tokens were written by
        a teacher, the expert or a replayed episode, or sampled under an experience-guided prompt, so the
        sampler's log-probs (if any) are not π_old on the training prompt. Only those rows get the
        actor's pass; rows are joined by traj_id."""
        old = batch["rollout_log_probs"].clone()
        need = batch["exp_mask"].bool().any(1) if "exp_mask" in batch else torch.zeros(len(batch), dtype=torch.bool)
        metrics["rollout/bypass_recomputed_rows"] = int(need.sum())
        if need.any():
            rows = need.nonzero().squeeze(1).numpy()
            sub = batch.select(rows)
            old[need] = sub.union(self.workers.compute_log_prob(sub))["old_log_probs"]
        return Batch(batch.tensors | {"old_log_probs": old}, batch.ids, batch.meta)

    def _rollout_correction(self, batch: Batch, metrics: dict) -> Batch:
        """rollout_corr/* metrics always; rollout_is_weights and the RS / veto mask when configured."""
        c = self.cfg.algorithm.rollout_correction
        weights, mask, corr_metrics = rollout_corr.compute_rollout_correction(
            batch["old_log_probs"], batch["rollout_log_probs"], batch["response_mask"], c.rollout_is,
            c.rollout_is_threshold, c.rollout_rs, c.rollout_rs_threshold, c.rollout_rs_threshold_lower,
            c.rollout_token_veto_threshold)
        metrics |= corr_metrics
        tensors = {"response_mask": mask} | ({"rollout_is_weights": weights} if weights is not None else {})
        return Batch(batch.tensors | tensors, batch.ids, batch.meta)

    def _compute_advantage(self, batch: Batch, metrics: dict) -> Batch:
        """The estimator registry is the only dispatch on algorithm.adv_estimator; it says what it reads."""
        cfg = self.cfg.algorithm
        estimator = estimators.get_adv_estimator(cfg.adv_estimator)
        batch.require(*estimator.inputs)
        if cfg.use_kl_in_reward:  # trajectory mode only (config_check): a per-token reward term
            batch.require("old_log_probs", "ref_log_prob")
            kl = algos.kl_penalty(batch["old_log_probs"], batch["ref_log_prob"], cfg.kl_penalty)
            rewards = batch["token_level_rewards"] - cfg.kl_ctrl.kl_coef * kl * batch["response_mask"]
            batch = Batch(batch.tensors | {"token_level_rewards": rewards}, batch.ids, batch.meta)
        adv, adv_metrics = estimators.compute_advantage(cfg.adv_estimator, batch, cfg,
                                                   step_mode=self.cfg.env.rollout_mode == "step")
        metrics |= adv_metrics
        return Batch(batch.tensors | {"advantages": adv}, batch.ids, batch.meta)

    def _warn_empty_step(self, metrics: dict) -> None:
        """One line for a step that trains on nothing (every group dropped, or every episode crashed)."""
        self.empty_steps += 1
        ds = self.cfg.algorithm.dapo.dynamic_sampling
        why = (f"dynamic sampling (mode={ds.mode}, metric={ds.metric}) dropped every group of "
               f"{metrics['dynamic_sampling/num_gen_batches']} generation batch(es)" if ds.enable
               else "every episode ended in env_error")
        from tqdm import tqdm

        tqdm.write(f"warning: step {self.global_step + 1} trained on nothing: {why} (train success rate "
                   f"{metrics.get('train/success_rate', float('nan')):.2f}); the weights did not change",
                   file=sys.stderr)  # tqdm.write: on its own line, not after the progress bar

    @staticmethod
    def _warn_empty_run(steps: int, empty: int) -> None:
        """One line at the end of a run most of whose steps trained on nothing."""
        if 2 * empty > steps:
            print(f"warning: {empty} of {steps} training steps of this run trained on nothing "
                  "(dynamic_sampling/empty_steps): the policy barely changed. A model that never (or always) wins "
                  "gives no signal: start from a warm start, python -m agentevolver.sft, then main_ppo with "
                  "actor_rollout_ref.model.path=<its trainer.default_local_dir>/hf_actor (README, Running)",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> dict:
        roll = self.cfg.actor_rollout_ref.rollout
        sampling = SamplingParams.from_rollout_config(roll, validate=True, n=1, seed=self._seed(self.global_step, 0))
        size = self.cfg.data.val_batch_size or len(self.val_games)
        batches = []
        for start in range(0, len(self.val_games), size):  # each eval game exactly once, fixed order
            batches.append(self.rollout(self.val_games[start:start + size], roll.val_kwargs.n, sampling,
                                         f"val{self.global_step}c{start}", {}, validate=True))
        metrics = episode_metrics(Batch.concat(batches))
        self._log_val_games(Batch.concat(batches))
        return {f"val/{k}": v for k, v in metrics.items() if k.startswith("success_rate")}

    def _log_val_games(self, batch: Batch) -> None:
        """Per-game held-out outcomes (val_games.jsonl): what a paired bootstrap over games needs."""
        if not len(batch):
            return
        last = batch.select(batch.ids["is_last"].astype(bool))
        won: dict[str, list[float]] = defaultdict(list)
        for tid, w in zip(last.ids["task_id"].tolist(), last.ids["won"].tolist()):
            won[tid].append(float(w))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "val_games.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, "won": {k: float(np.mean(v)) for k, v in won.items()}}) + "\n")

    # ------------------------------------------------------------------ state
    def rng_permutation(self, n: int, salt: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.trainer.seed, salt]).permutation(n)

    def _seed(self, step: int, sub: int) -> int | None:
        return None if not self.cfg.trainer.deterministic else self.cfg.trainer.seed * 1_000_003 + step * 1009 + sub + 1

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _trainer_state(self) -> dict:
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return {"global_step": self.global_step, "epoch": self.epoch, "cursor": self.cursor, "order": self.order,
                "empty_steps": self.empty_steps,
                "wandb_run_id": self.tracker.wandb_run_id, "self_evolving": self._self_evolving_state(),
                "driver_rng": base64.b64encode(pickle.dumps(rng)).decode()}

    def _save_checkpoint(self) -> None:
        def write(path: Path) -> None:
            self.workers.save_checkpoint(str(path))
            self._save_replay(path.parent)  # inside the step folder, before the completeness marker

        with sigint_deferred():  # Ctrl-C mid-save would waste the save: it lands right after it
            self.ckpt.save(self.global_step, self._trainer_state(), write, world_size=self.workers.world_size)

    def _maybe_resume(self) -> str | None:
        path, note = self.ckpt.find_resume(str(self.cfg.trainer.resume_mode))
        if note:  # newer checkpoints that are incomplete (a crash mid-save, a truncated shard)
            print(note, flush=True)
        if path is None:
            return None
        state = self.ckpt.load_trainer_state(path)
        self.workers.load_checkpoint(str(Path(path) / "actor"))
        self.workers.sync_weights()
        self.global_step, self.epoch, self.cursor = state["global_step"], state["epoch"], state["cursor"]
        self.order = state["order"]
        self.empty_steps = state.get("empty_steps", 0)  # absent in checkpoints written before it was counted
        self._load_self_evolving(state.get("self_evolving") or {}, Path(path))
        py_rng, np_rng, torch_rng = pickle.loads(base64.b64decode(state["driver_rng"]))  # our own file
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_rng_state(torch_rng)
        print(f"resumed from {path} at step {self.global_step}", flush=True)
        return state.get("wandb_run_id")

    def _timing_metrics(self, timings: dict[str, float], generated_tokens: int) -> dict:
        out = {f"timing/{k}": v for k, v in timings.items()}
        phases = sum(timings.get(k, 0.0) for k in TIMED_PHASES)
        step = timings.get("step", 0.0)
        out["timing/overhead"] = max(0.0, step - phases)
        out["timing/overhead_frac"] = out["timing/overhead"] / step if step else 0.0
        # throughput of the whole step: every model-generated token of every episode played
        out["perf/tokens_per_s"] = generated_tokens / step if step else 0.0
        return out

    def shutdown(self) -> None:
        """Idempotent: main_ppo's fault paths shut down before their one line, the normal path after fit."""
        if getattr(self, "_shut_down", False):
            return
        self._shut_down = True
        with contextlib.suppress(Exception):
            self.tracker.finish()
        with contextlib.suppress(Exception):
            self.workers.shutdown()
        with contextlib.suppress(Exception):
            self.pool.shutdown()
        with contextlib.suppress(Exception):
            if self.task_source is not None:
                self.task_source.shutdown()


def episode_metrics(batch: Batch) -> dict[str, float]:
    """Success rates (overall and per task type) and episode statistics of a rollout batch: one
    count per episode (its is_last row); prompt and response lengths per training row."""
    if not len(batch):
        return {}
    batch.require("prompt_attention_mask", "response_mask", "is_last", "won", "task_type", "num_turns",
                  "format_errors", "invalid_actions", "projected_actions", "score", "finish_reason")
    model_tokens = batch["response_mask"].sum(-1).float()
    prompt_tokens = batch["prompt_attention_mask"].sum(-1).float()
    batch = batch.select(batch.ids["is_last"].astype(bool))
    won = batch.ids["won"].astype(float)
    out = {"success_rate": float(won.mean())}
    per_type = defaultdict(list)
    for t, w in zip(batch.ids["task_type"].tolist(), won.tolist()):
        per_type[t].append(w)
    out |= {f"success_rate/{t}": float(np.mean(v)) for t, v in sorted(per_type.items())}
    out["response_length/mean"] = model_tokens.mean().item()
    out["response_length/max"] = model_tokens.max().item()
    out["prompt_length/mean"] = prompt_tokens.mean().item()
    out["prompt_length/max"] = prompt_tokens.max().item()
    out["episode/num_turns_mean"] = float(batch.ids["num_turns"].mean())
    out["episode/format_errors_mean"] = float(batch.ids["format_errors"].mean())
    out["episode/invalid_actions_mean"] = float(batch.ids["invalid_actions"].mean())
    out["episode/projected_actions_mean"] = float(batch.ids["projected_actions"].mean())
    out["episode/score_mean"] = float(batch.ids["score"].mean())
    for reason in sorted(set(batch.ids["finish_reason"].tolist())):
        out[f"episode/finish_reason/{reason}"] = float((batch.ids["finish_reason"] == reason).mean())
    return out
