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


_PROBLEM_NAME = re.compile(r"\(problem [^)]*\)")


def problem_key(pddl_problem: str) -> str:
    """A game's PDDL problem without its (trial) name: equal keys = the same game under another name."""
    return _PROBLEM_NAME.sub("", pddl_problem)


def problem_keys(games: Iterable[str | os.PathLike]) -> set[str]:
    """problem_key of each game (a folder or its game.tw-pddl)."""
    out = set()
    for g in games:
        with open(game_file_of(g)) as f:
            out.add(problem_key(json.load(f)["pddl_problem"]))
    return out


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


# What the engine reads from a game file at load (engine._CachedPddlEnv.load).
REQUIRED_GAME_KEYS = ("pddl_domain", "pddl_problem", "grammar")
BROKEN_GAMES_FILE = "broken_games.txt"


@dataclass(frozen=True)
class BrokenGame:
    """A game folder the start-up scan cannot use, and why (one phrase)."""

    game_dir: str
    reason: str


@dataclass
class GameScan:
    """The start-up scan of one split: playable games, and broken ones (skipped, reported)."""

    split: str
    games: list[GameSpec]
    broken: list[BrokenGame]

    @property
    def broken_frac(self) -> float:
        total = len(self.games) + len(self.broken)
        return len(self.broken) / total if total else 0.0


def _read_game(game_file: Path) -> tuple[dict | None, str | None]:
    """(game data, None) or (None, why it is unusable). The cheap check: the JSON parses and holds what
    the engine's load reads. The PDDL itself is only compiled at load (~0.5 s a game: too slow to do
    for every game at start); a game that fails there is named once by the env pool (env_error)."""
    try:
        with open(game_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{GAME_FILE} unreadable ({type(e).__name__}: {e})"
    except json.JSONDecodeError as e:
        return None, f"{GAME_FILE} is not valid JSON ({e})"
    if not isinstance(data, dict):
        return None, f"{GAME_FILE} is not a JSON object"
    missing = [k for k in REQUIRED_GAME_KEYS if not isinstance(data.get(k), str) or not data.get(k)]
    if missing:
        return None, f"{GAME_FILE} lacks {', '.join(missing)}"
    return data, None


def scan_games(
    folder: str | os.PathLike, split: str = "", task_types: Iterable[str] | None = None
) -> GameScan:
    """Every game folder below `folder`, sorted by path: playable games, and broken ones (a game file
    that does not parse or lacks what the engine reads; a trial folder whose game.tw-pddl is gone).
    Unsolvable / `movable` / `Sliced` games are skipped by design and not counted as broken."""
    folder = Path(folder)
    wanted = _check_task_types(task_types)
    specs, broken = [], []
    game_dirs = {p.parent for p in folder.rglob(GAME_FILE)} | {p.parent for p in folder.rglob(TRAJ_FILE)}
    for game_dir in sorted(game_dirs):
        if "movable" in str(game_dir) or "Sliced" in str(game_dir):
            continue  # alfworld's loaders skip these (not supported by the text engine)
        game_file = game_dir / GAME_FILE
        if not game_file.is_file():
            broken.append(BrokenGame(str(game_dir), f"{GAME_FILE} missing (only {TRAJ_FILE} there)"))
            continue
        data, problem = _read_game(game_file)
        if problem:
            broken.append(BrokenGame(str(game_dir), problem))
            continue
        if not data.get("solvable", False):
            continue
        task_type = read_task_type(game_dir)
        if wanted is not None and task_type not in wanted:
            continue
        task_id = f"{game_dir.parent.name}/{game_dir.name}"
        specs.append(GameSpec(str(game_dir), task_type, task_id, split))
    return GameScan(split, specs, broken)


def games_under(
    folder: str | os.PathLike, split: str = "", task_types: Iterable[str] | None = None
) -> list[GameSpec]:
    """Every playable game below `folder`, sorted by path; skips unsolvable / `movable` / `Sliced` and
    broken games (`scan_games` lists those)."""
    return scan_games(folder, split, task_types).games


def _check_task_types(task_types: Iterable[str] | None) -> set[str] | None:
    if task_types is None:
        return None
    wanted = set(task_types)
    unknown = wanted - set(TASK_TYPES)
    if unknown:
        raise AlfworldDataError(f"unknown task types {sorted(unknown)}; valid: {', '.join(TASK_TYPES)}")
    return wanted


def scan_split(
    data_dir: str | os.PathLike | None, split: str, task_types: Iterable[str] | None = None
) -> GameScan:
    """The scan of one split (sorted by path); raises when the split folder is not there."""
    root = resolve_data_dir(data_dir) / DATA_SUBDIR
    splits = available_splits(root.parent)
    if split not in splits:
        raise AlfworldDataError(
            f"split {split!r} not found under {root}; available splits: {', '.join(splits) or 'none'} "
            f"(official: {', '.join(KNOWN_SPLITS)})"
        )
    return scan_games(root / split, split=split, task_types=task_types)


def list_games(
    data_dir: str | os.PathLike | None, split: str, task_types: Iterable[str] | None = None
) -> list[GameSpec]:
    """Games of one split, sorted by path (fixed order: an eval pass plays each game exactly once);
    broken games are left out (`scan_split` reports them)."""
    scan = scan_split(data_dir, split, task_types)
    if not scan.games:
        root = resolve_data_dir(data_dir) / DATA_SUBDIR
        raise AlfworldDataError(
            f"no playable games in split {split!r} under {root} (task_types={task_types}; "
            f"{len(scan.broken)} broken); available splits: {', '.join(available_splits(root.parent))}"
        )
    return scan.games


def check_broken_games(scans: Sequence[GameScan], max_broken_frac: float, key: str) -> str | None:
    """The one summary line about broken games (None when there are none); raises AlfworldDataError
    when a split has no playable game left, or more than `max_broken_frac` of its games are broken."""
    broken = [b for scan in scans for b in scan.broken]
    for scan in scans:
        total = len(scan.games) + len(scan.broken)
        example = f", e.g. {scan.broken[0].game_dir}: {scan.broken[0].reason}" if scan.broken else ""
        if not scan.games:
            raise AlfworldDataError(f"no playable game left in split {scan.split!r} after skipping "
                                    f"{len(scan.broken)} broken one(s){example}" if scan.broken else
                                    f"no playable games in split {scan.split!r}")
        if scan.broken_frac > max_broken_frac:
            raise AlfworldDataError(
                f"{key}={max_broken_frac}: {len(scan.broken)} of {total} games of split {scan.split!r} are broken "
                f"({scan.broken_frac:.0%}){example}; fix or remove them, or raise {key}")
    if not broken:
        return None
    return (f"warning: skipping {len(broken)} broken game(s), e.g. {broken[0].game_dir}: {broken[0].reason} "
            f"(all listed in {BROKEN_GAMES_FILE})")


def write_broken_games(scans: Sequence[GameScan], out_dir: str | os.PathLike) -> Path | None:
    """`<out_dir>/broken_games.txt`: one `path<TAB>reason` line per broken game (None when there are none)."""
    broken = [b for scan in scans for b in scan.broken]
    if not broken:
        return None
    path = Path(out_dir) / BROKEN_GAMES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{b.game_dir}\t{b.reason}\n" for b in broken))
    return path


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
