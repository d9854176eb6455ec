"""Write a random-weight Qwen3-MoE checkpoint of a released model's layer width, for GPU benchmarks.

The embedded model (hidden 128, 32 experts of 48) is all launch overhead on a GPU; this folder has
Qwen3-30B-A3B's layer width (transformers' `Qwen3MoeConfig` defaults: hidden 2048, 32 query and 4 KV heads,
128 experts of 768, top-8) with fewer layers, and the embedded model's tokenizer and vocabulary, so the
serving benchmark can drive it. Weights are random: what is measured is the arithmetic, not the text.

    python scripts/wide_moe.py --out /tmp/wide-moe --layers 4 --device cuda
    python -m load_tests.bench_serving --model /tmp/wide-moe --device cuda --dtype bfloat16 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, not only under `make`

from deploy.app import DEFAULT_MODEL as EMBEDDED  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where the weights are initialised (cuda is faster)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    config = Qwen3MoeConfig(vocab_size=embedded["vocab_size"], num_hidden_layers=args.layers, norm_topk_prob=True,
                            max_position_embeddings=4096, eos_token_id=embedded["eos_token_id"],
                            pad_token_id=embedded["pad_token_id"])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.layers} layers, {params / 1e9:.2f}B parameters, {args.dtype}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
