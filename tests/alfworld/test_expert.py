"""The state-aware expert (DAgger labels): pure cases, and on the real engine it wins every generated game
from states a random policy reached, closed receptacles and distractors included."""
from __future__ import annotations

import random

import pytest
import ray

from agentevolver.alfworld.agent import NOTHING_HAPPENS, PolicyOutput, run_episodes
from agentevolver.alfworld.expert import expert_command

CLEAN = ["go to countertop 1", "take apple 1 from countertop 1", "go to sinkbasin 1", "clean apple 1 with sinkbasin 1",
         "go to fridge 1", "move apple 1 to fridge 1"]
ADMISSIBLE = ["go to countertop 1", "go to sinkbasin 1", "go to fridge 1", "open fridge 1", "take apple 1 from countertop 1",
              "take mug 1 from countertop 1", "clean apple 1 with sinkbasin 1", "move apple 1 to fridge 1",
              "move mug 1 to countertop 1", "move apple 1 to sinkbasin 1", "take apple 1 from sinkbasin 1"]


def _history(commands: list[str], failed: set[int] = frozenset()) -> tuple[list[tuple[str, str]], str]:
    """(observation, command) pairs whose next observation says whether the command was acted on (the apple
    and the mug are on countertop 1)."""
    obs = ["You are in the middle of a room."]
    for i, command in enumerate(commands):
        seen = "On the countertop 1, you see a apple 1, and a mug 1." if command == "go to countertop 1" else f"ok {i}"
        obs.append(NOTHING_HAPPENS if i in failed else seen)
    return list(zip(obs[:-1], commands)), obs[-1]


@pytest.mark.parametrize("done,expected", [
    ([], "go to countertop 1"),                                            # the walkthrough from the start
    (CLEAN[:2], "go to sinkbasin 1"),
    (["go to countertop 1", "take mug 1 from countertop 1"], "move mug 1 to countertop 1"),  # the wrong object: put it down
    (CLEAN[:4] + ["move apple 1 to sinkbasin 1"], "take apple 1 from sinkbasin 1"),  # put down elsewhere: clean stays done
    (CLEAN[:4] + ["move apple 1 to sinkbasin 1", "go to fridge 1"], "go to sinkbasin 1"),
    (["go to sinkbasin 1", "go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"], "go to sinkbasin 1"),
    (CLEAN[:5], "move apple 1 to fridge 1"),
])
def test_expert_plans_from_the_state_reached(done, expected):
    history, obs = _history(done)
    assert expert_command(CLEAN, history, obs, ADMISSIBLE) == expected


def test_expert_searches_for_an_object_no_observation_has_named():
    history = [("You are in the middle of a room.", "go to countertop 1")]
    assert expert_command(CLEAN, history, "On the countertop 1, you see a mug 1.", ADMISSIBLE) == "go to sinkbasin 1"
    assert expert_command(CLEAN, history, "On the countertop 1, you see a apple 1, and a mug 1.", ADMISSIBLE) == \
        "take apple 1 from countertop 1"
    history += [("On the countertop 1, you see a apple 1.", "go to sinkbasin 1")]  # seen once: remembered
    assert expert_command(CLEAN, history, "On the sinkbasin 1, you see nothing.", ADMISSIBLE) == "go to countertop 1"
    visited = [("You are in the middle of a room.", f"go to {r}") for r in ("countertop 1", "sinkbasin 1", "fridge 1")]
    # nothing left to search (it must be inside something closed): go where it is
    assert expert_command(CLEAN, visited, "The fridge 1 is closed.", ADMISSIBLE) == "go to countertop 1"


def test_windowed_expert_forgets_what_the_prompt_no_longer_shows():
    history, obs = _history(CLEAN[:5])  # cleaned 2 commands ago: inside a 2-turn window
    assert expert_command(CLEAN, history, obs, ADMISSIBLE, window=2) == "move apple 1 to fridge 1"
    history, obs = _history(CLEAN[:4] + ["go to countertop 1", "go to fridge 1"])  # the clean left the window
    assert expert_command(CLEAN, history, obs, ADMISSIBLE) == "move apple 1 to fridge 1"
    assert expert_command(CLEAN, history, obs, ADMISSIBLE, window=2) == "go to sinkbasin 1"  # clean it again
    # a sighting older than the window is searched for again, sweeping receptacles in name order
    history = [("You are in the middle of a room.", "go to countertop 1"),
               ("On the countertop 1, you see a apple 1.", "go to sinkbasin 1"), ("ok", "go to fridge 1")]
    rooms = [a for a in ADMISSIBLE if not a.startswith("open ")] + ["go to drawer 1"]
    assert expert_command(CLEAN, history, "ok", rooms) == "go to countertop 1"
    assert expert_command(CLEAN, history, "ok", rooms, window=2) == "go to countertop 1"  # still shown
    assert expert_command(CLEAN, history, "ok", rooms, window=1) == "go to sinkbasin 1"  # the one after fridge 1
    assert expert_command(CLEAN, history, "ok", rooms + ["open fridge 1"], window=1) == "open fridge 1"  # look inside


def test_expert_ignores_commands_not_acted_on_and_opens_closed_receptacles():
    history, obs = _history(["go to countertop 1", "take apple 1 from countertop 1"], failed={1})
    assert expert_command(CLEAN, history, obs, ADMISSIBLE) == "take apple 1 from countertop 1"
    history, obs = _history(CLEAN[:5])
    closed = [a for a in ADMISSIBLE if a != "move apple 1 to fridge 1"]  # the fridge is shut: open it first
    assert expert_command(CLEAN, history, obs, closed) == "open fridge 1"
    assert expert_command(CLEAN, history, obs, ["go to countertop 1"]) is None  # no admissible way on: no label
    assert expert_command(["slice apple 1 with knife 1"], [], obs, ADMISSIBLE) is None  # unknown plan shape
    look = ["go to sidetable 1", "use desklamp 1", "take alarmclock 2 from sidetable 1"]
    adm = ["go to sidetable 1", "take alarmclock 2 from sidetable 1", "use desklamp 1"]
    assert expert_command(look, *_history(["go to sidetable 1"]), adm) == "take alarmclock 2 from sidetable 1"
    assert expert_command(look, *_history(["go to sidetable 1", "take alarmclock 2 from sidetable 1"]), adm) == \
        "use desklamp 1"


class RandomThenExpert:
    """A seeded random admissible prefix of 0..6 commands per episode, then the expert."""

    def __init__(self, seed: int, window: int | None) -> None:
        self.rng, self.prefix, self.unlabelled, self.window = random.Random(seed), {}, 0, window

    def act(self, views):
        out = []
        for v in views:
            k = self.prefix.setdefault(v.episode_id, self.rng.randint(0, 6))
            command = None if v.step < k else expert_command(v.info["walkthrough"], v.history, v.observation,
                                                              v.admissible, window=self.window)
            if command is None:
                self.unlabelled += v.step >= k
                command = self.rng.choice(v.admissible)
            out.append(PolicyOutput(f"<action>{command}</action>"))
        return out


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 2])
def test_expert_wins_generated_games_from_random_states(tmp_path, window):
    from agentevolver.alfworld.data import games_under
    from agentevolver.alfworld.generator import generate_games
    from agentevolver.alfworld.pool import EnvPool

    generate_games(tmp_path, 12, seed=21, min_receptacles=4, max_receptacles=8, num_distractors=(0, 3),
                   closed_fraction=0.5)  # 2 per task type, some receptacles closed, distractor objects
    games = games_under(tmp_path, split="")
    assert len(games) == 12
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = EnvPool(num_workers=2)
        policy = RandomThenExpert(0, window)
        episodes = [(f"e{i}-{j}", g) for i, g in enumerate(games) for j in range(3)]
        stats = run_episodes(pool, episodes, policy, max_steps=40)
        pool.shutdown()
    finally:
        ray.shutdown()
    lost = [(eid, s.history[-4:]) for eid, s in stats.items() if not s.won]
    assert not lost, lost
    assert sum(v > 0 for v in policy.prefix.values()) >= 20  # most episodes started from a random state
