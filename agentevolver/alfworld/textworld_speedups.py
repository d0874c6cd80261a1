"""Pure-function shortcuts for TextWorld's PDDL text layer, installed once per process by `engine`.

A turn of TextWorld's PddlEnv derives the text of every admissible command and of the feedback
through its context-sensitive grammar, and that grammar (textworld 1.7) redoes pure work each time:
1. `textgen._parse_and_convert(text, rule_name)`: a TatSu parse (≈ 5 ms) of the same few template
   strings, ~90 per game load and one per admissible command per turn.
2. `textworld.logic._parse_and_convert(text, rule_name)`: a TatSu parse of a rule condition such as
   "receptacleatlocation(r:receptacle, l:location)" at every conditional symbol of every derivation.
3. `textgen.copy_context`: a deep copy of the context's `variables` (EntityInfo objects) and
   `mapping` at every symbol. The grammar never changes those values in place: it only adds keys
   (`query`), and every `{...}` expression in alfred.twl2 is an attribute read. Copying the two dicts,
   not their values, gives the same text.
1 and 2 are memoised per process (bounded LRU) and each caller gets a deep copy of the parse (the
grammar writes a context into the symbols it derives). tests/alfworld/test_engine_speedups.py plays
the same games with and without these and compares every observation and admissible list.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import textworld.logic as tw_logic
from textworld.envs.pddl import textgen as pddl_textgen

PARSE_CACHE_SIZE = 4096  # distinct (text, rule) pairs per process: templates, conditions, task sentences


class LRU:
    """A small bounded cache: `get(key, make)` builds on a miss and evicts the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, make: Callable[[], Any]):
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = make()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


GRAMMAR_PARSES = LRU(PARSE_CACHE_SIZE)  # textgen templates
LOGIC_PARSES = LRU(PARSE_CACHE_SIZE)  # textworld.logic expressions
_ORIGINAL = {
    "textgen_parse": pddl_textgen._parse_and_convert,
    "logic_parse": tw_logic._parse_and_convert,
    "copy_context": pddl_textgen.copy_context,
}


def _memo(cache: LRU, parse: Callable[..., Any]) -> Callable[..., Any]:
    def memo_parse(text: str, rule_name: str, trace: bool = False, **kwargs: Any) -> Any:
        if trace or kwargs or not isinstance(text, str):  # debugging, or a call not written for
            return parse(text, rule_name=rule_name, trace=trace, **kwargs)
        return copy.deepcopy(cache.get((text, rule_name), lambda: parse(text, rule_name=rule_name)))

    return memo_parse


def shallow_copy_context(context: dict) -> dict:
    """textgen.copy_context with the `variables` and `mapping` dicts copied, not their values."""
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def install() -> None:
    """Replace the three functions process-wide (idempotent)."""
    pddl_textgen._parse_and_convert = _memo(GRAMMAR_PARSES, _ORIGINAL["textgen_parse"])
    tw_logic._parse_and_convert = _memo(LOGIC_PARSES, _ORIGINAL["logic_parse"])
    pddl_textgen.copy_context = shallow_copy_context


def uninstall() -> None:
    """Restore TextWorld's own functions (the equivalence test plays both ways)."""
    pddl_textgen._parse_and_convert = _ORIGINAL["textgen_parse"]
    tw_logic._parse_and_convert = _ORIGINAL["logic_parse"]
    pddl_textgen.copy_context = _ORIGINAL["copy_context"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """TextWorld as shipped inside the block (the equivalence test and the benchmark's baseline)."""
    uninstall()
    try:
        yield
    finally:
        install()


def stats() -> dict[str, int]:
    return {"grammar_parses": len(GRAMMAR_PARSES), "grammar_parse_hits": GRAMMAR_PARSES.hits,
            "logic_parses": len(LOGIC_PARSES), "logic_parse_hits": LOGIC_PARSES.hits}
