"""Game listing on the real shared data, and the engine against alfworld's own text env."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from agentevolver.alfworld.data import (
    TASK_TYPES,
    AlfworldDataError,
    count_by_task_type,
    detect_command_wording,
    games_under,
    list_games,
    resolve_data_dir,
)

VALID_SEEN = dict(zip(TASK_TYPES, (35, 13, 27, 16, 25, 24)))
VALID_TRAIN = dict(zip(TASK_TYPES, (46, 19, 37, 25, 28, 45)))


def test_counts_per_split(shared_alfworld):
    seen = list_games(shared_alfworld, "valid_seen")
    train = list_games(shared_alfworld / "json_2.1.1", "valid_train")  # json_2.1.1 itself is accepted
    assert len(seen) == 140 and len(train) == 200
    assert count_by_task_type(g.task_type for g in seen) == VALID_SEEN
    assert count_by_task_type(g.task_type for g in train) == VALID_TRAIN
    assert [g.game_dir for g in seen] == sorted(g.game_dir for g in seen)  # fixed order
    assert len({g.task_id for g in seen}) == 140
    g = seen[0]
    assert g.split == "valid_seen" and g.task_type == "look_at_obj_in_light"
    assert g.task_id == "look_at_obj_in_light-AlarmClock-None-DeskLamp-323/trial_T20190909_044715_250790"
    two = list_games(shared_alfworld, "valid_seen", task_types=["pick_two_obj_and_place"])
    assert len(two) == 24 and {x.task_type for x in two} == {"pick_two_obj_and_place"}


def test_data_errors_are_one_line(shared_alfworld, tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    for bad in (None, tmp_path / "missing"):
        with pytest.raises(AlfworldDataError) as err:
            resolve_data_dir(bad)
        msg = str(err.value)
        assert "\n" not in msg and "env.alfworld.data_dir" in msg and "alfworld-download" in msg
        assert "python -m agentevolver.alfworld generate --out DIR --num-games N" in msg
    monkeypatch.setenv("ALFWORLD_DATA", str(shared_alfworld))
    assert resolve_data_dir(None) == shared_alfworld
    with pytest.raises(AlfworldDataError, match="available splits: valid_seen, valid_train"):
        list_games(None, "train")
    with pytest.raises(AlfworldDataError, match="unknown task types"):
        list_games(None, "valid_seen", task_types=["pick_three"])


def _copy_game(src, dst, solvable=True, grammar_sub=None):
    dst.mkdir(parents=True)
    shutil.copy(src / "traj_data.json", dst / "traj_data.json")
    data = json.loads((src / "game.tw-pddl").read_text())
    data["solvable"] = solvable
    if grammar_sub:
        data["grammar"] = data["grammar"].replace(*grammar_sub)
    (dst / "game.tw-pddl").write_text(json.dumps(data))


def test_skip_rules_order_and_wording(shared_alfworld, tmp_path):
    seen = list_games(shared_alfworld, "valid_seen")
    src = [seen[0], seen[20]]  # look_at_obj_in_light, pick_and_place_simple
    split = tmp_path / "json_2.1.1" / "train"
    names = ["b-task/trial_1", "a-task/trial_2", "a-task-movable/trial_1", "c-Sliced/trial_1", "d-task/trial_u"]
    for i, name in enumerate(names):
        _copy_game(Path(src[i % 2].game_dir), split / name, solvable=name != "d-task/trial_u")
    games = list_games(tmp_path, "train")
    assert [g.task_id for g in games] == ["a-task/trial_2", "b-task/trial_1"]
    assert [g.task_type for g in games] == ["pick_and_place_simple", "look_at_obj_in_light"]  # from traj_data
    assert detect_command_wording(seen) == "move"
    old = tmp_path / "old" / "x" / "t"
    _copy_game(Path(src[1].game_dir), old,
               grammar_sub=('template :: "move {o} to {r}"', 'template :: "put {o} in/on {r}"'))
    assert detect_command_wording(games_under(tmp_path / "old")) == "put"


def test_engine_matches_alfworld_env_and_never_plans(shared_alfworld):
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl import PddlEnv

    from agentevolver.alfworld.engine import GameEngine, cache_stats

    seen = list_games(shared_alfworld, "valid_seen")
    two = [g for g in seen if g.task_type == "pick_two_obj_and_place"]
    a, b = seen[0], min(two, key=lambda g: Path(g.game_file).stat().st_size)  # small scenes: fast
    argv = list(sys.argv)
    transcripts = {}  # alfworld's own env: [(observation, admissible)] along the stored walkthrough
    raw = AlfredInfos(AlfredDemangler(shuffle=False)(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))))
    for game in (a, b):
        raw.load(game.game_file)
        state = raw.reset()
        seq = [(state.feedback, state["admissible_commands"])]
        for command in json.loads(Path(game.game_file).read_text())["walkthrough"]:
            state, _, _ = raw.step(command)
            seq.append((state.feedback, state["admissible_commands"]))
        transcripts[game.game_dir] = seq
    sys.argv[:] = argv  # the raw env (not ours) overwrote it

    engine = GameEngine()
    for game in (a, b, a):  # one engine re-used across games and episodes
        res = engine.reset(game.game_dir)
        assert sys.argv == argv
        seq = transcripts[game.game_dir]
        assert (res.observation, res.admissible) == seq[0]
        assert res.info["task"] and res.observation.endswith("Your task is to: " + res.info["task"])
        assert res.info["task_type"] == game.task_type
        stored = json.loads(Path(game.game_file).read_text())["walkthrough"]
        assert res.info["walkthrough"] == stored
        assert not res.done and not res.won
        for i, command in enumerate(stored, start=1):
            res = engine.step(command)
            assert (res.observation, res.admissible) == seq[i]
        assert res.won and res.done
    sys.argv[:] = argv
    res = engine.reset(a.game_dir)
    nothing = engine.step("fly to the moon")
    assert nothing.observation == "Nothing happens." and not nothing.done
    assert nothing.admissible == res.admissible
    stats = cache_stats()
    assert stats["translations"] >= 2 and stats["translation_hits"] >= 3
