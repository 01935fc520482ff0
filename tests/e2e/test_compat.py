"""The clients people already use, against the live stack, by base URL only: the ``openai`` client on
``/v1``, ``huggingface_hub.InferenceClient`` on ``/models/<name>``, and plain ``requests`` scripts written
for the hosted Inference API. Every request is a job (its id in ``X-Bloomq-Job-Id``)."""

from __future__ import annotations

import json

import openai
import pytest
import redis
import requests

from tests.e2e.conftest import running_stack
from tests.support import wait_for

PROMPT = "Once upon a time"
KEY = "compat-test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, tiny_model_dir):
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    # bloom-560m is configured but no worker serves it: its jobs wait in the queue (a hung-up client's test).
    env = {"BLOOMQ_API_KEYS": KEY, "BLOOMQ_CHAT_TEMPLATES": f"{tiny_model_dir.name}={template}",
           "BLOOMQ_MODELS": "bloom-560m"}
    with running_stack(request, tmp_path_factory, tiny_model_dir, **env) as s:
        yield s


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir.name


@pytest.fixture()
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def hf(stack, model, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # The suite runs with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL, even this local one.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=f"{stack.url}/models/{model}", api_key=KEY, timeout=60)


def _job(stack, job_id: str) -> dict:
    return requests.get(f"{stack.url}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10).json()


# -- OpenAI ------------------------------------------------------------------------------------------


def test_openai_completion_is_greedy_generate_and_a_visible_job(stack, oai, model, reference):
    raw = oai.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == reference(PROMPT, max_new_tokens=24)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 24 and completion.usage.prompt_tokens > 0
    job = _job(stack, raw.headers["X-Bloomq-Job-Id"])
    assert job["status"] == "succeeded" and job["output"]["generated_text"] == completion.choices[0].text


def test_openai_streaming_gives_the_same_text_then_usage(oai, model, reference):
    stream = oai.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(PROMPT, max_new_tokens=40)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 40


def test_openai_n_choices_with_a_seed_are_reproducible(oai, model):
    def sample():
        return oai.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0.9, n=2, seed=7)

    first, second = sample(), sample()
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.text for c in second.choices]
    assert texts[0] != texts[1]  # choice i samples with seed + i


def test_openai_logprobs_and_echo(oai, model):
    completion = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    echoed = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + completion.choices[0].text


def test_openai_errors_name_the_parameter(oai, model):
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0).models.list()


def test_openai_models_list_and_chat_with_the_operators_template(oai, model, reference):
    assert model in [m.id for m in oai.models.list().data]
    messages = [{"role": "user", "content": "Tell me a story"}]
    chat = oai.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    prompt = "user: Tell me a story\nassistant:"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference(prompt, max_new_tokens=16)
    streamed = oai.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    # Logprobs, whole and streamed: the same tokens with the same log-probabilities.
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=2).choices[0].logprobs.content
    assert len(whole) == 8 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in whole)
    chunks = oai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         stream=True)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in whole]


def test_a_streaming_client_that_leaves_cancels_its_job(stack, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    with requests.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=30) as response:
        job_id = response.headers["X-Bloomq-Job-Id"]
        next(response.iter_lines())  # the stream began
    wait_for(lambda: _job(stack, job_id)["status"] == "canceled", timeout=30, what="the job to be canceled")


# -- Hugging Face Inference API / TGI ---------------------------------------------------------------


def test_inference_client_text_generation_returns_only_the_new_text(hf, reference):
    # The base URL is the hosted API's route ("/"), where return_full_text defaults to false, as TGI's.
    assert hf.text_generation(PROMPT, max_new_tokens=20) == reference(PROMPT, max_new_tokens=20)
    full = hf.text_generation(PROMPT, max_new_tokens=20, return_full_text=True)
    assert full == PROMPT + reference(PROMPT, max_new_tokens=20)


def test_inference_client_text_generation_with_details(hf, reference):
    out = hf.text_generation(PROMPT, max_new_tokens=20, details=True, decoder_input_details=True)
    assert out.generated_text == reference(PROMPT, max_new_tokens=20)
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 20
    assert len(out.details.tokens) == 20 and all(t.logprob <= 0 for t in out.details.tokens)
    assert out.details.prefill[0].logprob is None and len(out.details.prefill) > 1


def test_inference_client_streams_tokens_then_details(hf, reference):
    events = list(hf.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True))
    assert len(events) == 20
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == reference(PROMPT, max_new_tokens=20)
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 20
    plain = list(hf.text_generation(PROMPT, max_new_tokens=20, stream=True))
    assert plain == [e.token.text for e in events]


def test_inference_client_validation_error_is_typed(hf):
    from huggingface_hub.errors import ValidationError

    with pytest.raises(ValidationError):
        hf.text_generation(PROMPT, max_new_tokens=10, top_n_tokens=9, details=True)


def test_hosted_inference_api_script_with_requests(stack, model, reference):
    url = f"{stack.url}/models/{model}"
    headers = {"Authorization": f"Bearer {KEY}"}
    response = requests.post(url, headers=headers, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}},
                             timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and body[0]["generated_text"] == reference(PROMPT, max_new_tokens=12)
    assert int(response.headers["x-generated-tokens"]) == 12 and int(response.headers["x-prompt-tokens"]) > 0
    assert _job(stack, response.headers["X-Bloomq-Job-Id"])["status"] == "succeeded"
    bad = requests.post(url, headers=headers, json={"inputs": PROMPT, "parameters": {"top_k": 0}}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"


def test_info_and_health_over_http(stack, model):
    headers = {"Authorization": f"Bearer {KEY}"}
    info = requests.get(f"{stack.url}/models/{model}/info", headers=headers, timeout=10).json()
    assert info["max_total_tokens"] == 2048 and info["max_best_of"] == 2 and info["workers"] == 1
    assert requests.get(f"{stack.url}/models/{model}/health", headers=headers, timeout=10).status_code == 200


def test_best_of_returns_the_likeliest_sequence_and_the_other(stack, model):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "best_of": 2, "do_sample": True, "seed": 3,
                                             "details": True}}
    result = requests.post(f"{stack.url}/models/{model}/generate", headers=headers, json=body, timeout=60).json()
    best = sum(t["logprob"] for t in result["details"]["tokens"])
    (other,) = result["details"]["best_of_sequences"]
    assert best >= sum(t["logprob"] for t in other["tokens"])
    assert json.dumps(result)  # plain JSON all the way down


def test_a_waiting_client_that_hangs_up_cancels_its_job(stack):
    # bloom-560m is configured with no worker here: its job would wait in the queue for as long as it is allowed.
    body = {"model": "bloom-560m", "prompt": PROMPT, "max_tokens": 4}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=1)
    client = redis.Redis.from_url(stack.redis.url)

    def canceled() -> bool:
        ids = [raw.decode().removeprefix("bloomq:job:") for raw in client.scan_iter("bloomq:job:*")]
        jobs = [_job(stack, job_id) for job_id in ids]
        return any(j.get("model") == "bloom-560m" and j.get("status") == "canceled" for j in jobs)

    wait_for(canceled, timeout=30, what="the hung-up client's job to be canceled")


def test_unknown_compatible_paths_answer_in_their_clients_error_shape(stack):
    headers = {"Authorization": f"Bearer {KEY}"}
    openai_404 = requests.get(f"{stack.url}/v1/no-such-route", headers=headers, timeout=10)
    assert openai_404.status_code == 404 and set(openai_404.json()["error"]) == {"message", "type", "param", "code"}
    tgi_405 = requests.get(f"{stack.url}/models/tiny-bloom/generate", headers=headers, timeout=10)
    assert tgi_405.status_code == 405 and set(tgi_405.json()) == {"error", "error_type"}
