"""Build the embedded default model `vibe-tiny-moe`, its tokenizer and the prompt sets, from local text only.

Owns: the training corpus (CPython's `pydoc_data.topics` plus the repo's tracked Markdown and Python files as
committed at HEAD; the pure-Python stdlib modules of STDLIB_CODE_MODULES feed only the code prompts), the
byte-level BPE tokenizer and chat template, the tiny Qwen3-MoE config, CPU training with a per-layer
load-balancing loss, the routing statistics measured on held-out prompts, and the JSON Lines prompt sets
(`deploy/prompts/profile.jsonl`, `load_tests/workloads/*.jsonl`). Ignores serving, placement and devices.

Prompt sets are JSON Lines, one request per line: `{"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...], "max_tokens": int}`, the last message from the user, prompt plus output within the
1024-token context. Their text is CPython's reference, CPython's own source, the repo's files, or written here.

    python -m deploy.build_default_model            # `make model`: about an hour (the committed build: 54
                                                    # minutes of wall time, 32 CPU-minutes, on a shared 2-core machine)
    python -m deploy.build_default_model --steps 200 --aux-coef 0.01 --out /tmp/m --prompts-dir /tmp/p \
        --workloads-dir /tmp/w                      # a quick experiment that leaves the repo alone

Every random choice comes from `BuildConfig.seed`. The corpus is read from the commit checked out (uncommitted
edits are not trained on; a tree without git is refused), and build_info.json records the corpus's hash and
documents, that commit and whether the working tree differed from it, the builder's SHA-256 and the library
versions. A rebuild with all of these the same gives the same tokenizer and token stream; training is
bit-identical only with `--threads 1`: with more threads (the default 2) torch's CPU kernels split sums between
threads run to run, and the weights match another build only within float tolerance (after 3 steps, 30 of 47
tensors differed by up to 1.7e-6). Other library versions may give another tokenizer merge order, so other ids.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data import topics

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from placement.drift import cosine_distance

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "deploy" / "models" / "vibe-tiny-moe"
PROMPTS_DIR = REPO_ROOT / "deploy" / "prompts"
WORKLOADS_DIR = REPO_ROOT / "load_tests" / "workloads"
MAX_FOLDER_BYTES = 16 * 2**20

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML; with tools, Qwen2.5's Hermes tool format (the tool calls service.tools parses). A conversation
# without tools renders as plain ChatML, as the model was trained.
CHAT_TEMPLATE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and loop.first and tools %}
{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}
{{- '<|im_start|>assistant\n' + (message['content'] or '') }}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}
{{- '<tool_call>\n{"name": ' + (fn['name'] | tojson) + ', "arguments": ' + (fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson)) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message['role'] == 'tool' %}
{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
""".strip()
# Pure-Python CPython modules whose source feeds the code prompts (never the training corpus).
STDLIB_CODE_MODULES = (
    "textwrap", "heapq", "bisect", "fnmatch", "colorsys", "shlex", "string", "queue", "graphlib",
    "statistics", "fractions", "dataclasses", "contextlib", "functools", "calendar", "difflib", "glob",
    "copy", "pprint", "reprlib", "numbers", "operator", "sched", "tokenize", "base64",
)
SYSTEM_PROMPTS = (
    "You are a concise assistant that answers questions about Python.",
    "You are vibe-tiny-moe, a small model trained on the Python reference.",
    "Answer in plain English and show code where it helps.",
)
QUESTIONS = (
    "Explain {title}.", "What does the Python reference say about {title}?", "Tell me about {title}.",
    "How does {title} work?", "Describe {title} with an example.", "What should I know about {title}?",
)
FOLLOW_UPS = ("Go on.", "Tell me more about {title}.", "Can you continue?", "What else is there about {title}?")
PASSAGE_ASKS = (
    "Summarise this passage in plain words.", "What is the key point of this text?",
    "Rewrite this for a beginner.", "Which Python feature does this describe, and how is it used?",
)
CODE_SYSTEM = "You are a Python code completion engine. Reply with code only."
CODE_ASKS = ("Complete the following Python code.", "Continue this Python source file.",
             "Finish the function below.")


@dataclass(frozen=True)
class BuildConfig:
    """Model shape, training schedule and prompt-set sizes of the default model.

    Sizes: hidden 128, 4 heads of 32 (2 KV heads), 32 experts of intermediate 48, top-4, vocab 4096, tied
    embeddings: about 3.1M parameters, 12.4 MB in fp32. Training reads `batch_size * seq_len` tokens/step.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    moe_intermediate_size: int = 48
    num_layers: int = 4
    num_experts: int = 32
    top_k: int = 4
    max_positions: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 30
    aux_coef: float = 0.003  # per-layer load-balancing loss weight, tuned (see the report)
    seed: int = 0
    threads: int = 2  # torch threads; 1 makes training bit-identical run to run (see the module docstring)
    heldout_every: int = 8  # every n-th corpus section is held out of training (profile prompts)
    section_chars: int = 1200  # longest assistant turn in the training conversations
    num_profile: int = 64
    num_sharegpt: int = 320
    num_sonnet: int = 120
    num_code: int = 160

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "seed":
                continue
            if not (value > 0 or (name == "aux_coef" and value == 0)):
                raise ValueError(f"BuildConfig.{name} must be > 0, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_positions {self.max_positions}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class Section:
    """One assistant-turn-sized piece of a corpus document; `title` names its document."""

    title: str
    text: str
    first: bool  # the document's first section


# --- corpus --------------------------------------------------------------------------------------


def git(repo_root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """stdout of `git args` in `repo_root`; a RuntimeError saying what the build needs if git or the checkout is
    missing (a bare CalledProcessError said neither)."""
    need = (f"the default model is built from the files committed in a git checkout of the repository; {repo_root} "
            "is not one (a tarball, an sdist or an installed package?): build from a clone")
    try:
        return subprocess.run(["git", *args], cwd=repo_root, check=True, capture_output=True, input=stdin).stdout
    except FileNotFoundError:
        raise RuntimeError(f"git is not installed: {need}") from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"`git {' '.join(args)}` failed ({exc.stderr.decode(errors='replace').strip()}): "
                           f"{need}") from None


def committed_files(repo_root: Path, suffixes: tuple[str, ...] = (".md", ".py")) -> tuple[str, dict[str, str]]:
    """(commit, {path: text}) of the regular files ending in `suffixes` as committed at HEAD of `repo_root`.

    The commit's content, not the working tree's: an uncommitted edit went into the corpus, so the recorded corpus
    hash named no commit. Text is UTF-8 with universal newlines, as `Path.read_text` reads it, so a clean checkout's
    corpus is what the working tree's was. Symlinks and submodules are left out.
    """
    top = Path(git(repo_root, "rev-parse", "--show-toplevel").decode().strip())
    if top.resolve() != repo_root.resolve():  # e.g. an installed copy inside some other repository
        raise RuntimeError(f"{repo_root} is not the top of a git checkout (git's is {top}): the default model is "
                           "built from the files committed in a clone of the repository")
    commit = git(repo_root, "rev-parse", "HEAD").decode().strip()
    blobs = {}  # path -> object id
    for entry in git(repo_root, "ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0"):
        if entry:
            meta, path = entry.decode().split("\t", 1)
            mode, kind, oid = meta.split()
            if kind == "blob" and mode in ("100644", "100755") and path.endswith(suffixes):
                blobs[path] = oid
    paths = sorted(blobs)
    out = git(repo_root, "cat-file", "--batch", stdin="".join(f"{blobs[p]}\n" for p in paths).encode())
    files, at = {}, 0
    for path in paths:  # each: "<oid> blob <size>\n<content>\n"
        header_end = out.index(b"\n", at)
        size = int(out[at:header_end].split()[2])
        text = out[header_end + 1:header_end + 1 + size].decode()
        files[path] = text.replace("\r\n", "\n").replace("\r", "\n")
        at = header_end + 1 + size + 1
    return commit, files


def corpus_documents(files: dict[str, str]) -> list[tuple[str, str]]:
    """(title, text) of every pydoc topic (title: its heading) and of `files` {path: text} (title: path), by path."""
    docs = [(text.split("\n", 1)[0].strip(), text) for _, text in sorted(topics.topics.items())]
    docs += sorted(files.items())
    return [(title, text) for title, text in docs if text.strip()]


def pack(pieces: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive pieces with `sep` into chunks of at most `max_chars` (a longer piece stays whole)."""
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}{sep}{piece}" if current else piece
    return [*chunks, current] if current else chunks


def split_sections(title: str, text: str, max_chars: int) -> list[Section]:
    """Cut a document into sections of at most `max_chars`, at blank lines where possible, else at lines."""
    blocks = []
    for block in (b.strip("\n") for b in text.split("\n\n") if b.strip()):
        lines = [line[i:i + max_chars] for line in block.split("\n") for i in range(0, max(len(line), 1), max_chars)]
        blocks += pack(lines, "\n", max_chars)
    return [Section(title, body, i == 0) for i, body in enumerate(pack(blocks, "\n\n", max_chars))]


def split_corpus(docs: list[tuple[str, str]], cfg: BuildConfig) -> tuple[list[Section], list[Section]]:
    """(training sections, held-out sections): every `heldout_every`-th section is held out."""
    sections = [s for title, text in docs for s in split_sections(title, text, cfg.section_chars)]
    held = [s for i, s in enumerate(sections) if i % cfg.heldout_every == cfg.heldout_every - 1]
    train = [s for i, s in enumerate(sections) if i % cfg.heldout_every != cfg.heldout_every - 1]
    return train, held


def section_conversation(section: Section, rng: random.Random) -> list[dict[str, str]]:
    """A chat in which the user asks about the section's document and the assistant answers with it."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    asks = QUESTIONS if section.first else FOLLOW_UPS
    messages.append({"role": "user", "content": rng.choice(asks).format(title=section.title)})
    messages.append({"role": "assistant", "content": section.text})
    return messages


# --- tokenizer -----------------------------------------------------------------------------------


def build_tokenizer(texts: list[str], cfg: BuildConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, wrapped with eos `<|im_end|>`, pad `<|endoftext|>` and the chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD,
                                   model_max_length=cfg.max_positions, chat_template=CHAT_TEMPLATE)


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens of the chat prompt (template and generation prompt included)."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def token_stream(tokenizer, conversations: list[list[dict[str, str]]]) -> torch.Tensor:
    """int64 [N]: the rendered conversations, tokenized and concatenated."""
    texts = [render(tokenizer, messages, False) for messages in conversations]
    # the backend tokenizer: a conversation may exceed the context, and only windows of it are trained on
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return torch.tensor([token for conversation in encoded for token in conversation.ids], dtype=torch.long)


# --- model and training --------------------------------------------------------------------------


def build_model(cfg: BuildConfig, tokenizer) -> Qwen3MoeForCausalLM:
    """A freshly initialised Qwen3-MoE whose every decoder layer is an MoE layer."""
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        # dense MLP width: unused (every layer is MoE) but part of the config; the active expert width
        intermediate_size=cfg.moe_intermediate_size * cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen3MoeForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss per layer, averaged over layers (1.0 at perfect balance).

    Args:
        router_logits: per layer [N, E] router logits of the N tokens.
    Unlike transformers' built-in loss, which pools the counts of all layers and so lets single layers
    collapse, every layer is balanced on its own.
    """
    probs = torch.softmax(torch.stack(router_logits).float(), dim=-1)  # [L, N, E]
    num_experts = probs.shape[-1]
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(2).float()  # [L, N, E]
    token_share = chosen.mean(1) / top_k  # [L, E], sums to 1
    prob_share = probs.mean(1)  # [L, E], sums to 1
    return (num_experts * (token_share * prob_share).sum(-1)).mean()


def batch_loads(router_logits: tuple[torch.Tensor, ...], top_k: int) -> np.ndarray:
    """int64 [L, E]: top-k assignments per expert in one batch, from per-layer router logits [N, E]."""
    logits = torch.stack(router_logits).detach()  # [L, N, E]
    chosen = logits.topk(top_k, dim=-1).indices.flatten(1)  # [L, N * k]
    return np.stack([np.bincount(row, minlength=logits.shape[-1]) for row in chosen.numpy()])


def learning_rate(step: int, cfg: BuildConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, cfg: BuildConfig) -> dict:
    """Train on random `seq_len` windows of `stream` [N]; returns losses, wall and CPU seconds."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start, cpu_start, log = time.perf_counter(), time.process_time(), []
    for step in range(cfg.steps):
        starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])  # [B, T]
        out = model(input_ids=batch, output_router_logits=True)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        aux = balance_loss(out.router_logits, cfg.top_k)
        (lm + cfg.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.steps - 1:
            skew = routing_summary(batch_loads(out.router_logits, cfg.top_k))["max_over_mean"]
            log.append({"step": step, "lm_loss": lm.item(), "balance_loss": aux.item(), "batch_max_over_mean": skew,
                        "seconds": time.perf_counter() - start})
            print(f"step {step:4d}  lm {lm.item():.3f}  balance {aux.item():.3f}  skew {skew}  "
                  f"{log[-1]['seconds']:.0f} s", flush=True)
    model.eval()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "log": log}


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over consecutive `seq_len` windows of `stream` [N]."""
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)  # [W, T]
    total = sum(F.cross_entropy(model(input_ids=batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                reduction="sum").item() for batch in windows.split(batch_size))
    return total / (windows.shape[0] * (seq_len - 1))


# --- routing -------------------------------------------------------------------------------------


@torch.no_grad()
def router_loads(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> np.ndarray:
    """int64 [L, E]: top-k assignments of every prompt token to each expert (prefill of the chat prompts).

    Observes each router with a forward hook that returns nothing (returning would replace its output).
    """
    config = model.config
    counts = np.zeros((config.num_hidden_layers, config.num_local_experts), dtype=np.int64)
    chosen: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out: chosen.append(out[2]))
             for layer in model.model.layers]
    try:
        texts = sorted((render(tokenizer, messages, True) for messages in conversations), key=len)  # less padding
        for begin in range(0, len(texts), batch_size):
            enc = tokenizer(texts[begin:begin + batch_size], add_special_tokens=False, padding=True,
                            return_tensors="pt")
            chosen.clear()
            model(**enc)
            real = enc["attention_mask"].reshape(-1).bool()  # [B*T], rows as the router sees them
            for layer, indices in enumerate(chosen):  # indices [B*T, k]
                counts[layer] += np.bincount(indices[real].reshape(-1).numpy(), minlength=counts.shape[1])
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def routing_summary(loads: np.ndarray) -> dict:
    """Per-layer skew of loads [L, E]: max/mean, min/mean, min share of the layer's tokens, dead experts."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=1)
    return {
        "max_over_mean": (loads.max(axis=1) / mean).round(4).tolist(),
        "min_over_mean": (loads.min(axis=1) / mean).round(4).tolist(),
        "min_share": (loads.min(axis=1) / loads.sum(axis=1)).round(6).tolist(),
        "dead_experts": [int(n) for n in (loads == 0).sum(axis=1)],
    }


# --- prompt sets ---------------------------------------------------------------------------------


def log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def fit_entry(tokenizer, messages, max_tokens: int, cfg: BuildConfig, min_output: int = 16) -> dict | None:
    """{"messages", "max_tokens"} with the output clipped to the context; None if the prompt leaves no room."""
    room = cfg.max_positions - prompt_tokens(tokenizer, messages)
    if room < min_output:
        return None
    return {"messages": messages, "max_tokens": min(max_tokens, room)}


def code_sources(files: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(name, lines) of the pure-Python stdlib modules and of the Python files among `files` {path: text}."""
    texts = [(name, Path(importlib.util.find_spec(name).origin).read_text()) for name in STDLIB_CODE_MODULES]
    texts += [(path, text) for path, text in sorted(files.items()) if path.endswith(".py")]
    return [(name, lines) for name, text in texts if len(lines := text.splitlines()) >= 12]


def code_conversation(sources, rng: random.Random, min_lines: int, max_lines: int) -> list[dict[str, str]]:
    """A completion request for a snippet that starts at a `def`/`class` line and stops mid-way."""
    _, lines = rng.choice(sources)
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "class "))] or [0]
    first = rng.choice(starts)
    snippet = "\n".join(lines[first:first + rng.randint(min_lines, max_lines)])
    ask = f"{rng.choice(CODE_ASKS)}\n\n```python\n{snippet}\n```"
    return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": ask}]


def prose_conversation(sections: list[Section], rng: random.Random) -> list[dict[str, str]]:
    """A ShareGPT-like chat: a bare question, a pasted passage to explain, or a multi-turn exchange."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
    section, kind = rng.choice(sections), rng.random()
    if kind < 0.3:
        messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(title=section.title)})
    elif kind < 0.6:
        messages.append({"role": "user", "content": f"{section.text}\n\n{rng.choice(PASSAGE_ASKS)}"})
    else:
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(title=section.title)})
            messages.append({"role": "assistant", "content": rng.choice(sections).text[: rng.randint(200, 900)]})
        messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS).format(title=section.title)})
    return messages


def sonnet_conversation(lines: list[str], prefix: str, tokenizer, rng: random.Random) -> list[dict[str, str]]:
    """Like vLLM's Sonnet benchmark: a shared prefix, then random reference lines up to 450-700 tokens."""
    target, body = rng.randint(450, 700), prefix
    while prompt_tokens(tokenizer, [{"role": "user", "content": body}]) < target:
        body += "\n" + rng.choice(lines)
    return [{"role": "user", "content": body}]


def sample_entries(count: int, make, tokenizer, cfg: BuildConfig) -> list[dict]:
    """`count` entries from `make() -> (messages, max_tokens)`, skipping prompts the context cannot hold."""
    entries = []
    while len(entries) < count:
        entry = fit_entry(tokenizer, *make(), cfg)
        if entry is not None:
            entries.append(entry)
    return entries


def prompt_sets(held_prose: list[Section], prose: list[Section], sources, tokenizer, cfg: BuildConfig,
                rng: random.Random) -> dict[str, list[dict]]:
    """The profile set (held-out prose, a quarter unseen stdlib code) and the three load-test workloads, by name.

    sharegpt_like: bare questions, pasted passages and multi-turn chats, outputs 16-512 tokens;
    sonnet_like: long prompts, outputs 16-64 tokens; code: Python snippets of 6-60 lines, outputs 32-256.
    """
    lines = [line for s in prose for line in s.text.splitlines() if len(line.strip()) > 30]
    prefix = ("Below are lines taken from the Python language reference. Pick as many lines as you can from "
              "them and repeat them exactly, one per line.\n\n" + "\n".join(lines[:12]))

    unseen_code = [source for source in sources if source[0] in STDLIB_CODE_MODULES]  # never trained on

    def profile():
        if rng.random() < 0.25:
            return code_conversation(unseen_code, rng, 8, 30), 128
        return prose_conversation(held_prose, rng), 128

    return {
        "profile": sample_entries(cfg.num_profile, profile, tokenizer, cfg),
        "sharegpt_like": sample_entries(
            cfg.num_sharegpt, lambda: (prose_conversation(prose, rng), log_uniform_int(rng, 16, 512)), tokenizer, cfg),
        "sonnet_like": sample_entries(
            cfg.num_sonnet, lambda: (sonnet_conversation(lines, prefix, tokenizer, rng), rng.randint(16, 64)),
            tokenizer, cfg),
        "code": sample_entries(
            cfg.num_code, lambda: (code_conversation(sources, rng, 6, 60), log_uniform_int(rng, 32, 256)),
            tokenizer, cfg),
    }


def write_jsonl(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the build -----------------------------------------------------------------------------------


@torch.no_grad()
def greedy_samples(model, tokenizer, conversations, max_new_tokens: int = 60) -> list[dict]:
    """Greedy continuations of the given chat prompts."""
    samples = []
    for messages in conversations:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": messages[-1]["content"][:200], "reply": reply})
    return samples


def routing_stats(model, tokenizer, sets: dict[str, list[dict]], profile_path: Path, cfg: BuildConfig) -> dict:
    """Skew on the profile set (with its raw loads [L, E]), per workload, and prose-vs-code drift per layer."""
    loads = {name: router_loads(model, tokenizer, [e["messages"] for e in entries]) for name, entries in sets.items()}
    pairs = (("sharegpt_like", "code"), ("sonnet_like", "code"), ("sharegpt_like", "sonnet_like"))
    return {
        "prompt_set": str(profile_path.relative_to(REPO_ROOT) if profile_path.is_relative_to(REPO_ROOT)
                          else profile_path),
        "aux_coef_per_layer": cfg.aux_coef,
        "num_prompt_tokens": int(loads["profile"][0].sum() // cfg.top_k),
        **routing_summary(loads["profile"]),
        "loads": loads["profile"].tolist(),
        "workloads": {name: routing_summary(loads[name]) for name in sets if name != "profile"},
        "drift_cosine_distance": {f"{a}_vs_{b}": cosine_distance(loads[a], loads[b]).round(4).tolist()
                                  for a, b in pairs},
    }


def save_folder(model, tokenizer, model_dir: Path, stats: dict, info: dict) -> int:
    """Write weights, tokenizer, generation config and the two JSON reports; returns the folder's bytes."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "routing_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (model_dir / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    if size > MAX_FOLDER_BYTES:
        raise RuntimeError(f"{model_dir} is {size} bytes, over the {MAX_FOLDER_BYTES}-byte budget")
    return size


def provenance(repo_root: Path, commit: str) -> dict:
    """What build_info.json records besides the config and the corpus to tell which code built the model.

    The corpus's commit; whether the working tree (this builder included) differed from it when the corpus was
    read (tracked files only; taken at the build's start, not an hour later); this file's SHA-256 then; the versions whose changes change the result (tokenizers: the BPE
    merge order, so every id; torch and transformers: initialisation and training arithmetic).
    """
    dirty = git(repo_root, "status", "--porcelain", "--untracked-files=no").strip() != b""
    return {"git_commit": commit, "git_dirty": dirty,
            "builder_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                         "numpy": np.__version__}}


def build(cfg: BuildConfig, model_dir: Path, prompts_dir: Path, workloads_dir: Path,
          repo_root: Path = REPO_ROOT) -> dict:
    """Train and save the model and write the prompt sets; returns the build summary printed.

    `repo_root`: the git checkout whose committed files are the corpus (tests build from a small one).
    """
    commit, files = committed_files(repo_root)  # first: without a checkout, fail before any work
    origin = provenance(repo_root, commit)  # (now: the tree and this builder as they are when the corpus is read)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    docs = corpus_documents(files)
    train_sections, held = split_corpus(docs, cfg)
    tokenizer = build_tokenizer([s.text for s in train_sections], cfg)
    stream = token_stream(tokenizer, [section_conversation(s, rng) for s in train_sections])
    held_stream = token_stream(tokenizer, [section_conversation(s, rng) for s in held])
    print(f"corpus: {len(docs)} documents, {len(train_sections)} training sections ({stream.numel()} tokens), "
          f"{len(held)} held out ({held_stream.numel()} tokens)", flush=True)

    model = build_model(cfg, tokenizer)
    training = train(model, stream, cfg)
    training["heldout_loss"] = eval_loss(model, held_stream, cfg.seq_len)
    training["train_loss"] = eval_loss(model, stream[: held_stream.numel()], cfg.seq_len)

    prose = [s for s in train_sections + held if not s.title.endswith(".py")]
    held_prose = [s for s in held if not s.title.endswith(".py")]
    sets = prompt_sets(held_prose, prose, code_sources(files), tokenizer, cfg, rng)
    paths = {name: (prompts_dir if name == "profile" else workloads_dir) / f"{name}.jsonl" for name in sets}
    for name, entries in sets.items():
        write_jsonl(paths[name], entries)
    stats = routing_stats(model, tokenizer, sets, paths["profile"], cfg)
    samples = greedy_samples(model, tokenizer, [sets["profile"][i]["messages"] for i in range(4)])
    info = {"config": asdict(cfg), "training": training, "greedy_samples": samples,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "corpus_sha256": hashlib.sha256("".join(text for _, text in docs).encode()).hexdigest(),
            "corpus_documents": [title for title, _ in docs], **origin}
    size = save_folder(model, tokenizer, model_dir, stats, info)
    summary = {"folder_bytes": size, "training_seconds": round(training["seconds"], 1),
               "training_cpu_seconds": round(training["cpu_seconds"], 1), "heldout_loss": training["heldout_loss"],
               "max_over_mean": stats["max_over_mean"], "min_share": stats["min_share"],
               "drift": stats["drift_cosine_distance"], "samples": samples}
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=BuildConfig.steps)
    parser.add_argument("--aux-coef", type=float, default=BuildConfig.aux_coef)
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    parser.add_argument("--threads", type=int, default=BuildConfig.threads,
                        help="torch threads; 1: training bit-identical run to run (slower)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="model folder")
    parser.add_argument("--prompts-dir", type=Path, default=PROMPTS_DIR)
    parser.add_argument("--workloads-dir", type=Path, default=WORKLOADS_DIR)
    args = parser.parse_args()
    cfg = BuildConfig(steps=args.steps, aux_coef=args.aux_coef, seed=args.seed, threads=args.threads)
    build(cfg, args.out, args.prompts_dir, args.workloads_dir)


if __name__ == "__main__":
    main()
