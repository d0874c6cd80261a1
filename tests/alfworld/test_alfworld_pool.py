"""EnvPool on real Ray actors and the real engine: the agent loop, worker failure, memory."""
import time
from pathlib import Path

import pytest
import ray

from agentevolver.alfworld.agent import FORMAT_ERROR_OBSERVATION, PolicyOutput, run_episodes
from agentevolver.alfworld.data import TASK_TYPES, list_games
from agentevolver.alfworld.play import RandomPolicy, WalkthroughPolicy, summarize
from agentevolver.alfworld.pool import EnvPool


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_cluster):
    p = EnvPool(num_workers=2)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def small_games(shared_alfworld):
    """The 2 smallest valid_seen scenes of each task type (fast to load), in task-type order."""
    games = list_games(shared_alfworld, "valid_seen")
    out = []
    for t in TASK_TYPES:
        of_type = sorted((g for g in games if g.task_type == t), key=lambda g: Path(g.game_file).stat().st_size)
        out += of_type[:2]
    return out


def _walkthrough(game):
    import json

    return json.loads(Path(game.game_file).read_text())["walkthrough"]


@pytest.mark.slow
def test_walkthrough_wins_every_valid_seen_game(pool, shared_alfworld):
    games = list_games(shared_alfworld, "valid_seen")
    t0 = time.perf_counter()
    timing = {}
    stats = run_episodes(pool, [(f"g{i:03d}", g) for i, g in enumerate(games)], WalkthroughPolicy(),
                         max_steps=30, timing=timing)
    elapsed = time.perf_counter() - t0
    summary = summarize(games, stats)
    print(f"\nvalid_seen walkthrough: {summary['won']}/{summary['games']} in {elapsed:.1f}s "
          f"(env {timing['env']:.1f}s)")
    assert summary["won"] == 140 and summary["success_rate"] == 1.0
    assert summary["per_task_type"] == {t: {"games": n, "won": n} for t, n in
                                        zip(TASK_TYPES, (35, 13, 27, 16, 25, 24))}
    assert all(s.finish_reason == "won" and s.format_errors == 0 and s.invalid_actions == 0
               for s in stats.values())
    assert pool.live_episodes() == {}  # closed at the end


def test_random_policy_rarely_wins(pool, small_games):
    episodes = [(f"r{i}", g) for i, g in enumerate(small_games[::2])]  # one per task type
    stats = run_episodes(pool, episodes, RandomPolicy(seed=0), max_steps=20)
    rate = sum(s.won for s in stats.values()) / len(stats)
    print(f"\nrandom policy success on {len(stats)} small games, 20 steps, seed 0: {rate:.3f}")
    assert rate < 0.3
    assert all(s.finish_reason in ("won", "max_steps") for s in stats.values())
    assert all(s.steps == 20 for s in stats.values() if not s.won)


class _ScriptedPolicy:
    """Turn 0: no tags (format error); turn 1: a non-admissible action; then the walkthrough."""

    def __init__(self, plans):
        self.plans = plans
        self.seen = []

    def act(self, views):
        outs = []
        for v in views:
            self.seen.append((v.episode_id, v.step, v.observation))
            if v.episode_id == "ctx":
                outs.append(PolicyOutput("", finish_reason="context_limit"))
            elif v.step == 0:
                outs.append(PolicyOutput("I would go to the desk"))
            elif v.step == 1:
                outs.append(PolicyOutput("<think>hm</think><action>dance with the lamp</action>"))
            else:
                outs.append(PolicyOutput(f"<action>{self.plans[v.episode_id][v.step - 2].upper()}</action>"))
        return outs


def test_run_episodes_counts_errors_and_finish_reasons(pool, small_games):
    game, other = small_games[0], small_games[2]
    plans = {"ok": _walkthrough(game), "short": _walkthrough(other)}
    policy = _ScriptedPolicy(plans)
    timing = {}
    stats = run_episodes(pool, [("ok", game), ("short", other), ("ctx", game)], policy, max_steps=3,
                         timing=timing)
    ok = run_episodes(pool, [("ok", game)], policy, max_steps=30)["ok"]
    assert ok.won and ok.finish_reason == "won"
    assert ok.format_errors == 1 and ok.invalid_actions == 1 and ok.steps == len(plans["ok"]) + 2
    assert ok.history[1][0] == FORMAT_ERROR_OBSERVATION  # the env was not stepped on the format error
    assert ok.history[1][1] == "dance with the lamp"
    assert ok.history[2][0] == "Nothing happens."  # the invalid action was stepped
    assert stats["short"].finish_reason == "max_steps" and stats["short"].steps == 3
    assert stats["ctx"].finish_reason == "context_limit" and stats["ctx"].steps == 0
    assert timing["env"] > 0
    assert ok.task_type == game.task_type and ok.task_id == game.task_id


def test_pool_survives_a_killed_worker(ray_cluster, small_games):
    pool = EnvPool(num_workers=2)
    try:
        game, other = small_games[0], small_games[1]
        first = pool.reset([("a0", game), ("a1", game), ("b0", other), ("b1", other)])
        assert not any(r.info.get("error") for r in first.values())
        where = pool.live_episodes()
        assert sorted(where.values()) == [0, 0, 1, 1] and where["a0"] == where["a1"]  # one game, one worker
        plans = {e: _walkthrough(game if e[0] == "a" else other) for e in where}
        pool.step({e: plans[e][0] for e in where})
        victim = where["a0"]
        ray.kill(pool.worker_handles()[victim])  # a real actor dies mid-episode
        res = pool.step({e: plans[e][1] for e in where})
        dead = [e for e in where if where[e] == victim]
        alive = [e for e in where if where[e] != victim]
        assert all(res[e].done and "died" in res[e].info["error"] for e in dead)
        assert all(not res[e].info.get("error") for e in alive)
        assert pool.num_restarts == 1
        for turn in range(2, max(len(plans[e]) for e in alive)):  # the others play on and win
            res = pool.step({e: plans[e][turn] for e in alive if turn < len(plans[e])})
        assert all(res[e].won for e in res)
        again = pool.step({dead[0]: "look"})[dead[0]]
        assert again.done and "not live" in again.info["error"]
        fresh = pool.reset([("c0", game), ("c1", other)])  # the replaced worker serves new episodes
        assert not any(r.info.get("error") for r in fresh.values())
        assert sorted(pool.live_episodes().values()) == [0, 0, 1, 1]
    finally:
        pool.shutdown()


def test_pool_times_out_a_hung_worker(ray_cluster, small_games):
    pool = EnvPool(num_workers=2, step_timeout_s=2.0)
    try:
        game = small_games[0]
        pool.reset([("x", game), ("y", small_games[1])])
        hung = pool.live_episodes()["x"]
        pool.worker_handles()[hung].sleep.remote(60)  # the worker is stuck (like a C-level hang)
        t0 = time.perf_counter()
        res = pool.step({"x": _walkthrough(game)[0], "y": _walkthrough(small_games[1])[0]})
        assert time.perf_counter() - t0 < 10
        assert res["x"].done and "timed out" in res["x"].info["error"]
        assert not res["y"].info.get("error")
        assert pool.num_restarts == 1
        assert not pool.reset([("z", game)])["z"].info.get("error")
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_worker_memory_is_flat(ray_cluster, small_games):
    """100 short episodes (reset, 2 steps, close) on one worker cycling 2 games: after a warm-up of
    20 (engines and caches built) RSS must not grow by more than 15 MB. A fresh PddlEnv per episode
    (new libdownward copy each) grows by several MB per episode, i.e. > 100 MB here."""
    pool = EnvPool(num_workers=1)
    try:
        games = small_games[:2]
        plans = [_walkthrough(g)[:2] for g in games]
        rss = []
        for batch in range(10):
            ids = [f"m{batch}-{k}" for k in range(10)]
            pool.reset([(e, games[k % 2]) for k, e in enumerate(ids)])
            for turn in range(2):
                pool.step({e: plans[k % 2][turn] for k, e in enumerate(ids)})
            pool.close(ids)
            if batch in (1, 9):
                rss.append(pool.stats()[0]["rss_mb"])
        print(f"\nworker RSS after 20 episodes {rss[0]:.1f} MB, after 100 {rss[1]:.1f} MB")
        assert rss[1] - rss[0] < 15
        assert pool.stats()[0]["engines"] == 10  # engines are recycled, not re-created
    finally:
        pool.shutdown()
