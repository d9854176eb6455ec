"""Text around the engine: chat templates, incremental detokenisation, stop strings and token pieces.

Owns turning chat messages into prompt token ids with the tokenizer's own chat template, turning a
growing list of completion token ids into text deltas for streaming (a delta never ends in half a UTF-8
character, and text that could still become a stop string is held back until it cannot), and each
token's own text and bytes for log-probability entries. Ignores tokenisation of plain prompts
(``tokenizer.encode``) and anything about the model.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first completion tokens (leading spaces)
_INCOMPLETE = "\ufffd"      # what a partial UTF-8 sequence decodes to
_CHAR_TOKENS = 4           # tokens one character's bytes may span at most (a token decodes to one byte or more)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], *,
                        add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                        template_kwargs: Mapping[str, Any] | None = None,
                        continue_final_message: bool = False) -> list[int]:
    """Prompt token ids of a conversation, by default ending with the assistant's generation prompt.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``, at least one (assistant messages may carry
            ``tool_calls``, tool messages ``tool_call_id``).
        tools: the functions the model may call, OpenAI's ``tools`` entries; the template renders them
            (a template without tool support ignores them).
        template_kwargs: more variables for the template (``enable_thinking``, ...).
        continue_final_message: end the prompt inside the last message (its end-of-turn left out), for
            the completion to continue it; needs ``add_generation_prompt`` false.

    Raises:
        ValueError: no messages, no chat template, or the template rejects the conversation.
    """
    if not messages:
        raise ValueError("messages must contain at least one message")
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template")
    try:
        encoded = render_template(tokenizer, messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                  tools=tools, template_kwargs=template_kwargs,
                                  continue_final_message=continue_final_message)
    except (TemplateError, TypeError) as exc:  # TypeError: a value of the wrong type for the template
        raise ValueError(f"chat template rejected the messages: {exc}") from exc
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded  # a dict in transformers 5
    return list(ids)


def render_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], *, tokenize: bool,
                    add_generation_prompt: bool, tools: Sequence[Mapping[str, Any]] | None,
                    template_kwargs: Mapping[str, Any] | None, continue_final_message: bool):
    """The chat template applied to `messages`: its text, or (``tokenize``) its token ids."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                         tools=list(tools) if tools else None,
                                         continue_final_message=continue_final_message, **(template_kwargs or {}))


def text_after_history(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], *,
                       add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                       template_kwargs: Mapping[str, Any] | None = None,
                       continue_final_message: bool = False) -> str | None:
    """The text the chat template renders after the conversation's history: the generation prompt ("" without
    one), or, continuing the final message, that message's turn. Whether a completion starts inside a thinking
    block is read there, not in the messages' own text (a user asking what ``<think>`` does opens no block). None
    when the template does not render the history as a prefix of the whole (or refuses it alone).

    Args: as `apply_chat_template`'s.
    """
    history = messages[:-1] if continue_final_message else messages
    common = {"tokenize": False, "tools": tools, "template_kwargs": template_kwargs}
    try:
        whole = render_template(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, **common)
        before = render_template(tokenizer, history, add_generation_prompt=False, continue_final_message=False,
                                 **common) if history else ""
    except Exception:  # a template that will not render the history alone (it must end with a user turn, ...)
        return None
    return whole[len(before):] if isinstance(whole, str) and isinstance(before, str) and whole.startswith(before) \
        else None


class IncrementalDetokenizer:
    """Text of completion tokens, one token at a time, never splitting a UTF-8 character.

    Decodes a short window of ids (the last emitted tokens plus the new ones) and emits what the new
    tokens add, once it no longer ends in an incomplete character. Special tokens decode to nothing,
    unless ``skip_special_tokens`` is False, or they are among ``kept`` (tags a parser reads).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True, kept: Collection[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # the special tokens to leave out by hand when some are kept (decoded with special tokens, then)
        self._dropped = special_ids(tokenizer) - set(kept) if skip_special_tokens and kept else None
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0               # window start
        self._read_offset = len(self._ids)    # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token; returns the new complete text ('' while a character is incomplete)."""
        self._ids.append(token_id)
        return self._take(allow_incomplete=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character decodes to U+FFFD), at the end of a completion."""
        return self._take(allow_incomplete=True)

    def _take(self, allow_incomplete: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) > len(prefix) and (allow_incomplete or not text.endswith(_INCOMPLETE)):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix):]
        if len(self._ids) - self._read_offset <= _CHAR_TOKENS:
            return ""
        # More tokens held than a character spans: the text ends in a replacement character no later byte completes
        # (a lone continuation byte), or the tokens decode to nothing (special tokens left out). Every new token
        # decoded all of them again, on the engine's step thread (quadratic: a completion biased to emit such a byte
        # slowed every request's steps; a review). What all but the last _CHAR_TOKENS settled is taken now.
        end = len(self._ids) - _CHAR_TOKENS
        settled = self._decode(self._ids[self._prefix_offset:end])
        if not text.startswith(settled):  # (a character split at `end`: settled by a later token)
            return ""
        if len(settled) > len(prefix):
            self._prefix_offset, self._read_offset = self._read_offset, end
            return settled[len(prefix):]
        del self._ids[self._read_offset:end]  # they add nothing: the window keeps its context without them
        return ""

    def _decode(self, ids: list[int]) -> str:
        if self._dropped is not None:
            return self._tokenizer.decode([i for i in ids if i not in self._dropped], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (its named ones and the added tokens marked special): what
    decoding with ``skip_special_tokens`` leaves out."""
    return frozenset({*tokenizer.all_special_ids,
                      *(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)})


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (text to hold back
    while it may still become ``tag``)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class StopStringMatcher:
    """Completion text cut before the first stop string, released only once it cannot be cut any more.

    ``text`` is everything accepted so far (already truncated if stopped); ``take`` returns the part not
    yet released, minus the last ``max(len(stop)) - 1`` characters that could still begin a stop string.
    With ``include`` (vLLM's ``include_stop_str_in_output``) the text is cut after the first stop string to end
    instead, and nothing is held back (text that may begin one stays in the output either way).
    """

    def __init__(self, stop: Sequence[str], include: bool = False) -> None:
        self._stop = tuple(stop)
        self._include = include
        self._holdback = 0 if include else max((len(s) for s in self._stop), default=1) - 1
        self._released = 0
        self.text = ""
        self.stopped = False

    def add(self, delta: str, search: bool = True) -> None:
        """Append decoded text; sets ``stopped`` and truncates ``text`` at the first stop string that ends in
        ``delta`` (without ``search``: none; a stop string begun in it may still end in a later one). Each
        stop string is looked for only where it would end in ``delta`` (vLLM's window): whether one counts
        does not depend on the others given."""
        assert not self.stopped, "text added after a stop string"
        before = len(self.text)
        self.text += delta
        if not search:
            return
        hits = [(i, s) for i, s in ((self.text.find(s, max(0, before - len(s) + 1)), s) for s in self._stop) if i >= 0]
        if hits:
            # (included: each hit ends in ``delta``, past the text released, which is never taken back)
            self.text = self.text[:min(i + len(s) for i, s in hits)] if self._include else self.text[:min(hits)[0]]
            self.stopped = True

    def take(self, final: bool) -> str:
        """Text not released yet; all of it if ``final`` or stopped."""
        end = len(self.text) if final or self.stopped else max(self._released, len(self.text) - self._holdback)
        delta = self.text[self._released:end]
        self._released = end
        return delta


class TextStream:
    """Streaming text of one completion: detokeniser plus stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], stop: Sequence[str],
                 skip_special_tokens: bool = True, kept_special: Collection[int] = (),
                 include_stop: bool = False) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, kept_special)
        self._matcher = StopStringMatcher(stop, include_stop)
        self._search = True  # the last token's text was searched: the rest of it, flushed at the end, is too

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared (the completion must end)."""
        return self._matcher.stopped

    @property
    def text(self) -> str:
        return self._matcher.text

    def push(self, token_id: int, search: bool = True) -> None:
        """Add a token's text; without ``search`` no stop string can end in it (``min_tokens``)."""
        self._search = search
        self._matcher.add(self._detokenizer.push(token_id), search)

    def take(self, final: bool) -> str:
        """Text to send now; ``final`` at the end of the completion flushes everything held back (searched as
        the last token was: with ``min_tokens`` equal to ``max_tokens`` no stop string counts)."""
        if final and not self._matcher.stopped:
            self._matcher.add(self._detokenizer.flush(), self._search)
        return self._matcher.take(final)


class TokenPieces:
    """Each token's own text and UTF-8 bytes, as OpenAI's log-probability entries show them.

    The bytes are the token's exact bytes for byte-level BPE vocabularies (GPT-2 style: Qwen, DeepSeek,
    Llama 3, OLMoE) and SentencePiece byte-fallback pieces (``<0x0A>``), so a character split over two
    tokens can be rebuilt from the entries; otherwise the UTF-8 of the token's decoded text. The text is
    the token decoded alone (special tokens included; half a character decodes to U+FFFD).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, bytes]] = {}

    def text(self, token_id: int) -> str:
        return self._piece(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return list(self._piece(token_id)[1])

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if not self._byte_level and isinstance(piece, str) and token_id not in self._tokenizer.all_special_ids:
                # SentencePiece's "▁" is a space, which a decoder strips at the start of a text (Llama 2's and
                # Mistral's Strip, Metaspace's prepend scheme): a token alone lost it ("▁there" read "there", and
                # the entries' bytes no longer rebuilt the text they came from)
                spaces = len(piece) - len(piece.lstrip("▁"))
                text = " " * max(spaces - (len(text) - len(text.lstrip(" "))), 0) + text
            found = self._cache[token_id] = (text, self._raw_bytes(token_id, text))
        return found

    def _raw_bytes(self, token_id: int, text: str) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level and token_id not in self._tokenizer.all_special_ids:
                to_byte = _unicode_to_byte()
                if all(char in to_byte for char in piece):
                    return bytes(to_byte[char] for char in piece)
            if match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
                return bytes([int(match[1], 16)])
        return text.encode("utf-8")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet (transformers' `bytes_to_unicode`)."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def profile_lines(path: str | Path) -> list[dict]:
    """The items of a profile prompts file: each non-empty line {"messages": [{"role": str, "content": str}, ...]}
    (at least one) or {"prompt": str}.

    Raises:
        ValueError: naming ``path`` and the first line that is neither (checked when the app is built: at a
            replica's start it failed the start).
    """
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: line {number} is not JSON: {exc}") from None
        messages = item.get("messages") if isinstance(item, dict) else None
        prompt = isinstance(item, dict) and isinstance(item.get("prompt"), str) and bool(item["prompt"])
        chat = isinstance(messages, list) and bool(messages) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not (prompt or chat):
            raise ValueError(f'{path}: line {number} is neither {{"messages": [{{"role": ..., "content": ...}}, ...]}} '
                             'nor {"prompt": "..."}')
        items.append(item)
    return items
