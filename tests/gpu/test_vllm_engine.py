"""The vLLM engine (engine/vllm_engine.py) against HF generate: greedy continuations of the tiny random model equal
HFGenerator's, row by row, with and without a stop string. Needs a CUDA GPU and the vllm package; never executed
while writing this package (no GPU, no vllm)."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sami_kernels.engine.generation import GenerationConfig, HFGenerator
from sami_kernels.engine.models import resolve_model_path
from sami_kernels.engine.vllm_engine import VLLMGenerator

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the vllm package (pip install vllm)"),
]


@pytest.mark.parametrize("stop_strings", [(), ("Human:", "\n\n")])
def test_vllm_greedy_equals_hf_greedy(stop_strings):
    path = resolve_model_path("tiny-random")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = GenerationConfig(max_new_tokens=12, batch_size=4, stop_strings=stop_strings)
    prefix = "System: 1. The assistant is helpful.\n\nHuman:"
    prompts = [" hi", " How do I keep basil fresh after buying it?", " Why?", " What is a good way to study?"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda")
    expected = HFGenerator(model, tokenizer, config).generate_with_status(prefix, prompts)
    del model
    engine = VLLMGenerator(path, tokenizer, config, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    assert engine.generate_with_status(prefix, prompts) == expected
