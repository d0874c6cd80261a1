"""Self-questioning: training tasks drawn on line from the game generator, with a success curriculum.

`data.task_source=generated`: every training game is a fresh procedurally generated one (never a repeat
unless `data.task_gen.max_games` caps the stream). Which game comes next is decided on the driver —
a task type and one level per difficulty knob, sampled from the curriculum's weights — and made by a
background Ray actor (`TaskGenActor`) that keeps `prefetch` batches ready, so generation runs while
the trainer rolls out and updates. No generated game has a held-out game's PDDL problem (a draw that
does is redrawn). A game depends only on (seed, index, task type, knob levels), the
draw of index i only on (seed, i) and the curriculum's counts, so a run is reproducible and a resume
re-submits the pending requests saved in the checkpoint.

Curriculum (`data.task_gen.curriculum`, a registry): `uniform`, or `success_pq`: a key k (a task type,
or one level of one knob) with recent success p_k over its last `curriculum_window` episodes gets weight
    w_k = max(p̂_k (1 − p̂_k), curriculum_min_weight),   p̂_k = (wins_k + 1) / (episodes_k + 2),
so most weight goes where success is mid-range (the most learning signal for a GRPO group), and weights
are normalised per kind (task type; each knob). Unseen keys have p̂ = 0.5, the maximum.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agentevolver.alfworld.data import DATA_SUBDIR, TASK_TYPES, GameSpec

TASK_SOURCES = ("fixed", "generated")
KNOBS = ("receptacles", "distractors", "closed_fraction")


def uniform_weights(wins: np.ndarray, episodes: np.ndarray, min_weight: float) -> np.ndarray:
    """w_k = 1 for every key."""
    return np.ones_like(wins, dtype=np.float64)


def success_pq_weights(wins: np.ndarray, episodes: np.ndarray, min_weight: float) -> np.ndarray:
    """w_k = max(p̂(1 − p̂), min_weight) with p̂ = (wins + 1) / (episodes + 2) (Laplace-smoothed)."""
    p = (np.asarray(wins, dtype=np.float64) + 1.0) / (np.asarray(episodes, dtype=np.float64) + 2.0)
    return np.maximum(p * (1.0 - p), min_weight)


CURRICULA: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "uniform": uniform_weights,
    "success_pq": success_pq_weights,
}


def get_curriculum(name: str) -> Callable[[np.ndarray, np.ndarray, float], np.ndarray]:
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; valid: {', '.join(CURRICULA)}")
    return CURRICULA[name]


class Curriculum:
    """Recent outcomes per key ("type:<task_type>", "<knob>:<level>") and the sampling weights."""

    def __init__(self, name: str, task_types: Sequence[str], levels: dict[str, int], window: int,
                 min_weight: float) -> None:
        self.fn, self.name = get_curriculum(name), name
        self.task_types = list(task_types)
        self.levels = dict(levels)  # knob -> number of levels
        self.window, self.min_weight = int(window), float(min_weight)
        self.recent: dict[str, deque] = {}

    def _keys(self, kind: str) -> list[str]:
        if kind == "type":
            return [f"type:{t}" for t in self.task_types]
        return [f"{kind}:{i}" for i in range(self.levels[kind])]

    def probs(self, kind: str) -> np.ndarray:
        keys = self._keys(kind)
        wins = np.array([sum(self.recent.get(k, ())) for k in keys], dtype=np.float64)
        eps = np.array([len(self.recent.get(k, ())) for k in keys], dtype=np.float64)
        w = self.fn(wins, eps, self.min_weight)
        return w / w.sum()

    def observe(self, task_type: str, levels: dict[str, int], won: bool) -> None:
        for key in [f"type:{task_type}", *(f"{k}:{v}" for k, v in levels.items())]:
            self.recent.setdefault(key, deque(maxlen=self.window)).append(int(won))

    def metrics(self) -> dict[str, float]:
        out = {}
        for t, p in zip(self.task_types, self.probs("type")):
            out[f"curriculum/weight/{t}"] = float(p)
            rec = self.recent.get(f"type:{t}", ())
            if rec:  # recent success the weight came from (absent before the first episode of a type)
                out[f"curriculum/success/{t}"] = float(np.mean(rec))
        for knob in self.levels:
            if self.levels[knob] > 1:
                for i, p in enumerate(self.probs(knob)):
                    out[f"curriculum/weight/{knob}/{i}"] = float(p)
        return out

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.recent.items()}

    def load_state_dict(self, state: dict) -> None:
        self.recent = {k: deque(v, maxlen=self.window) for k, v in state.items()}


class TaskGenActor:
    """Makes games in its own process (a Ray actor): one planner + engine, reused for every game."""

    def __init__(self, split_dir: str, exclude: Sequence[str] = ()) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.split_dir = Path(split_dir)
        self.exclude = frozenset(exclude)  # problem keys never to make (the held-out games')
        self.staging = tempfile.mkdtemp(prefix="alfworld-taskgen-")

    def make(self, specs: list[dict]) -> tuple[list[dict], float]:
        """Generate each spec (seed, index, task_type, knob values); returns their GameSpec fields and seconds."""
        from agentevolver.alfworld.generator import generate_game

        t0, out = time.perf_counter(), []
        for s in specs:
            folder = generate_game(self.split_dir, s["seed"], s["index"], s["task_type"], s["split"],
                                   s["min_receptacles"], s["max_receptacles"], tuple(s["distractors"]),
                                   s["closed_fraction"], Path(self.staging), exclude=self.exclude)
            out.append({"game_dir": str(folder), "task_type": s["task_type"],
                        "task_id": f"{folder.parent.name}/{folder.name}", "split": s["split"]})
        return out, time.perf_counter() - t0


class GeneratedTaskSource:
    """The stream of generated training games (see the module docstring). cfg = the whole config."""

    def __init__(self, cfg: Any, out_dir: Path, exclude: Sequence[str] = ()) -> None:
        """exclude: problem keys (alfworld.data.problem_key) no generated game may have: the held-out set's."""
        g = cfg.data.task_gen
        self.seed = int(cfg.data.seed * 1_000_003 + 17 if g.seed is None else g.seed)
        self.split = str(g.split)
        self.batch_size = int(cfg.data.train_batch_size)
        self.prefetch = int(g.prefetch)
        self.max_games = None if g.max_games is None else int(g.max_games)
        self.task_types = list(cfg.env.alfworld.task_types or TASK_TYPES)
        self.knob_levels = {"receptacles": [tuple(x) for x in g.receptacles],
                            "distractors": [tuple(x) for x in g.distractors],
                            "closed_fraction": [float(x) for x in g.closed_fraction]}
        self.curriculum = Curriculum(g.curriculum, self.task_types,
                                     {k: len(v) for k, v in self.knob_levels.items()},
                                     g.curriculum_window, g.curriculum_min_weight)
        self.split_dir = Path(out_dir) / "generated_tasks" / DATA_SUBDIR / self.split
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.next_index = 0  # games requested so far (the stream position)
        self.made: list[dict] = []  # GameSpec fields of every game made (for max_games repeats)
        self.levels_of: dict[str, dict[str, int]] = {}  # task_id -> knob levels, until observed
        self.pending: deque[tuple[list[dict], Any]] = deque()  # (specs, ObjectRef) in request order
        self.draws = 0  # batches drawn (seeds the repeat choice)
        import ray  # here, not at import: config_check imports this module's registries

        self.actor = ray.remote(num_cpus=0.01)(TaskGenActor).remote(str(self.split_dir), sorted(exclude))
        self.last_wait_s = 0.0
        self.last_gen_s = 0.0

    # ---------------------------------------------------------------- requests
    def _spec(self, index: int) -> dict:
        """What game `index` is: its task type and knob levels, drawn from the current weights."""
        rng = np.random.default_rng([self.seed, index])
        task_type = self.task_types[int(rng.choice(len(self.task_types), p=self.curriculum.probs("type")))]
        levels = {k: int(rng.choice(len(v), p=self.curriculum.probs(k))) for k, v in self.knob_levels.items()}
        rec, dis = self.knob_levels["receptacles"][levels["receptacles"]], \
            self.knob_levels["distractors"][levels["distractors"]]
        return {"seed": self.seed, "index": index, "task_type": task_type, "split": self.split,
                "min_receptacles": int(rec[0]), "max_receptacles": int(rec[1]), "distractors": [int(dis[0]), int(dis[1])],
                "closed_fraction": self.knob_levels["closed_fraction"][levels["closed_fraction"]], "levels": levels}

    def _submit(self, specs: list[dict]) -> None:
        fresh = [s for s in specs if "repeat" not in s]
        ref = self.actor.make.remote(fresh) if fresh else None
        self.pending.append((specs, ref))

    def _request(self) -> None:
        specs = []
        for _ in range(self.batch_size):
            if self.max_games is not None and self.next_index >= self.max_games:
                specs.append({"repeat": True})  # resolved at draw time from the games made
            else:
                specs.append(self._spec(self.next_index))
                self.next_index += 1
        self._submit(specs)

    def start(self) -> None:
        while len(self.pending) < self.prefetch:
            self._request()

    # ---------------------------------------------------------------- draws
    def next_games(self) -> list[GameSpec]:
        """The next batch (waits only if the background actor is behind); one new request replaces it."""
        import ray

        self.start()
        specs, ref = self.pending.popleft()
        t0 = time.perf_counter()
        made, gen_s = ray.get(ref) if ref is not None else ([], 0.0)
        self.last_wait_s, self.last_gen_s = time.perf_counter() - t0, gen_s
        fresh = iter([dict(m, levels=s["levels"]) for m, s in zip(made, [s for s in specs if "repeat" not in s])])
        rng = np.random.default_rng([self.seed, 1 << 20, self.draws])
        self.draws += 1
        games = []
        for s in specs:
            if "repeat" in s:  # max_games reached: a game made earlier, uniformly
                g = self.made[int(rng.integers(len(self.made)))]
            else:
                g = next(fresh)
                self.made.append(g)
            self.levels_of[g["task_id"]] = g["levels"]
            games.append(GameSpec(g["game_dir"], g["task_type"], g["task_id"], g["split"]))
        self._request()
        return games

    def peek_games(self) -> list[GameSpec]:
        """The games of the pending requests (waits for them), without drawing them."""
        import ray

        out = []
        for _, ref in self.pending:
            made = ray.get(ref)[0] if ref is not None else []
            out += [GameSpec(g["game_dir"], g["task_type"], g["task_id"], g["split"]) for g in made]
        return out

    def observe(self, task_ids: Sequence[str], task_types: Sequence[str], won: Sequence[bool]) -> None:
        """Episode outcomes of drawn games update the curriculum (one count per episode)."""
        for tid, ttype, w in zip(task_ids, task_types, won):
            self.curriculum.observe(ttype, self.levels_of.get(tid, {}), bool(w))
        for tid in set(task_ids):  # observed once per draw: a repeat draw sets its levels again
            self.levels_of.pop(tid, None)

    def metrics(self) -> dict[str, float]:
        return self.curriculum.metrics() | {"curriculum/games_made": float(self.next_index),
                                            "timing/task_gen_background": self.last_gen_s}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "made": self.made, "draws": self.draws,
                "pending": [specs for specs, _ in self.pending], "curriculum": self.curriculum.state_dict(),
                "levels_of": self.levels_of}

    def load_state_dict(self, state: dict) -> None:
        self.next_index, self.made, self.draws = state["next_index"], state["made"], state["draws"]
        self.levels_of = state["levels_of"]
        self.curriculum.load_state_dict(state["curriculum"])
        self.pending.clear()
        for specs in state["pending"]:  # same specs -> the same games (byte-identical files)
            self._submit(specs)

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor)
