"""Equivalence benchmark: the served model's log-likelihoods under every placement and while experts move.

    python -m load_tests.equivalence --out bench        # about 4 minutes on 2 cores

Placement moves expert weights between workers while the service answers; it must never change what
the model computes. This scores shipped prompts the way lm-evaluation-harness does (completions with
the prompt as token ids, ``echo``, ``logprobs``, ``max_tokens: 0``) on the default emulated cluster,
under each policy's placement in turn (`POST /admin/recalibrate` with ``policy``, ``mode: full``,
``force``), and once more while forced re-placements run back to back, and compares every prompt
token's log-probability with the unmodified single-process model's. Writes `<out>/equivalence.json`
and prints one line per phase.

Owns the measurement only; ignores speed (the other benchmarks measure it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from deploy.app import DEFAULT_MODEL
from load_tests.compare import ADMIN_TOKEN, deploy_args, serve_apps
from load_tests.workloads import load_workloads
from service.model import load_reference_model
from service.text import apply_chat_template

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLICIES = ("contiguous", "eplb", "vibe")


@dataclass(frozen=True)
class EquivalenceConfig:
    """What to score.

    Attributes:
        prompts_per_workload: prompts taken from each shipped workload set (in file order).
        max_prompt_tokens: prompts are cut to this many tokens (chat template applied first).
        batch: prompts per completions request.
        migrations: forced full re-placements run while scoring, alternating the policies.
    """

    prompts_per_workload: int = 8
    max_prompt_tokens: int = 96
    batch: int = 8
    migrations: int = 4


def prompt_ids(config: EquivalenceConfig, tokenizer) -> list[list[int]]:
    """The shipped prompts' token ids, as the chat endpoint would see them, cut to the limit."""
    sets = load_workloads(("sharegpt_like", "sonnet_like", "code"))
    return [apply_chat_template(tokenizer, list(p.messages))[:config.max_prompt_tokens]
            for prompts in sets.values() for p in prompts[:config.prompts_per_workload]]


def reference_logprobs(model, prompts: list[list[int]]) -> list[list[float]]:
    """Each prompt token's log-probability after the first, from the single-process model."""
    scores = []
    with torch.inference_mode():
        for ids in prompts:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            scores.append([float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))])
    return scores


def differences(served: list[list[float]], reference: list[list[float]]) -> dict:
    """Largest and mean absolute difference over every token, and how many tokens were compared."""
    if [len(s) for s in served] != [len(r) for r in reference]:
        raise ValueError("served and reference scores cover different tokens")
    diffs = [abs(s - r) for ss, rr in zip(served, reference) for s, r in zip(ss, rr)]
    return {"tokens": len(diffs), "max_abs_logprob_diff": max(diffs, default=0.0),
            "mean_abs_logprob_diff": sum(diffs) / max(len(diffs), 1)}


async def score(client: httpx.AsyncClient, base: str, model: str, prompts: list[list[int]], batch: int) -> list:
    """Served log-probabilities of every prompt token after the first (echo, max_tokens 0), in order."""
    scores = []
    for start in range(0, len(prompts), batch):
        body = {"model": model, "prompt": prompts[start:start + batch], "max_tokens": 0, "echo": True,
                "logprobs": 0}
        response = await client.post(f"{base}/v1/completions", json=body)
        response.raise_for_status()
        scores += [choice["logprobs"]["token_logprobs"][1:] for choice in response.json()["choices"]]
    return scores


async def replace_placement(client: httpx.AsyncClient, base: str, policy: str) -> dict:
    response = await client.post(f"{base}/admin/recalibrate", headers=ADMIN,
                                 json={"policy": policy, "mode": "full", "force": True})
    response.raise_for_status()
    return response.json()


async def run(config: EquivalenceConfig, base: str, model_name: str, prompts: list[list[int]],
              reference: list[list[float]]) -> dict:
    """Score under each policy's placement, then while re-placements run; every phase against the
    single-process model, and against the first placement's served scores (``max_abs_diff_vs_first``:
    0 means bit-identical)."""
    phases, first = [], None
    async with httpx.AsyncClient(timeout=300) as client:
        for policy in POLICIES:
            plan = await replace_placement(client, base, policy)
            served = await score(client, base, model_name, prompts, config.batch)
            first = first or served
            phases.append({"phase": f"placement {policy}", "version": plan["to_version"],
                           "status": plan["status"], "experts_moved": plan["experts_moved"],
                           **differences(served, reference),
                           "max_abs_diff_vs_first": differences(served, first)["max_abs_logprob_diff"]})
        moves, rounds = [], 0
        mover = asyncio.ensure_future(_migrate(client, base, config.migrations, moves))
        during, during_vs_first = [], []
        while not mover.done() or rounds == 0:
            served = await score(client, base, model_name, prompts, config.batch)
            during.append(differences(served, reference)["max_abs_logprob_diff"])
            during_vs_first.append(differences(served, first)["max_abs_logprob_diff"])
            rounds += 1
        await mover
        phases.append({"phase": "during migrations", "version": moves[-1]["to_version"] if moves else None,
                       "status": ",".join(m["status"] for m in moves),
                       "experts_moved": sum(m["experts_moved"] for m in moves), "rounds": rounds,
                       "tokens": rounds * sum(len(r) for r in reference), "max_abs_logprob_diff": max(during),
                       "max_abs_diff_vs_first": max(during_vs_first)})
    return {"phases": phases}


async def _migrate(client: httpx.AsyncClient, base: str, count: int, moves: list) -> None:
    for i in range(count):
        moves.append(await replace_placement(client, base, POLICIES[i % len(POLICIES)]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--prompts-per-workload", type=int, default=EquivalenceConfig.prompts_per_workload)
    parser.add_argument("--migrations", type=int, default=EquivalenceConfig.migrations)
    options = parser.parse_args(argv)
    config = EquivalenceConfig(prompts_per_workload=options.prompts_per_workload, migrations=options.migrations)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    prompts = prompt_ids(config, tokenizer)
    reference = reference_logprobs(load_reference_model(str(DEFAULT_MODEL)), prompts)
    args = {**deploy_args(), "admin_token": ADMIN_TOKEN, "app_name": "equivalence"}
    started = time.monotonic()
    with serve_apps({"equivalence": args}, at_root=True) as (bases, startup_s):
        result = asyncio.run(run(config, bases["equivalence"], DEFAULT_MODEL.name, prompts, reference))
    result.update(config=asdict(config), prompts=len(prompts), startup_s=startup_s,
                  seconds=time.monotonic() - started, model=str(DEFAULT_MODEL.name))
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "equivalence.json").write_text(json.dumps(result, indent=2) + "\n")
    for phase in result["phases"]:
        print(f"phase={phase['phase'].replace(' ', '_')} version={phase['version']} "
              f"experts_moved={phase['experts_moved']} tokens={phase['tokens']} "
              f"max_abs_logprob_diff={phase['max_abs_logprob_diff']:.3g} "
              f"max_abs_diff_vs_first={phase['max_abs_diff_vs_first']:.3g}")
    return result


if __name__ == "__main__":
    main()
