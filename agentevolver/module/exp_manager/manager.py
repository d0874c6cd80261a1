"""The trainer's experience manager (`exp_manager.*`): pool + replay, what a rollout is guided with,
what a finished step adds. The trainer calls it through thin hooks (ae_ray_trainer.py)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agentevolver.alfworld.agent import EpisodeStats, TurnView, accepted_actions
from agentevolver.alfworld.data import GameSpec
from agentevolver.module.exp_manager.experience import (
    EpisodeRecord,
    Experience,
    ExperiencePool,
    SummaryContext,
    allocate_modes,
    get_summarizer,
)
from agentevolver.module.exp_manager.replay import SuccessReplay


def walkthrough_record(game: GameSpec) -> EpisodeRecord:
    """The generator's / ALFRED's planner walkthrough of a game as a successful episode (its task
    sentence is the annotation the game's grammar carries)."""
    with open(game.game_file) as f:
        data = json.load(f)
    task = ""
    try:
        with open(game.game_file.replace("game.tw-pddl", "traj_data.json")) as f:
            anns = [a["task_desc"] for a in json.load(f)["turk_annotations"]["anns"]]
        task = next((a for a in anns if a in data.get("grammar", "")), anns[0] if anns else "")
    except (OSError, KeyError, ValueError):
        pass
    return EpisodeRecord(game.task_id, game.task_type, task, list(data.get("walkthrough") or []), True, 1.0)


class ExperienceManager:
    def __init__(self, cfg: Any) -> None:
        e = cfg.exp_manager
        self.cfg = e
        self.pool = ExperiencePool(e.max_pool_size, e.max_per_task)
        self.summarise = get_summarizer(e.summarizer)
        r = e.replay
        self.replay = SuccessReplay(r.max_tasks, r.max_per_task, r.match) if r.enable else None

    def guided(self, validate: bool) -> bool:
        mode = self.cfg.val_rollout_expmode if validate else self.cfg.train_rollout_expmode
        return mode != "woexp"

    def plan(self, games: Sequence[GameSpec], n: int, tag: str, validate: bool) -> dict[str, bool]:
        """{episode id: keep} for the guided episodes of a rollout (ids as the trainer makes them)."""
        mode = self.cfg.val_rollout_expmode if validate else self.cfg.train_rollout_expmode
        sample_mode = "allkeep" if validate else self.cfg.train_sample_expmode
        guided, keep = allocate_modes(len(games), n, mode, self.cfg.rollout_expratio, sample_mode,
                                      self.cfg.train_sample_keepratio)
        return {f"{tag}-{i}-{j}": keep[i] for i in range(len(games)) for j in range(n) if guided[i][j]}

    def guide_fn(self, plan: dict[str, bool]):
        """The policy's guide(view): top-k experiences of the view's task for a planned episode."""
        def guide(view: TurnView) -> tuple[list[str], bool] | None:
            if view.episode_id not in plan:
                return None
            exps = self.pool.retrieve(view.info.get("task_type", ""), view.task, int(self.cfg.top_k))
            return (exps, plan[view.episode_id]) if exps else None
        return guide

    def records(self, episodes: Sequence[tuple[str, GameSpec]], stats: dict[str, EpisodeStats],
                tasks: dict[str, str]) -> list[EpisodeRecord]:
        return [EpisodeRecord(g.task_id, g.task_type, tasks.get(eid, ""), accepted_actions(stats[eid].history),
                              bool(stats[eid].won)) for eid, g in episodes]

    def add(self, records: Sequence[EpisodeRecord], step: int, ctx: SummaryContext | None = None) -> int:
        """Summarise and pool; returns experiences added."""
        texts = self.summarise(list(records), ctx or SummaryContext())
        added = 0
        for rec, text in zip(records, texts):
            if text:
                added += self.pool.add(Experience(rec.task_id, rec.task_type, rec.task, text, step))
        return added

    def metrics(self) -> dict[str, float]:
        out = {"experience/pool_size": float(len(self.pool))}
        if self.replay is not None:
            out["experience/replay_store_episodes"] = float(len(self.replay))
        return out

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
