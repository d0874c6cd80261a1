"""Replay of successes (self-imitation): stored successful episodes stand in for failed rollouts.

For a GRPO group (one uid = one task instance) whose success rate is below `success_threshold`, up to
`max_replay_per_group` of its failed episodes are replaced by stored successful episodes of the same
task (`match`: task_id, or task_type for fresh generated games), newest first. A replayed episode keeps its tokens, prompt and reward; it joins the
group's uid, gets fresh ids (`<replaced episode>~replay`) and exp_mask = response_mask (its tokens come
from an older policy: the HET loss clips them with off_cliprange_high). The actor recomputes its old
log-probs like any row's, so the importance ratio is against the current policy.

Storage: per task the newest `max_per_task` successful episodes (all their rows), at most `max_tasks`
tasks (least recently stored evicted). Rollouts of the current policy are stored, never replays; with
`teacher` set, a low-success group whose task has nothing stored gets teacher episodes of that very
game (the planner walkthrough played through the policy's own prompts, as the SFT warm start collects
it) stored first: off-policy guidance for a stream of fresh games, whose own successes never recur.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from agentevolver.protocol import DERIVED, Batch

# what "the same task" means: the same game (task_id), or, for a stream of fresh games that never repeat,
# the same task type (a success on another game of the type: off-policy self-imitation)
REPLAY_MATCH = ("task_id", "task_type")
_STORED_TENSORS = ("prompts", "prompt_attention_mask", "responses", "response_attention_mask", "response_mask",
                   "rollout_log_probs", "token_level_rewards", "exp_mask")


class SuccessReplay:
    def __init__(self, max_tasks: int, max_per_task: int, match: str = "task_id") -> None:
        if match not in REPLAY_MATCH:
            raise ValueError(f"unknown replay match {match!r}; valid: {', '.join(REPLAY_MATCH)}")
        self.max_tasks, self.max_per_task, self.match = int(max_tasks), int(max_per_task), match
        self.store: OrderedDict[str, list[Batch]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(v) for v in self.store.values())

    def add_successes(self, batch: Batch) -> int:
        """Store every won, not-replayed episode of `batch` (its rows); returns episodes stored."""
        if not len(batch):
            return 0
        eids = batch.ids["episode_id"]
        stored = 0
        for eid in dict.fromkeys(eids.tolist()):
            rows = np.flatnonzero(eids == eid)
            if not bool(batch.ids["won"][rows[0]]) or bool(batch.ids["exp_replayed"][rows[0]]):
                continue
            ep = batch.select(rows)
            ep = Batch({k: v.clone() for k, v in ep.tensors.items() if k in _STORED_TENSORS}, ep.ids, {})
            tid = str(ep.ids[self.match][0])
            episodes = self.store.pop(tid, [])
            episodes.append(ep)
            self.store[tid] = episodes[-self.max_per_task:]
            stored += 1
        while len(self.store) > self.max_tasks:
            self.store.popitem(last=False)
        return stored

    def _low_groups(self, batch: Batch, success_threshold: float):
        """(uid, its episodes' last-row mask, task key, won per episode) of each group below the threshold."""
        last = batch.ids["is_last"].astype(bool)
        for uid in dict.fromkeys(batch.ids["uid"].tolist()):
            in_group = (batch.ids["uid"] == uid) & last
            won = batch.ids["won"][in_group].astype(bool)
            if won.mean() < success_threshold:
                yield uid, in_group, str(batch.ids[self.match][in_group][0]), won

    def wanting(self, batch: Batch, success_threshold: float) -> list[str]:
        """task_id of each low-success group that has no stored success to replay (yet)."""
        if not len(batch):
            return []
        return [str(batch.ids["task_id"][in_group][0])
                for _, in_group, tid, _ in self._low_groups(batch, success_threshold) if tid not in self.store]

    def replace_failures(self, batch: Batch, success_threshold: float, max_per_group: int) -> tuple[Batch, int]:
        """The batch with failed episodes of low-success groups swapped for stored successes; rows replayed."""
        if not len(batch) or max_per_group < 1 or not self.store:
            return batch, 0
        drop: set[str] = set()
        added: list[Batch] = []
        for uid, in_group, tid, won in self._low_groups(batch, success_threshold):
            if tid not in self.store:
                continue
            failed = [str(e) for e, w in zip(batch.ids["episode_id"][in_group], won) if not w]
            stored = list(reversed(self.store[tid]))  # newest first
            for victim, ep in zip(reversed(failed), stored[:max_per_group]):
                drop.add(victim)
                added.append(_as_replay(ep, uid, f"{victim}~replay"))
        if not added:
            return batch, 0
        keep = ~np.isin(batch.ids["episode_id"], list(drop))
        kept = batch.select(keep)
        replay_rows = sum(len(b) for b in added)
        return Batch.concat([kept, *[_match(b, kept) for b in added]]), replay_rows

    def state_dict(self) -> dict:
        return {"store": [(tid, [{"tensors": e.tensors, "ids": {k: v.tolist() for k, v in e.ids.items()}} for e in eps])
                          for tid, eps in self.store.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.store = OrderedDict(
            (tid, [Batch(e["tensors"], {k: np.array(v) for k, v in e["ids"].items()}, {}) for e in eps])
            for tid, eps in state["store"])


def _as_replay(ep: Batch, uid: str, episode_id: str) -> Batch:
    """Fresh ids for a replayed copy: the group's uid, a new episode / traj id, exp_mask on its tokens."""
    ids = {k: v.tolist() for k, v in ep.ids.items()}
    n = len(ep)
    step_mode = "/t" in str(ids["traj_id"][0])
    ids["traj_id"] = [f"{episode_id}/t{t}" if step_mode else episode_id for t in ids["turn"]]
    ids["episode_id"] = [episode_id] * n
    ids["uid"] = [uid] * n
    ids["exp_replayed"] = [True] * n
    tensors = dict(ep.tensors)
    tensors["exp_mask"] = tensors["response_mask"].clone()
    return Batch(tensors, {k: np.array(v) for k, v in ids.items()}, {})


def _match(b: Batch, like: Batch) -> Batch:
    """Only the fields `like` has (a stored episode may carry fewer), tensors as their dtype."""
    missing = [k for k in like.tensors if k not in DERIVED and k not in b.tensors]
    if missing:
        raise KeyError(f"replayed episode lacks {missing}")
    tensors = {k: b.tensors[k].to(like.tensors[k].dtype) for k in like.tensors if k not in DERIVED}
    return Batch(tensors, {k: b.ids[k] for k in like.ids}, dict(like.meta))

