"""Self-navigating (AgentEvolver's experience manager): a pool of textual experiences, retrieval,
injection into rollout prompts, and stripping for training.

- An *experience* is one line of text summarised from a finished trajectory (successes only with the
  `rule` summariser), keyed by its task (task_id, task_type, task sentence).
- Retrieval: the top-k experiences of the same task type, ranked by the word-level similarity of their
  task sentence to the new one (difflib ratio over word lists), newest first on ties.
- Injection: `experience_template.format(experience=...)` is put in front of the user turn of a guided
  rollout prompt. Stripping removes exactly that block again (`strip_experience`), so a "discard" row
  is trained under the byte-identical unguided prompt while its tokens were sampled under the guided
  one: those tokens are off-policy and carry exp_mask = 1 (clipped with off_cliprange_high).
- Allocation (AgentEvolver's names): per task, `train_sample_expmode` allkeep | alldiscard | hybrid
  (keep ratio 1, 0, train_sample_keepratio) decides whether the training prompt keeps the experience;
  per rollout, `train_rollout_expmode` woexp | mixed | all (share 0, rollout_expratio, 1) decides
  which of a task's n rollouts are guided.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ROLLOUT_EXPMODES = ("woexp", "mixed", "all")
SAMPLE_EXPMODES = ("allkeep", "alldiscard", "hybrid")
EXPERIENCE_FIELD = "{experience}"
_NUMBER = re.compile(r"\s+\d+\b")
_PREPOSITIONS = ("from", "to", "in/on", "in", "on", "with")


@dataclass
class EpisodeRecord:
    """What a summariser sees of one finished episode: its task and the commands the env accepted."""

    task_id: str
    task_type: str
    task: str
    actions: list[str]
    won: bool
    score: float = 0.0


@dataclass
class Experience:
    task_id: str
    task_type: str
    task: str
    content: str
    step: int = 0


@dataclass
class SummaryContext:
    """What the `llm` summariser needs: the tokenizer and the rollout engines' generate."""

    tokenizer: Any = None
    generate_fn: Callable | None = None
    max_tokens: int = 64
    seed: int | None = None
    extra: dict = field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def abstract_action(command: str) -> str:
    """'take apple 1 from countertop 2' -> 'take the apple from the countertop' (instance numbers dropped)."""
    words = _NUMBER.sub("", command.strip()).split()
    return " ".join(f"the {w}" if i == 1 or (i > 1 and words[i - 1] in _PREPOSITIONS) else w
                    for i, w in enumerate(words))


def summarise_rule(records: Sequence[EpisodeRecord], ctx: SummaryContext | None = None) -> list[str | None]:
    """Deterministic abstraction of a successful trajectory: the receptacle visited before each
    non-movement action, then that action, numbers dropped; detours (a `go to` followed by another
    `go to`) are left out. E.g. "to put a clean apple in the fridge: go to countertop, take the apple
    from the countertop; go to sinkbasin, clean the apple with the sinkbasin; go to fridge, move the
    apple to the fridge". Failed episodes give None (they are not summarised)."""
    out: list[str | None] = []
    for rec in records:
        if not rec.won or not rec.actions:
            out.append(None)
            continue
        steps, place = [], None
        for a in rec.actions:
            if a.startswith("go to "):
                place = _NUMBER.sub("", a[len("go to "):]).strip()
                continue
            act = abstract_action(a)
            steps.append(f"go to {place}, {act}" if place else act)
            place = None
        task = _one_line(rec.task).rstrip(".").lower()
        out.append(_one_line(f"to {task}: " + "; ".join(steps)) if steps else None)
    return out


LLM_SUMMARY_PROMPT = ("Summarise the successful household episode below as ONE short, general tip that would "
                      "help with similar tasks (no object numbers).\nTask: {task}\nActions: {actions}\nTip:")


def summarise_llm(records: Sequence[EpisodeRecord], ctx: SummaryContext) -> list[str | None]:
    """The rollout engine writes the tip (greedy, ctx.max_tokens new tokens) for each successful episode."""
    from agentevolver.workers.rollout.base import SamplingParams

    todo = [i for i, r in enumerate(records) if r.won and r.actions]
    out: list[str | None] = [None] * len(records)
    if not todo:
        return out
    tok = ctx.tokenizer
    prompts = []
    for i in todo:
        text = LLM_SUMMARY_PROMPT.format(task=_one_line(records[i].task), actions="; ".join(records[i].actions))
        msgs = [{"role": "user", "content": text}]
        prompts.append(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False))
    params = SamplingParams(temperature=0.0, max_tokens=int(ctx.max_tokens), seed=ctx.seed)
    generated = ctx.generate_fn(prompts, params)
    for i, samples in zip(todo, generated, strict=True):
        tip = _one_line(tok.decode(samples[0].token_ids, skip_special_tokens=True))
        out[i] = tip or None
    return out


SUMMARIZERS: dict[str, Callable[..., list[str | None]]] = {"rule": summarise_rule, "llm": summarise_llm}


def get_summarizer(name: str) -> Callable[..., list[str | None]]:
    if name not in SUMMARIZERS:
        raise ValueError(f"unknown summarizer {name!r}; valid: {', '.join(SUMMARIZERS)}")
    return SUMMARIZERS[name]


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio()


class ExperiencePool:
    """Bounded pool: at most max_per_task experiences per task (newest kept) and max_size in all
    (oldest evicted first). Identical content for the same task is stored once."""

    def __init__(self, max_size: int, max_per_task: int) -> None:
        self.max_size, self.max_per_task = int(max_size), int(max_per_task)
        self.items: list[Experience] = []  # oldest first

    def __len__(self) -> int:
        return len(self.items)

    def add(self, exp: Experience) -> bool:
        exp.content = _one_line(exp.content)
        if not exp.content or any(e.task_id == exp.task_id and e.content == exp.content for e in self.items):
            return False
        self.items.append(exp)
        same = [i for i, e in enumerate(self.items) if e.task_id == exp.task_id]
        for i in reversed(same[: max(0, len(same) - self.max_per_task)]):
            del self.items[i]
        del self.items[: max(0, len(self.items) - self.max_size)]
        return True

    def retrieve(self, task_type: str, task: str, k: int) -> list[str]:
        """Top-k contents of the same task type by task-sentence similarity (newest first on ties)."""
        ranked = sorted(((-_similarity(task, e.task), -i, e.content) for i, e in enumerate(self.items)
                         if e.task_type == task_type))
        out: list[str] = []
        for _, _, content in ranked:
            if content not in out:
                out.append(content)
            if len(out) >= k:
                break
        return out

    def state_dict(self) -> list[dict]:
        return [asdict(e) for e in self.items]

    def load_state_dict(self, state: list[dict]) -> None:
        self.items = [Experience(**e) for e in state]


# ----------------------------------------------------------------------------- prompts
def format_experience(template: str, experiences: Sequence[str]) -> str:
    return template.replace(EXPERIENCE_FIELD, "\n".join(f"- {_one_line(e)}" for e in experiences))


def inject_experience(messages: list[dict[str, str]], template: str, experiences: Sequence[str]
                      ) -> list[dict[str, str]]:
    """A copy of chat messages with the formatted experience block in front of the (last) user turn."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = format_experience(template, experiences) + m["content"]
            break
    return out


def _strip_pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition(EXPERIENCE_FIELD)
    # experiences are single lines joined by "\n", so the block ends at the template's first tail match
    return re.compile(re.escape(head) + r"(?:- [^\n]*(?:\n- [^\n]*)*)?" + re.escape(tail))


def strip_experience(text: str, template: str) -> str:
    """Remove the first injected experience block from a prompt text (the training prompt of a
    'discard' row); a text without one is returned unchanged."""
    return _strip_pattern(template).sub("", text, count=1)


def allocate_modes(num_tasks: int, n: int, rollout_expmode: str, expratio: float, sample_expmode: str,
                   keepratio: float) -> tuple[list[list[bool]], list[bool]]:
    """(guided[i][j]: rollout j of task i is experience-guided, keep[i]: task i's training prompt keeps
    the experience). AgentEvolver's split: the first round(n·ratio) rollouts of a task, the first
    int(num_tasks·keep_ratio) tasks."""
    if rollout_expmode not in ROLLOUT_EXPMODES:
        raise ValueError(f"unknown rollout expmode {rollout_expmode!r}; valid: {', '.join(ROLLOUT_EXPMODES)}")
    if sample_expmode not in SAMPLE_EXPMODES:
        raise ValueError(f"unknown sample expmode {sample_expmode!r}; valid: {', '.join(SAMPLE_EXPMODES)}")
    share = {"woexp": 0.0, "mixed": float(expratio), "all": 1.0}[rollout_expmode]
    n_guided = round(n * share)
    keep_ratio = {"allkeep": 1.0, "alldiscard": 0.0, "hybrid": float(keepratio)}[sample_expmode]
    n_keep = int(num_tasks * keep_ratio)
    return [[j < n_guided for j in range(n)] for _ in range(num_tasks)], [i < n_keep for i in range(num_tasks)]
