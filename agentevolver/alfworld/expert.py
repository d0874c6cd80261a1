"""A state-aware expert for ALFWorld games: the next command from ANY state an agent has reached.

The planner walkthrough stored in a game file only wins from the start state. DAgger-style relabelling
(`exp_manager.dagger`) needs the expert's command in the states the *policy* visits, so this expert
replays the episode's accepted commands on a small abstract state (where the agent is, what it holds,
where each object of the task lies, which object was cleaned / heated / cooled)
and plans from there with the walkthrough's own pieces: its objects, their receptacles, the
appliance of each treatment, the goal receptacle and its put-command wording. It knows no more than the
agent could: an object (or the lamp) no observation has named yet is searched for, receptacle by
unvisited receptacle in admissible order, before the expert walks to it (the planner's walkthrough goes
straight there, which a policy cannot learn from what it sees).

    expert_command(walkthrough, history, observation, admissible, window=None) -> "go to fridge 1" | None

None when the expert cannot tell (a command it needs is not admissible, or the walkthrough has a
shape it does not know): the caller then has no label for that turn. Pure and deterministic; the
real-engine test plays random prefixes of every task type and then this expert, and it must win.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentevolver.alfworld.agent import accepted_actions

_GO = re.compile(r"^go to (.+)$")
_TAKE = re.compile(r"^take (.+) from (.+)$")
_PUT = re.compile(r"^(?:move (.+) to (.+)|put (.+) in/on (.+))$")
_TREAT = re.compile(r"^(clean|heat|cool) (.+) with (.+)$")
_USE = re.compile(r"^use (.+)$")
_OPEN = re.compile(r"^open (.+)$")


def _put_args(m: re.Match) -> tuple[str, str]:
    """(object, receptacle) of a _PUT match, either wording."""
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


def _go_targets(admissible: Sequence[str]) -> list[str]:
    """The receptacles of the admissible `go to` commands, in admissible order."""
    return [c[len("go to "):] for c in admissible if c.startswith("go to ")]


@dataclass
class _Plan:
    """What the walkthrough says must happen, object by object (objects in the order it takes them)."""

    objects: list[str] = field(default_factory=list)
    start: dict[str, str] = field(default_factory=dict)                     # object -> receptacle it starts in
    treatments: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # object -> [(verb, appliance)]
    goal: dict[str, str] = field(default_factory=dict)                      # object -> goal receptacle
    lamp: tuple[str, str] | None = None                                     # (lamp, its receptacle)
    put_template: str = "move {o} to {r}"


def _parse_plan(walkthrough: Sequence[str]) -> _Plan | None:
    plan, here = _Plan(), None
    for cmd in walkthrough:
        cmd = cmd.strip()
        if m := _GO.match(cmd):
            here = m.group(1)
        elif m := _TAKE.match(cmd):
            o, r = m.groups()
            plan.objects.append(o)
            plan.start[o], plan.treatments[o] = r, []
        elif m := _PUT.match(cmd):
            o, r = _put_args(m)
            plan.goal[o] = r
            plan.put_template = "move {o} to {r}" if m.group(1) else "put {o} in/on {r}"
        elif m := _TREAT.match(cmd):
            verb, o, r = m.groups()
            plan.treatments.setdefault(o, []).append((verb, r))
        elif m := _USE.match(cmd):
            if here is None:
                return None
            plan.lamp = (m.group(1), here)
        elif not _OPEN.match(cmd) and not cmd.startswith("close "):
            return None  # a command shape this expert does not plan with
    if not plan.objects or (plan.lamp is None and set(plan.goal) != set(plan.objects)):
        return None
    return plan


@dataclass
class _State:
    at: str | None = None
    holding: str | None = None
    where: dict[str, str] = field(default_factory=dict)    # object -> receptacle (absent while held)
    done: dict[str, set[str]] = field(default_factory=dict)  # object -> treatments applied
    visited: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)  # objects named in an observation so far (the agent knows where)


def _replay(plan: _Plan, commands: Sequence[str], observations: Sequence[str] = ()) -> _State:
    s = _State(where=dict(plan.start), done={o: set() for o in plan.objects})
    things = plan.objects + ([plan.lamp[0]] if plan.lamp else [])
    s.seen = {o for o in things if any(re.search(rf"\b{re.escape(o)}\b", obs) for obs in observations)}
    for cmd in commands:
        if m := _GO.match(cmd):
            s.at = m.group(1)
            s.visited.add(s.at)
        elif m := _TAKE.match(cmd):
            s.holding = m.group(1)
            s.where.pop(s.holding, None)
            s.seen.add(s.holding)
        elif m := _PUT.match(cmd):
            o, r = _put_args(m)
            s.holding = None
            s.where[o] = r
            s.seen.add(o)
        elif m := _TREAT.match(cmd):
            s.done.setdefault(m.group(2), set()).add(m.group(1))
    return s


def _next(plan: _Plan, s: _State, explore: str | None) -> tuple[str, str] | None:
    """(receptacle to be at, command to give there); None when every goal already holds. An object the
    agent has not seen yet is searched for first (`explore`: the next unvisited receptacle), as an agent
    without the planner's knowledge must; with nothing left to search, it goes where the object is."""
    def put_down() -> tuple[str, str]:
        return s.at or "", plan.put_template.format(o=s.holding, r=s.at)

    def fetch(o: str) -> tuple[str, str]:
        if o not in s.seen and explore is not None:
            return explore, ""
        return s.where[o], f"take {o} from {s.where[o]}"

    if plan.lamp is not None:  # look at an object under the lamp: hold it, then switch the lamp on
        o, (lamp, lamp_at) = plan.objects[0], plan.lamp
        if s.holding != o:
            return put_down() if s.holding is not None else fetch(o)
        return (explore, "") if lamp not in s.seen and explore is not None else (lamp_at, f"use {lamp}")
    for o in plan.objects:
        finished = s.where.get(o) == plan.goal[o] and all(v in s.done[o] for v, _ in plan.treatments[o])
        if finished:
            continue
        if s.holding != o:
            if s.holding is not None:
                return put_down()
            return fetch(o)
        for verb, appliance in plan.treatments[o]:
            if verb not in s.done[o]:
                return appliance, f"{verb} {o} with {appliance}"
        return plan.goal[o], plan.put_template.format(o=o, r=plan.goal[o])
    return None


def _sweep(at: str | None, admissible: Sequence[str]) -> str | None:
    """The receptacle after `at` in name order, cyclically (the first one from nowhere): a search that
    needs no memory beyond where the agent stands, so a policy seeing a short history can learn it."""
    names = sorted(set(_go_targets(admissible)) | ({at} if at else set()))
    if not names:
        return None
    return names[(names.index(at) + 1) % len(names)] if at in names else names[0]


def expert_command(walkthrough: Sequence[str], history: Sequence[tuple[str, str]], observation: str,
                   admissible: Sequence[str], window: int | None = None) -> str | None:
    """The expert's next command after `history` ((observation, command) pairs), or None (see module doc).

    window: know only what a prompt with the last `window` turns shows (env.history_window): the physical
    state (where the agent is, what it holds) still comes from the whole episode, as the admissible
    commands reveal it, but a treatment or a sighting older than the window is forgotten: the expert then
    treats again or searches again, the choice a policy reading that prompt can make."""
    plan = _parse_plan(walkthrough)
    if plan is None:
        return None
    state = _replay(plan, accepted_actions(history, observation), [o for o, _ in history] + [observation])
    if window is not None:
        shown = list(history)[max(0, len(history) - window):]
        recent = _replay(plan, accepted_actions(shown, observation), [o for o, _ in shown] + [observation])
        state.done, state.seen = recent.done, recent.seen | ({state.holding} if state.holding else set())
        explore = _sweep(state.at, admissible)
    else:
        unvisited = [r for r in _go_targets(admissible) if r not in state.visited]
        explore = unvisited[0] if unvisited else None
    step = _next(plan, state, explore)
    if step is None:
        return None
    where, command = step
    if not command and state.at and f"open {state.at}" in admissible:  # searching: look inside what is closed
        return f"open {state.at}"
    if where and state.at != where:
        command = f"go to {where}"
    if command in admissible:
        return command
    if where and state.at == where and f"open {where}" in admissible:  # a closed receptacle: open it first
        return f"open {where}"
    return None
