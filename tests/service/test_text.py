"""Chat templates, incremental detokenisation and stop strings (service/text.py).

Also home of the tiny byte-level tokenizer and matching tiny chat model that test_engine and test_app
import (tests/tiny_models.py has models without tokenizers).
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from deploy.build_default_model import CHAT_TEMPLATE  # ChatML, with Hermes tool calls
from service.text import (
    IncrementalDetokenizer,
    StopStringMatcher,
    TextStream,
    TokenPieces,
    apply_chat_template,
)
from tests.tiny_models import tiny_config


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text round-trips; multi-byte characters span tokens) with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_chat_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, architecture: str = "qwen3_moe") -> torch.nn.Module:
    """The tiny model of ``architecture`` (tests/tiny_models.py) with the tokenizer's vocabulary and EOS."""
    config = tiny_config(architecture)
    config.vocab_size = len(tokenizer)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def test_chat_template_ids_match_the_rendered_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo €"}]
    ids = apply_chat_template(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer.encode(rendered) and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_chat_template_rejects_empty_and_missing_templates(tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        apply_chat_template(tokenizer, [])
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(bare, [{"role": "user", "content": "hi"}])


def test_chat_template_errors_become_value_errors(tokenizer):
    strict = build_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        apply_chat_template(strict, [{"role": "user", "content": "hi"}])
    strict.chat_template = "{{ 'depth ' + depth }}"  # a request's template variable of the wrong type
    with pytest.raises(ValueError, match="can only concatenate"):
        apply_chat_template(strict, [{"role": "user", "content": "hi"}], template_kwargs={"depth": 3})
    assert apply_chat_template(strict, [{"role": "user", "content": "hi"}], template_kwargs={"depth": "3"})


def test_tools_and_tool_history_render_in_the_hermes_format(tokenizer):
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function",
                                                                      "function": {"name": "w", "arguments": {"c": 1}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    text = tokenizer.decode(apply_chat_template(tokenizer, messages, tools=tools))
    assert text.startswith("<|im_start|>system\n# Tools\n") and '\n{"type": "function", "function": {"name": "w"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n') in text
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert tokenizer.decode(apply_chat_template(tokenizer, plain)) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # plain ChatML


def _stream_deltas(tokenizer, text: str, prompt: str = "Q: ") -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt))
    deltas = [detok.push(t) for t in tokenizer.encode(text)]
    return [*deltas, detok.flush()]


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_detokenizer_deltas_concatenate_to_the_text_without_split_characters(tokenizer, text):
    assume(not any(special in text for special in tokenizer.all_special_tokens))  # those decode to nothing
    deltas = _stream_deltas(tokenizer, text)
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_waits_for_the_rest_of_a_multibyte_character(tokenizer):
    euro = tokenizer.encode("€")  # 3 UTF-8 bytes, split over tokens by a small byte-level BPE
    assert len(euro) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push(t) for t in euro] == [""] * (len(euro) - 1) + ["€"]


def test_detokenizer_flush_shows_an_incomplete_character_as_replacement(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(tokenizer.encode("€")[0]) == ""
    assert detok.flush() == "\ufffd"



def _byte_ids(tokenizer, data: bytes) -> list[int]:
    """The byte-level vocabulary's one-byte token of each byte."""
    byte = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(byte[b]) for b in data]


@pytest.mark.parametrize("kind", ["continuation bytes", "special tokens"])
def test_detokenizer_work_stays_linear_when_nothing_can_be_sent(tokenizer, kind):
    """Tokens that never end in a complete character (lone UTF-8 continuation bytes) or decode to nothing (special
    tokens left out) held the window open: each new token decoded all of them again, on the engine's step thread,
    quadratic in the completion (a review biased a completion to such a byte). What all but the last few settled is
    taken now; the text is the whole decode's all the same."""
    ids = (_byte_ids(tokenizer, b"ok ") + _byte_ids(tokenizer, b"\x80" * 2000) if kind == "continuation bytes"
           else _byte_ids(tokenizer, b"ok ") + [tokenizer.convert_tokens_to_ids("<|im_start|>")] * 2000
           + _byte_ids(tokenizer, b" done"))
    decoded = []
    detok = IncrementalDetokenizer(tokenizer, [])
    decode = tokenizer.decode

    def counted(token_ids, *args, **kwargs):
        decoded.append(len(token_ids))
        return decode(token_ids, *args, **kwargs)

    tokenizer.decode = counted
    try:
        text = "".join(detok.push(t) for t in ids) + detok.flush()
    finally:
        del tokenizer.decode
    assert text == decode(ids, skip_special_tokens=True)
    assert sum(decoded) < 40 * len(ids)  # (it was about len(ids) ** 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from(["<|im_start|>", "é", "中", "😀"])),
                max_size=40))
def test_detokenizer_deltas_rebuild_any_byte_sequence(tokenizer, pieces):
    """Arbitrary bytes, valid UTF-8 or not, and special tokens: the deltas and the flush are the whole decode."""
    ids = []
    for piece in pieces:
        if piece == "<|im_start|>":
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += _byte_ids(tokenizer, piece.encode() if isinstance(piece, str) else piece)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)

def test_detokenizer_drops_special_tokens(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    ids = [*tokenizer.encode("ab"), tokenizer.eos_token_id]
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "ab"


def test_stop_string_across_deltas_truncates_and_never_releases_part_of_it():
    matcher = StopStringMatcher(["END"])
    released = []
    for delta in ["abc", "E", "N", "Dxyz"]:
        matcher.add(delta)
        released.append(matcher.take(final=False))
    assert matcher.stopped and matcher.text == "abc"
    assert "".join(released) == "abc" and "E" not in "".join(released)


def test_stop_string_false_alarm_is_released():
    matcher = StopStringMatcher(["END"])
    out = ""
    for delta in ["aE", "N", "x"]:
        matcher.add(delta)
        out += matcher.take(final=False)
    out += matcher.take(final=True)
    assert not matcher.stopped and out == "aENx"


def test_text_added_without_search_ends_no_stop_string_but_may_begin_one():
    matcher = StopStringMatcher(["END"])
    matcher.add("aEND", search=False)  # (min_tokens not reached)
    matcher.add("xE", search=False)
    matcher.add("ND!")
    assert matcher.stopped and matcher.text == "aENDx"


def test_whether_a_stop_string_counts_does_not_depend_on_the_others():
    """Each stop string is looked for only where it would end in the new text (vLLM's window): a "\\n" that
    ended before min_tokens was reached does not count, whether or not a longer stop string is also given."""
    for stop in (["\n"], ["\n", "ZZZZZZ"]):
        matcher = StopStringMatcher(stop)
        matcher.add("ab\nc", search=False)  # (min_tokens not reached)
        matcher.add("d")
        assert not matcher.stopped and matcher.text == "ab\ncd", stop
        matcher.add("e\nf")
        assert matcher.stopped and matcher.text == "ab\ncde", stop


def test_text_flushed_at_the_end_is_searched_only_if_the_last_tokens_text_was():
    """What the last token held back (half a character, flushed at the end) is searched as its text was: with
    min_tokens equal to max_tokens no stop string counts (the text was cut while finish_reason said "length")."""
    byte = bytes_to_unicode()
    vocab = {byte[b]: b for b in range(256)} | {byte[0xAD] + byte[0xE6]: 256}  # the end of 中, the start of 文
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(byte[0xAD], byte[0xE6])]))
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = [0xE4, 0xB8, 256, 0x96]  # 中 and two of 文's three bytes: 中 is held back with the half of 文
    for search in (True, False):
        stream = TextStream(tokenizer, [], ["中"])
        for token in ids:
            stream.push(token, search=search)
            assert stream.take(final=False) == ""
        assert stream.take(final=True) == ("" if search else "中\ufffd")
        assert stream.stopped == search


def test_an_included_stop_string_ends_the_text_where_the_first_one_ends():
    """vLLM's include_stop_str_in_output: the text is cut after the stop string that ends first, and none of it
    is held back meanwhile (what may begin a stop string is in the output either way)."""
    matcher = StopStringMatcher(["END", "ZZZZZ"], include=True)
    released = []
    for delta in ["abc", "E", "N", "Dxyz"]:
        matcher.add(delta)
        released.append(matcher.take(final=False))
    assert matcher.stopped and matcher.text == "abcEND" and released == ["abc", "E", "N", "D"]
    matcher = StopStringMatcher(["zzb", "z"], include=True)  # (both begin at 2: "z" ends first)
    matcher.add("aazzb")
    assert matcher.text == "aaz" and matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["zz", "b"])
    matcher.add("aazzb")
    assert matcher.text == "aa" and matcher.stopped


def test_text_stream_stops_inside_a_token(tokenizer):
    text = "print('hello world') # done"
    stream = TextStream(tokenizer, [], ["world"])
    released = ""
    for token in tokenizer.encode(text):
        stream.push(token)
        released += stream.take(final=stream.stopped)
        if stream.stopped:
            break
    assert stream.stopped and released == "print('hello "


def test_token_pieces_bytes_rebuild_text_split_inside_characters(tokenizer):
    text = "héllo wörld \U0001f600 – 中文"
    ids = tokenizer.encode(text)
    pieces = TokenPieces(tokenizer)
    assert any(pieces.text(i) == "\ufffd" for i in ids)  # some tokens hold half a character
    assert b"".join(bytes(pieces.bytes(i)) for i in ids).decode("utf-8") == text
    eos = tokenizer.eos_token_id
    assert pieces.text(eos) == "<|im_end|>" and bytes(pieces.bytes(eos)) == b"<|im_end|>"


def test_token_pieces_of_a_sentencepiece_byte_fallback_vocabulary():
    """A vocabulary without the byte-level alphabet: ``<0xNN>`` pieces are their byte, others their text."""
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "\u2581hi": 3, "a": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    pieces = TokenPieces(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))
    assert bytes(pieces.bytes(1)) + bytes(pieces.bytes(2)) == "é".encode()
    assert (pieces.text(3), bytes(pieces.bytes(3))) == (" hi", b" hi")


@pytest.mark.parametrize("decoder", [
    decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                       decoders.Strip(" ", 1, 0)]),  # Llama 2's and Mistral's tokenizer.json
    decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="first")])])
def test_a_sentencepiece_token_keeps_its_leading_space_which_its_decoder_strips_alone(decoder):
    """Llama 2's and Mistral's decoders strip a text's leading space: a "\u2581there" token decoded alone read "there"
    and a lone "\u2581" nothing, so the entries' bytes did not rebuild the text the stream sent (a review)."""
    vocab = {"<unk>": 0, "<s>": 1, "\u2581hi": 2, "\u2581there": 3, "\u2581": 4, ",": 5, "<0xE4>": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoder
    pieces = TokenPieces(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>"))
    assert [(pieces.text(i), bytes(pieces.bytes(i))) for i in (3, 4, 5, 6, 1)] == [
        (" there", b" there"), (" ", b" "), (",", b","), ("\ufffd", b"\xe4"), ("<s>", b"<s>")]
