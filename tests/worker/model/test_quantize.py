"""Weight-only int8 / int4 quantization (torchao): the weights shrink as promised, the quantized model
still picks the unquantized model's greedy token at most positions, and requests run through the engine.

A random BLOOM is a harsh case for quantization (its weights are wide, 0.5 std, and its logits close
together); measured here on the checkpoint below, teacher-forced over 5 prompts x 32 tokens: int8 picks
the same token at 85.6 % of positions, int4 at 32.5 % (chance: 0.1 %)."""

from __future__ import annotations

import pytest
import torch

from config.models import resolve_model
from worker.engine.capacity import EngineConfig
from worker.engine.core import Engine
from worker.engine.params import SamplingParams
from worker.model.loading import ModelLoadError, load_model
from worker.model.quantize import QuantizationError, int4_config, quantize
from worker.model.tiny import build_tiny_bloom

PROMPTS = ["Once upon a time", "The quick brown fox", "def fibonacci(n):", "Il était une fois", "SELECT id, name FROM"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    # Wide and shallow with a small vocabulary: the linear layers are 96 % of the weights, as in BLOOM-176B.
    path = build_tiny_bloom(tmp_path_factory.mktemp("quant") / "bloom", hidden_size=512, n_layer=4, n_head=8)
    return resolve_model(str(path))


@pytest.fixture(scope="module")
def whole(spec):
    return load_model(spec, CPU, "float32")


@pytest.fixture(scope="module")
def greedy_texts(whole):
    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = whole.tokenizer(prompt, return_tensors="pt").input_ids
            out = whole.model.generate(ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids))
            texts.append((ids.shape[1], out))
    return texts


@pytest.mark.slow  # quantizes a model and runs the engine twice: left out of make test-fast
@pytest.mark.parametrize(("mode", "size_limit", "agreement_floor"), [("int8", 0.55, 0.8), ("int4", 0.35, 0.25)])
def test_quantized_weights_are_smaller_and_mostly_pick_the_same_tokens(spec, whole, greedy_texts, mode, size_limit,
                                                                       agreement_floor):
    quantized = load_model(spec, CPU, "float32", quantization=mode)
    assert quantized.quantization == mode
    ratio = quantized.weights_bytes / whole.weights_bytes
    assert ratio <= size_limit
    layer = quantized.model.transformer.h[0]
    assert type(layer.mlp.dense_h_to_4h.weight).__name__ != "Parameter"  # a torchao tensor
    assert type(quantized.model.transformer.word_embeddings.weight) is torch.nn.Parameter  # left as loaded
    same = total = 0
    with torch.inference_mode():
        for start, ids in greedy_texts:
            want = whole.model(ids).logits[0, start - 1 : -1].argmax(-1)
            got = quantized.model(ids).logits[0, start - 1 : -1].argmax(-1)
            same += int((want == got).sum())
            total += want.numel()
    print(f"{mode}: weights {ratio:.3f} of fp32, greedy agreement {same / total:.3f} over {total} positions")
    assert same / total >= agreement_floor

    engine = Engine(quantized, spec, EngineConfig(max_batch_size=4, max_batch_slots=2048))
    try:
        sequences = [engine.submit(prompt, SamplingParams(max_new_tokens=16, do_sample=index % 2 == 1, seed=3))
                     for index, prompt in enumerate(PROMPTS)]
        for seq in sequences:
            seq.done.wait(timeout=60)
            assert engine.result(seq).output.generated_tokens == 16
    finally:
        engine.stop()


def test_int4_refuses_layers_that_do_not_divide_into_its_groups():
    model = torch.nn.Sequential(torch.nn.Linear(40, 8))
    with pytest.raises(QuantizationError, match=r"groups of 32 input columns.*input width 40"):
        quantize(model, "int4", CPU)


def test_int4_on_cuda_packs_for_the_kernel_that_ships_with_torch():
    # torchao 0.18's default int4 packing (plain) and the preshuffled one call kernels of the separate mslk
    # package; tile_packed_to_4d is tinygemm's, in torch itself. Chosen without a GPU: the config only.
    import inspect

    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows.int4 import int4_tile_packed_to_4d_tensor

    config = int4_config("cuda", torch.bfloat16)
    assert isinstance(config, Int4WeightOnlyConfig) and config.group_size == 128
    assert str(getattr(config.int4_packing_format, "value", config.int4_packing_format)) == "tile_packed_to_4d"
    assert "mslk" not in inspect.getsource(int4_tile_packed_to_4d_tensor)
    with pytest.raises(QuantizationError, match="bfloat16"):
        int4_config("cuda", torch.float16)


def test_a_failure_inside_torchao_stops_the_load_with_a_clear_refusal(spec, monkeypatch):
    import torchao.quantization

    def missing_kernel(*args, **kwargs):
        raise ImportError("Requires mslk >= 1.0.0")

    monkeypatch.setattr(torchao.quantization, "quantize_", missing_kernel)
    with pytest.raises(ModelLoadError, match=r"could not quantize .* to int8.*ImportError: Requires mslk") as raised:
        load_model(spec, CPU, "float32", quantization="int8")
    assert isinstance(raised.value.__cause__, QuantizationError)
    assert isinstance(raised.value.__cause__.__cause__, ImportError)  # the original error, chained
