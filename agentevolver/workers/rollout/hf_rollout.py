"""`hf` rollout engine: a transformers model with a KV cache and our own decode loop (the CPU default).

Why not `model.generate`: a hand loop over the same forward gives (1) a per-call `torch.Generator`
for reproducible seeded sampling without touching the global RNG, (2) position ids that are exactly
`cumsum(attention_mask) - 1` as the FSDP actor computes them, (3) no generation_config surprises
(its default top_k=50, repetition penalties), (4) log-probs straight from the logits that produced
each token. Prompts are left-padded and batched in chunks of `max_num_seqs` rows (sorted by length
to limit padding); output is stripped at the first stop token.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from agentevolver.workers.rollout.base import (
    GenOutput,
    RolloutEngine,
    SamplingParams,
    register_rollout_engine,
    trim_at_stop,
)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token and its log-prob.

    logits (B, V) raw -> next (B,), logp (B,) with logp = log_softmax(logits / T)[next],
    T = temperature or 1 when greedy; top-k / top-p only restrict what can be sampled.
    """
    logits = logits.float()
    logp_all = torch.log_softmax(logits / params.logprob_temperature, dim=-1)  # (B, V)
    if params.temperature == 0:
        nxt = logits.argmax(dim=-1)
    else:
        filt = logp_all.clone()
        if 0 < params.top_k < filt.shape[-1]:
            kth = filt.topk(params.top_k, dim=-1).values[:, -1:]
            filt = filt.masked_fill(filt < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_lp, idx = filt.sort(dim=-1, descending=True)
            cum = sorted_lp.softmax(-1).cumsum(-1)
            drop = cum - sorted_lp.softmax(-1) >= params.top_p  # keep the smallest prefix with mass >= top_p
            filt = filt.scatter(-1, idx, sorted_lp.masked_fill(drop, float("-inf")))
        nxt = torch.multinomial(filt.softmax(-1), 1, generator=generator).squeeze(-1)
    return nxt, logp_all.gather(-1, nxt[:, None]).squeeze(-1)


@register_rollout_engine("hf")
class HFRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, config: Any, device: str, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(model_path, config, device, dtype, **options)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=dtype, attn_implementation=self.attn_implementation).to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]
        self.max_num_seqs = int(config.max_num_seqs)
        # transformers 5.x renamed past_key_values -> cache (the old name warns); support both.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._offloaded = False

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenOutput]]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # similar lengths per chunk
        results: list[GenOutput | None] = [None] * len(rows)
        for s in range(0, len(order), self.max_num_seqs):
            chunk = order[s:s + self.max_num_seqs]
            for r, out in zip(chunk, self._generate_chunk([rows[r][1] for r in chunk], params, gen)):
                results[r] = out
        return [results[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        gen: torch.Generator | None) -> list[GenOutput]:
        B, P = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = 1
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P), as the actor's unpadded forward
        stop = torch.tensor(self.stop_ids(params), device=self.device)
        from transformers import DynamicCache

        cache = DynamicCache()
        kw = {self._cache_kw: cache, "use_cache": True}
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, **kw).logits[:, -1]
        next_pos = pos[:, -1:] + 1
        toks, lps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for step in range(params.max_tokens):
            nxt, lp = sample_next(logits, params, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            toks.append(nxt)
            lps.append(lp)
            done = done | torch.isin(nxt, stop)
            if bool(done.all()) or step == params.max_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], dim=1)
            logits = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                                **kw).logits[:, -1]
            next_pos = next_pos + 1
        tok_mat, lp_mat = torch.stack(toks, 1).cpu(), torch.stack(lps, 1).float().cpu()  # (B, R)
        stop_ids = stop.tolist()
        return [GenOutput(*trim_at_stop(tok_mat[i].tolist(), lp_mat[i].tolist(), stop_ids), self.policy_version)
                for i in range(B)]

    @property
    def streams_weights(self) -> bool:
        return True

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     version: int) -> None:
        """Copy each incoming tensor into its parameter as it arrives (a dict or a stream of pairs), so a
        sync holds at most one incoming tensor beside the engine's own weights."""
        targets = self.model.state_dict(keep_vars=True)  # params + persistent buffers, tied names included
        pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
        loaded, unexpected = set(), []
        for name, tensor in pairs:
            if name not in targets:
                unexpected.append(name)
                continue
            if targets[name].shape != tensor.shape:  # copy_ would broadcast silently
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(targets[name].shape)} "
                                 f"of {self.model_path}")
            targets[name].data.copy_(tensor)
            loaded.add(name)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = set(targets) - loaded - tied
        if unexpected or missing:
            raise ValueError(f"state dict does not match {self.model_path}: missing {sorted(missing)}"
                             f", unexpected {sorted(unexpected)}")
        self.policy_version = int(version)

    def sleep(self) -> None:
        """On CUDA park the weights on the CPU during the actor update; no-op on CPU."""
        if self.device.type == "cuda" and not self._offloaded:
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self._offloaded = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """The weights are all there is to restore (the KV cache lives per generate call)."""
        if self._offloaded and (tags is None or "weights" in tags):
            self.model.to(self.device)
            self._offloaded = False
