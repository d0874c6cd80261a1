"""tests/vllm runs only where vllm is installed (`make test-vllm`, in .venv-vllm).

In the main venv (no vllm) nothing here is collected, so a plain `pytest` skips this folder silently.
(`origin is None` means the spec found is only this folder as a namespace package, not vllm.)
"""
import importlib.util

_spec = importlib.util.find_spec("vllm")
collect_ignore_glob = [] if _spec is not None and _spec.origin is not None else ["test_*.py"]
