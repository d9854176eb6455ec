"""A tiny model folder laid out as Moonshot releases Kimi-K2: DeepSeek-V3's architecture under ``model_type:
kimi_k2`` with remote code named in ``auto_map`` (never run here), FP8 weights with block scales (K2's) or INT4
experts (K2-Thinking's), and a tiktoken
tokenizer (``tiktoken.model``: base64 token bytes and rank per line; ``tokenizer_config.json`` naming the
remote-code ``TikTokenTokenizer`` and the special tokens by id; a Kimi-style chat template in
``chat_template.jinja``). The ranks are a byte-level BPE trained here on multilingual text (the 256 bytes, then
each merge's token in merge order), so that Kimi's pre-tokenization pattern has Han, Latin, Cyrillic, digits and
code to split."""

from __future__ import annotations

import base64
import json
import pydoc_data.topics
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.tiny_models import as_fp8, as_int_packed, tiny_config

MULTILINGUAL = ["我们构建最好的专家放置服务。混合专家模型的每一层都是一道屏障。你好，世界！",
                "Привет, мир! Каждый слой смеси экспертов — это барьер.",
                "Ünïcödé façade naïve café: DON'T, it's, THEY'RE, we'll, I'd.",
                "日本語のテキストとカタカナ、한국어 텍스트.",
                "def placement(experts: list[int]) -> dict:\n    return {e: e % 8 for e in experts}  # 12345 678\n",
                "CamelCaseWords and snake_case_words, HTTPServer2026, x86_64, 3.14159."]
# Kimi-K2's special tokens, by offset from the number of ranks (the rest of the 256 reserved ids are unnamed)
SPECIAL_OFFSETS = {"[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
                   "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
                   "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
                   "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
                   "[UNK]": 254, "[PAD]": 255}
CHAT_TEMPLATE = r"""
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>{%- endif -%}
{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>
{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>
{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>
{%- else -%}<|im_system|>{{ message.get('name') or message['role'] }}<|im_middle|>{%- endif -%}
{%- if message['role'] == 'tool' -%}## Return of {{ message['tool_call_id'] }}
{% endif -%}
{{- message['content'] or '' -}}
{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}<|tool_calls_section_begin|>
{%- for call in message['tool_calls'] -%}<|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>
{%- if call['function']['arguments'] is string -%}{{ call['function']['arguments'] }}{%- else -%}{{ call['function']['arguments'] | tojson }}{%- endif -%}
<|tool_call_end|>{%- endfor -%}<|tool_calls_section_end|>{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""
# tokens across boundaries Kimi's pattern splits at (a lower- then an uppercase letter; a Han character then a Latin
# one): a tokenizer that does not split there merges them, so "aB 中A" tells the patterns apart
BOUNDARY_TOKENS = (b"aB", "中".encode()[:2], "中".encode(), "中A".encode())
REMOTE_CODE = {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
               "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def train_ranks(vocab_size: int = 400) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE trained on `MULTILINGUAL` and Python's docs (bytes, then merges), then
    `BOUNDARY_TOKENS`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(MULTILINGUAL * 20 + list(pydoc_data.topics.topics.values())[:20], trainer)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tok.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    for token in BOUNDARY_TOKENS:
        ranks.setdefault(token, len(ranks))
    return ranks


def write_kimi_tokenizer(folder: Path, ranks: dict[bytes, int]) -> dict[str, int]:
    """Write ``ranks`` and Kimi's tokenizer files into ``folder``; returns the special tokens' ids."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiktoken.model").write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                                   for token, rank in ranks.items()))
    ids = {token: len(ranks) + offset for token, offset in SPECIAL_OFFSETS.items()}
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": 1024, "added_tokens_decoder": {str(i): {"content": t, **entry} for t, i in ids.items()},
    }, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE.strip())
    return ids


def save_kimi_k2(folder: str | Path, seed: int = 3, quantization: str = "fp8") -> Path:
    """The tiny Kimi-K2 release (see the module) in ``folder``; its vocabulary is the tokenizer's. ``quantization``:
    "fp8" (K2, K2-Instruct: every linear layer's weights in FP8 with block scales) or "int4" (K2-Thinking: the
    routed experts' weights INT4 in compressed-tensors' pack-quantized format, the rest unquantized)."""
    folder = Path(folder)
    ranks = train_ranks()
    ids = write_kimi_tokenizer(folder, ranks)
    config = tiny_config("deepseek_v3")
    config.vocab_size, config.max_position_embeddings = len(ranks) + 256, 1024
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["[BOS]"], ids["[EOS]"], ids["[PAD]"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]  # as Kimi-K2's generation_config: the end of a turn
    model.save_pretrained(folder)
    as_fp8(folder, model) if quantization == "fp8" else as_int_packed(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "model_type": "kimi_k2", "auto_map": REMOTE_CODE,
                                                    "architectures": ["DeepseekV3ForCausalLM"]}, indent=2))
    return folder
