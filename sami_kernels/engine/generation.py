"""Generation behind a small interface: a Generator continues prefix + prompt for many prompts sharing one prefix.

    generator.generate(prefix, prompts) -> [continuation of the text prefix + p for p in prompts]  (cut at stop strings)

HFGenerator runs batched Hugging Face generate. Row k is fed exactly encode(prefix + prompts[k]) (tokens.encode: the
text encoded as one string, BOS once), never the prefix and the prompt encoded apart (that would split "Human: How"
into ':', 'Ġ', 'How' where the text has ':', 'ĠHow'). The shared part is the longest token prefix common to
encode(prefix) and every row, capped so each row keeps >= 1 uncached token: the KV cache of encode(prefix) is computed
ONCE for one row, kept while later calls pass the same prefix (the model must not change meanwhile), cut to the
shared part and handed to every batch as a view: every row's cache is the one stored tensor expanded over the batch
(stride 0), never a per-row copy. Transformers' DynamicCache grows by torch.cat at every forward step, so the first
step of a batch writes a new [rows, heads, positions, head dim] tensor (the cat reads the expanded view as it reads any
tensor); what the view saves is the per-row copy of the prefix made before that step and the copy of the stored cache
per batch. Each row is laid out [shared | padding | rest of the row] with the padding masked and positions counted
over real tokens only, so every row equals its unpadded generation.

Greedy by default. Sampling (config.do_sample) is done by the last logits processor, SeededSampling: temperature,
then top-p, then one draw per row; with seeds=[s_k] row k draws from its own torch.Generator seeded with s_k, so an
item's text depends neither on the batch it lands in nor on the global RNG (without seeds: the global RNG).
first_token_bans bar their words' first tokens from the first generated token, or, with bans_after set, from the
token generated right after the generated text first ends with bans_after. A vLLM (or any other) engine plugs in by
implementing `generate` and `generate_with_status` with the same contract (vllm_engine.py).

ShardedGenerator runs any engine over the ranks of a torch.distributed job, resumably:
    generate_many([(prefix_r, prompts_r, seeds_r)]) -> per request, [(continuation, finished)] per prompt
The rows of every request are cut into batches of batch_size in a fixed order (the request's prompts by length, then
by position), independent of the number of ranks; the k-th batch not yet logged goes to rank k mod world, each
round's results are all-gathered, so every rank returns every row in its request order. With a journal (an
append-only log, e.g. recipes' StageFile: `records`, `log(event)`, `save()`, used on rank 0 only) each finished batch
is appended as one durable line keyed by a hash of (prefix, prompts, seeds), and batches already logged are not
generated again: a killed phase re-run returns what an uninterrupted one returns, as long as a row's text depends
only on its own prompt and seed (HFGenerator: per-row seeds; greedy rows are generated in the same batches anyway).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from .tokens import common_prefix_length, encode, tail_after


class Generator(Protocol):
    def generate(self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None) -> list[str]: ...

    def generate_with_status(
        self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None
    ) -> list[tuple[str, bool]]: ...


@dataclass
class GenerationConfig:
    max_new_tokens: int = 350
    batch_size: int = 8
    do_sample: bool = False  # greedy, as in SAMI
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ("Human:", "\n\nHuman", "###")
    first_token_bans: tuple[str, ...] = ()  # words the first new token may not start, e.g. ("Sorry",)
    bans_after: str = ""  # "": the bans hit the first generated token; else the first token after this marker
    ngram_penalties: dict[int, float] = field(default_factory=dict)  # {n: penalty}, e.g. {3: 1.0, 4: 2.0}


class FirstTokenBan:
    """Logits processor: `token_ids` are barred from one token per row: the first generated token when `after` is
    "", else the token generated right after the generated text (decode(ids after prompt_width)) first ends with
    `after`. A processor with `after` keeps per-row state: make one per generate call."""

    def __init__(self, token_ids: list[int], prompt_width: int, *, after: str = "", decode: Callable | None = None):
        if after and decode is None:
            raise ValueError("FirstTokenBan with `after` needs `decode` (token ids -> text)")
        self.token_ids, self.prompt_width, self.after, self.decode = sorted(set(token_ids)), prompt_width, after, decode
        self.passed: list[bool] | None = None  # per row: the marker was reached (and its ban applied)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = self._rows_at_the_banned_token(input_ids[:, self.prompt_width :])
        if rows:
            scores[torch.tensor(rows, device=scores.device)[:, None], self.token_ids] = float("-inf")
        return scores

    def _rows_at_the_banned_token(self, generated: torch.Tensor) -> list[int]:
        if not self.after:
            return list(range(len(generated))) if generated.shape[1] == 0 else []
        if self.passed is None:
            self.passed = [False] * len(generated)
        rows = [r for r, ids in enumerate(generated) if not self.passed[r] and self.decode(ids).endswith(self.after)]
        for r in rows:
            self.passed[r] = True
        return rows


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


class SeededSampling:
    """Last logits processor, sampling: p = softmax(scores / temperature), cut to the smallest set of most likely
    tokens whose mass reaches top_p, renormalised; row r draws one token from its own torch.Generator seeded with
    seeds[r] (the global RNG when seeds is None). Only the drawn token stays finite, so greedy selection returns it."""

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int] | None):
        self.temperature, self.top_p, self.seeds = temperature, top_p, seeds
        self.generators: list[torch.Generator | None] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = (
                [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
                if self.seeds is not None
                else [None] * len(scores)
            )
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # the mass before it already reaches p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        drawn = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)])
        chosen = torch.full_like(scores, float("-inf"))
        chosen[torch.arange(len(scores), device=scores.device), drawn] = 0.0
        return chosen


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


def finished_text(tokenizer, new_ids: list[int], stop_strings: Sequence[str]) -> tuple[str, bool]:
    """(the decoded new tokens cut at the first stop string, finished): finished when a stop string or EOS ended the
    row, False when the token budget did."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cut = cut_at_stop(text, stop_strings)
    return cut, cut != text or (tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_ids)


class HFGenerator:
    def __init__(self, model, tokenizer, config: GenerationConfig, *, progress: Callable[[int], None] | None = None):
        if config.max_new_tokens < 1 or config.batch_size < 1:
            raise ValueError("generation.max_new_tokens and generation.batch_size must be >= 1")
        if config.do_sample and not (config.temperature > 0 and 0 < config.top_p <= 1):
            raise ValueError(
                f"sampling needs generation.temperature > 0 and generation.top_p in (0, 1], got "
                f"{config.temperature} and {config.top_p}"
            )
        self.model, self.tokenizer, self.config, self.progress = model, tokenizer, config, progress
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix_encodings = 0  # how many prefixes were run through the model (each one once)
        self._prefix: tuple[list[int], object] | None = None  # (encode(prefix), its KV cache) of the last prefix

    def _banned_first_tokens(self) -> list[int]:
        """First token of each banned word, with and without a leading space, alone and right after bans_after."""
        marker = self.config.bans_after
        marker_ids = encode(self.tokenizer, marker)
        banned = []
        for word in self.config.first_token_bans:
            for text in (word, " " + word):
                banned.append(self._text_ids(text)[0])
                in_context = tail_after(marker_ids, encode(self.tokenizer, marker + text)) if marker else None
                banned.extend(in_context[:1] if in_context else [])
        return banned

    def _processors(self, prompt_width: int, seeds: Sequence[int] | None):
        from transformers import LogitsProcessorList

        c = self.config
        processors = LogitsProcessorList()
        if c.first_token_bans:
            decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            processors.append(
                FirstTokenBan(self._banned_first_tokens(), prompt_width, after=c.bans_after, decode=decode)
            )
        for n, penalty in sorted(c.ngram_penalties.items()):
            processors.append(NGramFrequencyPenalty(n, penalty, prompt_width))
        if c.do_sample:
            processors.append(SeededSampling(c.temperature, c.top_p, seeds))
        return processors

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prefix_cache(self, prefix_ids: list[int], shared: int, rows: int):
        """The KV cache of prefix_ids[:shared] for `rows` rows (None when nothing is shared); the cache of the whole
        prefix is computed once per prefix and cut (causal attention: its first `shared` positions are exact)."""
        if shared == 0:
            return None
        if self._prefix is None or self._prefix[0] != prefix_ids:
            device = next(self.model.parameters()).device
            cache = self.model(torch.tensor([prefix_ids], device=device), use_cache=True).past_key_values
            self._prefix = (prefix_ids, cache)
            self.prefix_encodings += 1
        cache = copy.copy(self._prefix[1])  # new cache and layer objects over the stored tensors (no tensor copied)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
        if len(prefix_ids) > shared:
            cache.crop(shared - len(prefix_ids))  # a negative count: drop that many trailing positions (a view)
        for layer in cache.layers:  # every row reads the one stored prefix: a stride-0 batch dimension
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        return cache

    def generate(self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None) -> list[str]:
        return [text for text, _ in self.generate_with_status(prefix, prompts, seeds=seeds)]

    @torch.no_grad()
    def generate_with_status(
        self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None
    ) -> list[tuple[str, bool]]:
        """(continuation cut at the first stop string, finished): finished is False when max_new_tokens ran out
        before a stop string or EOS. seeds: one per prompt, the sampling seed of its row (see the module doc)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        if not prompts:
            return []
        prefix_ids = encode(self.tokenizer, prefix)
        encoded = [encode(self.tokenizer, prefix + p) for p in prompts]
        shared = min(common_prefix_length([prefix_ids, *encoded]), min(map(len, encoded)) - 1)
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))  # similar lengths share a batch
        outputs: list[tuple[str, bool]] = [("", False)] * len(prompts)
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            row_seeds = None if seeds is None else [seeds[k] for k in rows]
            results = self._generate_batch(prefix_ids, shared, [encoded[k] for k in rows], row_seeds)
            for k, result in zip(rows, results, strict=True):
                outputs[k] = result
            if self.progress is not None:
                self.progress(len(rows))
        self.model.train(was_training)
        return outputs

    def _generate_batch(self, prefix_ids, shared: int, rows: list[list[int]], seeds) -> list[tuple[str, bool]]:
        """One batch: rows laid out [shared | padding | rest], generated, decoded and cut at the stop strings."""
        c, device = self.config, next(self.model.parameters()).device
        width = max(len(row) for row in rows) - shared
        ids = torch.full((len(rows), shared + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :shared] = torch.tensor(prefix_ids[:shared], dtype=torch.long)
        mask[:, :shared] = 1
        for r, row in enumerate(rows):
            rest = row[shared:]
            ids[r, ids.shape[1] - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[r, ids.shape[1] - len(rest) :] = 1
        out = self.model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            past_key_values=self._prefix_cache(prefix_ids, shared, len(rows)),
            max_new_tokens=c.max_new_tokens,
            pad_token_id=self.pad_id,
            stop_strings=list(c.stop_strings) or None,
            tokenizer=self.tokenizer,
            logits_processor=self._processors(ids.shape[1], seeds),
            do_sample=False,  # sampling, when configured, is the last logits processor's draw
        )
        return [finished_text(self.tokenizer, new.tolist(), c.stop_strings) for new in out[:, ids.shape[1] :]]


Request = tuple[str, Sequence[str], Sequence[int] | None]  # (prefix, prompts, seeds or None)


class ShardedGenerator:
    """An engine's generate calls split across the ranks of a process group and logged batch by batch (module doc)."""

    def __init__(self, engine: Generator, batch_size: int, *, journal=None, progress: Callable | None = None):
        if batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {batch_size}")
        self.engine, self.batch_size, self.journal, self.progress = engine, batch_size, journal, progress
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    def generate(self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None) -> list[str]:
        return [text for text, _ in self.generate_with_status(prefix, prompts, seeds=seeds)]

    def generate_with_status(
        self, prefix: str, prompts: Sequence[str], *, seeds: Sequence[int] | None = None
    ) -> list[tuple[str, bool]]:
        return self.generate_many([(prefix, prompts, seeds)])[0]

    def generate_many(self, requests: Sequence[Request]) -> list[list[tuple[str, bool]]]:
        """Every request's rows, generated by the ranks in turn (or read from the journal); called by every rank."""
        for _, prompts, seeds in requests:
            if seeds is not None and len(seeds) != len(prompts):
                raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        batches = self._batches(requests)
        keys = [batch_key(requests[r][0], *self._rows(requests[r], rows)) for r, rows in batches]
        done = self._broadcast(self._logged(set(keys)))
        outputs = [[("", False)] * len(prompts) for _, prompts, _ in requests]
        pending = []
        for b, key in enumerate(keys):
            if key in done:
                self._place(outputs, batches[b], done[key])
                self._advance(len(batches[b][1]))
            else:
                pending.append(b)
        for start in range(0, len(pending), self.world):
            turn = pending[start : start + self.world]
            mine = turn[self.rank] if self.rank < len(turn) else None
            result = None if mine is None else self._generate(requests, batches[mine])
            for b, batch_outputs in zip(turn, self._all_gather(result)[: len(turn)], strict=True):
                self._place(outputs, batches[b], batch_outputs)
                self._record(keys[b], batch_outputs)
            self._advance(sum(len(batches[b][1]) for b in turn))
        return outputs

    def close(self) -> None:
        """Release the engine's resources when it holds any (VLLMGenerator's GPU engine)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def _advance(self, rows: int) -> None:
        if self.progress is not None:
            self.progress(rows)

    def _batches(self, requests: Sequence[Request]) -> list[tuple[int, list[int]]]:
        """(request, its row indices) per batch: each request's rows by prompt length (similar lengths share a batch),
        cut every batch_size rows."""
        batches = []
        for r, (_, prompts, _) in enumerate(requests):
            order = sorted(range(len(prompts)), key=lambda k, prompts=prompts: len(prompts[k]))
            batches += [(r, order[s : s + self.batch_size]) for s in range(0, len(order), self.batch_size)]
        return batches

    @staticmethod
    def _rows(request: Request, rows: list[int]) -> tuple[list[str], list[int] | None]:
        _, prompts, seeds = request
        return [prompts[k] for k in rows], None if seeds is None else [seeds[k] for k in rows]

    def _generate(self, requests: Sequence[Request], batch: tuple[int, list[int]]) -> list[tuple[str, bool]]:
        prompts, seeds = self._rows(requests[batch[0]], batch[1])
        return self.engine.generate_with_status(requests[batch[0]][0], prompts, seeds=seeds)

    @staticmethod
    def _place(outputs, batch: tuple[int, list[int]], batch_outputs) -> None:
        for k, (text, finished) in zip(batch[1], batch_outputs, strict=True):
            outputs[batch[0]][k] = (text, finished)

    def _logged(self, keys: set[str]) -> dict[str, list]:
        """The journal's outputs of these batch keys (rank 0; the others get them by broadcast)."""
        if self.journal is None or self.rank != 0:
            return {}
        return {r["batch"]: r["outputs"] for r in self.journal.records if r["batch"] in keys}

    def _record(self, key: str, batch_outputs) -> None:
        """One finished batch appended to the journal as one durable line (rank 0)."""
        if self.journal is not None and self.rank == 0:
            self.journal.log({"unit": key, "record": {"batch": key, "outputs": [list(x) for x in batch_outputs]}})
            self.journal.save()

    def _broadcast(self, value):
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_gather(self, value) -> list:
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


def batch_key(prefix: str, prompts: Sequence[str], seeds: Sequence[int] | None) -> str:
    """A batch's identity in a journal: a hash of its prefix, prompts and seeds."""
    text = json.dumps([prefix, list(prompts), None if seeds is None else list(seeds)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
