"""The OpenAI-compatible request bodies (completions, chat) and how they become job parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.schema import MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS, JobRequest
from web.http.errors import ApiError, field_errors

MAX_CHOICES = 8  # n, and prompts in one request, times each other


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


REFUSED = "bloomq cannot honour it (an error naming the parameter)"


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate; null: as many as the model allows.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1 (sampling), as OpenAI.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # bloomq extras, as vLLM accepts them
    top_k: int | None = None
    repetition_penalty: float | None = None
    typical_p: float | None = None
    min_tokens: int | None = Field(None, ge=0, description="vLLM's: tokens before the end-of-text token or a stop "
                                   "sequence may end the text (at most max_tokens).")
    ignore_eos: bool = Field(False, description="vLLM's: go on past the end-of-text token, up to max_tokens.")
    # OpenAI parameters bloomq cannot honour: accepted only at their neutral value
    frequency_penalty: float | None = Field(0.0, description=f"Refused unless 0 or null: {REFUSED}.")
    presence_penalty: float | None = Field(0.0, description=f"Refused unless 0 or null: {REFUSED}.")
    logit_bias: dict[str, float] | None = Field(None, description=f"Refused unless empty or null: {REFUSED}.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a parameter given a value bloomq cannot honour."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by bloomq; use repetition_penalty"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by bloomq"
        return None

    def parameters(self, choice: int, logprobs: int | None = None, echo: bool = False) -> dict[str, Any]:
        """The job parameters for choice ``choice``."""
        temperature = 1.0 if self.temperature is None else self.temperature
        params: dict[str, Any] = {
            "do_sample": temperature > 0,
            "temperature": temperature,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "return_full_text": echo,
        }
        if self.max_tokens is not None:
            params["max_new_tokens"] = self.max_tokens
        if self.min_tokens is not None:
            params["min_new_tokens"] = self.min_tokens
        if self.ignore_eos:
            params["ignore_eos"] = True
        for name in ("top_p", "top_k", "repetition_penalty", "typical_p"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.seed is not None and temperature > 0:
            params["seed"] = self.seed + choice
        if logprobs is not None:
            params.update(details=True, top_n_tokens=logprobs or None, decoder_input_details=echo)
        return params


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    best_of: int | None = Field(None, description=f"Refused unless null or equal to n: {REFUSED}.")
    suffix: str | None = Field(None, description=f"Refused unless empty or null: {REFUSED}.")

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by bloomq"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported on /v1/completions"
        return super().unsupported()

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; omitted or null: as many as the "
                                   "model allows (max_completion_tokens takes precedence).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1)


def completion_jobs(req: CompletionRequest) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, job parameters) for every job a completions request makes: one per prompt and choice."""
    return [(prompt, req.parameters(choice, req.logprobs, req.echo)) for prompt in req.prompts
            for choice in range(req.n)]


def check_completion(req: CompletionRequest) -> None:
    """What the completions endpoint refuses beyond the request schema (an ApiError naming the param)."""
    if any(not p for p in req.prompts):
        raise ApiError(422, "invalid_request_error", "prompt: must not be empty", [{"name": "prompt", "message": ""}])
    if len(req.prompts) * req.n > MAX_CHOICES:
        raise ApiError(422, "invalid_request_error",
                       f"prompt: at most {MAX_CHOICES} completions per request (prompts x n)",
                       [{"name": "prompt", "message": "too many prompts for n"}])
    bad = req.unsupported()
    if bad:
        raise ApiError(422, "invalid_request_error", bad[1], [{"name": bad[0], "message": bad[1]}])


def job_requests(model: str, inputs: list[tuple[str, dict[str, Any]]], to_the_limit: bool, total: int
                 ) -> list[JobRequest]:
    """One job request per (prompt, parameters); an error naming the OpenAI parameter when one is refused."""
    requests = []
    for prompt, params in inputs:
        if to_the_limit:
            params = {**params, "max_length": total}
        try:
            requests.append(JobRequest.model_validate({"inputs": prompt, "model": model, "parameters": params}))
        except ValidationError as exc:
            raise _invalid_parameters(exc) from None
    return requests


# Job API names -> the OpenAI parameter a client sent
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "max_length": "max_tokens", "inputs": "prompt",
                 "min_new_tokens": "min_tokens",
                 "top_n_tokens": "logprobs", "seed": "seed", "stop": "stop"}


def openai_name(name: str) -> str:
    parts = name.split(".")
    leaf = parts[1] if parts[0] == "parameters" and len(parts) > 1 else parts[0]
    return _OPENAI_NAMES.get(leaf, leaf)


def _invalid_parameters(exc: ValidationError) -> ApiError:
    fields = [{"name": openai_name(f["name"]), "message": f["message"]} for f in field_errors(exc)]
    return ApiError(422, "invalid_request_error", f"{fields[0]['name']}: {fields[0]['message']}", fields)


def renamed(err: ApiError) -> ApiError:
    """A job API error with its fields named as the OpenAI parameters the client sent."""
    fields = [{"name": openai_name(f["name"]), "message": f["message"]} for f in err.fields]
    return ApiError(err.status, err.type, err.message, fields, err.retry_after)


