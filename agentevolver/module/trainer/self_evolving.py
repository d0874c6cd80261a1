"""AgentEvolver's self-evolving loop inside the trainer (issue 16): the hooks `RayTrainer` calls.

Self-questioning: `data.task_source=generated` draws fresh games (never a held-out game's problem) from a
background generator with a success curriculum. Self-navigating: the experience pool guides a share of
the rollouts (exp_mask on stripped prompts). Self-imitation: stored successes (or, with
`exp_manager.replay.teacher`, the teacher's episode of the same game) replace failures of low-success
groups. Every piece is off by default; each hook is a no-op then.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agentevolver.alfworld.data import GameSpec, problem_keys
from agentevolver.module.exp_manager.experience import SummaryContext
from agentevolver.module.exp_manager.manager import ExperienceManager, walkthrough_record
from agentevolver.module.trainer.task_source import GeneratedTaskSource
from agentevolver.module.trainer.tracking import timer
from agentevolver.protocol import Batch
from agentevolver.workers.rollout.base import SamplingParams

REPLAY_FILE = "experience_replay.pt"  # in a checkpoint's step folder: the stored successful episodes
DAGGER_SUFFIX = "~dagger"  # episode id of the expert relabelling of episode <id>: <id>~dagger
DAGGER_FINISH = "dagger"  # finish_reason of a relabelled episode: what tells its rows apart


class SelfEvolvingLoop:
    """Mixed into RayTrainer: uses its cfg, out_dir, val_games, train_games, rollout(), workers, tokenizer."""

    def _init_self_evolving(self) -> None:
        """Generated tasks (data.task_source) and the experience manager (exp_manager), when configured."""
        cfg = self.cfg
        self.task_source = None
        if cfg.data.task_source == "generated":  # never a held-out game's problem: "never trained on" holds
            held_out = problem_keys(g.game_dir for g in self.val_games)
            self.task_source = GeneratedTaskSource(cfg, self.out_dir, exclude=held_out)
        e = cfg.exp_manager
        uses_pool = e.train_rollout_expmode != "woexp" or e.val_rollout_expmode != "woexp"
        self.exp = ExperienceManager(cfg) if uses_pool or e.replay.enable else None
        self._step_records = []

    def _draw_games(self, timings: dict[str, float]) -> list[GameSpec]:
        if self.task_source is None:
            return self._next_games()
        with timer("task_gen", timings):  # only the wait for the background actor: it runs ahead
            return self.task_source.next_games()

    def _experience_guide(self, games: list[GameSpec], n: int, tag: str, validate: bool):
        if self.exp is None or not self.exp.guided(validate) or not len(self.exp.pool):
            return None
        return self.exp.guide_fn(self.exp.plan(games, n, tag, validate))

    def _replay_successes(self, batch: Batch, stats: dict, games: list[GameSpec], tag: str,
                          timings: dict[str, float]) -> Batch:
        if self.exp is None or self.exp.replay is None:
            return batch
        r = self.cfg.exp_manager.replay
        if r.teacher is not None:  # low-success groups with nothing stored: the teacher's episode of that game
            by_id = {g.task_id: g for g in games}
            wanting = [by_id[t] for t in self.exp.replay.wanting(batch, r.success_threshold)]
            if wanting:
                from agentevolver.sft import make_teacher  # fresh per call: it caches a plan per episode

                taught = self.rollout(wanting, r.max_replay_per_group, SamplingParams(), f"{tag}t", timings,
                                      teacher=make_teacher(self.cfg, r.teacher))  # k episodes: k replays
                stats["teacher_episodes"] += int(self.exp.replay.add_successes(taught))
        batch, rows = self.exp.replay.replace_failures(batch, r.success_threshold, r.max_replay_per_group)
        stats["rows"] += rows
        return batch

    def _expert(self):
        """view -> the state-aware expert's command for the view's state (exp_manager.dagger), knowing only
        what the policy's prompt shows (env.history_window turns)."""
        from agentevolver.alfworld.expert import expert_command

        window = self.cfg.env.history_window
        return lambda view: expert_command(view.info.get("walkthrough") or [], view.history, view.observation,
                                           view.admissible, window=window)

    def _dagger_rows(self, policy, rows: list[dict]) -> list[dict]:
        """Episode rows of the expert relabelling of up to dagger.max_per_group failed episodes per group:
        scored as a success (the expert's command in every state the policy reached), exp_replayed."""
        per_group: dict[str, int] = {}
        out = []
        for row in rows:
            if row["won"] or row["finish_reason"] == "env_error":
                continue
            if per_group.get(row["uid"], 0) >= self.cfg.exp_manager.dagger.max_per_group:
                continue
            new_id = row["traj_id"] + DAGGER_SUFFIX
            turns = policy.relabel(row["traj_id"], new_id)
            if not turns:
                continue
            per_group[row["uid"]] = per_group.get(row["uid"], 0) + 1
            out.append(row | {"traj_id": new_id, "exp_replayed": True, "finish_reason": DAGGER_FINISH, "won": True,
                              "steps": turns, "format_errors": 0, "invalid_actions": 0, "projected_actions": 0,
                              "reward": float(self.cfg.env.reward.success)})
        return out

    def _self_evolving_metrics(self, all_rows: Batch, batch: Batch, replay_stats: dict,
                               timings: dict[str, float]) -> dict:
        """End of a step's generation: curriculum counts, replay store, pool update; their metrics."""
        out: dict = {}
        if not len(all_rows):
            return out
        episodes = all_rows.select(all_rows.ids["is_last"].astype(bool) & (all_rows.ids["finish_reason"] != "env_error"))
        if self.task_source is not None:
            self.task_source.observe(episodes.ids["task_id"].tolist(), episodes.ids["task_type"].tolist(),
                                     episodes.ids["won"].tolist())
            out |= self.task_source.metrics()
        e = self.cfg.exp_manager
        if self.exp is None and not e.dagger.enable:
            return out
        dagger = batch.ids["finish_reason"] == DAGGER_FINISH if len(batch) else np.zeros(0, bool)
        out["experience/injected_rows"] = int(batch.ids["exp_guided"].sum()) if len(batch) else 0
        out["experience/off_policy_rows"] = int((batch["exp_mask"].sum(-1) > 0).sum()) if len(batch) else 0
        out["experience/replayed_rows"] = int((batch.ids["exp_replayed"] & ~dagger).sum()) if len(batch) else 0
        if e.dagger.enable:
            out["experience/dagger_rows"] = int(dagger.sum())
        if self.exp is None:
            return out
        with timer("experience", timings):
            if self.exp.replay is not None:
                self.exp.replay.add_successes(all_rows.select(all_rows.ids["finish_reason"] != "env_error"))
            if e.updated_freq > 0 and (self.global_step + 1) % e.updated_freq == 0:
                ctx = SummaryContext(self.tokenizer, self.workers.generate, e.summary_max_tokens,
                                     self._seed(self.global_step, 999))
                out["experience/added"] = self.exp.add(self._step_records, self.global_step + 1, ctx)
        self._step_records = []
        out |= self.exp.metrics()
        out["experience/replaced_rows_generated"] = replay_stats["rows"]
        if e.replay.enable and e.replay.teacher is not None:
            out["experience/teacher_episodes"] = replay_stats["teacher_episodes"]
        return out

    def _init_experience_before_training(self) -> None:
        """exp_manager.init_experience_before_training: the pool starts with the planner walkthroughs of
        the first training games (fixed: the train split; generated: the prefetched batches)."""
        if self.exp is None or not self.cfg.exp_manager.init_experience_before_training or self.global_step:
            return
        if self.task_source is not None:
            self.task_source.start()
            games = self.task_source.peek_games()
        else:
            games = self.train_games
        records = [walkthrough_record(g) for g in games[: self.cfg.exp_manager.max_pool_size]]
        self.exp.add(records, 0)

    def _self_evolving_state(self) -> dict:
        return {"task_source": self.task_source.state_dict() if self.task_source is not None else None,
                "experience": self.exp.state_dict() if self.exp is not None else None}

    def _save_replay(self, step_dir: Path) -> None:
        if self.exp is not None and self.exp.replay is not None:
            torch.save(self.exp.replay.state_dict(), step_dir / REPLAY_FILE)

    def _load_self_evolving(self, state: dict, step_dir: Path) -> None:
        if self.task_source is not None and state.get("task_source"):
            self.task_source.load_state_dict(state["task_source"])
        if self.exp is not None and state.get("experience"):
            self.exp.load_state_dict(state["experience"])
        if self.exp is not None and self.exp.replay is not None and (step_dir / REPLAY_FILE).is_file():
            self.exp.replay.load_state_dict(torch.load(step_dir / REPLAY_FILE, weights_only=False))  # our own file
