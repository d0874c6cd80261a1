"""EnvPool: ALFWorld games hosted in Ray actors, reset and stepped in batches.

Each worker actor hosts many live episodes (one `GameEngine` per live episode, engines recycled
across episodes) and asks Ray for a fraction of a CPU so it fits beside trainer actors on a small
box. One pool call sends one batched request per worker and waits for all of them in parallel;
batching many episodes per call is what amortises the Ray round trip (≈ 1 ms) against a 30-70 ms step.

Failures: a Python exception inside one env ends that episode only (`done=True`, `info["error"]`;
its engine is dropped, others on the worker are separate libdownward copies and go on). A worker
that dies or overruns its deadline (a hang in C code cannot be interrupted from Python) is killed
and replaced; each of its live episodes ends with `info["error"]`. The rest of the batch goes on.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Sequence

import psutil
import ray

from agentevolver.alfworld.data import GameSpec
from agentevolver.alfworld.engine import GameEngine, StepResult, cache_stats

RESET_FAILED = "reset failed for "  # the prefix of a game's load failure (EnvWorker.reset)


def error_result(message: str, info: dict | None = None) -> StepResult:
    """A terminal StepResult for an episode whose env failed (the trainer marks it `env_error`)."""
    return StepResult(f"[env error] {message}", [], False, True, {**(info or {}), "error": message})


class EnvWorker:
    """Hosts live episodes (episode_id -> GameEngine) in one process. Used as a Ray actor."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._live: dict[str, GameEngine] = {}
        self._free: list[GameEngine] = []
        self.engines_created = 0

    def _engine(self) -> GameEngine:
        if self._free:
            return self._free.pop()
        self.engines_created += 1
        return GameEngine()

    def reset(self, requests: list[tuple[str, str]]) -> dict[str, StepResult]:
        out = {}
        for episode_id, game_dir in requests:
            if episode_id in self._live:
                self._free.append(self._live.pop(episode_id))
            engine = self._engine()
            try:
                out[episode_id] = engine.reset(game_dir)
                self._live[episode_id] = engine
            except Exception as exc:  # noqa: BLE001 - a broken game must not end the batch
                out[episode_id] = error_result(f"{RESET_FAILED}{game_dir}: {type(exc).__name__}: {exc}")
        return out

    def step(self, actions: dict[str, str]) -> dict[str, StepResult]:
        out = {}
        for episode_id, command in actions.items():
            engine = self._live.get(episode_id)
            if engine is None:
                out[episode_id] = error_result(f"episode {episode_id} is not live on this worker")
                continue
            try:
                out[episode_id] = engine.step(command)
            except Exception as exc:  # noqa: BLE001 - drop this engine only (its state is unknown)
                del self._live[episode_id]
                out[episode_id] = error_result(f"step failed: {type(exc).__name__}: {exc}")
        return out

    def close(self, episode_ids: list[str]) -> None:
        for episode_id in episode_ids:
            engine = self._live.pop(episode_id, None)
            if engine is not None:
                self._free.append(engine)

    def stats(self) -> dict:
        return {
            "pid": os.getpid(),
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "live": len(self._live),
            "engines": self.engines_created,
            **cache_stats(),
        }

    def sleep(self, seconds: float) -> None:
        """Block the worker (tests use it to exercise the hang/timeout path)."""
        time.sleep(seconds)


class EnvPool:
    """Batched, parallel ALFWorld episodes over `num_workers` Ray actors.

    `step_timeout_s` / `reset_timeout_s` bound one env operation; a batched call of n operations on a
    worker gets a deadline of `timeout + n * timeout / 8` (normal costs are ≈ 0.07 s a step, ≈ 2 s a
    first load, so this only fires on a real hang).
    """

    def __init__(
        self,
        num_workers: int = 2,
        num_cpus_per_worker: float = 0.25,
        step_timeout_s: float = 30.0,
        reset_timeout_s: float = 120.0,
        max_restarts: int = 100,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"EnvPool needs num_workers >= 1, got {num_workers}")
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(EnvWorker)
        self.step_timeout_s = step_timeout_s
        self.reset_timeout_s = reset_timeout_s
        self.max_restarts = max_restarts
        self.num_restarts = 0
        self._workers = [self._actor_cls.remote() for _ in range(num_workers)]
        self._where: dict[str, int] = {}  # episode_id -> worker index
        self.failed_games: dict[str, str] = {}  # game folder -> its first load error (named once)
        ray.get([w.stats.remote() for w in self._workers])  # fail fast if actors cannot start

    # ---------------------------------------------------------------- public API
    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def worker_handles(self) -> list:
        """The live actor handles (tests kill one with `ray.kill` to exercise a restart)."""
        return list(self._workers)

    def live_episodes(self) -> dict[str, int]:
        return dict(self._where)

    def reset(self, requests: Sequence[tuple[str, GameSpec | str]]) -> dict[str, StepResult]:
        """Start episodes: episode_id -> first observation. Episodes of one game share a worker when
        balance allows (its cached translation is re-used); load is spread evenly over workers."""
        games = {eid: (g.game_dir if isinstance(g, GameSpec) else str(g)) for eid, g in requests}
        if len(games) != len(requests):
            raise ValueError("EnvPool.reset: duplicate episode ids in one call")
        self.close([eid for eid in games if eid in self._where])
        plan = self._assign(sorted(games, key=lambda eid: (games[eid], eid)))
        calls = {w: [(eid, games[eid]) for eid in eids] for w, eids in plan.items() if eids}
        for w, batch in calls.items():
            for eid, _ in batch:
                self._where[eid] = w
        results = self._call("reset", calls, self.reset_timeout_s)
        for eid, res in results.items():
            if res.info.get("error"):
                self._where.pop(eid, None)
                self._name_failed_game(games[eid], res.info["error"])
        return {eid: results[eid] for eid, _ in requests}

    def _name_failed_game(self, game_dir: str, error: str) -> None:
        """A game that fails to load (e.g. its PDDL does not compile: the start-up scan only parses the
        JSON) is named once; each of its episodes still ends as env_error."""
        if error.startswith(RESET_FAILED) and game_dir not in self.failed_games:
            self.failed_games[game_dir] = error
            print(f"warning: env_error: game {game_dir} failed to load ({error.split(': ', 1)[-1]}); "
                  "its episodes count as env_error", flush=True)

    def step(self, actions: dict[str, str]) -> dict[str, StepResult]:
        """Play one command in each listed episode, all workers in parallel."""
        calls: dict[int, dict[str, str]] = {}
        out: dict[str, StepResult] = {}
        for eid, command in actions.items():
            if eid not in self._where:
                out[eid] = error_result(f"episode {eid} is not live (never reset, closed, or failed)")
                continue
            calls.setdefault(self._where[eid], {})[eid] = command
        results = self._call("step", calls, self.step_timeout_s)
        for eid, res in results.items():
            if res.info.get("error"):
                self._where.pop(eid, None)
        out.update(results)
        return {eid: out[eid] for eid in actions}

    def close(self, episode_ids: Iterable[str]) -> None:
        """Free the episodes' engines for re-use (unknown ids are ignored)."""
        by_worker: dict[int, list[str]] = {}
        for eid in episode_ids:
            w = self._where.pop(eid, None)
            if w is not None:
                by_worker.setdefault(w, []).append(eid)
        refs = {w: self._workers[w].close.remote(eids) for w, eids in by_worker.items()}
        for w, ref in refs.items():
            try:
                ray.get(ref, timeout=self.step_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                self._restart(w)

    def stats(self) -> list[dict]:
        """Per-worker pid, RSS (MB), live episodes, engines created, cache counters."""
        return ray.get([w.stats.remote() for w in self._workers], timeout=self.step_timeout_s)

    def shutdown(self) -> None:
        for w in self._workers:
            ray.kill(w)
        self._workers = []
        self._where.clear()

    # ---------------------------------------------------------------- internals
    def _assign(self, episode_ids: list[str]) -> dict[int, list[str]]:
        """Fill workers in game order up to an even quota (live episodes count toward it)."""
        n = self.num_workers
        live = [0] * n
        for w in self._where.values():
            live[w] += 1
        target = math.ceil((sum(live) + len(episode_ids)) / n)
        quota = [max(0, target - live[w]) for w in range(n)]
        plan: dict[int, list[str]] = {w: [] for w in range(n)}
        w = 0
        for eid in episode_ids:
            while quota[w] == 0:
                w = (w + 1) % n
            plan[w].append(eid)
            quota[w] -= 1
        return plan

    def _call(self, method: str, calls: dict[int, list | dict], timeout_s: float) -> dict[str, StepResult]:
        refs = {w: getattr(self._workers[w], method).remote(payload) for w, payload in calls.items()}
        deadline = {w: time.monotonic() + timeout_s * (1 + len(calls[w]) / 8) for w in refs}
        out: dict[str, StepResult] = {}
        pending = dict(refs)
        while pending:
            wait_s = max(0.0, min(deadline[w] for w in pending) - time.monotonic())
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=wait_s)
            ready_set = set(ready)
            now = time.monotonic()
            for w in list(pending):
                ref = pending[w]
                if ref in ready_set:
                    del pending[w]
                    try:
                        out.update(ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        out.update(self._fail_worker(w, calls[w], f"env worker died: {type(exc).__name__}"))
                elif now >= deadline[w]:
                    del pending[w]
                    out.update(self._fail_worker(w, calls[w], f"env worker timed out after {timeout_s}s"))
        return out

    def _fail_worker(self, w: int, payload: list | dict, message: str) -> dict[str, StepResult]:
        """Restart worker w; every episode of this call on it ends with `info["error"]`."""
        eids = [eid for eid, _ in payload] if isinstance(payload, list) else list(payload)
        self._restart(w)  # its other live episodes get the error on their next step ("not live")
        return {eid: error_result(message) for eid in eids}

    def _restart(self, w: int) -> None:
        if self.num_restarts >= self.max_restarts:
            raise RuntimeError(f"EnvPool: env workers restarted {self.num_restarts} times (max_restarts)")
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(self._workers[w])
        for eid in [eid for eid, wi in self._where.items() if wi == w]:
            del self._where[eid]
        self.num_restarts += 1
        self._workers[w] = self._actor_cls.remote()
