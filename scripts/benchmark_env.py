"""Env throughput and memory: EnvPool (Ray workers) vs a raw single-process alfworld loop.

Same games, same action sequences (the stored walkthroughs of N real games, each played R times).
Raw loop = what alfworld's own text env does per episode: one PddlEnv + AlfredDemangler + AlfredInfos,
`load(game)` + `reset()` per episode, then the commands, on TextWorld as shipped (textworld_speedups
disabled for it). Engine loops = one in-process GameEngine with and without textworld_speedups.
Pool = all episodes reset in one batched call and stepped in lockstep (one batched pool.step per
turn), as the trainer does.
Prints ONE JSON object (last stdout line).

    python scripts/benchmark_env.py [--data DIR] [--games 8] [--repeats 4] [--episodes 500]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray

from agentevolver.alfworld import textworld_speedups
from agentevolver.alfworld.data import TASK_TYPES, GameSpec, list_games
from agentevolver.alfworld.engine import GameEngine
from agentevolver.alfworld.pool import EnvPool

SHARED = Path(__file__).resolve().parents[2] / "shared" / "alfworld"  # the real games beside the checkout


def pick_games(data_dir: str, split: str, n: int) -> list[GameSpec]:
    """n games round-robin over task types (fixed: the first of each type in path order, then next)."""
    by_type: dict[str, list[GameSpec]] = {}
    for g in list_games(data_dir, split):
        by_type.setdefault(g.task_type, []).append(g)
    picked, i = [], 0
    while len(picked) < n:
        for t in TASK_TYPES:
            if i < len(by_type.get(t, [])) and len(picked) < n:
                picked.append(by_type[t][i])
        i += 1
    return picked


def walkthrough(game: GameSpec) -> list[str]:
    with open(game.game_file) as f:
        return json.load(f)["walkthrough"]


def engine_loop(episodes: list[GameSpec], speedups: bool) -> dict:
    """One GameEngine in this process (no Ray), with or without textworld_speedups."""
    with contextlib.nullcontext() if speedups else textworld_speedups.disabled():
        engine, steps, won, reset_s = GameEngine(), 0, 0, 0.0
        t0 = time.perf_counter()
        for game in episodes:
            t = time.perf_counter()
            res = engine.reset(game.game_dir)
            reset_s += time.perf_counter() - t
            for command in walkthrough(game):
                res = engine.step(command)
                steps += 1
            won += int(res.won)
        total = time.perf_counter() - t0
    return {"steps": steps, "won": won, "time_s": total, "step_s": total - reset_s}


@textworld_speedups.disabled()  # alfworld's env on TextWorld as shipped
def raw_loop(episodes: list[GameSpec]) -> dict:
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl import PddlEnv

    argv = list(sys.argv)
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(shuffle=False)(PddlEnv(infos)))
    steps, won, reset_s = 0, 0, 0.0
    plans = [walkthrough(g) for g in episodes]
    t0 = time.perf_counter()
    for game, plan in zip(episodes, plans):
        t = time.perf_counter()
        env.load(game.game_file)
        env.reset()
        reset_s += time.perf_counter() - t
        for command in plan:
            state, _, _ = env.step(command)
            steps += 1
        won += int(state["won"])
    total = time.perf_counter() - t0
    sys.argv[:] = argv
    return {"steps": steps, "won": won, "time_s": total, "step_s": total - reset_s,
            "reset_s_mean": reset_s / len(episodes)}


def pool_loop(pool: EnvPool, episodes: list[GameSpec]) -> dict:
    plans = {f"e{i}": walkthrough(g) for i, g in enumerate(episodes)}
    t0 = time.perf_counter()
    pool.reset([(f"e{i}", g) for i, g in enumerate(episodes)])
    reset_s = time.perf_counter() - t0
    steps, won, turn = 0, 0, 0
    active = set(plans)
    while active:
        results = pool.step({eid: plans[eid][turn] for eid in sorted(active)})
        steps += len(results)
        turn += 1
        for eid, res in results.items():
            if res.done or turn >= len(plans[eid]):
                won += int(res.won)
                active.discard(eid)
    total = time.perf_counter() - t0
    pool.close(list(plans))
    return {"steps": steps, "won": won, "time_s": total, "step_s": total - reset_s,
            "reset_s_mean": reset_s / len(episodes)}


def rss_per_hosted_game(pool: EnvPool, games: list[GameSpec]) -> float:
    """RSS added to one worker per concurrently hosted (distinct, first-time) game."""
    before = pool.stats()[0]["rss_mb"]
    pool.reset([(f"h{i}", g) for i, g in enumerate(games)])
    after = pool.stats()[0]["rss_mb"]
    pool.close([f"h{i}" for i in range(len(games))])
    return (after - before) / len(games)


def rss_growth(pool: EnvPool, games: list[GameSpec], episodes: int, batch: int = 10, warmup: int = 50) -> dict:
    """RSS of a worker over `episodes` short episodes (reset, 2 walkthrough steps, close), cycling games."""
    plans = [walkthrough(g)[:2] for g in games]
    rss, done = [], 0
    while done < episodes:
        ids = [f"m{done + k}" for k in range(batch)]
        idx = [(done + k) % len(games) for k in range(batch)]
        pool.reset([(eid, games[i]) for eid, i in zip(ids, idx)])
        for turn in range(2):
            pool.step({eid: plans[i][turn] for eid, i in zip(ids, idx)})
        pool.close(ids)
        done += batch
        if done == warmup or done >= episodes:
            rss.append(pool.stats()[0]["rss_mb"])
    return {"rss_after_warmup_mb": rss[0], "rss_end_mb": rss[-1], "growth_mb": rss[-1] - rss[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else os.environ.get("ALFWORLD_DATA"))
    p.add_argument("--split", default="valid_seen")
    p.add_argument("--games", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    games = pick_games(args.data, args.split, args.games)
    episodes = [g for g in games for _ in range(args.repeats)]  # a GRPO group = one game repeated
    raw = raw_loop(episodes)
    plain, fast = engine_loop(episodes, speedups=False), engine_loop(episodes, speedups=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = EnvPool(num_workers=args.workers)
    pooled = pool_loop(pool, episodes)
    pool.shutdown()

    one = EnvPool(num_workers=1)
    hosted = rss_per_hosted_game(one, pick_games(args.data, args.split, 24)[args.games:])
    small = sorted(games, key=lambda g: os.path.getsize(g.game_file))[:4]
    memory = rss_growth(one, small, args.episodes)
    one.shutdown()
    ray.shutdown()

    pool_sps = pooled["steps"] / pooled["time_s"]
    raw_sps = raw["steps"] / raw["time_s"]
    assert pooled["steps"] == raw["steps"] and pooled["won"] == raw["won"] == len(episodes), (pooled, raw)
    assert plain["won"] == fast["won"] == len(episodes), (plain, fast)
    print(json.dumps({
        "episodes": len(episodes),
        "steps": raw["steps"],
        "pool_workers": args.workers,
        "pool_steps_per_s": round(pool_sps, 2),
        "raw_steps_per_s": round(raw_sps, 2),
        "ratio": round(pool_sps / raw_sps, 2),
        "pool_step_only_steps_per_s": round(pooled["steps"] / pooled["step_s"], 2),
        "raw_step_only_steps_per_s": round(raw["steps"] / raw["step_s"], 2),
        "engine_step_only_steps_per_s": round(fast["steps"] / fast["step_s"], 2),
        "engine_no_speedups_step_only_steps_per_s": round(plain["steps"] / plain["step_s"], 2),
        "speedups_ratio_step_only": round(plain["step_s"] / fast["step_s"], 2),
        "speedups_ratio_whole_episodes": round(plain["time_s"] / fast["time_s"], 2),
        "reset_s_mean": round(pooled["reset_s_mean"], 4),
        "raw_reset_s_mean": round(raw["reset_s_mean"], 4),
        "rss_mb_per_hosted_game": round(hosted, 2),
        "rss_growth_mb_over_500_episodes": round(memory["growth_mb"], 2),
        "rss_worker_mb": round(memory["rss_end_mb"], 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
