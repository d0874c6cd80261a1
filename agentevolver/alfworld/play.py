"""`python -m agentevolver.alfworld play`: play each game under a folder once, through the same pool and
loop the trainer uses, with a scripted policy (walkthrough / random) or a human at the terminal."""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from agentevolver.alfworld.agent import PolicyOutput, TurnView, run_episodes
from agentevolver.alfworld.data import (
    CONFIG_KEY,
    DATA_SUBDIR,
    GET_DATA_HINT,
    TASK_TYPES,
    AlfworldDataError,
    GameSpec,
    count_by_task_type,
    games_under,
    list_games,
)


def _wrap(action: str, why: str) -> str:
    return f"<think>{why}</think><action>{action}</action>"


class WalkthroughPolicy:
    """Plays the planner walkthrough stored in the game file (an expert; should win every game).

    With max_detours > 0 it first visits 0..max_detours other receptacles, chosen per episode from a
    seeded RNG. The planner knows where objects are and an agent does not: detours show the search a
    real agent needs, with legal moves only, and the walkthrough still wins afterwards because
    `go to` is admissible from anywhere (the SFT warm start's `explore` teacher).
    """

    def __init__(self, seed: int = 0, max_detours: int = 0) -> None:
        self.seed, self.max_detours = seed, max_detours
        self.plans: dict[str, list[str]] = {}

    def action(self, view: TurnView) -> str:
        plan = self.plans.get(view.episode_id)
        if plan is None:
            walkthrough = list(view.info.get("walkthrough") or [])
            rng = random.Random(f"{self.seed}-{view.episode_id}")
            others = sorted(a for a in view.admissible if a.startswith("go to ") and a not in walkthrough)
            k = rng.randint(0, min(self.max_detours, len(others)))
            plan = self.plans[view.episode_id] = rng.sample(others, k) + walkthrough
        return plan[view.step] if view.step < len(plan) else "look"  # past the plan: harmless filler

    def act(self, views: list[TurnView]) -> list[PolicyOutput]:
        return [PolicyOutput(_wrap(self.action(v), "follow the plan")) for v in views]


class RandomPolicy:
    """Uniform over the admissible actions, from a seeded RNG (a chance-level baseline)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def act(self, views: list[TurnView]) -> list[PolicyOutput]:
        return [PolicyOutput(_wrap(self.rng.choice(v.admissible), "random")) for v in views]


class HumanPolicy:
    """Shows observation + numbered admissible actions and reads a number or a command from stdin."""

    def __init__(self, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stderr) -> None:
        self.stdin, self.stdout = stdin, stdout

    def act(self, views: list[TurnView]) -> list[PolicyOutput]:
        outs = []
        for v in views:
            print(f"\n=== {v.episode_id} step {v.step} — task: {v.task}\n{v.observation}", file=self.stdout)
            for i, a in enumerate(v.admissible, 1):
                print(f"  {i:2d}. {a}", file=self.stdout)
            print("> ", end="", file=self.stdout, flush=True)
            line = self.stdin.readline()
            if not line:
                outs.append(PolicyOutput("", finish_reason="context_limit"))  # EOF: stop the episode
                continue
            line = line.strip()
            if line.isdigit() and 1 <= int(line) <= len(v.admissible):
                line = v.admissible[int(line) - 1]
            outs.append(PolicyOutput(_wrap(line, "human")))
        return outs


# --policy name -> factory(seed); the only place a policy name is resolved
POLICIES: dict[str, Callable[[int], Any]] = {
    "walkthrough": lambda seed: WalkthroughPolicy(seed),
    "random": lambda seed: RandomPolicy(seed),
    "human": lambda seed: HumanPolicy(),  # a person needs no seed
}


def make_policy(name: str, seed: int):
    """The policy registered under `name`, seeded with `seed` (--seed)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    return factory(seed)


def find_games(path: str | None, split: str | None, task_types: Sequence[str] | None = None) -> list[GameSpec]:
    """`path` = a data dir (with --split) or any folder holding game.tw-pddl files."""
    folder = Path(path) if path is not None else None
    if split is not None or folder is None or not folder.is_dir() or (folder / DATA_SUBDIR).is_dir():
        return list_games(path, split or "valid_seen", task_types)  # raises the data-dir error + hint
    games = games_under(folder, split="", task_types=task_types)
    if not games:
        raise AlfworldDataError(
            f"{CONFIG_KEY}/--games {path}: no playable game.tw-pddl files below this folder: "
            f"to get games, {GET_DATA_HINT}"
        )
    return games


def summarize(games: Sequence[GameSpec], stats: dict) -> dict:
    """{games, won, success_rate, mean_steps, per_task_type: {task_type: {games, won}}}."""
    played = count_by_task_type(g.task_type for g in games)
    won_per = count_by_task_type(g.task_type for g, s in zip(games, stats.values()) if s.won)
    n, won = len(games), sum(int(s.won) for s in stats.values())
    return {
        "games": n,
        "won": won,
        "success_rate": won / n if n else 0.0,
        "mean_steps": sum(s.steps for s in stats.values()) / n if n else 0.0,
        "finish_reasons": dict(Counter(s.finish_reason for s in stats.values())),
        "per_task_type": {t: {"games": k, "won": won_per.get(t, 0)} for t, k in played.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentevolver.alfworld play", description=__doc__)
    p.add_argument("--games", default=None, help="data dir (with --split) or a folder of games; "
                   "default $ALFWORLD_DATA")
    p.add_argument("--split", default=None, help="split of a data dir (default valid_seen)")
    p.add_argument("--policy", default="walkthrough", choices=sorted(POLICIES))
    p.add_argument("--task-types", nargs="*", default=None, choices=TASK_TYPES)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="play only the first N games")
    p.add_argument("--json", action="store_true", help="last stdout line = one JSON summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    games = find_games(args.games, args.split, args.task_types)[: args.limit]
    import ray

    from agentevolver.alfworld.pool import EnvPool

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    pool = EnvPool(num_workers=args.workers)
    try:
        episodes = [(f"{i:05d}", g) for i, g in enumerate(games)]
        # The human plays one game at a time; scripted policies play every game in one batch.
        chunk = 1 if args.policy == "human" else len(episodes)
        policy = make_policy(args.policy, args.seed)
        stats: dict = {}
        for i in range(0, len(episodes), chunk):
            stats.update(run_episodes(pool, episodes[i:i + chunk], policy, max_steps=args.max_steps))
    finally:
        pool.shutdown()
        ray.shutdown()
    for g, s in zip(games, stats.values()):
        print(f"{'WON ' if s.won else 'lost'} {s.steps:3d} steps  {s.finish_reason:13s} {g.task_id}")
    summary = summarize(games, stats)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"won {summary['won']}/{summary['games']} ({summary['success_rate']:.1%}), "
              f"mean steps {summary['mean_steps']:.2f}")
    return 0
