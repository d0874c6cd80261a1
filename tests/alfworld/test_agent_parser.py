"""Action parsing, admissible matching, prompts and rewards (pure text; no engine)."""
import pytest

from agentevolver.alfworld.agent import (
    SYSTEM_PROMPT,
    EpisodeStats,
    build_messages,
    episode_reward,
    format_observation_turn,
    match_admissible,
    parse_action,
    system_prompt,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>the apple is on the table</think><action>go to countertop 1</action>", "go to countertop 1"),
        ("<action>open fridge 1</action>", "open fridge 1"),  # think is optional
        ("Sure! <ACTION>  take apple 1 from countertop 1 \n</Action> hope that helps", "take apple 1 from countertop 1"),
        ("< action >look</ action >", "look"),
        ("<think>maybe <action>go to sink 1</action>?</think><action>go to fridge 1</action>", "go to fridge 1"),
        ("<action>go to desk 1</action> wait, no: <action>go to bed 1</action>", "go to bed 1"),  # last wins
        ("<think>x</think><action>go to drawer 1", "go to drawer 1"),  # stopped at the </action> stop string
        ("<action>go to desk 1</action><action>", "go to desk 1"),  # empty unclosed tail -> last complete
        ("<action>take ｃｄ　1 from desk 1</action>", "take cd 1 from desk 1"),  # NFKC: full-width -> ascii
        ("<action>mettre la pomme 1 à l’évier</action>", "mettre la pomme 1 à l’évier"),
        ("<think>only thinking</think>", None),
        ("go to desk 1", None),
        ("<action>   </action>", None),
        ("", None),
        ("<think>unfinished <action>go to desk 1</action>", "go to desk 1"),  # unclosed think: tag counts
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_match_admissible_normalises_case_space_punctuation():
    admissible = ["go to desk 1", "move cd 1 to drawer 2", "take cd 1 from desk 1"]
    assert match_admissible("Go  to DESK 1", admissible) == "go to desk 1"
    assert match_admissible("move cd 1 to drawer 2.", admissible) == "move cd 1 to drawer 2"
    assert match_admissible("'take cd 1 from desk 1'", admissible) == "take cd 1 from desk 1"
    assert match_admissible("put cd 1 in/on drawer 2", admissible) is None  # 0.3 wording is not 0.4
    assert match_admissible("go to desk 10", admissible) is None
    assert match_admissible(None, admissible) is None


def test_build_messages_history_window_and_prefix():
    history = [(f"obs {i}", f"act {i}") for i in range(5)]
    full = build_messages("put a cd in drawer.", "now", ["look", "go to desk 1"], history)
    assert [m["role"] for m in full] == ["system", "user"]
    user = full[1]["content"]
    assert user.startswith("Your task is to: put a cd in drawer.")
    assert all(f"act {i}" in user for i in range(5)) and "Previous steps (5 of 5)" in user
    last2 = build_messages("t", "now", ["look"], history, history_window=2)[1]["content"]
    assert "act 2" not in last2 and "[Step 4] Action: act 3" in last2 and "[Step 5] Action: act 4" in last2
    none = build_messages("t", "now", ["look"], history, history_window=0)[1]["content"]
    assert "Previous" not in none
    # The prompt ends with the same block trajectory mode appends after each assistant turn.
    assert user.endswith(format_observation_turn("now", ["look", "go to desk 1"]))
    assert "- go to desk 1" in user


def test_system_prompt_wording():
    assert "move apple 1 to countertop 1" in SYSTEM_PROMPT
    assert "put apple 1 in/on countertop 1" in system_prompt("put")
    with pytest.raises(ValueError, match="valid: move, put"):
        system_prompt("place")
    assert system_prompt("put", "brief") == system_prompt("move", "brief") == (
        "Choose ONE admissible action and write it inside <action> </action>.")
    with pytest.raises(ValueError, match="valid: full, brief"):
        system_prompt("move", "short")


def test_episode_reward():
    assert episode_reward(EpisodeStats(won=True, format_errors=2), success=10.0, format_penalty=0.5) == 9.0
    assert episode_reward(EpisodeStats(won=False)) == 0.0
    assert episode_reward(EpisodeStats(won=False, format_errors=3), format_penalty=0.1) == pytest.approx(-0.3)
    # a snapped (projected) and an unsnappable (invalid) command each cost one inadmissible_penalty
    stats = EpisodeStats(won=True, format_errors=1, invalid_actions=1, projected_actions=3)
    assert episode_reward(stats, format_penalty=0.5, inadmissible_penalty=0.05) == pytest.approx(1.0 - 0.5 - 0.2)


def test_nearest_admissible_snaps_near_misses_only():
    from agentevolver.alfworld.agent import nearest_admissible

    admissible = ["examine armchair 1", "go to sofa 1", "take pillow 2 from armchair 1", "look"]
    # a memorised object name in the right command: 5 of 6 words agree
    assert nearest_admissible("take creditcard 2 from armchair 1", admissible) == "take pillow 2 from armchair 1"
    assert nearest_admissible("go to sofa 2", admissible) == "go to sofa 1"
    assert nearest_admissible("Go to SOFA 1.", admissible) == "go to sofa 1"
    assert nearest_admissible("fly to the moon", admissible) is None  # nothing similar enough
    assert nearest_admissible(None, admissible) is None
    assert nearest_admissible("look", []) is None
