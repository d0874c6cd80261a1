"""Build a tiny, offline Qwen2-architecture model + a project-trained BPE tokenizer for ALFWorld.

    python -m agentevolver.models.build_tiny --out models/tiny-qwen2 [--hidden-size 128 --num-layers 2
        --num-heads 4 --vocab-size 2048 --seed 0 --corpus-dir DIR]

The folder is a standard HF model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json) that reloads offline with
AutoModelForCausalLM / AutoTokenizer.

Why the tokenizer pipeline copies Qwen2's: transformers 5.x loads model_type qwen2 with
`Qwen2Tokenizer`, which rebuilds the pipeline (NFC normalizer, Qwen2 split regex + ByteLevel
pre-tokenizer, ByteLevel decoder) around the saved vocab/merges. A BPE trained with any other
pre-tokenizer would silently produce different ids after reload (tests/models/test_tiny_model.py::
test_tokenizer_ids_survive_reload checks that they do not).
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

PAD_TOKEN = "<|endoftext|>"
BOS_CHAT = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_CHAT, EOS_TOKEN)
# Added (not special) so they are one id each and survive decode(skip_special_tokens=True).
TAG_TOKENS = ("<think>", "</think>", "<action>", "</action>")

# Qwen2's pre-tokenizer regex, as in transformers' Qwen2Tokenizer.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5 chat format (no tools, no default system message).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_FALLBACK_PROMPT = (
    "You are an expert agent operating in the ALFRED embodied environment. Your task is to: "
    "Your current observation is: Your admissible actions of the current situation are: "
    "Prior to this step, you have already taken steps. You should first reason step-by-step about "
    "the current situation. This reasoning process MUST be enclosed within <think> </think> tags. "
    "Once you've finished your reasoning, you should choose an admissible action for current step "
    "and present it within <action> </action> tags."
)


# ----------------------------------------------------------------------------------- corpus
def _alfworld_names() -> tuple[list[str], list[str]]:
    """Display names (lower case, as the game prints them) of objects and receptacles."""
    from alfworld.gen import constants as C

    objects = sorted({o.lower() for o in C.OBJECTS})
    receps = sorted({r.lower() for r in C.RECEPTACLES})
    return objects, receps


def _command_lines(objects: list[str], receps: list[str], rng: random.Random, n: int) -> Iterator[str]:
    """ALFWorld 0.4.x commands and feedback sentences with random object / receptacle numbers."""
    for _ in range(n):
        o, r, r2 = rng.choice(objects), rng.choice(receps), rng.choice(receps)
        i, j, k = rng.randint(1, 20), rng.randint(1, 12), rng.randint(1, 12)
        yield rng.choice([
            f"go to {r} {j}", f"take {o} {i} from {r} {j}", f"move {o} {i} to {r} {j}",
            f"open {r} {j}", f"close {r} {j}", f"heat {o} {i} with microwave {k}",
            f"cool {o} {i} with fridge {k}", f"clean {o} {i} with sinkbasin {k}",
            f"use desklamp {k}", "look", f"examine {r} {j}", f"examine {o} {i}", "inventory",
            f"You arrive at {r} {j}. On the {r} {j}, you see a {o} {i}, and a {rng.choice(objects)} {k}.",
            f"You arrive at {r} {j}. The {r} {j} is closed.",
            f"You open the {r} {j}. The {r} {j} is open. In it, you see a {o} {i}.",
            f"You pick up the {o} {i} from the {r} {j}.",
            f"You move the {o} {i} to the {r2} {k}.", f"You heat the {o} {i} using the microwave {k}.",
            f"You cool the {o} {i} using the fridge {k}.", f"You clean the {o} {i} using the sinkbasin {k}.",
            f"You turn on the desklamp {k}.", f"You are carrying: a {o} {i}.", "Nothing happens.",
            f"Your task is to: put a {o} in {r}.", f"Your task is to: put some {o} on {r}.",
            f"Your task is to: put a clean {o} in {r}.", f"Your task is to: put a hot {o} in {r}.",
            f"Your task is to: put a cool {o} in {r}.", f"Your task is to: look at {o} under the desklamp.",
            f"Your task is to: find two {o} and put them in {r}.",
            f"You are in the middle of a room. Looking quickly around you, you see a {r} {j}, a {r2} {k}.",
            f"<think>I need to find the {o} first. It may be in the {r} {j}.</think><action>go to {r} {j}</action>",
        ])


def _system_prompt_text() -> str:
    """The agent's prompt words, from the ALFWorld agent module when it exists (written elsewhere)."""
    try:
        from agentevolver.alfworld import agent  # lazy: optional, may not exist yet

        return str(getattr(agent, "SYSTEM_PROMPT", _FALLBACK_PROMPT))
    except Exception:  # noqa: BLE001  (a broken/unfinished sibling module must not break the build)
        return _FALLBACK_PROMPT


def _game_texts(corpus_dir: Path, max_files: int = 400) -> Iterator[str]:
    """Grammar text, walkthrough commands and task descriptions of ALFWorld game folders."""
    for path in sorted(corpus_dir.rglob("game.tw-pddl"))[:max_files]:
        game = json.loads(path.read_text())
        yield game.get("grammar", "")
        yield "\n".join(game.get("walkthrough") or [])
        traj = path.parent / "traj_data.json"
        if traj.exists():
            for ann in json.loads(traj.read_text()).get("turk_annotations", {}).get("anns", []):
                yield ann.get("task_desc", "")


def build_corpus(seed: int = 0, corpus_dir: Path | None = None, num_lines: int = 20000) -> list[str]:
    """Training text for the BPE: grammar file, names, commands, numbers, prompt words, game files."""
    import alfworld

    rng = random.Random(seed)
    objects, receps = _alfworld_names()
    texts = [(Path(alfworld.__file__).parent / "data" / "alfred.twl2").read_text()]
    texts += [" ".join(objects), " ".join(receps), " ".join(str(i) for i in range(200))]
    texts += [_system_prompt_text()] * 20
    texts += list(_command_lines(objects, receps, rng, num_lines))
    if corpus_dir is not None:
        if not Path(corpus_dir).is_dir():
            raise FileNotFoundError(f"--corpus-dir {corpus_dir} is not a directory")
        texts += list(_game_texts(Path(corpus_dir)))
    return texts


# -------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's normalizer / pre-tokenizer / decoder; total size == vocab_size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size - len(TAG_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                         show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                     unk_token=None, bos_token=None, model_max_length=32768)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))
    # Load as Qwen2Tokenizer (what transformers 5.x picks for qwen2 anyway; explicit for 4.x / vLLM).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="Qwen2Tokenizer", add_prefix_space=False, errors="replace",
               clean_up_tokenization_spaces=False, split_special_tokens=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmpl = out / "chat_template.jinja"
    if not tmpl.exists():  # transformers 4.x inlines it in tokenizer_config.json instead
        tmpl.write_text(CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------ model
def build_tiny_model(out_dir: str | Path, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int | None = None, intermediate_size: int | None = None,
                     vocab_size: int = 2048, max_position_embeddings: int = 32768, seed: int = 0,
                     corpus_dir: str | Path | None = None, tie_word_embeddings: bool = False) -> Path:
    """Write a random-init Qwen2ForCausalLM + trained tokenizer to out_dir; deterministic for a seed."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"--hidden-size {hidden_size} must be divisible by --num-heads {num_heads}")
    num_kv_heads = num_kv_heads or max(1, num_heads // 2)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be divisible by num_kv_heads {num_kv_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(build_corpus(seed, Path(corpus_dir) if corpus_dir else None), vocab_size)
    _save_tokenizer(tok, out)
    pad_id, eos_id = tok.token_to_id(PAD_TOKEN), tok.token_to_id(EOS_TOKEN)

    config = Qwen2Config(
        vocab_size=max(vocab_size, tok.get_vocab_size()), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=None, eos_token_id=eos_id,
        pad_token_id=pad_id, use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id], pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(str(out))
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None, help="default num_heads // 2")
    p.add_argument("--intermediate-size", type=int, default=None, help="default 4 * hidden_size")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-dir", default=None, help="extra ALFWorld game folders for the BPE corpus")
    a = p.parse_args(argv)
    out = build_tiny_model(a.out, hidden_size=a.hidden_size, num_layers=a.num_layers, num_heads=a.num_heads,
                           num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size,
                           vocab_size=a.vocab_size, seed=a.seed, corpus_dir=a.corpus_dir)
    from transformers import AutoModelForCausalLM

    n = count_parameters(AutoModelForCausalLM.from_pretrained(str(out)))
    print(f"wrote {out} ({n / 1e6:.2f} M parameters)")


if __name__ == "__main__":
    main()
