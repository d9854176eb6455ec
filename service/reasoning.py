"""Reasoning outputs: a thinking model's ``<think> ... </think>`` block, split from its answer.

Owns `ReasoningStream`, which splits one completion's text, as it streams, into reasoning and content,
and `opens_reasoning`, which tells from the end of a prompt whether the chat template already opened the
block (DeepSeek-R1 and Qwen3's thinking-only models put ``<think>`` in the generation prompt; Qwen3's
hybrid models write it themselves, or get an empty block in the prompt with ``enable_thinking: false``).
Ignores HTTP, tools (the content goes on to `service.tools`) and the chat template itself; GPT-OSS's
reasoning (``openai_gptoss``) comes with its answer and calls in the harmony format (`service.harmony`).
"""

from __future__ import annotations

from service.text import partial_tag

THINK_START, THINK_END = "<think>", "</think>"
HARMONY = "openai_gptoss"  # vLLM's name for GPT-OSS's: its analysis channel, read by `service.harmony`
PARSERS = ("qwen3", "deepseek_r1", "kimi_k2", HARMONY)  # vLLM's names; the <think> ones are this module's parser
# Tags that end a block besides </think>, left in the text (the tool parser's): Kimi-K2-Thinking may start its calls
# without closing its block (vLLM's KimiK2ReasoningParser ends the reasoning there too)
IMPLICIT_ENDS = {"kimi_k2": ("<|tool_calls_section_begin|>",)}


def opens_reasoning(prompt_tail: str) -> bool:
    """Whether a prompt ending in ``prompt_tail`` leaves a ``<think>`` block open for the model."""
    return prompt_tail.rfind(THINK_START) > prompt_tail.rfind(THINK_END)


class ReasoningStream:
    """Reasoning and content of one completion, fed its text as it streams.

    Outside a block, the completion is reasoning only if it opens with ``<think>`` (after whitespace);
    inside one (``in_reasoning``: the prompt opened it), everything up to ``</think>`` is reasoning, all
    of it if the block never closes; one of ``ends`` (`IMPLICIT_ENDS`) ends it too, and stays in the content.
    Whitespace at both ends of the reasoning and at the start of the answer after it is dropped; text that could
    still be a tag is held back, so feeding the whole text at once gives what the pieces give.
    """

    def __init__(self, in_reasoning: bool = False, ends: tuple[str, ...] = ()) -> None:
        self._ends = (THINK_END, *ends)
        self._state = "reasoning" if in_reasoning else "start"
        self._buffer = ""
        self._space = ""           # trailing whitespace of the reasoning, held back
        self._started = False      # the reasoning has had a non-whitespace character
        self.reasoned = in_reasoning  # a block was opened (reasoning may still be empty)
        self._spaced = False       # the last push had text (after the block: whitespace, unless it began the answer)
        self.gave_content = False  # the last push returned content (the answer begun by it: an implicit end's tag)

    @property
    def in_block(self) -> bool:
        """Inside the reasoning block (its closing tag not yet seen)."""
        return self._state == "reasoning"

    @property
    def before_answer(self) -> bool:
        """Inside the reasoning block, or after it with only whitespace since (the answer not begun), the last push
        part of it: a push of no text after the block leaves it undecided (False), as a token's text that is held
        back (half a character, what could be a stop string) may turn out to begin the answer."""
        return self._state == "reasoning" or (self._state == "answer" and self._spaced)

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """Add ``text``; returns (reasoning, content) to send now. ``final`` flushes."""
        self._buffer += text
        self._spaced, self.gave_content = bool(text), False
        reasoning, content = "", ""
        if self._state == "start":
            head = self._buffer.lstrip()
            if head.startswith(THINK_START):
                self._buffer, self._state, self.reasoned = head[len(THINK_START):], "reasoning", True
            elif final or not THINK_START.startswith(head):
                self._state = "content"
            else:
                return "", ""  # whitespace or the start of "<think>": wait
        if self._state == "reasoning":
            found = [(at, tag) for tag in self._ends if (at := self._buffer.find(tag)) >= 0]
            if found:
                end, tag = min(found)
                reasoning = self._reasoning(self._buffer[:end], closing=True)
                self._buffer = self._buffer[end + (len(THINK_END) if tag == THINK_END else 0):]
                self._state = "answer"
            else:
                keep = 0 if final else max(partial_tag(self._buffer, tag) for tag in self._ends)
                reasoning = self._reasoning(self._buffer[:len(self._buffer) - keep], closing=final)
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return reasoning, ""
        if self._state == "answer":
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return reasoning, ""
            self._state = "content"
        content, self._buffer = self._buffer, ""
        self.gave_content = bool(content)
        return reasoning, content

    def _reasoning(self, text: str, closing: bool) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        text = self._space + text
        body = text.rstrip()
        self._space = "" if closing else text[len(body):]
        return body

