"""The ALFWorld agent interface (text level): prompt, action parsing, rewards, and the multi-turn loop.

The loop (`run_episodes`) is shared by the play CLI and the trainer: a `Policy` turns a batch of
`TurnView`s (one per active episode) into texts in ONE call, so the trainer batches generation across
episodes; all active envs are then stepped in ONE batched pool call. Token bookkeeping is the policy's.
"""
from __future__ import annotations

import difflib
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentevolver.alfworld.data import GameSpec

ACTION_PROJECTIONS = ("exact", "nearest")
NEAREST_MIN_SIMILARITY = 0.5  # word-level similarity below which an action stays invalid
FINISH_REASONS = ("won", "max_steps", "context_limit", "env_error", "format_error", "env_done")
FORMAT_ERROR_OBSERVATION = (
    "Invalid response format. Think inside <think>...</think>, then give exactly one admissible "
    "action inside <action>...</action>."
)
_EXAMPLE_PUT = {"move": "move apple 1 to countertop 1", "put": "put apple 1 in/on countertop 1"}


# env.system_prompt: `full` states the rules (what an instruction-tuned model reads); `brief` is the bare output
# format, for the 1 M-parameter CPU model, which reads no instructions: its 110-token `full` message was 31 % of
# every prompt, and so of every model pass (scripts/measure_prompt_tokens.py).
SYSTEM_PROMPT_STYLES = ("full", "brief")


def system_prompt(wording: str = "move", style: str = "full") -> str:
    """Rules of the game; `wording` = the data's put-command verb ('move' in 0.4 data, 'put' in 0.3)."""
    if wording not in _EXAMPLE_PUT:
        raise ValueError(f"unknown command wording {wording!r}; valid: {', '.join(_EXAMPLE_PUT)}")
    if style not in SYSTEM_PROMPT_STYLES:
        raise ValueError(f"unknown system prompt style {style!r}; valid: {', '.join(SYSTEM_PROMPT_STYLES)}")
    if style == "brief":
        return "Choose ONE admissible action and write it inside <action> </action>."
    return (
        "You are an expert agent operating in a household (ALFWorld). You are given a task, the current "
        "observation and the list of admissible actions. Each turn, first reason briefly inside "
        "<think> </think>, then choose exactly ONE action from the admissible actions and write it "
        "verbatim inside <action> </action>, e.g. <think>I need the apple first.</think>"
        f"<action>go to countertop 1</action>. Put commands look like `{_EXAMPLE_PUT[wording]}`. "
        "An action that is not admissible does nothing."
    )


SYSTEM_PROMPT = system_prompt("move")


def format_admissible(admissible: Sequence[str]) -> str:
    return "\n".join(f"- {a}" for a in admissible)


def format_observation_turn(observation: str, admissible: Sequence[str]) -> str:
    """User turn appended after each assistant turn in trajectory mode (multi-turn prompts are then a
    prefix-extension of the previous turn's prompt). Also the tail of every `build_messages` prompt."""
    return (
        f"Observation:\n{observation.strip()}\n\nAdmissible actions:\n{format_admissible(admissible)}\n\n"
        "Answer with <think>...</think><action>...</action>."
    )


def build_messages(
    task: str,
    observation: str,
    admissible: Sequence[str],
    history: Sequence[tuple[str, str]],
    history_window: int | None = None,
    system: str = SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """[system, user] chat messages for one turn (step mode, verl-agent style).

    history: (observation, action) pairs of earlier turns, oldest first; all of them
    (`history_window=None`) or the last k. With an empty history the user message equals the first
    user turn of trajectory mode. system: the system message (`system_prompt(wording, style)`).
    """
    if history_window is not None and history_window < 0:
        raise ValueError(f"history_window must be >= 0 or None, got {history_window}")
    shown = list(history) if history_window is None else list(history)[max(0, len(history) - history_window):]
    parts = [f"Your task is to: {task.strip()}"]
    if shown:
        first = len(history) - len(shown) + 1
        lines = [f"Previous steps ({len(shown)} of {len(history)}):"]
        for i, (obs, act) in enumerate(shown, start=first):
            lines.append(f"[Step {i}] Observation: {obs.strip()}\n[Step {i}] Action: {act}")
        parts.append("\n".join(lines))
    parts.append(format_observation_turn(observation, admissible))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_THINK_BLOCK = re.compile(r"<\s*think\s*>.*?<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)
_ACTION = re.compile(r"<\s*action\s*>(.*?)<\s*/\s*action\s*>", re.IGNORECASE | re.DOTALL)
_OPEN_ACTION = re.compile(r"<\s*action\s*>", re.IGNORECASE)


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


def parse_action(text: str) -> str | None:
    """The command inside `<action>...</action>`; None when there is none.

    Rules: tags are case/whitespace-insensitive; `<think>` blocks are dropped first (an example tag
    while reasoning does not count); the LAST complete action tag wins (the model's final answer);
    an unclosed final `<action>` (generation stopped at the `</action>` stop string) counts up to the
    end of its line (an empty one falls back to the last complete tag); text is NFKC-normalised and
    whitespace collapsed; an empty action is None.
    """
    if not text:
        return None
    body = _THINK_BLOCK.sub(" ", text)
    complete = list(_ACTION.finditer(body))
    opens = list(_OPEN_ACTION.finditer(body))
    action = ""
    if opens and (not complete or opens[-1].start() >= complete[-1].end()):
        lines = body[opens[-1].end():].strip().splitlines()  # unclosed final tag
        action = _clean(lines[0]) if lines else ""
    if not action and complete:
        action = _clean(complete[-1].group(1))
    return action or None


def _norm(command: str) -> str:
    return _clean(command).lower().strip(" .'\"`")


def match_admissible(action: str | None, admissible: Sequence[str]) -> str | None:
    """The admissible command equal to `action` up to case, whitespace, quotes and a final period."""
    if action is None:
        return None
    key = _norm(action)
    for command in admissible:
        if _norm(command) == key:
            return command
    return None


def nearest_admissible(action: str | None, admissible: Sequence[str],
                       min_similarity: float = NEAREST_MIN_SIMILARITY) -> str | None:
    """The admissible command most similar to `action` word by word (difflib ratio over word lists,
    first best on ties), or None below `min_similarity`. E.g. 'take creditcard 2 from armchair 1'
    -> 'take pillow 2 from armchair 1' (5 of 6 words agree); 'go to sofa 1' never becomes a take."""
    if action is None or not admissible:
        return None
    words = _norm(action).split()
    scores = [difflib.SequenceMatcher(None, words, _norm(c).split()).ratio() for c in admissible]
    best = max(range(len(admissible)), key=scores.__getitem__)
    return admissible[best] if scores[best] >= min_similarity else None


NOTHING_HAPPENS = "Nothing happens."  # the engine's answer to a command it did not act on


def accepted_actions(history: Sequence[tuple[str, str]], last_observation: str | None = None) -> list[str]:
    """Commands of an episode the env acted on: not followed by "Nothing happens." nor a format error."""
    out = []
    for t, (_, action) in enumerate(history):
        after = history[t + 1][0] if t + 1 < len(history) else last_observation
        if after is not None and after.strip() in (NOTHING_HAPPENS, FORMAT_ERROR_OBSERVATION):
            continue
        out.append(action)
    return out


@dataclass
class EpisodeStats:
    """Outcome of one episode. steps = agent turns (format-error turns included)."""

    won: bool = False
    steps: int = 0
    format_errors: int = 0
    invalid_actions: int = 0
    projected_actions: int = 0  # non-admissible actions replaced by the nearest admissible one
    finish_reason: str = ""
    task_type: str = ""
    task_id: str = ""
    # (observation, action) per turn; on a format error the action is the raw answer (first 200 chars)
    history: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


def episode_reward(stats: EpisodeStats, success: float = 1.0, format_penalty: float = 0.0,
                   inadmissible_penalty: float = 0.0) -> float:
    """r = success · won − format_penalty · format_errors − inadmissible_penalty · (invalid + projected actions)
    (verl-agent uses success=10 and a penalty per turn without a valid <action>)."""
    inadmissible = stats.invalid_actions + stats.projected_actions
    return success * float(stats.won) - format_penalty * stats.format_errors - inadmissible_penalty * inadmissible


@dataclass
class TurnView:
    """What the policy sees for one active episode. history = earlier (observation, action) pairs.
    info = the reset info (task, task_type, walkthrough, game) updated with the last step's info."""

    episode_id: str
    task: str
    observation: str
    admissible: list[str]
    history: list[tuple[str, str]]
    step: int
    info: dict[str, Any]


@dataclass
class PolicyOutput:
    """The policy's text for one turn; finish_reason (e.g. 'context_limit') ends the episode unplayed."""

    text: str
    finish_reason: str | None = None


class Policy(Protocol):
    def act(self, views: list[TurnView]) -> list[PolicyOutput]: ...


@dataclass
class _Episode:
    view: TurnView
    stats: EpisodeStats


def run_episodes(
    pool,
    episodes: Sequence[tuple[str, GameSpec]],
    policy: Policy,
    max_steps: int = 30,
    max_format_errors: int | None = None,
    timing: dict[str, float] | None = None,
    projection: str = "exact",
) -> dict[str, EpisodeStats]:
    """Play episodes to the end: won / max_steps / context_limit / env_error (/ format_error).

    Per turn: one batched `policy.act` over all active episodes; an unparsable answer counts a format
    error and the env is NOT stepped (the agent sees FORMAT_ERROR_OBSERVATION); a parsed action that
    is not admissible counts as invalid and IS stepped (the engine answers "Nothing happens."). Then
    all stepped envs go in one `pool.step`. `timing["env"]` accumulates seconds spent in pool calls.
    projection="nearest": a parsed action that is not admissible is replaced by `nearest_admissible`
    (counted in projected_actions; it stays invalid when nothing is similar enough).
    """
    if projection not in ACTION_PROJECTIONS:
        raise ValueError(f"unknown action projection {projection!r}; valid: {', '.join(ACTION_PROJECTIONS)}")
    timing = timing if timing is not None else {}
    timing.setdefault("env", 0.0)
    specs = dict(episodes)
    t0 = time.perf_counter()
    first = pool.reset(list(episodes))
    timing["env"] += time.perf_counter() - t0
    active: dict[str, _Episode] = {}
    done: dict[str, EpisodeStats] = {}
    for eid, res in first.items():
        spec = specs[eid]
        stats = EpisodeStats(task_type=spec.task_type, task_id=spec.task_id)
        if res.info.get("error"):
            stats.finish_reason, stats.error = "env_error", res.info["error"]
            done[eid] = stats
            continue
        view = TurnView(eid, res.info.get("task", ""), res.observation, res.admissible, [], 0, dict(res.info))
        active[eid] = _Episode(view, stats)

    while active:
        ids = list(active)
        outputs = policy.act([active[eid].view for eid in ids])
        if len(outputs) != len(ids):
            raise ValueError(f"policy returned {len(outputs)} outputs for {len(ids)} views")
        to_step: dict[str, str] = {}
        for eid, out in zip(ids, outputs):
            ep = active[eid]
            if out.finish_reason:
                ep.stats.finish_reason = out.finish_reason
                done[eid] = ep.stats
                continue
            ep.stats.steps += 1
            action = parse_action(out.text)
            if action is None:
                ep.stats.format_errors += 1
                _advance(ep, out.text.strip()[:200], FORMAT_ERROR_OBSERVATION, ep.view.admissible, {})
                if max_format_errors is not None and ep.stats.format_errors >= max_format_errors:
                    ep.stats.finish_reason = "format_error"
                elif ep.stats.steps >= max_steps:
                    ep.stats.finish_reason = "max_steps"
                if ep.stats.finish_reason:
                    done[eid] = ep.stats
                continue
            command = match_admissible(action, ep.view.admissible)
            if command is None and projection == "nearest":
                command = nearest_admissible(action, ep.view.admissible)
                ep.stats.projected_actions += command is not None
            if command is None:
                ep.stats.invalid_actions += 1
                command = action
            to_step[eid] = command
        t0 = time.perf_counter()
        results = pool.step(to_step) if to_step else {}
        timing["env"] += time.perf_counter() - t0
        for eid, res in results.items():
            ep = active[eid]
            _advance(ep, to_step[eid], res.observation, res.admissible, res.info)
            if res.info.get("error"):
                ep.stats.finish_reason, ep.stats.error = "env_error", res.info["error"]
            elif res.won:
                ep.stats.won, ep.stats.finish_reason = True, "won"
            elif res.done:
                ep.stats.finish_reason = "env_done"
            elif ep.stats.steps >= max_steps:
                ep.stats.finish_reason = "max_steps"
            if ep.stats.finish_reason:
                done[eid] = ep.stats
        for eid in done:
            active.pop(eid, None)

    t0 = time.perf_counter()
    pool.close([eid for eid, _ in episodes])
    timing["env"] += time.perf_counter() - t0
    return {eid: done[eid] for eid, _ in episodes}


def _advance(ep: _Episode, action: str, observation: str, admissible: list[str], info: dict) -> None:
    view = ep.view
    ep.stats.history.append((view.observation, action))
    view.history = list(ep.stats.history)
    view.observation = observation
    view.admissible = admissible if admissible else view.admissible
    view.step = ep.stats.steps
    view.info.update(info)
