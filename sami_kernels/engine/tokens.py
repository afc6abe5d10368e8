"""The engine's one tokenisation rule, used by generation, packed scoring and the pair engine.

    encode(text) = tokenizer(text, add_special_tokens=False).input_ids, with bos_token_id prepended unless the ids
                   already start with it (chat-template text writes its own BOS) or the tokenizer has none
    continuation_ids(prompt, continuation) = encode(prompt + continuation)[len(encode(prompt)):]

A continuation is always tokenised in its context: the text prompt + continuation is encoded as one string, so the
model sees the ids it would see for that text (on SentencePiece tokenizers an answer after "\\n" starts with "Sure",
not with the "▁Sure" it encodes to alone). When encode(prompt) is not a token prefix of encode(prompt +
continuation), a token merges across the boundary and no continuation ids exist: refused with a BoundaryMergeError
(a ValueError), which callers that generated the continuation catch to drop it.
"""

from __future__ import annotations

from collections.abc import Sequence


class BoundaryMergeError(ValueError):
    """A token merges across a prompt/continuation boundary: the continuation has no token ids of its own."""


def encode(tokenizer, text: str) -> list[int]:
    """The token ids of text, BOS first (once) when the tokenizer has one."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


def tail_after(prefix_ids: Sequence[int], ids: Sequence[int]) -> list[int] | None:
    """ids after prefix_ids when prefix_ids is a token prefix of ids, else None."""
    return list(ids[len(prefix_ids) :]) if list(ids[: len(prefix_ids)]) == list(prefix_ids) else None


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all rows."""
    shortest = min(map(len, rows))
    return next((n for n in range(shortest) if len({row[n] for row in rows}) > 1), shortest)


def split_continuation(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(encode(prompt), continuation_ids(prompt, continuation)); BoundaryMergeError on a merge across the boundary."""
    prompt_ids = encode(tokenizer, prompt)
    full = encode(tokenizer, prompt + continuation)
    tail = tail_after(prompt_ids, full)
    if tail is None:
        n = common_prefix_length([prompt_ids, full])
        raise BoundaryMergeError(
            f"the prompt ending {prompt[-30:]!r} and the continuation starting {continuation[:30]!r} merge across "
            f"their boundary: the prompt ends in tokens {tokenizer.convert_ids_to_tokens(prompt_ids[n:])} but "
            f"prompt + continuation has {tokenizer.convert_ids_to_tokens(full[n : n + 2])} there, so the "
            "continuation has no token ids of its own (end the prompt or start the continuation differently)"
        )
    return prompt_ids, tail
