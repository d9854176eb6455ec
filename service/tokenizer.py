"""A model folder's tokenizer: transformers' own, or a fast tokenizer built for the folders that ship only remote code.

Owns `load_tokenizer`, which every part of the service loads tokenizers with. A folder that transformers'
`AutoTokenizer` can read (a `tokenizer.json`, a sentencepiece model, ...) gets what it returns. Moonshot's Kimi
releases (Kimi-K2, K2-Thinking, Kimi-Linear) ship a `tiktoken.model` and a remote-code `TikTokenTokenizer`, which
is never run here (`trust_remote_code` is off): their tokenizer is rebuilt as a `tokenizers` byte-level BPE from
the same ranks, split by the same pre-tokenization pattern (Kimi's, which keeps runs of Han characters apart
from other letters), with the same special tokens at the same ids (the folder's `added_tokens_decoder`, the
rest of the reserved range as ``<|reserved_token_{id}|>``, as the remote code names them: 256 ids for Kimi-K2,
258 for Kimi-Linear, whose code reserves two more). All of them are matched in text; decoding with
``skip_special_tokens`` skips the entries marked "special" and the unnamed reserved ids, not the others
(Kimi-K2-Thinking's ``<think>``/``</think>``: the remote code skips only its special-tokens map, so vLLM's
text keeps them, and the reasoning is split at them). Encoding equals tiktoken's with that pattern (tests
compare them); the chat template, BOS/EOS/pad and the context length come
from the folder's `tokenizer_config.json` (and `chat_template.jinja`).

Ignores tiktoken's own splitting of inputs longer than 400,000 characters or with runs of 25,000 characters
without (or only) whitespace (a guard against its regex engine's stack, which the `tokenizers` one does not need).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

TIKTOKEN_FILE = "tiktoken.model"
KIMI_TOKENIZER_CLASS = "TikTokenTokenizer"
# The pre-tokenization pattern of Moonshot's `tokenization_kimi.py` (`TikTokenTokenizer.pat_str`).
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
KIMI_RESERVED_SPECIAL_TOKENS = 256  # the ids after the ranks' that the remote code reserves for special tokens
# Kimi-Linear's remote code (its `tokenization_kimi.py`) reserves two more: ``num_reserved_special_tokens + 2``
KIMI_LINEAR_RESERVED_SPECIAL_TOKENS = KIMI_RESERVED_SPECIAL_TOKENS + 2


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the local model folder ``folder`` (nothing is downloaded, no remote code is run).

    Raises:
        ValueError: a Kimi folder whose `tiktoken.model` is malformed.
    """
    folder = Path(folder)
    config = _tokenizer_config(folder)
    if config.get("tokenizer_class") == KIMI_TOKENIZER_CLASS and (folder / TIKTOKEN_FILE).is_file():
        return kimi_tokenizer(folder, config)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def kimi_tokenizer(folder: Path, config: dict | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer equal to the `TikTokenTokenizer` of the Kimi folder ``folder`` (see the module)."""
    config = _tokenizer_config(folder) if config is None else config
    ranks = read_tiktoken_ranks(folder / TIKTOKEN_FILE)
    named = {int(i): token for i, token in (config.get("added_tokens_decoder") or {}).items()}
    end = max(len(ranks) + _reserved_special_tokens(folder, config), max(named, default=0) + 1)
    backend = _RanksConverter(ranks, pattern=KIMI_PATTERN).converted()
    # One at a time, in id order: each takes the next id. All are matched in text (the remote code encodes with
    # every reserved token allowed); decoding skips those the folder marks special, and the unnamed reserved ids,
    # not the others (Kimi-K2-Thinking's <think> and </think>, which its reasoning is split at)
    for i in range(len(ranks), end):
        token = named.get(i, f"<|reserved_token_{i}|>")
        added = AddedToken(_content(token), normalized=False, special=_special(token))
        if added.special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
    template = folder / "chat_template.jinja"
    kwargs = {key: _content(config[key]) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
              if config.get(key) is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **kwargs, name_or_path=str(folder),
        model_max_length=config.get("model_max_length", int(1e30)),
        chat_template=template.read_text() if template.is_file() else config.get("chat_template"))


def _reserved_special_tokens(folder: Path, config: dict) -> int:
    """The ids after the ranks' that the folder's remote code reserves: Kimi-Linear's (a ``kimi_linear`` model, or
    remote code reserving ``num_reserved_special_tokens + 2``) 258, Kimi-K2's 256. The remote code is read as text,
    never run."""
    model = folder / "config.json"
    if model.is_file() and json.loads(model.read_text()).get("model_type") == "kimi_linear":
        return KIMI_LINEAR_RESERVED_SPECIAL_TOKENS
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") or [None]
    module = (auto[0] if isinstance(auto, list) else auto) or ""
    source = folder / (module.split("--")[-1].rsplit(".", 1)[0] + ".py") if "." in module else None
    if source is not None and source.is_file() and "num_reserved_special_tokens + 2" in source.read_text():
        return KIMI_LINEAR_RESERVED_SPECIAL_TOKENS
    return KIMI_RESERVED_SPECIAL_TOKENS


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A `tiktoken.model` file's ranks: one ``<base64 token bytes> <rank>`` per line (tiktoken's format)."""
    ranks = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise ValueError(f"{path}: line {number} is not '<base64 token> <rank>': {line[:80]!r}") from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}")
    return ranks


class _RanksConverter(TikTokenConverter):
    """transformers' tiktoken converter over ranks already read (it reads files with the `tiktoken` package)."""

    def __init__(self, ranks: dict[bytes, int], pattern: str) -> None:
        super().__init__(vocab_file=None, pattern=pattern)
        self._ranks = ranks

    def load_tiktoken_bpe(self, _url) -> dict[bytes, int]:  # transformers' is a staticmethod reading a file
        return self._ranks


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _special(token) -> bool:
    """Whether an `added_tokens_decoder` entry (or an unnamed reserved id's name) is a special token: as the
    entry's "special" says (transformers' meaning: skipped by ``skip_special_tokens``), reserved ids are."""
    return not isinstance(token, dict) or bool(token.get("special", True))


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)
