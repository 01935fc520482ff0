"""The continuous-batching engine: takes sequences, runs forward passes over all of them, yields tokens.

Imports torch, transformers and ``config`` only (nothing of Celery, Redis, ``jobs`` or ``web``), so it runs
in-process like ``vllm.LLM``::

    from config.models import resolve_model
    from worker.engine import Engine, SamplingParams
    from worker.model.loading import load_model, pick_device

    spec = resolve_model("bigscience/bloom-560m")
    engine = Engine(load_model(spec, pick_device("auto")), spec)
    print(engine.generate("Hello", SamplingParams(max_new_tokens=20)).output.generated_text)

Where things are:

- ``core``: ``Engine``, the loop (admit, plan, one pass, choose, retire) and the caller's side (``submit``,
  ``cancel``, ``result``);
- ``waiting``: requests waiting for a row, in rank order; ``scheduler``: which rows run in a pass (decode
  rows one token each, prompts in chunks within the step's token budget), prefix sharing;
- ``blocks``: the KV block pool (allocation, reference counts, the prefix index); ``capacity``: how many
  blocks and rows fit (``EngineConfig``);
- ``paged``: BLOOM's forward pass over the paged KV cache; ``attention``: the gathering path and ALiBi;
  ``flex``: FlexAttention over the pool; ``chunk``: one row's part of a pass;
- ``choice`` and ``sampling``: the next token for every row at once; ``details``: log-probabilities;
- ``text``: incremental detokenization, stop sequences, why a row stops;
- ``triage`` and ``faults``: the failure policy (a row fails alone, out of memory preempts, a fatal device
  error stops the engine);
- ``params``, ``outputs``, ``sequence``: a request's parameters, its result, its state inside the engine.
"""

from worker.engine.capacity import EngineConfig
from worker.engine.core import Engine, GenerationResult
from worker.engine.faults import DeviceFault, GenerationError, OutOfMemory, RequestValidationError
from worker.engine.outputs import Completion, Details, FinishReason, Token
from worker.engine.params import SamplingParams
from worker.engine.sequence import Sequence

__all__ = [
    "Completion",
    "Details",
    "DeviceFault",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationError",
    "GenerationResult",
    "OutOfMemory",
    "RequestValidationError",
    "SamplingParams",
    "Sequence",
    "Token",
]
