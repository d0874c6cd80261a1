"""One live ALFWorld game on the real engine (TextWorld's PddlEnv + alfworld's wrappers).

The stack is what alfworld 0.4.2's `AlfredTWEnv` builds for text play:
`AlfredInfos(AlfredDemangler(shuffle=False)(PddlEnv(EnvInfos(won, admissible_commands, extras))))`,
without the `AlfredExpert` wrapper (its planner is slow and its handcoded expert is broken for
pick_two in 0.4.x): the walkthrough comes from the plan stored in the game file.

Why the caches: every `PddlEnv.load` and every `PddlEnv.reset` re-runs the fast-downward translator
twice (≈ 0.2-1 s for a real scene) and re-parses the grammar; a GRPO group plays the same game n
times. The translator output depends only on (domain, problem), so it is memoised per process
(bounded LRU), as are the parsed JSON and the grammar. A reset of a cached game then costs ≈ 30 ms.
Why one `PddlEnv` per engine, reused: each `PddlEnv()` dlopens a private copy of libdownward that is
never unloaded (a fresh env per episode grows RSS without bound), and one library copy holds one
live game state, so a process hosts as many engines as concurrent episodes and recycles them.
Why `textworld_speedups`: TextWorld's text grammar redoes pure work every turn (TatSu parses of the
same templates, deep copies of contexts); memoised, a turn costs ~10x less (scripts/benchmark_env.py).
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
from textworld.envs.pddl import PddlEnv
from textworld.envs.pddl import logic as pddl_logic

from agentevolver.alfworld import textworld_speedups
from agentevolver.alfworld.data import game_file_of, read_task_type
from agentevolver.alfworld.textworld_speedups import LRU

TASK_PREFIX = "Your task is to: "
CACHE_SIZE = 64  # games per process (≈ 1-3 MB each for real scenes)


@dataclass
class StepResult:
    """What the agent sees after a reset or a step. `info` on reset: task, task_type, walkthrough, game."""

    observation: str
    admissible: list[str]
    won: bool
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


_GAME_DATA = LRU(CACHE_SIZE)  # game file path -> parsed JSON
_LOGIC = LRU(CACHE_SIZE)  # game file path -> GameLogic (domain + grammar with the task sentence)
_TRANSLATION = LRU(CACHE_SIZE)  # (domain, problem[, optimize]) -> (task, sas)
_ORIGINAL_PDDL2SAS = fast_downward.pddl2sas
textworld_speedups.install()


def _memo_pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
    """fast_downward.pddl2sas, memoised on (domain, problem).

    PddlState translates twice: the plain task (played) and an `optimize=True` task that libdownward
    keeps only for `replan`. This engine never plans, so the replanning slot gets the plain
    translation too: one translator run per game instead of four per episode.
    """
    del optimize  # see docstring: the optimised task is only read by the planner
    return _TRANSLATION.get((domain, problem), lambda: _ORIGINAL_PDDL2SAS(domain, problem, verbose=verbose))


def _memo_pddl2sas_planning(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
    """fast_downward.pddl2sas memoised on (domain, problem, optimize): a planner needs the optimised task."""
    return _TRANSLATION.get((domain, problem, bool(optimize)),
                            lambda: _ORIGINAL_PDDL2SAS(domain, problem, verbose=verbose, optimize=optimize))


@contextlib.contextmanager
def engine_call(planning: bool = False) -> Iterator[None]:
    """Memoised translator for the duration of one load/reset; sys.argv restored (the translator sets it).

    planning=True keeps the optimised translation (for a PddlEnv that asks for `policy_commands`).
    """
    argv = list(sys.argv)
    fast_downward.pddl2sas = _memo_pddl2sas_planning if planning else _memo_pddl2sas
    try:
        yield
    finally:
        fast_downward.pddl2sas = _ORIGINAL_PDDL2SAS
        sys.argv[:] = argv


def _load_json(game_file: str) -> dict:
    with open(game_file) as f:
        return json.load(f)


class _CachedPddlEnv(PddlEnv):
    """PddlEnv whose `load` re-uses the parsed game file and grammar (same fields as PddlEnv.load)."""

    def load(self, game_file: str) -> None:
        data = _GAME_DATA.get(game_file, lambda: _load_json(game_file))
        self._game_file = game_file
        self._game_data = data
        self.walkthrough = data.get("walkthrough", None)
        self._logic = _LOGIC.get(
            game_file,
            lambda: pddl_logic.GameLogic(domain=data["pddl_domain"], grammar=data["grammar"]),
        )
        self._pddl_state = pddl_logic.PddlState(self.downward_lib, data["pddl_problem"], self._logic)
        self._entity_infos = self._get_entity_infos()


def extract_task(observation: str) -> str:
    """The task sentence of the intro text ('put a clean apple in fridge.'), '' if absent."""
    idx = observation.rfind(TASK_PREFIX)
    return observation[idx + len(TASK_PREFIX):].strip() if idx >= 0 else ""


class GameEngine:
    """One live game. `reset(game)` loads (or re-uses) the game; `step(command)` plays one command.

    Never plans: the walkthrough in `info` is the plan stored in the game file.
    """

    def __init__(self) -> None:
        # `walkthrough` is the file's plan: `_CachedPddlEnv.load` sets it from the game data and `reset`
        # puts that list in `info` (PddlEnv would plan only for a file without one; every alfworld
        # game file and every generated one has it, so nothing here ever plans).
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        self._env = AlfredInfos(AlfredDemangler(shuffle=False)(_CachedPddlEnv(infos)))
        self._loaded: str | None = None
        self.game_file: str | None = None
        self.episodes = 0

    def reset(self, game: str | Path) -> StepResult:
        game_file = game_file_of(game)
        with engine_call():
            if self._loaded != game_file:
                self._loaded = None  # a failed load leaves the engine unloaded, not half-loaded
                self._env.load(game_file)
                self._loaded = game_file
            state = self._env.reset()
        self.game_file = game_file
        self.episodes += 1
        observation = state["feedback"]
        data = _GAME_DATA.get(game_file, lambda: _load_json(game_file))
        info = {
            "task": extract_task(observation),
            "task_type": read_task_type(Path(game_file).parent),
            "walkthrough": list(data.get("walkthrough") or []),
            "game": str(Path(game_file).parent),
        }
        return StepResult(observation, list(state["admissible_commands"]), bool(state["won"]), False, info)

    def step(self, command: str) -> StepResult:
        if self._loaded is None or self.game_file is None:
            raise RuntimeError("GameEngine.step before reset")
        state, _, done = self._env.step(command)
        won = bool(state["won"])
        return StepResult(state["feedback"], list(state["admissible_commands"]), won, bool(done or won), {})


def cache_stats() -> dict[str, int]:
    """Sizes and hit counts of this process's game caches."""
    return {
        "games": len(_GAME_DATA),
        "logic": len(_LOGIC),
        "translations": len(_TRANSLATION),
        "translation_hits": _TRANSLATION.hits,
        "translation_misses": _TRANSLATION.misses,
        **textworld_speedups.stats(),
    }
