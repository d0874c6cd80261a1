"""Issue 14 item 13: broken game data is scanned at start, reported by path (one line + a file), skipped
and counted; too many broken games, or none left, refuse the start; a game whose PDDL fails at load
is named once by the env pool."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray

from agentevolver.alfworld.data import (
    BROKEN_GAMES_FILE,
    GAME_FILE,
    AlfworldDataError,
    check_broken_games,
    scan_split,
    write_broken_games,
)
from tests.helpers import one_line_error, run_main_ppo

N_GAMES = 6


@pytest.fixture
def data(shared_alfworld, tmp_path) -> tuple[Path, list[Path]]:
    """6 real valid_seen games copied into train + valid_seen; the first train game has invalid JSON,
    the second lost its game.tw-pddl."""
    src = sorted((shared_alfworld / "json_2.1.1" / "valid_seen").glob("*/*"))[:N_GAMES]
    root = tmp_path / "alf"
    dirs = []
    for split in ("train", "valid_seen"):
        for game in src:
            dst = root / "json_2.1.1" / split / game.parent.name / game.name
            shutil.copytree(game, dst)
            if split == "train":
                dirs.append(dst)
    (dirs[0] / GAME_FILE).write_text('{"pddl_domain": "(define", ')  # cut mid-write
    (dirs[1] / GAME_FILE).unlink()
    return root, dirs


def test_scan_names_each_broken_game_and_keeps_the_rest(data, tmp_path):
    root, dirs = data
    scan = scan_split(root, "train")
    assert len(scan.games) == N_GAMES - 2 and [b.game_dir for b in scan.broken] == [str(dirs[0]), str(dirs[1])]
    assert scan.broken[0].reason.startswith("game.tw-pddl is not valid JSON (")
    assert scan.broken[1].reason == "game.tw-pddl missing (only traj_data.json there)"
    scans = [scan, scan_split(root, "valid_seen")]
    note = check_broken_games(scans, 0.5, "data.max_broken_game_frac")
    print(note)
    assert note == (f"warning: skipping 2 broken game(s), e.g. {dirs[0]}: {scan.broken[0].reason} "
                    f"(all listed in {BROKEN_GAMES_FILE})")
    listed = write_broken_games(scans, tmp_path / "out").read_text().splitlines()
    assert listed == [f"{dirs[0]}\t{scan.broken[0].reason}", f"{dirs[1]}\t{scan.broken[1].reason}"]


def test_too_many_broken_or_none_left_refuses(data):
    root, dirs = data
    scan = scan_split(root, "train")
    with pytest.raises(AlfworldDataError, match=r"data.max_broken_game_frac=0.1: 2 of 6 games of split 'train' "
                                                 r"are broken \(33%\), e.g. .*; fix or remove them"):
        check_broken_games([scan], 0.1, "data.max_broken_game_frac")
    for d in dirs[2:]:
        (d / GAME_FILE).write_text("not json")
    with pytest.raises(AlfworldDataError, match="no playable game left in split 'train' after skipping 6 broken"):
        check_broken_games([scan_split(root, "train")], 1.0, "data.max_broken_game_frac")


def test_entry_point_refuses_too_many_broken_games_in_one_line(data, tiny_model_dir, tmp_path):
    root, dirs = data
    err = one_line_error(run_main_ppo([f"actor_rollout_ref.model.path={tiny_model_dir}", f"env.alfworld.data_dir={root}",
                                       f"trainer.default_local_dir={tmp_path / 'out'}",
                                       f"hydra.run.dir={tmp_path / 'hydra'}"]))
    assert err.startswith("error: data.max_broken_game_frac=0.1: 2 of 6 games of split 'train' are broken (33%)")
    assert str(dirs[0]) in err


@pytest.mark.slow
def test_a_game_whose_pddl_fails_at_load_is_named_once(data, capsys):
    from agentevolver.alfworld.pool import EnvPool

    root, dirs = data
    bad = dirs[2]
    game = json.loads((bad / GAME_FILE).read_text())
    game["pddl_problem"] = "(define (problem broken) (:objects"  # valid JSON, PDDL that does not parse
    (bad / GAME_FILE).write_text(json.dumps(game))
    assert str(bad) not in {b.game_dir for b in scan_split(root, "train").broken}  # the cheap scan passes it
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        pool = EnvPool(num_workers=1, num_cpus_per_worker=0.5)
        first = pool.reset([("a", str(bad)), ("b", str(bad)), ("c", str(dirs[3]))])
        again = pool.reset([("d", str(bad))])
        pool.shutdown()
    finally:
        ray.shutdown()
    assert all(r.info.get("error") for r in (first["a"], first["b"], again["d"])) and not first["c"].info.get("error")
    out = capsys.readouterr().out
    print(out)
    lines = [line for line in out.splitlines() if line.startswith("warning: env_error: game ")]
    assert len(lines) == 1 and lines[0].startswith(f"warning: env_error: game {bad} failed to load (")
    assert list(pool.failed_games) == [str(bad)]
