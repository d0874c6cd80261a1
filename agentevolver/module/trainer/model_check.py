"""Up-front check of the model folder (`actor_rollout_ref.model.path`), before Ray or any worker starts.

Three things a worker would otherwise find out late, or never:
- `config.json` is there;
- the weights are complete: every safetensors file's header parses and its tensors' byte ranges end
  exactly at the file's end (a truncated file fails here, without reading the tensors);
- the tokenizer is the model's: it round-trips the system prompt and an admissible command. Without
  `tokenizer.json` transformers quietly builds a 2-token tokenizer that encodes commands as `[]`.
Each problem is one line (a `ModelFolderError`), which config_check reports as a ConfigError.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Formats transformers loads without safetensors; only their presence and size can be checked cheaply.
OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What the policy must encode exactly (llm_policy renders these into every prompt / parses them back).
PROBE_COMMAND = "go to countertop 1"
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class ModelFolderError(ValueError):
    """The model folder is incomplete or unusable; the message is one line, naming files relative to it."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file, or None. Reads only the header.

    Layout: u64 little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data buffer; each tensor's [begin, end) lies in the buffer, and the buffer ends at the
    largest `end` (= file size - 8 - n for a complete file)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"header claims {n} bytes but the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        want = numel * _DTYPE_BYTES.get(info["dtype"], 0)
        if info["dtype"] in _DTYPE_BYTES and stop - begin != want:
            return f"tensor {name} spans {stop - begin} bytes, its shape needs {want}"
        end = max(end, stop)
    if 8 + n + end != size:
        return f"truncated or padded: tensors end at byte {8 + n + end}, the file has {size}"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the model loads: the index's shards, or model.safetensors / *.safetensors."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ModelFolderError(f"{index.name}: unreadable index ({type(e).__name__}: {e})") from e
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def check_weights(folder: Path) -> None:
    files = weight_files(folder)
    if not files:
        if any((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in OTHER_WEIGHTS):
            return
        raise ModelFolderError(f"no weights (model.safetensors, {SAFETENSORS_INDEX} or "
                               f"{OTHER_WEIGHTS[0]})")
    for f in files:
        if not f.is_file():
            raise ModelFolderError(f"{f.relative_to(folder)}: listed in {SAFETENSORS_INDEX} but missing")
        problem = safetensors_problem(f)
        if problem:
            raise ModelFolderError(f"{f.relative_to(folder)}: {problem}")


def check_tokenizer(folder: Path, trust_remote_code: bool = False) -> None:
    """The tokenizer loads and round-trips what every prompt holds (system prompt, a command)."""
    from transformers import AutoTokenizer

    from agentevolver.alfworld.agent import system_prompt

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # any loader failure is the folder's problem, reported in one line
        raise ModelFolderError(f"the tokenizer does not load ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from e
    for label, text in (("the system prompt", system_prompt("move")), ("the command", PROBE_COMMAND)):
        ids = tok.encode(text, add_special_tokens=False)
        back = tok.decode(ids)
        if not ids or back != text:
            files = ", ".join(sorted(p.name for p in folder.iterdir() if "token" in p.name)) or "none"
            raise ModelFolderError(
                f"the tokenizer ({len(tok)} tokens; tokenizer files: {files}) does not round-trip "
                f"{label} {text[:40]!r}: got {len(ids)} ids decoding to {back[:40]!r} (is tokenizer.json missing?)")


def check_model_folder(path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Raise ModelFolderError (one line) unless `path` holds a config, complete weights and the tokenizer."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelFolderError("no HF model folder (config.json) there")
    check_weights(folder)
    check_tokenizer(folder, trust_remote_code)
