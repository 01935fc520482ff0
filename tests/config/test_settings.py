import dataclasses
import re
import runpy
from pathlib import Path

import pytest

from config.sentinel import parse_sentinel_url
from config.settings import VARIABLES, Settings
from config.values import SettingsError


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


def test_engine_settings_default_as_documented_and_are_read():
    s = Settings.from_env({})
    assert (s.step_tokens, s.kv_block_tokens, s.prefix_caching, s.attention) == (None, 16, True, "auto")
    s = Settings.from_env({"BLOOMQ_STEP_TOKENS": "64", "BLOOMQ_KV_BLOCK_TOKENS": "32", "BLOOMQ_PREFIX_CACHING": "off",
                           "BLOOMQ_ATTENTION": " Flex"})
    assert (s.step_tokens, s.kv_block_tokens, s.prefix_caching, s.attention) == (64, 32, False, "flex")


@pytest.mark.parametrize(
    ("name", "value"),
    [("BLOOMQ_PORT", "eighty"), ("BLOOMQ_PORT", "70000"), ("BLOOMQ_JOB_RETENTION", "-1"), ("BLOOMQ_DTYPE", "int8"),
     ("BLOOMQ_STEP_TOKENS", "0"), ("BLOOMQ_KV_BLOCK_TOKENS", "24"), ("BLOOMQ_KV_BLOCK_TOKENS", "512"),
     ("BLOOMQ_PREFIX_CACHING", "maybe"), ("BLOOMQ_ATTENTION", "paged")],
)
def test_bad_value_fails_loudly_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_default_model_is_listed_once_even_when_repeated():
    s = Settings.from_env({"BLOOMQ_MODEL": "bloom-1b7", "BLOOMQ_MODELS": "bloom-1b7,bloom-3b"})
    assert s.model_refs == ("bloom-1b7", "bloom-3b")


def test_sentinel_urls_are_parsed_as_celery_spells_them():
    s = Settings.from_env({"BLOOMQ_REDIS_URL": "sentinel://h1:26379;sentinel://h2:26380;sentinel://h3/2",
                           "BLOOMQ_REDIS_SENTINEL_MASTER": "bloomq", "BLOOMQ_REDIS_MIN_REPLICAS": "1"})
    target = s.redis_sentinel
    assert target.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (target.master, target.db, s.redis_min_replicas) == ("bloomq", 2, 1)
    # kombu reads the database and password from the first entry only: every entry carries them.
    assert target.broker_url == "sentinel://h1:26379/2;sentinel://h2:26380/2;sentinel://h3:26379/2"
    secret = parse_sentinel_url("sentinel://:p%40ss@h1:26379;sentinel://:p%40ss@h2:26379/1")
    assert secret.password == "p@ss" and secret.broker_url.startswith("sentinel://:p%40ss@h1:26379/1;")
    assert Settings().redis_sentinel is None and Settings().redis_min_replicas == 0


@pytest.mark.parametrize("url", ["http://h:6379/0", "sentinel://h1:26379/1;sentinel://h2:26379/2",
                                 "sentinel://h1:26379;redis://h2:6379/0", "sentinel://:26379"])
def test_a_bad_redis_url_names_the_variable(url):
    with pytest.raises(SettingsError, match="BLOOMQ_REDIS_URL"):
        Settings.from_env({"BLOOMQ_REDIS_URL": url})


def test_operator_keys_are_keys_or_their_hashes():
    digest = "ab" * 32
    s = Settings.from_env({"BLOOMQ_OPERATOR_KEYS": f" ops-key , sha256:{digest}"})
    assert s.operator_keys == ("ops-key", f"sha256:{digest}") and "ops-key" not in repr(s)
    with pytest.raises(SettingsError, match="BLOOMQ_OPERATOR_KEYS"):
        Settings.from_env({"BLOOMQ_OPERATOR_KEYS": "sha256:1234"})


def test_every_variable_is_in_the_configuration_page_and_every_documented_one_is_read():
    root = Path(__file__).resolve().parents[2]
    table = (root / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`(BLOOMQ_[A-Z0-9_]+)", table))
    read = {variable for _, variable, _ in VARIABLES}
    assert read <= documented, f"undocumented: {sorted(read - documented)}"
    gunicorn = (root / "config" / "gunicorn.conf.py").read_text()
    assert all(f'"{variable}"' in gunicorn for variable in documented - read), sorted(documented - read)
    assert {name for name, _, _ in VARIABLES} == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize(("port", "bound"),
                         [("8080", "0.0.0.0:8080"), ("70000", None), ("web", None), ("", "0.0.0.0:5000")])
def test_the_web_port_is_checked_like_every_other_setting(monkeypatch, port, bound):
    monkeypatch.setenv("BLOOMQ_HOST", "0.0.0.0")
    monkeypatch.setenv("BLOOMQ_PORT", port)
    conf = str(Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py")
    if bound is None:
        with pytest.raises(SystemExit, match="BLOOMQ_PORT"):
            runpy.run_path(conf)
    else:
        assert runpy.run_path(conf)["bind"] == bound
