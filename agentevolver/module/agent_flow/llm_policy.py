"""The LLM as an ALFWorld policy: token-in / token-out bookkeeping for multi-turn episodes.

Two rollout modes (`env.rollout_mode`):
- `trajectory`: one episode is ONE token sequence: the chat-templated first prompt, then for every
  turn the model's response tokens (response_mask = 1, exactly the ids the rollout engine returned —
  never re-tokenised text) followed by the next observation turn (response_mask = 0). Each turn's
  prompt is a prefix-extension of the last one; the turn delimiters come from the tokenizer's chat
  template (`chat_turns`), which must append: a template that re-renders the history differently is
  refused at start.
- `step` (verl-agent style): every turn is its own row: a fresh prompt (task, the last
  `history_window` (observation, action) pairs, the current observation and admissible actions) and
  that turn's response. Prompts stay short however long the episode, which is what lets a small
  model act on the current observation; all rows of an episode share its id and reward.
Either way the actor recomputes log-probs on exactly the tokens that were sampled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from agentevolver.alfworld.agent import (
    SYSTEM_PROMPT,
    PolicyOutput,
    TurnView,
    build_messages,
    format_observation_turn,
)
from agentevolver.module.exp_manager.experience import inject_experience, strip_experience
from agentevolver.protocol import Batch, rollout_batch
from agentevolver.workers.rollout.base import GenOutput, SamplingParams

ROLLOUT_MODES = ("trajectory", "step")
# A probe conversation for deriving how the chat template joins turns: a response shaped like the real
# ones (a think block, so templates that rewrite earlier reasoning show up) and one more observation turn.
_PROBE_RESPONSE = "<think>the probe</think><action>look</action>"
_PROBE_VIEW = ("probe the template.", "You are in the middle of a room.", ["look", "inventory"])


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot carry trajectory mode; the message is one line."""


@dataclass(frozen=True)
class ChatTurns:
    """How the tokenizer's chat template closes an assistant turn and opens the next, read off a
    rendered probe conversation (never hard-coded: ChatML's <|im_end|> is one template among many).

    end_of_turn_id: the token that closes an assistant turn: the model must emit it, so it is a stop
    token of every rollout. next_turn: the text after it up to the next user message's content, and
    after that content (end of the user turn + the generation prompt).
    appends: re-rendering the history gives a prefix of the next prompt, token for token (trajectory
    mode needs it); why_not says what differs when it does not."""

    end_of_turn_id: int
    next_turn: tuple[str, str]
    appends: bool
    why_not: str = ""


def chat_turns(tokenizer, system: str = SYSTEM_PROMPT) -> ChatTurns:
    """Derive ChatTurns from `tokenizer.apply_chat_template` on a probe conversation (see ChatTurns)."""
    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    task, obs, admissible = _PROBE_VIEW
    first = build_messages(task, obs, admissible, history=[], system=system)
    user_next = format_observation_turn(obs + " Again.", admissible)
    closed = render(first + [{"role": "assistant", "content": _PROBE_RESPONSE}], gen=False)
    at = closed.rfind(_PROBE_RESPONSE)
    closing = encode(closed[at + len(_PROBE_RESPONSE):]) if at >= 0 else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if not closing or closing[0] not in special:
        raise ChatTemplateError("the chat template does not close an assistant turn with a special token "
                                "(no end-of-turn token to stop the rollout on)")
    eot = closing[0]
    eot_text = tokenizer.decode([eot])
    prompt0 = render(first, gen=True)
    prompt1 = render(first + [{"role": "assistant", "content": _PROBE_RESPONSE},
                              {"role": "user", "content": user_next}], gen=True)
    ids0, ids1 = encode(prompt0), encode(prompt1)
    if ids1[:len(ids0)] != ids0:
        part = next((i for i, (a, b) in enumerate(zip(ids0, ids1)) if a != b), min(len(ids0), len(ids1)))
        return ChatTurns(eot, ("", ""), False, f"re-rendering the history changes the earlier prompt "
                                               f"(they part at token {part} of {len(ids0)})")
    rest = prompt1[len(prompt0):]
    if not rest.startswith(_PROBE_RESPONSE):
        return ChatTurns(eot, ("", ""), False, "re-rendering the history rewrites the assistant's earlier "
                                               "response (e.g. drops its <think> block)")
    joint = rest[len(_PROBE_RESPONSE):]
    cut = joint.find(user_next)
    if cut < 0 or not joint.startswith(eot_text):
        return ChatTurns(eot, ("", ""), False, "the next user message does not follow the assistant's "
                                               "end-of-turn token")
    next_turn = (joint[len(eot_text):cut], joint[cut + len(user_next):])
    built = ids0 + encode(_PROBE_RESPONSE) + [eot] + encode(next_turn[0] + user_next + next_turn[1])
    if built != ids1:
        part = next((i for i, (a, b) in enumerate(zip(built, ids1)) if a != b), min(len(built), len(ids1)))
        return ChatTurns(eot, next_turn, False, f"the turns tokenised one by one part from the whole conversation "
                                                f"tokenised at once at token {part}")
    return ChatTurns(eot, next_turn, True)


@dataclass
class Trajectory:
    """One training row's tokens (trajectory mode: the episode; step mode: one turn) and, on the
    episode's record, its turn count, oldest policy version and policy-side finish reason."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    num_turns: int = 0
    policy_version: int = -1
    finish_reason: str | None = None  # set when the policy itself ends the episode
    anchor: str = ""  # step mode: the observation this turn answered (GiGPO groups turns by it)
    # experience-guided rows: the prompt the engine sampled under (prompt_ids is the training prompt);
    # off_policy = trained under a prompt other than the sampling one (exp_mask = 1 on its response)
    gen_prompt_ids: list[int] | None = None
    off_policy: bool = False
    guided: bool = False
    expert: str | None = None  # step mode, with an expert: its command for this turn's state (DAgger label)

    def extend(self, ids: list[int], mask: int, log_probs: list[float] | None = None) -> None:
        self.response_ids += ids
        self.response_mask += [mask] * len(ids)
        self.log_probs += log_probs if log_probs is not None else [0.0] * len(ids)


class LLMPolicy:
    """`agentevolver.alfworld.agent.Policy` backed by the rollout workers."""

    def __init__(self, tokenizer, generate_fn, sampling: SamplingParams, max_prompt_length: int,
                 max_response_length: int, system: str = SYSTEM_PROMPT, teacher=None, mode: str = "trajectory",
                 history_window: int | None = None, guide=None, experience_template: str = "",
                 expert=None) -> None:
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; valid: {', '.join(ROLLOUT_MODES)}")
        self.tokenizer = tokenizer
        self.generate_fn = generate_fn  # (prompts: list[list[int]], SamplingParams) -> list[list[GenOutput]]
        # teacher(view) -> response text: teacher forcing (SFT warm start on planner walkthroughs) through
        # exactly the token path the RL rollout uses, instead of generating.
        self.teacher = teacher
        self.sampling = sampling
        self.max_prompt_length = max_prompt_length
        # trajectory mode: budget of everything after the first prompt; step mode: of one turn's response
        self.max_response_length = max_response_length
        self.system = system  # the system message of every prompt (agent.system_prompt)
        self.mode = mode
        self.history_window = history_window
        # guide(view) -> (experiences, keep) | None, asked once per episode (exp_manager.experience):
        # the episode's prompts get the experiences; keep=False trains it under the stripped prompt
        self.guide, self.experience_template = guide, experience_template
        self.guidance: dict[str, tuple[list[str], bool] | None] = {}
        # expert(view) -> command | None, asked every step-mode turn: the label `relabel` trains on
        self.expert = expert
        self.tasks: dict[str, str] = {}  # episode -> task sentence (for the experience summariser)
        self.trajectories: dict[str, Trajectory] = {}  # per episode
        self.turns: dict[str, list[Trajectory]] = {}  # step mode: the episode's rows, one per turn
        self.timing_gen_s = 0.0
        self._calls = 0
        self.chat = chat_turns(tokenizer, system)
        if mode == "trajectory" and not self.chat.appends:
            raise ChatTemplateError(f"trajectory mode needs a chat template that appends: {self.chat.why_not}")
        # the model closes its turn with the template's end-of-turn token, whatever eos the model folder declares
        self._stop_ids = sorted(set(sampling.stop_token_ids) | {self.chat.end_of_turn_id})

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt(self, view: TurnView, history: list[tuple[str, str]], window: int | None) -> Trajectory:
        """A new row holding this turn's training prompt (and, when guided, the sampling prompt)."""
        messages = build_messages(view.task, view.observation, view.admissible, history=history,
                                  history_window=window, system=self.system)
        eid = view.episode_id
        self.tasks.setdefault(eid, view.task)
        if eid not in self.guidance:
            self.guidance[eid] = self.guide(view) if self.guide is not None else None
        g = self.guidance[eid]
        if not g or not g[0]:
            return Trajectory(self._encode(self._chat(messages)))
        experiences, keep = g
        guided = self._chat(inject_experience(messages, self.experience_template, experiences))
        train = guided if keep else strip_experience(guided, self.experience_template)
        return Trajectory(self._encode(train), gen_prompt_ids=self._encode(guided), off_policy=not keep, guided=True)

    def _chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _open_row(self, view: TurnView) -> Trajectory:
        """The row this turn's response goes into (its prompt added); finish_reason set if it cannot."""
        eid = view.episode_id
        if self.mode == "step":
            episode = self.trajectories.setdefault(eid, Trajectory([]))
            row = self._prompt(view, view.history, self.history_window)
            row.anchor = view.observation
            if self.expert is not None:
                row.expert = self.expert(view)
            if len(row.gen_prompt_ids or row.prompt_ids) > self.max_prompt_length:
                episode.finish_reason = "context_limit" if episode.num_turns else "prompt_too_long"
            self.turns.setdefault(eid, []).append(row)
            return episode
        episode = self.trajectories.get(eid)
        if episode is None:
            episode = self.trajectories[eid] = self._prompt(view, [], None)
            if len(episode.gen_prompt_ids or episode.prompt_ids) > self.max_prompt_length:
                episode.finish_reason = "prompt_too_long"
        else:
            before, after = self.chat.next_turn
            eot = self.chat.end_of_turn_id
            # the response ends with end-of-turn when the model closed its turn; close it when it did not
            closing = [] if episode.response_ids and episode.response_ids[-1] == eot else [eot]
            turn = before + format_observation_turn(view.observation, view.admissible) + after
            episode.extend(closing + self._encode(turn), mask=0)
        if episode.finish_reason is None and len(episode.response_ids) >= self.max_response_length:
            episode.finish_reason = "context_limit"
        return episode

    def _row(self, episode_id: str) -> Trajectory:
        return self.turns[episode_id][-1] if self.mode == "step" else self.trajectories[episode_id]

    def act(self, views: list[TurnView]) -> list[PolicyOutput]:
        outputs: dict[str, PolicyOutput] = {}
        prompts, active = [], []
        for view in views:
            episode = self._open_row(view)
            if episode.finish_reason is not None:
                if self.mode == "step":
                    self.turns[view.episode_id].pop()  # the turn never happened
                outputs[view.episode_id] = PolicyOutput(text="", finish_reason=episode.finish_reason)
                continue
            if self.teacher is not None:
                ids = self._encode(self.teacher(view)) + [self.chat.end_of_turn_id]
                outputs[view.episode_id] = self._take(view.episode_id, GenOutput(ids, [0.0] * len(ids), "stop", 0))
                continue
            row = self._row(view.episode_id)
            prompts.append((row.gen_prompt_ids or row.prompt_ids) + row.response_ids)
            active.append(view.episode_id)
        if prompts:
            params = SamplingParams(**{**self.sampling.__dict__, "stop_token_ids": self._stop_ids,
                                       "seed": None if self.sampling.seed is None else self.sampling.seed + self._calls})
            self._calls += 1
            t0 = time.perf_counter()  # engine time only: tokenising and bookkeeping count as overhead
            generated = self.generate_fn(prompts, params)
            self.timing_gen_s += time.perf_counter() - t0
            for episode_id, samples in zip(active, generated, strict=True):
                outputs[episode_id] = self._take(episode_id, samples[0])
        return [outputs[v.episode_id] for v in views]

    def _take(self, episode_id: str, out) -> PolicyOutput:
        episode, row = self.trajectories[episode_id], self._row(episode_id)
        room = self.max_response_length - len(row.response_ids)
        ids, log_probs = out.token_ids[:room], out.log_probs[:room]
        row.extend(ids, mask=1, log_probs=log_probs)
        episode.num_turns += 1
        episode.policy_version = out.policy_version if episode.policy_version < 0 else min(
            episode.policy_version, out.policy_version)
        if len(ids) < len(out.token_ids):  # the response budget ran out inside this turn
            episode.finish_reason = "context_limit"
            return PolicyOutput(text="", finish_reason="context_limit")
        return PolicyOutput(text=self.tokenizer.decode(ids, skip_special_tokens=True))

    def relabel(self, episode_id: str, new_id: str) -> int:
        """A new episode `new_id` of the expert's answers in `episode_id`'s states (DAgger): one row per
        labelled turn, the turn's training prompt and `<action>{expert}</action>` + end-of-turn, off-policy
        (exp_mask = 1; no sampler log-probs). Returns its rows (0: no labelled turn, nothing added)."""
        rows = []
        for t in self.turns.get(episode_id, []):
            if t.expert is None or not t.response_ids:
                continue
            row = Trajectory(list(t.prompt_ids), anchor=t.anchor, off_policy=True)
            row.extend(self._encode(f"<action>{t.expert}</action>") + [self.chat.end_of_turn_id], mask=1)
            rows.append(row)
        if rows:
            source = self.trajectories[episode_id]
            self.turns[new_id] = rows
            self.trajectories[new_id] = Trajectory([], num_turns=len(rows), policy_version=source.policy_version)
        return len(rows)

    def trajectory(self, episode_id: str) -> Trajectory:
        """The episode's record; an episode whose reset failed (env_error) never reached the policy and
        gets an empty one (an all-zero row that never counts in the loss)."""
        return self.trajectories.setdefault(episode_id, Trajectory([]))

    def rows_of(self, episode_id: str) -> list[Trajectory]:
        """The episode's training rows: its trajectory, or its turns (at least one row per episode)."""
        if self.mode == "step":
            return self.turns.get(episode_id) or [Trajectory([])]
        return [self.trajectory(episode_id)]

    def response_length(self, episode_id: str) -> int:
        """Tokens measured against data.max_response_length (overlong shaping): the whole trajectory
        after its prompt, or in step mode the longest turn's response."""
        return max(len(t.response_ids) for t in self.rows_of(episode_id))

    def to_batch(self, episodes: list[dict]) -> Batch:
        """Rows of the finished episodes (protocol.rollout_batch). `episodes` carry the per-episode ids
        (protocol.EPISODE_IDS) and `reward`; every row gets protocol.ROW_IDS from here."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        seqs, rows = [], []
        for ep in episodes:
            eid, record = ep["traj_id"], self.trajectory(ep["traj_id"])
            parts = self.rows_of(eid)
            for k, t in enumerate(parts):
                seqs.append(t)
                rows.append(ep | {"traj_id": f"{eid}/t{k}" if self.mode == "step" else eid, "episode_id": eid,
                                  "turn": k, "is_last": k == len(parts) - 1, "anchor": t.anchor,
                                  "num_turns": record.num_turns, "exp_guided": t.guided,
                                  "policy_version": record.policy_version})
        P = max(1, max(len(t.prompt_ids) for t in seqs))
        R = max(1, max(len(t.response_ids) for t in seqs))
        n = len(seqs)
        prompts = torch.full((n, P), pad, dtype=torch.long)
        prompt_attn = torch.zeros((n, P), dtype=torch.long)
        responses = torch.full((n, R), pad, dtype=torch.long)
        resp_attn = torch.zeros((n, R), dtype=torch.long)
        resp_mask = torch.zeros((n, R), dtype=torch.float32)
        log_probs = torch.zeros((n, R), dtype=torch.float32)
        exp_mask = torch.zeros((n, R), dtype=torch.float32)
        rewards = torch.zeros((n, R), dtype=torch.float32)
        for i, (t, row) in enumerate(zip(seqs, rows)):
            p, r = len(t.prompt_ids), len(t.response_ids)
            if p:
                prompts[i, P - p:] = torch.tensor(t.prompt_ids)
                prompt_attn[i, P - p:] = 1
            if r:
                responses[i, :r] = torch.tensor(t.response_ids)
                resp_attn[i, :r] = 1
                resp_mask[i, :r] = torch.tensor(t.response_mask, dtype=torch.float32)
                log_probs[i, :r] = torch.tensor(t.log_probs)
                if t.off_policy:  # sampled under a guided prompt, trained under the stripped one
                    exp_mask[i, :r] = resp_mask[i, :r]
            model_positions = resp_mask[i].nonzero()
            if len(model_positions):  # the episode reward sits on the row's last model-generated token
                rewards[i, model_positions[-1, 0]] = row["reward"]
        ids = {k: np.array([row[k] for row in rows]) for k in rows[0] if k != "reward"}
        ids["score"] = np.array([row["reward"] for row in rows], dtype=np.float32)
        tensors = {"prompts": prompts, "prompt_attention_mask": prompt_attn, "responses": responses,
                   "response_attention_mask": resp_attn, "response_mask": resp_mask,
                   "rollout_log_probs": log_probs, "token_level_rewards": rewards, "exp_mask": exp_mask}
        # The actor recomputes log-probs at the temperature the rollout sampled with.
        return rollout_batch(tensors, ids, self.sampling.logprob_temperature)
