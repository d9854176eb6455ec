"""The load-test prompt sets: reading and validating `load_tests/workloads/*.jsonl`.

Owns the JSON Lines format (one request per line: `{"messages": [{"role", "content"}, ...],
"max_tokens": int}`, the last message from the user), the folder lookup and the named groups the drift
scenarios switch between (prose vs code). Ignores arrival times and HTTP (see `generator`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

WORKLOADS_DIR = Path(__file__).resolve().parent / "workloads"
PROSE = ("sharegpt_like", "sonnet_like")
CODE = ("code",)
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One request of a workload set.

    Attributes:
        workload: name of the set it comes from (the file stem).
        index: line number in that set, from 0.
        messages: chat messages, each {"role": ..., "content": ...}; the last one is the user's.
        max_tokens: output tokens asked for (>= 1).
    """

    workload: str
    index: int
    messages: tuple[dict[str, str], ...]
    max_tokens: int


def load_workload(name: str, directory: Path | None = None) -> list[Prompt]:
    """Every prompt of `<directory>/<name>.jsonl` (default folder: `WORKLOADS_DIR`).

    Raises FileNotFoundError when the set is missing, ValueError naming the line of a malformed entry.
    """
    path = (WORKLOADS_DIR if directory is None else Path(directory)) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no workload set {name!r} at {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            prompts.append(parse_prompt(name, len(prompts), line, where=f"{path}:{number + 1}"))
    if not prompts:
        raise ValueError(f"workload set {path} is empty")
    return prompts


def load_workloads(names: Iterable[str], directory: Path | None = None) -> dict[str, list[Prompt]]:
    """`load_workload` for each distinct name, by name."""
    return {name: load_workload(name, directory) for name in dict.fromkeys(names)}


def parse_prompt(workload: str, index: int, line: str, *, where: str = "") -> Prompt:
    """One JSON line as a Prompt; ValueError naming `where` and the problem for a malformed one."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from exc
    messages, max_tokens = item.get("messages"), item.get("max_tokens")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in _ROLES
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: bad message {message!r:.80}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's, got {messages[-1]['role']!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"{where}: 'max_tokens' must be an int >= 1, got {max_tokens!r}")
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Prompt(workload, index, clean, max_tokens)
