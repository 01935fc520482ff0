"""The generation engine: prompt + parameters in, text + finish reason out.

It owns the model and the device; it knows nothing of Celery or Redis, so it is testable on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from config.models import ModelSpec
from jobs.schema import FinishReason, GenerateParameters, JobOutput
from worker.loading import LoadedModel
from worker.sampling import RowSampling, TokenChooser


class GenerationError(Exception):
    """A job that cannot be generated; ``type`` goes into the job's error."""

    type = "generation_error"


class RequestValidationError(GenerationError):
    """A request the model cannot serve (too long a prompt, too many tokens)."""

    type = "validation_error"


@dataclass
class GenerationResult:
    """What one request produced."""

    output: JobOutput
    prompt_tokens: int
    seconds: float


@dataclass
class _Request:
    """One request's state while it decodes."""

    prompt: str
    params: GenerateParameters
    input_ids: torch.Tensor  # [1, prompt_len]
    max_new_tokens: int
    sampling: RowSampling
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: str = ""


class Engine:
    """Generates text for requests with one loaded model."""

    def __init__(self, loaded: LoadedModel, spec: ModelSpec) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.spec = spec
        self.eos_token_id = self.model.generation_config.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = self.tokenizer.eos_token_id
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

    def generate(self, prompt: str, params: GenerateParameters) -> GenerationResult:
        """Run one request to completion."""
        started = time.perf_counter()
        request = self._prepare(prompt, params)
        with torch.inference_mode():
            self._decode(request)
        text = request.text
        if params.return_full_text:
            text = prompt + text
        output = JobOutput(
            generated_text=text,
            generated_tokens=len(request.tokens),
            finish_reason=request.finish_reason,
            seed=request.sampling.seed,
        )
        return GenerationResult(output, request.input_ids.shape[1], time.perf_counter() - started)

    def _prepare(self, prompt: str, params: GenerateParameters) -> _Request:
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        prompt_len = int(input_ids.shape[1])
        if prompt_len == 0:
            raise RequestValidationError("inputs: the prompt encodes to no tokens")
        if prompt_len > self.spec.max_input_tokens:
            raise RequestValidationError(
                f"inputs: the prompt has {prompt_len} tokens; {self.spec.name} accepts at most "
                f"{self.spec.max_input_tokens}"
            )
        if params.max_new_tokens is not None:
            max_new = params.max_new_tokens
        else:
            assert params.max_length is not None  # normalised parameters always carry one of the two
            max_new = params.max_length - prompt_len
            if max_new < 1:
                raise RequestValidationError(
                    f"parameters.max_length: {params.max_length} leaves no room after the prompt's "
                    f"{prompt_len} tokens"
                )
        if prompt_len + max_new > self.spec.max_total_tokens:
            raise RequestValidationError(
                f"parameters.max_new_tokens: prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) "
                f"must be <= {self.spec.max_total_tokens}"
            )
        return _Request(
            prompt=prompt,
            params=params,
            input_ids=input_ids.to(self.device),
            max_new_tokens=max_new,
            sampling=RowSampling.from_parameters(params),
        )

    def _decode(self, request: _Request) -> None:
        chooser = TokenChooser([request.sampling], self.device)
        ids = request.input_ids
        attention_mask = torch.ones_like(ids)
        seen = torch.zeros((1, self.vocab_size), dtype=torch.bool, device=self.device)
        seen[0, ids[0]] = True
        out = self.model(input_ids=ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        while True:
            logits = out.logits[:, -1, :].float()
            token = chooser.choose(logits, seen)
            token_id = int(token[0])
            request.tokens.append(token_id)
            seen[0, token_id] = True
            if self._finished(request, token_id):
                return
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((1, 1))], dim=1)
            out = self.model(
                input_ids=token.view(1, 1),
                attention_mask=attention_mask,
                cache=out.cache,
                use_cache=True,
            )

    def _finished(self, request: _Request, token_id: int) -> bool:
        """Update the request's text and say whether it is done."""
        request.text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if token_id == self.eos_token_id:
            request.finish_reason = FinishReason.EOS_TOKEN
            return True
        cut = _first_stop(request.text, request.params.stop)
        if cut is not None:
            request.text = request.text[:cut]
            request.finish_reason = FinishReason.STOP_SEQUENCE
            return True
        if len(request.tokens) >= request.max_new_tokens:
            request.finish_reason = FinishReason.LENGTH
            return True
        return False


def _first_stop(text: str, stops: list[str]) -> int | None:
    """The index where the earliest stop sequence begins in ``text``, if any."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
