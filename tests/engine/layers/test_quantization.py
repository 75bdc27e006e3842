"""int8 and int4 weights: the rounding is as small as the scales allow (int4 gives a Q4_1 file's
weights back exactly), and the engine with quantized weights gives transformers' greedy tokens
for the same model with those weights dequantized, through the small-batch kernels (a few
sequences) and oneDNN (prefill, larger batches) alike; w8a8 with each linear's input rounded to
int8 too, and w4a8 (int4's weights, int8 activations)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.linear import PackedLinear
from engine.layers.quantization import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_rows_int8,
)
from tests.tiny_models import hf_model_greedy, random_prompts


@pytest.mark.parametrize(("in_features", "num_groups"), [(128, 4), (100, 1)])  # 100: one group
def test_quantize_int8_rounds_each_group_to_its_own_scale(in_features, num_groups):
    # magnitudes from 1e-3 to 10 along the row: groups of every size
    torch.manual_seed(in_features)
    weight = torch.randn(64, in_features) * torch.logspace(-3, 1, in_features)
    weight[5] = 0.0  # an all-zero group must not divide by zero
    qweight, scale = quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scale.shape == (64, num_groups)
    assert (qweight.reshape(64, num_groups, -1)[torch.arange(64) != 5].abs().amax(2) == 127).all()
    error = (dequantize_int8(qweight, scale, torch.float32) - weight).abs()
    # half a scale, plus fp32's rounding of `q * scale` near the weight's own magnitude
    bound = (scale.repeat_interleave(in_features // num_groups, dim=1) / 2 * (1 + 1e-6)
             + weight.abs() * torch.finfo(torch.float32).eps)
    assert (error <= bound).all()
    assert (dequantize_int8(qweight, scale, torch.float32)[5] == 0).all()


def test_quantize_int4_rounds_each_group_between_its_minimum_and_maximum():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * torch.logspace(-3, 1, 128)
    weight[5] = 0.5  # a constant group: a zero step must not divide by zero
    packed, step_min = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)
    assert step_min.dtype == torch.float16 and step_min.shape == (2, 64, 4)
    dequantized = dequantize_int4(packed, step_min, torch.float32)
    step = step_min[0].float().repeat_interleave(32, dim=1)
    # half a step, plus fp16's rounding of the minimum and the step (15 of them at most)
    bound = step / 2 + 16 * weight.abs().amax() * 2**-11 * torch.logspace(-3, 1, 128) / 10
    assert ((dequantized - weight).abs() <= bound + 1e-3).all()
    assert (dequantized[5] == 0.5).all()
    # the nibbles: weight j of a group low in byte j, weight j + 16 high
    q = torch.arange(32, dtype=torch.uint8) % 16
    packed_row, _ = quantize_int4(q.float()[None, :])
    assert packed_row[0].tolist() == [int(q[j]) | int(q[j + 16]) << 4 for j in range(16)]


def test_int4_gives_a_q4_1_files_weights_back_exactly():
    """The embedded SmolLM2's layers are Q4_1: quantizing their dequantized values again gives
    the file's nibbles, steps and minimums, so `--quantization int4` serves the file's weights."""
    gguf = pytest.importorskip("gguf")
    from engine.weights.loader import default_model_path

    reader = gguf.GGUFReader(str(default_model_path()))
    tensors = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1][:7]
    assert len(tensors) == 7
    for tensor in tensors:
        blocks = torch.from_numpy(tensor.data.copy()).reshape(-1, 20)  # d, m (fp16), 16 bytes
        num_rows = int(tensor.shape[1])
        dequantized = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type))
        packed, step_min = quantize_int4(dequantized.reshape(num_rows, -1))
        assert torch.equal(packed.reshape(-1, 16), blocks[:, 4:])
        file_step_min = blocks[:, :4].contiguous().view(torch.float16)  # [blocks, 2]
        assert torch.equal(step_min.reshape(2, -1).T, file_step_min)


def _hf_with_quantized_weights(folder: str, quantization: str):
    """transformers' model with every linear (the head untied from the embedding, as the engine
    keeps the embedding exact) replaced by its rounding: int8, or int4 with an int8 head; w8a8
    and w4a8 round x too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach().clone())
    model.lm_head = head
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                if quantization in ("int4", "w4a8") and name != "lm_head":
                    rounded = dequantize_int4(*quantize_int4(module.weight), torch.float32)
                else:
                    rounded = dequantize_int8(*quantize_int8(module.weight), torch.float32)
                if quantization in ("w8a8", "w4a8"):
                    module.forward = _rounding_activations(module)
                module.weight.copy_(rounded)
    return model


def _rounding_activations(module: torch.nn.Linear):
    """`module`'s forward with x rounded to int8 per group of 32 first, as w8a8 and w4a8 do."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows_int8(x.reshape(-1, x.shape[-1]))
        rounded = (q.float().reshape(*scale.shape, -1) * scale[:, :, None]).reshape(x.shape)
        return torch.nn.functional.linear(rounded, module.weight, module.bias)
    return forward


def _gaps_to_argmax(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Per generated token, how far below transformers' largest logit it is, the whole sequence
    run at once (teacher forcing). Not `generate`: rounding activations to int8 turns the ulps
    by which a BLAS call's result depends on its row count into whole int8 steps, so transformers'
    own cached decoding parts from its full-sequence forward at near-ties (measured: a top-two
    gap of 0.015); the engine's rounding is per row whatever the batch."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return (logits.amax(dim=1) - chosen).tolist()


@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: a tied head and q/k/v biases
def test_quantized_engine_matches_transformers_with_the_same_weights(
    tiny_model_dirs, kind, quantization
):
    folder = tiny_model_dirs[kind]
    prompts = random_prompts(6, 1, 60, seed=3)
    # 3 sequences at a time: the small-batch kernel decodes; prefill chunks of 24 go through
    # oneDNN where the kernels stop at fewer rows (AVX-512)
    # fp32 activations, as the reference's (auto would be bf16 for w8a8 / w4a8 on some CPUs)
    llm = LLM(folder, dtype="float32", quantization=quantization, max_num_seqs=3,
              max_num_batched_tokens=24, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    actual = [o.token_ids for o in llm.generate(prompts, params)]
    reference = _hf_with_quantized_weights(folder, quantization)
    if quantization in ("w8a8", "w4a8"):
        for prompt, tokens in zip(prompts, actual, strict=True):
            assert _gaps_to_argmax(reference, prompt, tokens) == [0.0] * len(tokens)
    else:
        assert actual == [hf_model_greedy(reference, p, 10) for p in prompts]
    # every linear holds quantized weights for the kernel; the head int8 either way
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 4 + 1  # 2 layers of qkv, o, gate_up and down; the head
    layer_dtype = torch.int8 if quantization == "int8" else torch.uint8
    head_dtype = torch.uint8 if quantization in ("w8a8", "w4a8") else torch.int8
    assert [m.weight.dtype for m in linears] == [layer_dtype] * 8 + [head_dtype]
    assert all(m.weight_scale is not None for m in linears)


def test_quantization_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM("", quantization="int2")
    with pytest.raises(ValueError, match="not with quantization"):
        LLM("", quantization="int8", compile_decode=True)


@pytest.mark.parametrize(("quantization", "path"), [("w4a8", "scalar"), ("w8a8", "avx2"),
                                                   ("w8a8", "vnni")])
def test_int8_activations_on_the_scalar_path_warn_once_the_kernels_load(
    tiny_model_dirs, monkeypatch, caplog, quantization, path
):
    import logging

    from engine.kernels import cpu_ops

    llm = LLM(tiny_model_dirs["llama"], quantization=quantization)
    assert cpu_ops.load()
    monkeypatch.setattr(torch.ops.llm_cpu, "int8_activation_path", lambda: path)
    with caplog.at_level(logging.WARNING, logger="engine.llm_engine"):
        llm.engine._load_cpu_kernels()
    assert ("neither AVX512-VNNI nor AVX2" in caplog.text) is (path == "scalar")
