"""Length limits of a request against its model, checked in one place by the web (when it can count the
prompt's tokens) and by the engine (always, with the model's own tokenizer)."""

from __future__ import annotations

from config.models import ModelSpec


class LengthError(ValueError):
    """A job over one of its model's length limits; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_lengths(
    spec: ModelSpec, max_new_tokens: int | None, max_length: int | None, prompt_tokens: int | None,
    min_new_tokens: int | None = None,
) -> int | None:
    """How many new tokens the request may generate, or a ``LengthError`` (field names as the job API's).

    ``prompt_tokens`` None: the prompt could not be counted here; only the parameters are checked and
    the answer is None when it depends on the prompt (``max_length``).
    """
    max_new = max_new_tokens
    if max_new is None and max_length is None:
        raise LengthError("parameters", "give max_new_tokens or max_length")
    if max_new is not None and max_new > spec.max_new_tokens:
        raise LengthError("parameters.max_new_tokens", f"must be <= {spec.max_new_tokens} for {spec.name}")
    if max_new is None and max_length is not None and max_length > spec.max_total_tokens:
        raise LengthError("parameters.max_length", f"must be <= {spec.max_total_tokens} for {spec.name}")
    _check_minimum(min_new_tokens, max_new, "max_new_tokens")
    if max_new is None and max_length is not None:  # the prompt takes one token at least
        _check_minimum(min_new_tokens, max_length - 1, "what max_length leaves after a prompt")
    if prompt_tokens is None:
        return max_new
    if prompt_tokens == 0:
        raise LengthError("inputs", "the prompt encodes to no tokens")
    if prompt_tokens > spec.max_input_tokens:
        raise LengthError(
            "inputs", f"the prompt has {prompt_tokens} tokens; {spec.name} accepts at most {spec.max_input_tokens}"
        )
    if max_new is None:
        assert max_length is not None
        max_new = max_length - prompt_tokens
        if max_new < 1:
            raise LengthError(
                "parameters.max_length", f"{max_length} leaves no room after the prompt's {prompt_tokens} tokens"
            )
    if prompt_tokens + max_new > spec.max_total_tokens:
        raise LengthError(
            "parameters.max_new_tokens",
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new}) must be <= {spec.max_total_tokens} "
            f"for {spec.name}",
        )
    _check_minimum(min_new_tokens, max_new, "the new tokens max_length leaves")
    return max_new


def _check_minimum(min_new_tokens: int | None, max_new: int | None, limit: str) -> None:
    if min_new_tokens is not None and max_new is not None and min_new_tokens > max_new:
        raise LengthError("parameters.min_new_tokens", f"{min_new_tokens} is more than {limit} ({max_new})")
