import pytest

from config.models import PRESETS, ModelRegistry, UnknownModelError, model_name, resolve_model


@pytest.mark.parametrize(
    ("ref", "name"),
    [("bigscience/bloom-560m", "bloom-560m"), ("/data/my-bloom", "my-bloom"), ("/data/my-bloom/", "my-bloom"),
     ("bloom-7b1", "bloom-7b1")],
)
def test_model_name_is_the_last_path_component(ref, name):
    assert model_name(ref) == name


def test_a_reference_without_a_usable_name_is_refused():
    with pytest.raises(UnknownModelError):
        model_name("/")


def test_presets_cover_the_bloom_family():
    for name in ("bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloom", "bloomz-560m", "bloomz-7b1-mt"):
        assert PRESETS[name].source == f"bigscience/{name}"
        assert PRESETS[name].max_total_tokens == 2048


def test_preset_name_and_hub_id_resolve_to_the_same_spec():
    assert resolve_model("bloom-1b7") == resolve_model("bigscience/bloom-1b7") == PRESETS["bloom-1b7"]


def test_local_copy_of_a_preset_keeps_limits_but_loads_from_the_directory():
    spec = resolve_model("/models/bloom-1b7")
    assert spec.name == "bloom-1b7"
    assert spec.source == "/models/bloom-1b7"
    assert spec.max_total_tokens == PRESETS["bloom-1b7"].max_total_tokens


def test_registry_knows_presets_and_configured_models():
    registry = ModelRegistry(("/data/tiny-bloom", "bloom-7b1"))
    assert registry.default.name == "tiny-bloom"
    assert registry.get("tiny-bloom").source == "/data/tiny-bloom"
    assert registry.get("/data/tiny-bloom").name == "tiny-bloom"
    assert registry.get("bloom-3b") is PRESETS["bloom-3b"]
    assert registry.get("bigscience/bloom-3b") is PRESETS["bloom-3b"]
    assert registry.get("gpt2") is None
    assert registry.default.queue == "bloomq.tiny-bloom"
