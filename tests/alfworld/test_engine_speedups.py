"""textworld_speedups gives TextWorld's exact text: the same games played with and without it."""
import random

from agentevolver.alfworld import textworld_speedups
from agentevolver.alfworld.data import list_games
from agentevolver.alfworld.engine import GameEngine


def _play(games: list[str], seed: int, turns: int) -> list[tuple[str, list[str], bool]]:
    """Random admissible play (plus one inadmissible command a game): every observation and list."""
    rng, engine, out = random.Random(seed), GameEngine(), []
    for game in games:
        for _ in range(2):  # a second episode re-uses the loaded game
            res = engine.reset(game)
            out.append((res.observation, res.admissible, res.won))
            nothing = engine.step("fly to the moon")
            out.append((nothing.observation, nothing.admissible, nothing.won))
            for _ in range(turns):
                res = engine.step(rng.choice(res.admissible))
                out.append((res.observation, res.admissible, res.won))
                if res.done:
                    break
    return out


def test_same_text_with_and_without_speedups(shared_alfworld, gen_data):
    real = list_games(shared_alfworld, "valid_seen")
    games = [real[0].game_dir, real[-1].game_dir] + [g.game_dir for g in list_games(gen_data, "train")[:3]]
    with textworld_speedups.disabled():
        plain = _play(games, seed=3, turns=15)
    hits = textworld_speedups.stats()["grammar_parse_hits"]
    fast = _play(games, seed=3, turns=15)
    assert fast == plain
    assert len(plain) > 60 and len({obs for obs, _, _ in plain}) > 30  # many distinct texts compared
    assert textworld_speedups.stats()["grammar_parse_hits"] > hits + 100  # the memo was used
