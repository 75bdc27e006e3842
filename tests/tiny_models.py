"""Tiny random Llama-family models saved as Hugging Face folders, and transformers' greedy output
for them: the reference the engine must match token for token."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

TINY_MODEL_KINDS = ("llama", "mistral", "qwen2", "llama3_rope")

_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.2,  # large enough that greedy argmaxes are far from ties
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(**_COMMON)
    if kind == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**{**_COMMON, "tie_word_embeddings": True})
    if kind == "llama3_rope":
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return LlamaConfig(**_COMMON, rope_parameters=rope)
    raise ValueError(kind)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SageMaker endpoints serve large language models behind an HTTP contract.",
    "Hello world! Streaming tokens, one at a time, to every client that asks.",
    "café naïve 東京 🙂 — unicode text for the byte-level tokenizer",
] * 20


@cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 384 ids (the tiny models' vocabulary) and a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(kind: str, folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def make_int4_exact_model(kind: str, folder: Path) -> str:
    """The tiny `kind` model with each decoder layer's linear weights rounded to 4-bit values
    (m + d q per group of 32, as a model dequantized from a Q4_1 GGUF holds them): fp32 weights
    that engine/layers/lossless.py keeps as 4-bit values, bit for bit."""
    from transformers import AutoModelForCausalLM

    from engine.layers.quantization import dequantize_int4, quantize_int4

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                weight.copy_(dequantize_int4(*quantize_int4(weight), torch.float32))
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@cache
def _hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, as ignore_eos does
    return model


def hf_greedy(folder: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt, EOS ignored."""
    return hf_model_greedy(_hf_model(folder), prompt_ids, max_new_tokens)


def hf_default_model():
    """transformers' own GGUF loader on the embedded SmolLM2: the reference for our GGUF path."""
    from transformers import AutoModelForCausalLM

    from engine.weights import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def hf_model_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """`model.generate` greedy, to max_new_tokens. The explicit mask matters: a prompt may hold
    the pad token itself (SmolLM2's <|im_end|>), which generate would otherwise mask out."""
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def random_prompts(num: int, min_len: int, max_len: int, vocab_size: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]
