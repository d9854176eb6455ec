"""Kimi-K2 folders load without their remote code: the tiktoken tokenizer rebuilt as a fast tokenizer encodes as
tiktoken does with Kimi's pattern, and the ``kimi_k2`` config is DeepSeek-V3's (layout, weights, logits)."""

from __future__ import annotations

import json

import pytest
import tiktoken
import torch
from transformers import AutoConfig, DeepseekV3ForCausalLM
from transformers.convert_slow_tokenizer import TikTokenConverter

from service.checkpoint import KimiK2Config, load_layout, read_experts
from service.model import load_reference_model
from service.text import apply_chat_template
from service.tokenizer import KIMI_PATTERN, kimi_tokenizer, load_tokenizer, read_tiktoken_ranks
from service.tools import detect_format
from tests.kimi_release import MULTILINGUAL, SPECIAL_OFFSETS, save_kimi_k2, train_ranks, write_kimi_tokenizer

TEXTS = [*MULTILINGUAL, "中文English混合123456", "HelloWorld 你好World", "a  b   c\n\n\n d", "  leading", "trailing  ",
         "x'S y'LL Z'Re", "ÀBC déF ǅungla", "tabs\t\tand\r\nlines", "emoji 🤖🚀 ok", "1234567890", "", "aB 中A",
         "<|im_user|>user<|im_middle|>你好<|im_end|><|im_assistant|>assistant<|im_middle|>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_kimi_k2(tmp_path_factory.mktemp("models") / "kimi-k2")


@pytest.fixture(scope="module")
def ranks(folder):
    return read_tiktoken_ranks(folder / "tiktoken.model")


def reference(ranks, pattern=KIMI_PATTERN) -> tiktoken.Encoding:
    """What Moonshot's remote code encodes with: tiktoken over the ranks, the 256 reserved ids as specials."""
    names = {len(ranks) + offset: token for token, offset in SPECIAL_OFFSETS.items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), len(ranks) + 256)}
    return tiktoken.Encoding("kimi", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def test_the_tokenizer_encodes_and_decodes_as_tiktoken_with_kimis_pattern(folder, ranks):
    tokenizer, encoding = load_tokenizer(folder), reference(ranks)
    for text in TEXTS:
        ids = encoding.encode(text, allowed_special="all")
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == encoding.decode(ids) == text
    # the texts tell Kimi's pattern from transformers' default (tiktoken's cl100k-like one; "aB 中A" does): with
    # that, the equality above would not hold
    default = reference(ranks, TikTokenConverter().pattern)
    assert default.encode("aB 中A") != encoding.encode("aB 中A")


def test_special_tokens_keep_their_ids_and_the_reserved_range_is_named(folder, ranks):
    tokenizer = load_tokenizer(folder)
    base = len(ranks)
    assert len(tokenizer) == base + 256
    for token, offset in SPECIAL_OFFSETS.items():
        assert tokenizer.convert_tokens_to_ids(token) == base + offset
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == base + offset
    assert tokenizer.convert_ids_to_tokens(base + 100) == f"<|reserved_token_{base + 100}|>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (base, base + 1, base + 255)
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # no BOS, as the remote code
    ids = tokenizer.encode("<|im_user|>user<|im_middle|>hé<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "userhé"


def test_the_chat_template_renders_kimis_turns_and_is_read_as_kimis_tool_format(folder):
    tokenizer = load_tokenizer(folder)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "你好"}])
    assert tokenizer.decode(ids) == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by "
                                     "Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>你好<|im_end|>"
                                     "<|im_assistant|>assistant<|im_middle|>")
    assert detect_format(tokenizer.chat_template) == "kimi_k2"


def test_other_folders_load_with_transformers_and_malformed_ranks_are_refused(tmp_path):
    from tests.service.test_text import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "plain")
    assert type(load_tokenizer(tmp_path / "plain")).__name__ == "TokenizersBackend"
    bad = tmp_path / "bad"
    write_kimi_tokenizer(bad, train_ranks(300))
    lines = (bad / "tiktoken.model").read_text().splitlines()
    (bad / "tiktoken.model").write_text("\n".join([*lines[:5], "not-base64!", *lines[5:]]))
    with pytest.raises(ValueError, match="line 6 is not"):
        load_tokenizer(bad)
    (bad / "tiktoken.model").write_text("\n".join(lines[:5] + lines[6:]))  # rank 5 missing
    with pytest.raises(ValueError, match=r"its 303 tokens are not 0\.\.302"):
        kimi_tokenizer(bad)


def test_the_kimi_k2_config_is_deepseek_v3s_and_its_experts_and_logits_are_deepseek_v3s(folder):
    config = AutoConfig.from_pretrained(folder, local_files_only=True)  # its auto_map's remote code is not run
    assert isinstance(config, KimiK2Config) and json.loads((folder / "config.json").read_text())["auto_map"]
    layout = load_layout(folder)
    assert (layout.architecture, layout.moe_layers, layout.num_experts, layout.top_k) == ("kimi_k2", (1, 2), 8, 2)
    model = load_reference_model(folder)  # dequantized from FP8 as transformers loads DeepSeek-V3
    deepseek = DeepseekV3ForCausalLM.from_pretrained(folder, config=DeepseekV3ForCausalLM.config_class(
        **config.to_diff_dict()), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 300, 17, 42, 9, 256, 400]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, deepseek(ids).logits)
    (expert,) = read_experts(folder, [(0, 3)])  # MoE layer 0 is decoder layer 1
    weights = model.model.layers[1].mlp.experts
    assert torch.equal(expert.tensors["gate_up"], weights.gate_up_proj[3])
    assert torch.equal(expert.tensors["down"], weights.down_proj[3])


def test_the_historys_call_ids_are_rendered_in_kimis_form(folder):
    from service.openai_api import ChatMessage, template_messages

    def call(id_, name):
        return {"id": id_, "type": "function", "function": {"name": name, "arguments": "{\"city\": \"Paris\"}"}}

    messages = [ChatMessage(role="user", content="Weather in Paris and Rome?"),
                ChatMessage(role="assistant", content=None, tool_calls=[call("call_a", "get_weather"),
                                                                         call("functions.get_time:7", "get_time")]),
                ChatMessage(role="tool", content="18 C", tool_call_id="call_a"),
                ChatMessage(role="tool", content="noon", tool_call_id="functions.get_time:7"),
                ChatMessage(role="assistant", content=None, tool_calls=[call("call_b", "get_weather")]),
                ChatMessage(role="tool", content="21 C", tool_call_id="call_b")]
    rendered = template_messages(messages, "kimi_k2")
    assert [c["id"] for c in rendered[1]["tool_calls"]] == ["functions.get_weather:0", "functions.get_time:7"]
    assert [m.get("tool_call_id") for m in rendered[2:]] == ["functions.get_weather:0", "functions.get_time:7",
                                                              None, "functions.get_weather:2"]
    assert rendered[4]["tool_calls"][0]["id"] == "functions.get_weather:2"
    text = load_tokenizer(folder).apply_chat_template(rendered, tokenize=False)
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.get_weather:0\n18 C" in text
    assert template_messages(messages, "hermes")[1]["tool_calls"][0]["id"] == "call_a"  # other formats keep them


@pytest.mark.parametrize("marker", ["config", "remote code"])
def test_kimi_linear_folders_reserve_two_more_special_ids(tmp_path, marker):
    """Kimi-Linear's remote code reserves ``num_reserved_special_tokens + 2`` ids after the ranks (Kimi-K2's 256): the
    two more are special tokens too, named as its code names them, told by the folder's ``kimi_linear`` config or by
    its remote code's text (never run); encoding equals tiktoken's over those 258 specials."""
    ranks = train_ranks(300)
    write_kimi_tokenizer(tmp_path, ranks)
    if marker == "config":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_linear"}))
    else:
        (tmp_path / "tokenization_kimi.py").write_text(
            "for i in range(num_base_tokens, num_base_tokens + self.num_reserved_special_tokens + 2):\n    pass\n")
    tokenizer, base = load_tokenizer(tmp_path), len(ranks)
    assert len(tokenizer) == base + 258
    last = f"<|reserved_token_{base + 257}|>"
    assert tokenizer.convert_ids_to_tokens(base + 257) == last
    names = {base + offset: token for token, offset in SPECIAL_OFFSETS.items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + 258)}
    encoding = tiktoken.Encoding("kimi", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    text = f"a{last}b<|im_end|>"
    assert tokenizer.encode(text, add_special_tokens=False) == encoding.encode(text, allowed_special="all")
    write_kimi_tokenizer(tmp_path / "k2", ranks)  # neither: Kimi-K2's 256
    assert len(load_tokenizer(tmp_path / "k2")) == base + 256


def test_kimi_k2_thinkings_think_tags_are_kept_in_the_text_and_split_off_as_reasoning(tmp_path):
    """Kimi-K2-Thinking names ``<think>``/``</think>`` in its reserved range (the ranks' count + 22 and + 23) with
    ``"special": false``: they are matched in text (as the remote code, which allows every reserved token), yet
    decoding with ``skip_special_tokens`` (every completion's default) keeps them, as the remote code does, so
    the ``kimi_k2`` reasoning parser finds the block. The tokens marked special, and the unnamed reserved ids,
    are still skipped."""
    from service.reasoning import ReasoningStream
    from service.text import TextStream

    ranks = train_ranks(300)
    write_kimi_tokenizer(tmp_path, ranks)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    base, think = len(ranks), {"<think>": 22, "</think>": 23}
    for tag, offset in think.items():
        config["added_tokens_decoder"][str(base + offset)] = {
            "content": tag, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == base + 256
    text = "<think>let me see</think>The answer<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [ids[0], ids[-1]] == [base + 22, base + 2] and base + 23 in ids
    names = {base + offset: token for token, offset in {**SPECIAL_OFFSETS, **think}.items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + 256)}
    encoding = tiktoken.Encoding("kimi", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    assert ids == encoding.encode(text, allowed_special="all")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>let me see</think>The answer"
    assert tokenizer.decode([*ids, base + 100], skip_special_tokens=True) == "<think>let me see</think>The answer"
    stream = TextStream(tokenizer, tokenizer.encode("hi"), ())
    for token in ids:
        stream.push(token)
    assert ReasoningStream().push(stream.take(final=True), final=True) == ("let me see", "The answer")


def test_kimis_config_class_is_one_class_that_pickles_and_autoconfig_knows():
    """`KimiK2Config` is built on first use (service.checkpoint imports no transformers): one class, registered with
    AutoConfig, pickled by reference (Ray sends configs to actors)."""
    import pickle

    import service.checkpoint as checkpoint

    config = KimiK2Config(n_routed_experts=8)
    assert checkpoint.KimiK2Config is KimiK2Config and type(pickle.loads(pickle.dumps(config))) is KimiK2Config
    assert pickle.loads(pickle.dumps(config)).n_routed_experts == 8
    assert type(checkpoint.auto_config().for_model("kimi_k2")) is KimiK2Config
    with pytest.raises(AttributeError, match="has no attribute 'KimiK3Config'"):
        checkpoint.KimiK3Config  # noqa: B018
