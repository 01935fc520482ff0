import pytest
from pydantic import ValidationError

from jobs.schema import GenerateParameters, Job, JobRequest, JobStatus, new_job_id


def test_tutorial_parameters_are_accepted_and_mean_greedy():
    params = GenerateParameters.model_validate(
        {"max_length": 200, "top_k": 1, "temperature": 0, "repetition_penalty": 2.0, "seed": 2024}
    )
    normalised = params.normalised(64)
    assert normalised.do_sample is False
    assert normalised.max_length == 200
    assert normalised.max_new_tokens is None  # the worker derives it from the prompt length


@pytest.mark.parametrize(
    ("params", "sampling"),
    [
        ({}, False),
        ({"temperature": 0.7}, True),
        ({"temperature": 1.0}, False),
        ({"top_p": 0.9}, True),
        ({"top_k": 1}, False),
        ({"top_k": 40}, True),
        ({"do_sample": True}, True),
        ({"do_sample": True, "temperature": 0}, False),
        ({"do_sample": False, "temperature": 0.7}, False),
    ],
)
def test_decoding_mode(params, sampling):
    assert GenerateParameters.model_validate(params).sampling is sampling


def test_default_length_fills_in_only_when_no_limit_given():
    assert GenerateParameters().normalised(64).max_new_tokens == 64
    assert GenerateParameters(max_new_tokens=5).normalised(64).max_new_tokens == 5


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": "10"}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"typical_p": 0}, "typical_p"),
        ({"top_k": 0}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"beams": 4}, "beams"),
    ],
)
def test_invalid_parameters_name_the_field(params, field):
    with pytest.raises(ValidationError) as info:
        GenerateParameters.model_validate(params)
    assert info.value.errors()[0]["loc"][0] == field


def test_request_needs_a_non_empty_string_prompt():
    for body in ({"inputs": ""}, {"inputs": 5}, {}):
        with pytest.raises(ValidationError):
            JobRequest.model_validate(body)


def test_job_round_trips_through_json_and_renders_iso_utc():
    job = Job(id=new_job_id(), model="m", inputs="Grüße 你好 مرحبا", parameters=GenerateParameters(seed=3))
    assert Job.from_json(job.to_json()) == job
    resource = job.to_resource()
    assert resource["created_at"].endswith("Z")
    assert resource["status"] == "queued"
    assert resource["urls"] == {"self": f"/api/v1/jobs/{job.id}", "page": f"/jobs/{job.id}"}


def test_only_final_states_are_terminal():
    assert {s for s in JobStatus if s.terminal} == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
