"""ALFWorld game files on disk: where the data lives, which games a split holds, which wording it uses.

Layout (alfworld 0.4.x, what `alfworld-download` fetches and what the generator writes):
`<data_dir>/json_2.1.1/<split>/<task_type>-<Obj>-<MRecep>-<Recep>-<scene>/<trial>/game.tw-pddl`
(+ `traj_data.json`). Games are listed sorted by path so an eval pass plays each game exactly once in a
fixed order (the random eval draws of other stacks repeat some games and skip others).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
DATA_SUBDIR = "json_2.1.1"
CONFIG_KEY = "env.alfworld.data_dir"
# Canonical order = alfworld's TASK_TYPES ids 1..6.
TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
KNOWN_SPLITS = ("train", "valid_seen", "valid_unseen")
GET_DATA_HINT = (
    "run `alfworld-download` (official data) or "
    "`python -m agentevolver.alfworld generate --out DIR --num-games N`"
)
_PUT_TEMPLATE = re.compile(r'template\s*::\s*"(move|put) \{o\} (?:to|in/on|in|on) \{r\}"')


class AlfworldDataError(ValueError):
    """A user-fixable problem with the ALFWorld data (missing folder, unknown split, no games)."""


@dataclass(frozen=True)
class GameSpec:
    """One playable game: its folder, task type, id `<task-dir>/<trial>` and split."""

    game_dir: str
    task_type: str
    task_id: str
    split: str

    @property
    def game_file(self) -> str:
        return os.path.join(self.game_dir, GAME_FILE)


def game_file_of(game: str | os.PathLike) -> str:
    """Accept a game folder or its game.tw-pddl path."""
    path = Path(game)
    return str(path if path.name == GAME_FILE else path / GAME_FILE)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding `json_2.1.1/` (`data_dir` may also be json_2.1.1 itself; None -> $ALFWORLD_DATA)."""
    raw = data_dir if data_dir is not None else os.environ.get("ALFWORLD_DATA")
    if not raw:
        raise AlfworldDataError(
            f"{CONFIG_KEY} is not set and $ALFWORLD_DATA is empty: to get games, {GET_DATA_HINT}"
        )
    path = Path(os.path.expandvars(str(raw))).expanduser()
    if path.name == DATA_SUBDIR and path.is_dir():
        path = path.parent
    sub = path / DATA_SUBDIR
    if not sub.is_dir() or not any(p.is_dir() for p in sub.iterdir()):
        raise AlfworldDataError(
            f"{CONFIG_KEY}={raw}: no ALFWorld games at {sub}: to get games, {GET_DATA_HINT}"
        )
    return path


def available_splits(data_dir: str | os.PathLike | None) -> list[str]:
    """Split folders present under json_2.1.1 (e.g. train, valid_seen, valid_unseen, valid_train)."""
    sub = resolve_data_dir(data_dir) / DATA_SUBDIR
    return sorted(p.name for p in sub.iterdir() if p.is_dir())


def _task_type_from_dir_name(name: str) -> str:
    prefix = name.split("-", 1)[0]
    return prefix if prefix in TASK_TYPES else ""


def read_task_type(game_dir: str | os.PathLike) -> str:
    """`task_type` of traj_data.json; falls back to the task folder's name prefix."""
    game_dir = Path(game_dir)
    traj = game_dir / TRAJ_FILE
    if traj.is_file():
        try:
            with open(traj) as f:
                task_type = json.load(f).get("task_type", "")
            if task_type:
                return task_type
        except (OSError, ValueError):
            pass
    return _task_type_from_dir_name(game_dir.parent.name)


def _is_solvable(game_file: Path) -> bool:
    # The flag is at the end of a large JSON file; read it the way alfworld's loader does.
    with open(game_file) as f:
        return bool(json.load(f).get("solvable", False))


def games_under(
    folder: str | os.PathLike, split: str = "", task_types: Iterable[str] | None = None
) -> list[GameSpec]:
    """Every playable game below `folder`, sorted by path; skips unsolvable / `movable` / `Sliced`."""
    folder = Path(folder)
    wanted = _check_task_types(task_types)
    specs = []
    for game_file in sorted(folder.rglob(GAME_FILE)):
        game_dir = game_file.parent
        if "movable" in str(game_dir) or "Sliced" in str(game_dir):
            continue  # alfworld's loaders skip these (not supported by the text engine)
        if not _is_solvable(game_file):
            continue
        task_type = read_task_type(game_dir)
        if wanted is not None and task_type not in wanted:
            continue
        task_id = f"{game_dir.parent.name}/{game_dir.name}"
        specs.append(GameSpec(str(game_dir), task_type, task_id, split))
    return specs


def _check_task_types(task_types: Iterable[str] | None) -> set[str] | None:
    if task_types is None:
        return None
    wanted = set(task_types)
    unknown = wanted - set(TASK_TYPES)
    if unknown:
        raise AlfworldDataError(f"unknown task types {sorted(unknown)}; valid: {', '.join(TASK_TYPES)}")
    return wanted


def list_games(
    data_dir: str | os.PathLike | None, split: str, task_types: Iterable[str] | None = None
) -> list[GameSpec]:
    """Games of one split, sorted by path (fixed order: an eval pass plays each game exactly once)."""
    root = resolve_data_dir(data_dir) / DATA_SUBDIR
    splits = available_splits(root.parent)
    if split not in splits:
        raise AlfworldDataError(
            f"split {split!r} not found under {root}; available splits: {', '.join(splits) or 'none'} "
            f"(official: {', '.join(KNOWN_SPLITS)})"
        )
    games = games_under(root / split, split=split, task_types=task_types)
    if not games:
        raise AlfworldDataError(
            f"no playable games in split {split!r} under {root} (task_types={task_types}); "
            f"available splits: {', '.join(splits)}"
        )
    return games


def detect_command_wording(games: Sequence[GameSpec | str | os.PathLike]) -> str:
    """'move' (alfworld 0.4: `move X to Y`) or 'put' (0.3 data / papers: `put X in/on Y`).

    Read from the put-action template in the grammar stored in the first game file(s).
    """
    for game in games[:5]:
        game_file = game.game_file if isinstance(game, GameSpec) else game_file_of(game)
        with open(game_file) as f:
            data = json.load(f)
        match = _PUT_TEMPLATE.search(data.get("grammar", ""))
        if match:
            return match.group(1)
        for command in data.get("walkthrough") or []:
            if command.startswith(("move ", "put ")):
                return command.split(" ", 1)[0]
    raise AlfworldDataError("cannot detect the command wording: no put/move template in the game grammar")


def count_by_task_type(task_types: Iterable[str]) -> dict[str, int]:
    """{task_type: count} of one task type per game, in TASK_TYPES order, then any others sorted
    (types with no game are left out)."""
    counts = Counter(task_types)
    return {t: counts[t] for t in TASK_TYPES if t in counts} | {
        t: counts[t] for t in sorted(counts) if t not in TASK_TYPES
    }
