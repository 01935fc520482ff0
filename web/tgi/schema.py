"""The Hugging Face Inference API / TGI request body, as bloomq reads it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.schema import MAX_STOP_SEQUENCES

MAX_BEST_OF = 2


class TgiParameters(BaseModel):
    """TGI's parameters. Unknown ones are ignored, as TGI does; known ones are checked."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0, description="bloomq's (transformers' name): tokens before the "
                                       "end-of-text token or a stop sequence may end the text.")
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    # TGI features bloomq does not have: refused (422 naming the parameter) when asked for, so nothing is
    # silently different
    frequency_penalty: float | None = Field(None, description="Refused (422) when not 0 or null.")
    grammar: Any = Field(None, description="Refused (422) when given.")
    watermark: bool = Field(False, description="Refused (422) when true.")
    adapter_id: str | None = Field(None, description="Refused (422) when given.")


class TgiRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False
