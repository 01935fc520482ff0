"""Chat prompts from messages, with a model's chat template (Jinja, as in tokenizer_config.json), rendered
in a sandbox in the web process: no transformers, and a template cannot reach anything but its inputs.

BLOOM and BLOOMZ have no chat template; an operator who fine-tuned one for chat configures its template
with ``BLOOMQ_CHAT_TEMPLATES`` (``model=path/to/template.jinja``, comma-separated).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS, EOS = "<s>", "</s>"  # BLOOM's special tokens, offered to templates as transformers does


class ChatTemplateError(ValueError):
    """The template could not render these messages (it may raise on purpose, e.g. for a role it refuses)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=32)
def _compiled(source: str):  # noqa: ANN202 - a jinja2 Template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render_chat(template: str, messages: list[dict[str, Any]]) -> str:
    """The prompt for ``messages`` (ending where the assistant's answer begins)."""
    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS
        )
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
