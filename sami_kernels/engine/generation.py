"""Generation behind a small interface: a Generator continues prefix + prompt for many prompts sharing one prefix.

    generator.generate(prefix, prompts) -> [continuation of prefix + p for p in prompts]   (cut at stop strings)

HFGenerator runs batched Hugging Face generate with the prefix encoded ONCE: its KV cache is computed for one row,
kept while later calls pass the same prefix (the model must not change meanwhile), and repeated for every batch;
each row is laid out [prefix | padding | prompt] with the padding masked
and positions counted over real tokens only, so every row equals its unpadded generation. Greedy by default. A vLLM
(or any other) engine plugs in by implementing `generate` with the same contract.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Generator(Protocol):
    def generate(self, prefix: str, prompts: Sequence[str]) -> list[str]: ...


@dataclass
class GenerationConfig:
    max_new_tokens: int = 350
    batch_size: int = 8
    do_sample: bool = False  # greedy, as in SAMI
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ("Human:", "\n\nHuman", "###")
    first_token_bans: tuple[str, ...] = ()  # words the first new token may not start, e.g. ("Sorry",)
    ngram_penalties: dict[int, float] = field(default_factory=dict)  # {n: penalty}, e.g. {3: 1.0, 4: 2.0}


class FirstTokenBan:
    """Logits processor: the first generated token may not be any of `token_ids`."""

    def __init__(self, token_ids: list[int], prompt_width: int):
        self.token_ids, self.prompt_width = sorted(set(token_ids)), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.prompt_width:
            scores[:, self.token_ids] = float("-inf")
        return scores


class NGramFrequencyPenalty:
    """Logits processor: logit[v] -= penalty * (times the generated text already holds the n-gram that v would
    complete), counted over the generated tokens only (SELF-ALIGN's verbose cloning: 3-grams 1.0, 4-grams 2.0)."""

    def __init__(self, n: int, penalty: float, prompt_width: int):
        if n < 2:
            raise ValueError(f"n-gram penalties need n >= 2, got {n}")
        self.n, self.penalty, self.prompt_width = n, penalty, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        for row, ids in enumerate(input_ids[:, self.prompt_width :].tolist()):
            if len(ids) < n - 1:
                continue
            context = tuple(ids[len(ids) - n + 1 :])
            counts: dict[int, int] = {}
            for k in range(len(ids) - n + 1):
                if tuple(ids[k : k + n - 1]) == context:
                    counts[ids[k + n - 1]] = counts.get(ids[k + n - 1], 0) + 1
            if counts:
                index = torch.tensor(list(counts), device=scores.device)
                value = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
                scores[row, index] -= self.penalty * value
        return scores


def shared_prefix_prompts(template: str, queries: Sequence[str], **fields) -> tuple[str, list[str]]:
    """(prefix, prompts) with prefix + prompts[k] == template.format(query=queries[k], **fields): the prefix is the
    template up to {query}, shared by every query."""
    head, sep, tail = template.partition("{query}")
    if not sep:
        raise ValueError(f"the template has no {{query}} field: {template!r}")
    return head.format(**fields), [q + tail.format(**fields) for q in queries]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string."""
    end = min((k for k in (text.find(s) for s in stop_strings) if k >= 0), default=len(text))
    return text[:end]


class HFGenerator:
    def __init__(self, model, tokenizer, config: GenerationConfig, *, progress: Callable[[int], None] | None = None):
        if config.max_new_tokens < 1 or config.batch_size < 1:
            raise ValueError("generation.max_new_tokens and generation.batch_size must be >= 1")
        self.model, self.tokenizer, self.config, self.progress = model, tokenizer, config, progress
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix_encodings = 0  # how many prefixes were run through the model (each one once)
        self._prefix: tuple[list[int], object] | None = None  # (token ids, KV cache) of the last prefix

    def _processors(self, prompt_width: int):
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if self.config.first_token_bans:
            banned = [self._encode(w)[0] for word in self.config.first_token_bans for w in (word, " " + word)]
            processors.append(FirstTokenBan(banned, prompt_width))
        for n, penalty in sorted(self.config.ngram_penalties.items()):
            processors.append(NGramFrequencyPenalty(n, penalty, prompt_width))
        return processors

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def generate(self, prefix: str, prompts: Sequence[str]) -> list[str]:
        return [text for text, _ in self.generate_with_status(prefix, prompts)]

    @torch.no_grad()
    def generate_with_status(self, prefix: str, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(continuation cut at the first stop string, finished): finished is False when max_new_tokens ran out
        before a stop string or EOS."""
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prefix_ids = bos + self._encode(prefix)
        if not prefix_ids:
            raise ValueError("HFGenerator needs a non-empty prefix (or a tokenizer with a BOS token)")
        was_training = self.model.training
        self.model.eval()
        if self._prefix is None or self._prefix[0] != prefix_ids:
            cache = self.model(torch.tensor([prefix_ids], device=device), use_cache=True).past_key_values
            self._prefix = (prefix_ids, cache)
            self.prefix_encodings += 1
        prefix_cache = self._prefix[1]
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))  # similar lengths share a batch
        outputs: list[tuple[str, bool]] = [("", False)] * len(prompts)
        c = self.config
        sampling = (
            dict(do_sample=True, temperature=c.temperature, top_p=c.top_p) if c.do_sample else dict(do_sample=False)
        )
        for start in range(0, len(order), c.batch_size):
            rows = order[start : start + c.batch_size]
            width = max(len(encoded[k]) for k in rows)
            ids = torch.full((len(rows), len(prefix_ids) + width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            ids[:, : len(prefix_ids)] = torch.tensor(prefix_ids)
            mask[:, : len(prefix_ids)] = 1
            for r, k in enumerate(rows):
                ids[r, ids.shape[1] - len(encoded[k]) :] = torch.tensor(encoded[k], dtype=torch.long)
                mask[r, ids.shape[1] - len(encoded[k]) :] = 1
            processors = self._processors(ids.shape[1])
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            out = self.model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                past_key_values=cache,
                max_new_tokens=c.max_new_tokens,
                pad_token_id=self.pad_id,
                stop_strings=list(c.stop_strings) or None,
                tokenizer=self.tokenizer,
                logits_processor=processors,
                **sampling,
            )
            for r, k in enumerate(rows):
                new = out[r, ids.shape[1] :]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                cut = cut_at_stop(text, c.stop_strings)
                eos = self.tokenizer.eos_token_id
                outputs[k] = (cut, cut != text or (eos is not None and bool((new == eos).any())))
            if self.progress is not None:
                self.progress(len(rows))
        self.model.train(was_training)
        return outputs
