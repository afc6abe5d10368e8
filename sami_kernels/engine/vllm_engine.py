"""Generation on vLLM's offline API behind the Generator interface of generation.py (generation.engine: vllm).

    VLLMGenerator(model_dir, tokenizer, config, adapter=None, **engine_options)
    generate_with_status(prefix, prompts, seeds) -> [(continuation cut at the first stop string, finished)]

One vllm.LLM per generator, loaded from disk: the model directory (a saved full model, or the base model), plus a
saved LoRA adapter directory served through a LoRARequest (LLM(enable_lora=True), its rank read from the adapter's
config). Row k is one request:
    prompt          {"prompt_token_ids": tokens.encode(prefix + prompts[k])}, the ids HFGenerator feeds, so vLLM's own
                    tokenisation and BOS handling play no part
    SamplingParams  max_tokens = max_new_tokens, stop = stop_strings, temperature = 0 (greedy) unless do_sample, then
                    temperature and top_p as configured, seed = seeds[k]
and its output token ids are decoded and finished exactly as HFGenerator's (generation.finished_text), so the two
engines agree on a row's text whenever they agree on its tokens. first_token_bans and ngram_penalties are
Hugging Face logits processors: refused here. Under torchrun every rank builds its own single-GPU engine, started with
CUDA_VISIBLE_DEVICES set to that rank's device (LOCAL_RANK).

vLLM is an optional dependency, imported when a generator is built: without it, an ImportError says to install it
or use generation.engine: hf. Written against vLLM's documented offline API; not executed here (no GPU, no vllm).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .generation import GenerationConfig, finished_text
from .tokens import encode


def import_vllm():
    """The vllm module, or an ImportError naming generation.engine and how to install vllm."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "generation.engine: vllm needs the vllm package, which is not installed (pip install vllm, on a machine "
            f"with a CUDA GPU; {error}); use generation.engine: hf for Hugging Face generate"
        ) from None
    return vllm


def check_supported(config: GenerationConfig) -> None:
    unsupported = [name for name in ("first_token_bans", "ngram_penalties") if getattr(config, name)]
    if unsupported:
        raise ValueError(f"generation.engine: vllm does not support {unsupported}; use generation.engine: hf")


def sampling_params(vllm, config: GenerationConfig, seed: int | None):
    """vLLM's SamplingParams of one row (module docstring)."""
    randomness = {"temperature": config.temperature, "top_p": config.top_p} if config.do_sample else {"temperature": 0}
    return vllm.SamplingParams(
        max_tokens=config.max_new_tokens, stop=list(config.stop_strings) or None, seed=seed, **randomness
    )


def build_requests(vllm, tokenizer, config: GenerationConfig, prefix: str, prompts, seeds) -> tuple[list, list]:
    """(prompts as token-id dicts, one SamplingParams per prompt)."""
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    row_seeds = seeds if seeds is not None else [None] * len(prompts)
    return (
        [{"prompt_token_ids": encode(tokenizer, prefix + p)} for p in prompts],
        [sampling_params(vllm, config, s) for s in row_seeds],
    )


@contextlib.contextmanager
def visible_device(local_rank: str | None):
    """CUDA_VISIBLE_DEVICES narrowed to this torchrun rank's device while vLLM starts its engine (no-op alone)."""
    if local_rank is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = saved.split(",") if saved else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local_rank)] if devices else local_rank
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


class VLLMGenerator:
    def __init__(self, model_dir, tokenizer, config: GenerationConfig, *, adapter=None, progress=None, **engine):
        """engine: further vllm.LLM arguments (dtype, gpu_memory_utilization, ...). progress(rows) after a call."""
        check_supported(config)
        self.vllm = import_vllm()
        self.tokenizer, self.config, self.progress = tokenizer, config, progress
        if adapter is not None:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))["r"]
            engine = {"enable_lora": True, "max_lora_rank": rank, **engine}
            self.lora = importlib.import_module("vllm.lora.request").LoRARequest("adapter", 1, str(adapter))
        else:
            self.lora = None
        local_rank = os.environ.get("LOCAL_RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        with visible_device(local_rank):
            self.llm = self.vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **engine)

    def generate(self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None) -> list[str]:
        return [text for text, _ in self.generate_with_status(prefix, prompts, seeds=seeds)]

    def generate_with_status(
        self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None
    ) -> list[tuple[str, bool]]:
        if not prompts:
            return []
        requests, params = build_requests(self.vllm, self.tokenizer, self.config, prefix, prompts, seeds)
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        stop = self.config.stop_strings
        results = [finished_text(self.tokenizer, list(o.outputs[0].token_ids), stop) for o in outputs]
        if self.progress is not None:
            self.progress(len(prompts))
        return results

    def close(self) -> None:
        """Drop the engine so its GPU memory can go back before training (vLLM frees it when the LLM is collected)."""
        import gc

        self.llm = None
        gc.collect()
