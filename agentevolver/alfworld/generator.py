"""Procedural ALFWorld games: `python -m agentevolver.alfworld generate --out DIR --num-games N --seed S`.

Writes games in alfworld 0.4.2's layout and format, as `alfworld-generate` does for ALFRED trials:
`OUT/json_2.1.1/<split>/<task_type>-<Obj>-None-<Recep>-<scene>/<trial>/` with `game.tw-pddl` (the
wheel's alfred.pddl, alfred.twl2 with the task sentence filled in, the problem, `solvable: true`, the
fast-downward plan as `walkthrough`), `traj_data.json` and `initial_state.pddl`.

Per game: sample a scene (gen_scenes), ask the planner for a plan on the task objects (domain
randomization off, so the command numbers are the ones every loader shows), then replay the plan on
the real engine (`GameEngine`) from the files as written; only a game whose plan ends with won=True
is kept, anything else is re-drawn (a new attempt seed). Same seed and knobs -> byte-identical files;
game i depends only on (seed, i, knobs), so the first k games of an N-game run equal a k-game run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from agentevolver.alfworld.data import (
    DATA_SUBDIR,
    GAME_FILE,
    TASK_TYPES,
    TRAJ_FILE,
    count_by_task_type,
    problem_key,
    problem_keys,
    read_task_type,
)
from agentevolver.alfworld.gen_scenes import Scene, sample_scene, scene_to_pddl, task_sentences

MAX_ATTEMPTS = 20  # re-draws per game before giving up (a failed draw is rare: see tests)
MAX_PLAN_LEN = 40  # a longer plan means an odd scene; re-draw it
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class GenerationError(ValueError):
    """A user-fixable problem with the generator's arguments."""


def _wheel_logic() -> tuple[str, str]:
    """The domain and grammar shipped in the alfworld wheel (what its loaders expect)."""
    data = resources.files("alfworld").joinpath("data")
    return data.joinpath("alfred.pddl").read_text(), data.joinpath("alfred.twl2").read_text()


class _Planner:
    """fast-downward through TextWorld's PddlEnv (one env, reused: each PddlEnv dlopens a libdownward)."""

    def __init__(self) -> None:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv

        infos = textworld.EnvInfos(admissible_commands=True, won=True, policy_commands=True)
        self._env = AlfredDemangler(shuffle=False)(PddlEnv(infos))  # no shuffle: numbers match loaders

    def plan(self, game_data: dict) -> list[str]:
        from agentevolver.alfworld.engine import engine_call

        with engine_call(planning=True):  # load and reset translate the same problem: once
            self._env.load(game_data)
            state = self._env.reset()
        if state["won"]:
            return []  # goal already met at the start: not a task
        return list(state["policy_commands"] or [])


_TOOLS: dict = {}


def _tools():
    """(planner, engine), made once per process: each dlopens a libdownward copy that is never freed."""
    if not _TOOLS:
        from agentevolver.alfworld.engine import GameEngine

        _TOOLS["planner"], _TOOLS["engine"] = _Planner(), GameEngine()
    return _TOOLS["planner"], _TOOLS["engine"]


def _replay(engine, game_dir: Path, walkthrough: list[str]) -> tuple[bool, str]:
    """Play the walkthrough on the real engine: every command admissible, won exactly at the end."""
    result = engine.reset(game_dir)
    if result.won:
        return False, "won at reset"
    for i, command in enumerate(walkthrough):
        if command not in result.admissible:
            return False, f"step {i}: {command!r} not admissible"
        result = engine.step(command)
        if result.won and i < len(walkthrough) - 1:
            return False, f"won early at step {i}"
    return (True, "") if result.won else (False, "not won after the walkthrough")


def _game_files(scene: Scene, trial: str, seed: int, index: int, domain: str, grammar: str,
                rng: random.Random) -> tuple[dict, dict, str]:
    """(game.tw-pddl data without walkthrough, traj_data, problem text)."""
    params = scene.pddl_params()
    sentences = task_sentences(scene.task_type, params)
    problem = scene_to_pddl(scene, trial)
    game = {
        "pddl_domain": domain,
        # alfworld's add_task_to_grammar with a templated sentence (human annotations prob 0)
        "grammar": grammar.replace("UNKNOWN GOAL", rng.choice(sentences)),
        "pddl_problem": problem,
        "solvable": None,
        "walkthrough": None,
    }
    traj = {
        "task_id": trial,
        "task_type": scene.task_type,
        "pddl_params": params,
        "scene": {"floor_plan": f"FloorPlan{scene.scene_num}", "scene_num": scene.scene_num,
                  "room": scene.room, "random_seed": seed, "dirty_and_empty": False},
        "turk_annotations": {"anns": [{"task_desc": s} for s in sentences]},
        "generator": {"seed": seed, "index": index, "num_receptacles": len(scene.receptacles),
                      "num_objects": len(scene.objects), "num_distractors": scene.num_distractors,
                      "num_closed": scene.num_closed()},
    }
    return game, traj, problem


def _write_game(folder: Path, game: dict, traj: dict, problem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GAME_FILE).write_text(json.dumps(game))
    (folder / TRAJ_FILE).write_text(json.dumps(traj, indent=1))
    (folder / "initial_state.pddl").write_text(problem)


def task_type_schedule(num_games: int, task_types: Sequence[str], rng: random.Random) -> list[str]:
    """Balanced task types: each block of len(task_types) games holds every type once, shuffled."""
    schedule: list[str] = []
    while len(schedule) < num_games:
        block = list(task_types)
        rng.shuffle(block)
        schedule += block
    return schedule[:num_games]


def _check_args(num_games, task_types, split, min_receptacles, max_receptacles, num_distractors,
                closed_fraction) -> list[str]:
    if num_games < 1:
        raise GenerationError(f"num_games must be >= 1, got {num_games}")
    types = list(TASK_TYPES) if not task_types else list(dict.fromkeys(task_types))
    unknown = [t for t in types if t not in TASK_TYPES]
    if unknown:
        raise GenerationError(f"unknown task types {unknown}; valid: {', '.join(TASK_TYPES)}")
    if not _SPLIT_RE.match(split):
        raise GenerationError(f"split must be a plain name like train / valid_seen, got {split!r}")
    if not 3 <= min_receptacles <= max_receptacles <= 25:
        raise GenerationError(
            f"need 3 <= min_receptacles <= max_receptacles <= 25, got {min_receptacles}, {max_receptacles}")
    lo, hi = num_distractors
    if not 0 <= lo <= hi <= 40:
        raise GenerationError(f"need 0 <= distractors lo <= hi <= 40, got ({lo}, {hi})")
    if not 0.0 <= closed_fraction <= 1.0:
        raise GenerationError(f"closed_fraction must be in [0, 1], got {closed_fraction}")
    return types


def generate_games(
    out_dir: str | os.PathLike,
    num_games: int,
    seed: int,
    task_types: Sequence[str] | None = None,
    split: str = "train",
    min_receptacles: int = 6,
    max_receptacles: int = 25,
    num_distractors: tuple[int, int] = (2, 8),
    closed_fraction: float = 1.0,
    exclude: frozenset[str] = frozenset(),
) -> list[Path]:
    """Generate `num_games` planner-verified games under OUT/json_2.1.1/<split>/; returns their folders.
    No game gets a problem_key in `exclude` (e.g. a held-out split's: see `--exclude`).

    Difficulty knobs: receptacles per room in [min_receptacles, max_receptacles] (more places to search),
    distractor objects in `num_distractors` (more admissible commands), `closed_fraction` of the openable
    receptacles start closed (1.0 like ALFRED). With task_types None the six types are balanced.
    """
    types = _check_args(num_games, task_types, split, min_receptacles, max_receptacles, num_distractors,
                        closed_fraction)
    split_dir = Path(out_dir) / DATA_SUBDIR / split
    split_dir.mkdir(parents=True, exist_ok=True)
    domain, grammar = _wheel_logic()
    schedule = task_type_schedule(num_games, types, random.Random(f"schedule:{seed}"))
    out: list[Path] = []
    # Staging folders get fresh names (the engine caches games by path, so a path must never be reused)
    # and live outside OUT (a killed run must not leave half-checked games where loaders look).
    with tempfile.TemporaryDirectory(prefix="alfworld-gen-") as staging:
        for index, task_type in enumerate(schedule):
            out.append(generate_game(split_dir, seed, index, task_type, split, min_receptacles, max_receptacles,
                                     tuple(num_distractors), closed_fraction, Path(staging), domain, grammar,
                                     exclude))
    return out


def generate_game(split_dir: Path, seed: int, index: int, task_type: str, split: str, min_receptacles: int,
                  max_receptacles: int, num_distractors: tuple[int, int], closed_fraction: float,
                  staging: Path, domain: str | None = None, grammar: str | None = None,
                  exclude: frozenset[str] = frozenset()) -> Path:
    """Game `index` of the stream `seed` with these knobs, verified and moved to split_dir; its folder.

    Depends only on (seed, index, task_type, knobs, exclude), so a background generator and
    `generate_games` write the same bytes for the same arguments. `staging` must be a folder outside
    split_dir. A draw whose `problem_key` is in `exclude` (e.g. a held-out game's) is redrawn.
    """
    if domain is None or grammar is None:
        domain, grammar = _wheel_logic()
    planner, engine = _tools()
    tag = str(seed).replace("-", "m")
    trial = f"trial_S{tag}_{index:05d}"
    errors = []
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"game:{seed}:{index}:{attempt}")
        scene = sample_scene(rng, task_type, split, min_receptacles, max_receptacles,
                             tuple(num_distractors), closed_fraction)
        game, traj, problem = _game_files(scene, trial, seed, index, domain, grammar, rng)
        if exclude and problem_key(problem) in exclude:
            errors.append(f"attempt {attempt}: an excluded (held-out) problem")
            continue
        # Plan on the task objects only (distractors make pick_two searches 10-100x slower);
        # the replay below checks the plan on the full game.
        plan = planner.plan(dict(game, pddl_problem=scene_to_pddl(scene.task_only(), trial)))
        if not plan or len(plan) > MAX_PLAN_LEN:
            errors.append(f"attempt {attempt}: plan of length {len(plan)}")
            continue
        game["solvable"], game["walkthrough"] = True, plan
        traj["generator"]["attempt"] = attempt
        stage = Path(staging) / f"{seed}-{index}-{attempt}" / scene.dir_name() / trial
        _write_game(stage, game, traj, problem)
        ok, why = _replay(engine, stage, plan)
        if ok:
            final = Path(split_dir) / scene.dir_name() / trial
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage), str(final))
            return final
        errors.append(f"attempt {attempt}: replay failed: {why}")
    raise RuntimeError(f"game {index} ({task_type}): no winnable draw in {MAX_ATTEMPTS} "
                       f"attempts: {'; '.join(errors[-3:])}")


def _int_pair(text: str) -> tuple[int, int]:
    parts = text.replace(":", ",").replace("-", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or LO,HI, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentevolver.alfworld generate",
                                description="Generate planner-verified ALFWorld games (alfworld 0.4.2).")
    p.add_argument("--out", required=True, help="output data dir (games go to OUT/json_2.1.1/<split>/)")
    p.add_argument("--num-games", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-types", nargs="+", default=None, metavar="TYPE",
                   help=f"subset of: {' '.join(TASK_TYPES)} (default: all six, balanced)")
    p.add_argument("--split", default="train")
    p.add_argument("--min-receptacles", type=int, default=6)
    p.add_argument("--max-receptacles", type=int, default=25)
    p.add_argument("--distractors", type=_int_pair, default=(2, 8), metavar="LO,HI",
                   help="distractor objects per game, N or LO,HI (default 2,8)")
    p.add_argument("--closed-fraction", type=float, default=1.0,
                   help="fraction of openable receptacles that start closed (default 1.0)")
    p.add_argument("--exclude", default=None, metavar="DIR",
                   help="a folder of games (e.g. OUT/json_2.1.1/valid_seen) whose problems must not be made again: "
                        "a training split that never holds a held-out game")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        exclude = frozenset()
        if args.exclude is not None:
            if not Path(args.exclude).is_dir():
                raise GenerationError(f"--exclude {args.exclude}: not a folder")
            exclude = frozenset(problem_keys(Path(args.exclude).rglob(GAME_FILE)))
        games = generate_games(args.out, args.num_games, args.seed, args.task_types, args.split,
                               args.min_receptacles, args.max_receptacles, args.distractors,
                               args.closed_fraction, exclude)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    summary = {"games": len(games), "out": str(Path(args.out) / DATA_SUBDIR / args.split),
               "per_task_type": count_by_task_type(read_task_type(game) for game in games),
               "seconds": round(seconds, 2), "seconds_per_game": round(seconds / max(len(games), 1), 3)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
