"""The tiny offline Qwen2 model + project-trained tokenizer (agentevolver.models.build_tiny)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from agentevolver.models.build_tiny import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    TAG_TOKENS,
    build_corpus,
    build_tiny_model,
    count_parameters,
    train_tokenizer,
)

ALFWORLD_TEXT = [
    ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, "
     "you see a cabinet 4, a countertop 1, a fridge 1, and a sinkbasin 1.\n\nYour task is to: put a clean "
     "apple in fridge."),
    "<think>The apple may be on the countertop 1.</think><action>go to countertop 1</action>",
    "take apple 1 from countertop 1", "clean apple 1 with sinkbasin 1", "move apple 1 to fridge 1",
    "You arrive at countertop 1. On the countertop 1, you see a apple 1, a butterknife 2, and a mug 3.",
    "Nothing happens.", "  spaces\tand\n\nnewlines  ",
    "unicode: café naïve — 日本語 🤖 Ω≈ç√",  # NFC-normalised text (Qwen2's normalizer is NFC)
]


def _tiny(tmp_path_factory, seed: int = 0) -> Path:
    """Build once per session and seed; other test modules reuse the same folder."""
    out = tmp_path_factory.getbasetemp() / f"tiny-qwen2-seed{seed}"
    if not (out / "model.safetensors").exists():
        build_tiny_model(out, seed=seed)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory)


def test_reloads_offline_as_qwen2(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    assert isinstance(model, Qwen2ForCausalLM) and model.config.model_type == "qwen2"
    n = count_parameters(model)
    print(f"tiny model parameters: {n}")
    assert 0.5e6 < n < 5e6
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert len(tok) <= model.config.vocab_size
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert model.config.eos_token_id == tok.eos_token_id
    assert json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id]
    logits = model(input_ids=torch.tensor([tok.encode("go to fridge 1")])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_tokenizer_ids_survive_reload(tiny_dir, shared_alfworld):
    trained = train_tokenizer(build_corpus(seed=0), vocab_size=2048)  # same inputs as the build
    saved = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(str(tiny_dir))
    game = next(iter(sorted((shared_alfworld / "json_2.1.1" / "valid_seen").rglob("game.tw-pddl"))))
    texts = ALFWORLD_TEXT + json.loads(game.read_text())["walkthrough"]
    for text in texts:
        ids = trained.encode(text).ids
        assert saved.encode(text).ids == ids
        assert reloaded.encode(text, add_special_tokens=False) == ids, text
        assert reloaded.decode(ids) == text  # decode(encode(x)) == x
    assert len(reloaded) == trained.get_vocab_size()


def test_tags_and_special_tokens_are_single_ids(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    for t in TAG_TOKENS + ("<|im_start|>", EOS_TOKEN, PAD_TOKEN):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    ids = tok.encode("<think>x</think><action>look</action><|im_end|>", add_special_tokens=False)
    # tags are plain added tokens: they survive skip_special_tokens; <|im_end|> does not
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think><action>look</action>"
    assert len(tok.encode("take apple 1 from countertop 1")) <= 10  # trained on ALFWorld words: compact


def test_chat_template_qwen_style(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert (tiny_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "look"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are an agent.<|im_end|>\n<|im_start|>user\nlook<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == tok.encode(text, add_special_tokens=False)


def test_build_is_deterministic_for_a_seed(tiny_dir, tmp_path):
    def digest(folder: Path) -> dict[str, str]:
        return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                for f in ("model.safetensors", "tokenizer.json", "config.json")}

    again = build_tiny_model(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_dir)
    other = AutoModelForCausalLM.from_pretrained(str(build_tiny_model(tmp_path / "other", seed=1)))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert not torch.equal(other.lm_head.weight, base.lm_head.weight)


def test_corpus_dir_adds_game_text(shared_alfworld, tmp_path):
    split = shared_alfworld / "json_2.1.1" / "valid_seen"
    game_dir = min(split.rglob("game.tw-pddl")).parent
    corpus = build_corpus(seed=0, corpus_dir=game_dir)
    walkthrough = json.loads((game_dir / "game.tw-pddl").read_text())["walkthrough"]
    assert "\n".join(walkthrough) in corpus
    with pytest.raises(FileNotFoundError, match="corpus-dir"):
        build_corpus(seed=0, corpus_dir=tmp_path / "missing")
