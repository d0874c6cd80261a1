"""The procedural ALFWorld generator: real planner, real engine, real alfworld loaders (nothing mocked)."""
from __future__ import annotations

import json
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from alfworld.gen import constants as C

from agentevolver.alfworld.data import TASK_TYPES, problem_key, problem_keys
from agentevolver.alfworld.gen_scenes import APPLIANCE, FIT, sample_scene, scene_to_pddl
from agentevolver.alfworld.generator import GenerationError, generate_game, generate_games, main
from tests.helpers import run_module

N_GAMES = 60


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_module("agentevolver.alfworld", *args, timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _problem(game_dir: Path) -> str:
    return json.loads((game_dir / "game.tw-pddl").read_text())["pddl_problem"]


@pytest.fixture(scope="module")
def sixty(tmp_path_factory) -> tuple[Path, list[Path], float]:
    out = tmp_path_factory.mktemp("gen60")
    start = time.perf_counter()
    games = generate_games(out, N_GAMES, seed=0)
    per_game = (time.perf_counter() - start) / N_GAMES
    print(f"\ngenerated {N_GAMES} games in {per_game:.2f} s/game")
    return out / "json_2.1.1" / "train", games, per_game


@pytest.mark.slow
def test_sixty_games_balanced_and_walkthrough_wins_all(sixty):
    split_dir, games, per_game = sixty
    assert len(games) == N_GAMES and all(g.is_dir() for g in games)
    counts = {t: sum(g.parent.name.startswith(t + "-") for g in games) for t in TASK_TYPES}
    assert counts == {t: N_GAMES // 6 for t in TASK_TYPES}
    assert per_game < 10.0  # ≈ 0.5-1.5 s on an idle 2-core box
    summary = _last_json(_cli("play", "--games", str(split_dir), "--policy", "walkthrough", "--json"))
    print("walkthrough:", summary)
    assert summary["games"] == N_GAMES and summary["won"] == N_GAMES
    assert all(row == {"games": 10, "won": 10} for row in summary["per_task_type"].values())


@pytest.mark.slow
def test_random_policy_rarely_wins(sixty):
    split_dir, _, _ = sixty
    # 60 random-policy episodes: past 300 s with two demos sharing the cores (264 s alone, its fixture included)
    proc = _cli("play", "--games", str(split_dir), "--policy", "random", "--seed", "0", "--json", timeout=600)
    summary = _last_json(proc)
    print("random:", summary)
    assert summary["games"] == N_GAMES
    assert summary["success_rate"] < 0.30


@pytest.mark.slow
def test_layout_is_what_alfworld_loaders_read(sixty):
    from importlib import resources

    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    split_dir, games, _ = sixty
    config = {"dataset": {"data_path": str(split_dir), "num_train_games": -1},
              "env": {"task_types": [1, 2, 3, 4, 5, 6], "goal_desc_human_anns_prob": 0}}
    env = AlfredTWEnv(config, train_eval="train")
    assert sorted(Path(f).parent for f in env.game_files) == sorted(games)

    domain = resources.files("alfworld").joinpath("data/alfred.pddl").read_text()
    for game_dir in games:
        task_dir = game_dir.parent.name
        data = json.loads((game_dir / "game.tw-pddl").read_text())
        traj = json.loads((game_dir / "traj_data.json").read_text())
        assert data["pddl_domain"] == domain and data["solvable"] is True and data["walkthrough"]
        assert (game_dir / "initial_state.pddl").read_text() == data["pddl_problem"]
        params = traj["pddl_params"]
        assert traj["task_id"] == game_dir.name and traj["task_type"] == task_dir.split("-")[0]
        assert set(params) == {"mrecep_target", "object_sliced", "object_target", "parent_target",
                               "toggle_target"}
        recep = params["parent_target"] or params["toggle_target"]
        scene_num = traj["scene"]["scene_num"]
        assert task_dir == f"{traj['task_type']}-{params['object_target']}-None-{recep}-{scene_num}"
        sentences = [a["task_desc"] for a in traj["turk_annotations"]["anns"]]
        assert "UNKNOWN GOAL" not in data["grammar"]
        assert any(f"Your task is to: {s}." in data["grammar"] for s in sentences)
        problem = data["pddl_problem"]
        for t in ("SinkBasinType - rtype", "MicrowaveType - rtype", "FridgeType - rtype"):
            assert t in problem  # the domain's actions name these constants
        assert not re.search(r"\bSinkBasin_bar_", problem)  # basins are Sink_bar_N_bar_SinkBasin


def test_scenes_respect_alfworld_affordances():
    """Many draws (no planning): targets sit where they fit, never already in a goal receptacle."""
    for i in range(300):
        task_type = TASK_TYPES[i % 6]
        scene = sample_scene(random.Random(i), task_type, "train", 6, 25, (0, 10))
        rtype = dict(scene.receptacles)
        types = set(rtype.values())
        assert 6 <= len(scene.receptacles) <= 25
        assert task_type in C.GOALS_VALID and scene.room in C.GOALS_VALID[task_type]
        if task_type in APPLIANCE:
            assert APPLIANCE[task_type] in types and scene.parent_target != APPLIANCE[task_type]
        if scene.parent_target:
            assert scene.parent_target in types and scene.object_target in FIT[scene.parent_target]
        targets = [(o, r) for o, t, r in scene.objects if t == scene.object_target]
        assert len(targets) >= (2 if task_type == "pick_two_obj_and_place" else 1)
        for oid, t, rid in scene.objects:
            if t != "DeskLamp":
                assert t in FIT[rtype[rid]], (t, rtype[rid])
        assert all(rtype[r] != scene.parent_target for _, r in targets)
        if task_type == "look_at_obj_in_light":
            assert any(t == "DeskLamp" for _, t, _ in scene.objects)
        assert "(:goal" in scene_to_pddl(scene, f"p{i}")


def test_same_seed_same_bytes_cli_and_api(tmp_path):
    kw = {"min_receptacles": 6, "max_receptacles": 10, "num_distractors": (1, 3)}
    generate_games(tmp_path / "a", 6, seed=7, **kw)
    proc = _cli("generate", "--out", str(tmp_path / "b"), "--num-games", "6", "--seed", "7",
                "--max-receptacles", "10", "--distractors", "1,3")
    summary = _last_json(proc)
    assert summary["games"] == 6 and summary["per_task_type"] == {t: 1 for t in TASK_TYPES}
    generate_games(tmp_path / "c", 6, seed=8, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 18 and a == b
    assert a != c and set(a) != set(c)  # other seed: other folders (trial ids) and other scenes
    def bodies(files):  # the problem text without its name line (the name holds the trial id)
        return {v.decode().split(":domain", 1)[1] for k, v in files.items() if k.endswith(".pddl")}

    assert len(bodies(a)) == 6 and not bodies(a) & bodies(c)


def test_excluded_problems_are_redrawn(tmp_path):
    """A held-out game's problem is never made again: the draw that would repeat it is redrawn, and the
    result depends only on the arguments (a resume makes the same game)."""
    args = ("pick_and_place_simple", "train", 3, 3, (0, 0), 0.0)
    first = generate_game(tmp_path / "a", 5, 0, *args, tmp_path / "s1")
    held_out = problem_keys([first])
    assert held_out == {problem_key(_problem(first))}
    again = [generate_game(tmp_path / d, 5, 0, *args, tmp_path / f"s{d}", exclude=frozenset(held_out)) for d in "bc"]
    assert problem_key(_problem(again[0])) not in held_out
    assert _files(again[0]) == _files(again[1])
    assert json.loads((again[0] / "traj_data.json").read_text())["generator"]["attempt"] >= 1
    # the CLI: a training split made with --exclude <held-out split> shares no problem with it
    held = generate_games(tmp_path / "held", 2, seed=9, min_receptacles=3, max_receptacles=3, num_distractors=(0, 0))
    summary = _last_json(_cli("generate", "--out", str(tmp_path / "train"), "--num-games", "2", "--seed", "9",
                              "--min-receptacles", "3", "--max-receptacles", "3", "--distractors", "0",
                              "--exclude", str(tmp_path / "held")))
    made = list((tmp_path / "train").rglob("game.tw-pddl"))
    assert summary["games"] == len(made) == 2 and not problem_keys(made) & problem_keys(held)
    assert _cli("generate", "--out", str(tmp_path / "x"), "--num-games", "1", "--exclude",
                str(tmp_path / "nowhere")).stderr.strip().splitlines()[-1] == f"error: --exclude {tmp_path / 'nowhere'}: not a folder"


def test_knobs_are_respected(tmp_path):
    types = ["pick_two_obj_and_place", "pick_cool_then_place_in_recep"]
    games = generate_games(tmp_path, 4, seed=3, task_types=types, split="valid_seen", min_receptacles=18,
                           max_receptacles=20, num_distractors=(5, 5), closed_fraction=0.0)
    assert [g.parent.parent for g in games] == [tmp_path / "json_2.1.1" / "valid_seen"] * 4
    kinds = sorted(g.parent.name.split("-")[0] for g in games)
    assert kinds == ["pick_cool_then_place_in_recep"] * 2 + ["pick_two_obj_and_place"] * 2
    for game_dir in games:
        problem = _problem(game_dir)
        traj = json.loads((game_dir / "traj_data.json").read_text())
        target = traj["pddl_params"]["object_target"]
        assert 18 <= len(re.findall(r"\(receptacleType \w+_bar_", problem)) <= 20
        objects = re.findall(r"\(objectType (\w+_bar_\w+) (\w+)Type\)", problem)
        assert sum(t != target for _, t in objects) == 5  # distractors
        assert len(re.findall(r"\(openable ", problem)) == len(re.findall(r"\(opened ", problem))
        assert traj["generator"]["num_closed"] == 0


def test_user_errors_raise_clearly(tmp_path, capsys):
    with pytest.raises(GenerationError, match="unknown task types"):
        generate_games(tmp_path, 1, 0, task_types=["pick_and_juggle"])
    with pytest.raises(GenerationError, match="min_receptacles"):
        generate_games(tmp_path, 1, 0, min_receptacles=12, max_receptacles=8)
    with pytest.raises(GenerationError, match="split"):
        generate_games(tmp_path, 1, 0, split="../x")
    assert main(["--out", str(tmp_path), "--num-games", "0"]) == 2
    assert "num_games must be >= 1" in capsys.readouterr().err
