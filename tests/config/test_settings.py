import pytest

from config.settings import Settings, SettingsError


def test_defaults_match_the_documented_ones():
    s = Settings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.model == "bigscience/bloom-560m"
    assert (s.host, s.port) == ("127.0.0.1", 5000)
    assert s.job_retention_seconds == 24 * 3600


def test_values_are_read_and_cast_from_the_environment():
    s = Settings.from_env(
        {"BLOOMQ_PORT": "8080", "BLOOMQ_JOB_RETENTION": "60", "BLOOMQ_MODELS": "bloom-1b7, bloom-7b1", "BLOOMQ_DTYPE": "BF16"}
    )
    assert s.port == 8080
    assert s.job_retention_seconds == 60
    assert s.model_refs == ("bigscience/bloom-560m", "bloom-1b7", "bloom-7b1")
    assert s.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("name", "value"),
    [("BLOOMQ_PORT", "eighty"), ("BLOOMQ_PORT", "70000"), ("BLOOMQ_JOB_RETENTION", "-1"), ("BLOOMQ_DTYPE", "int8")],
)
def test_bad_value_fails_loudly_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_default_model_is_listed_once_even_when_repeated():
    s = Settings.from_env({"BLOOMQ_MODEL": "bloom-1b7", "BLOOMQ_MODELS": "bloom-1b7,bloom-3b"})
    assert s.model_refs == ("bloom-1b7", "bloom-3b")
