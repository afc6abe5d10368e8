"""Query sources for the papers' datasets: small files written here in the exact schemas of Anthropic/hh-rlhf and
openai/summarize_from_feedback ("comparisons"), read through `datasets` from disk (no network) and as JSONL."""

import json
import random

import datasets
import pytest

from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.data import first_human_turn, load_queries
from sami_kernels.recipes.sami.config import SAMIConfig

WORDS = "why how can my cat dog plan trip rent money friend sleep code bread garden phone job late tired".split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + rng.choice("?.!")


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def hh_rows(rng: random.Random, openings: list[str], rows: int) -> tuple[list[dict], list[str]]:
    """hh-rlhf rows (`chosen`, `rejected`: whole transcripts sharing their first turns) and each row's first turn."""
    firsts, records = [], []
    for _ in range(rows):
        first = rng.choice(openings)
        later = "".join(
            f"\n\nHuman: {sentence(rng, 5)}\n\nAssistant: {sentence(rng, 7)}" for _ in range(rng.randint(0, 2))
        )
        records.append(
            {
                "chosen": f"\n\nHuman: {first}\n\nAssistant: {sentence(rng, 9)}{later}",
                "rejected": f"\n\nHuman: {first}\n\nAssistant: {sentence(rng, 9)}{later}",
            }
        )
        firsts.append(first)
    return records, firsts


def tldr_rows(rng: random.Random, posts: int, rows: int) -> tuple[list[dict], dict[str, str]]:
    """summarize_from_feedback comparisons rows, each post compared several times, and {post id: post}."""
    by_id = {f"t3_{rng.getrandbits(32):08x}": " ".join(sentence(rng, 8) for _ in range(3)) for _ in range(posts)}
    records = []
    for _ in range(rows):
        post_id = rng.choice(sorted(by_id))
        records.append(
            {
                "info": {
                    "id": post_id,
                    "post": by_id[post_id],
                    "title": sentence(rng, 4),
                    "subreddit": rng.choice(["relationships", "AskReddit", "personalfinance"]),
                    "site": None,
                    "article": None,
                },
                "summaries": [
                    {"text": sentence(rng, 6), "policy": rng.choice(["sup2", "ref", "pretrain6b"]), "note": None}
                    for _ in range(2)
                ],
                "choice": rng.randint(0, 1),
                "worker": f"w{rng.getrandbits(40):010x}",
                "batch": f"batch{rng.randint(3, 22)}",
                "split": "train",
                "extra": {"confidence": rng.choice([None, rng.randint(1, 9)])},
            }
        )
    return records, by_id


def first_occurrences(values: list) -> list:
    return list(dict.fromkeys(values))


@pytest.mark.parametrize("seed", [0, 1])
def test_hh_first_human_turn_through_datasets_and_jsonl(tmp_path, seed):
    rng = random.Random(seed)
    openings = [sentence(rng, rng.randint(3, 9)) for _ in range(6)]
    openings[0] = f"{openings[0]}\n\n{sentence(rng, 4)}"  # a first turn of two paragraphs stays whole
    records, firsts = hh_rows(rng, openings, rows=25)
    path = write_lines(tmp_path / "train.jsonl", records)
    through_datasets = load_queries("hf:json", data_files=path, extractor="hh-first-human-turn")
    assert through_datasets == first_occurrences(firsts)  # de-duplicated by the query text, first kept, in order
    assert load_queries(path, extractor="hh-first-human-turn") == through_datasets
    assert load_queries(path, extractor="hh-first-human-turn", dedup_key=False) == firsts
    assert load_queries(path, extractor="hh-first-human-turn", field="chosen") == through_datasets  # not a conflict


def test_first_human_turn_cuts_at_the_next_turn():
    assert first_human_turn("\n\nHuman: Hi there \n\nAssistant: Hello\n\nHuman: Bye") == "Hi there"
    assert first_human_turn("Human: one\nline two\n\nHuman: again") == "one\nline two"
    assert first_human_turn("\n\nHuman: only a question") == "only a question"
    assert first_human_turn("\n\nAssistant: Hello\n\nHuman: Hi") == ""


@pytest.mark.parametrize("seed", [0, 1])
def test_tldr_post_through_datasets_dedup_by_id(tmp_path, seed):
    rng = random.Random(seed)
    records, by_id = tldr_rows(rng, posts=5, rows=30)
    twin = dict(records[-1], info=dict(records[-1]["info"], id="t3_twin"))  # another post with the same text
    records.append(twin)
    path = write_lines(tmp_path / "comparisons.jsonl", records)
    queries = load_queries("hf:json", data_files=path, extractor="tldr-post")
    expected = [by_id[i].strip() for i in first_occurrences(r["info"]["id"] for r in records[:-1])]
    assert queries == expected + [twin["info"]["post"].strip()]  # the post alone, once per id, in order
    assert load_queries("hf:json", data_files=path, extractor="tldr-post", dedup_key=True) == expected
    assert load_queries(path, extractor="tldr-post") == queries
    parquet = tmp_path / "comparisons.parquet"  # as the Hub's Parquet export holds it
    datasets.Dataset.from_list(records).to_parquet(parquet)
    assert load_queries("hf:parquet", data_files=str(parquet), extractor="tldr-post") == queries


def test_nested_field_and_dedup_key_paths_without_extractor(tmp_path):
    rng = random.Random(2)
    rows = [{"meta": {"uid": rng.randint(0, 3)}, "body": {"text": f" {sentence(rng, 5)} "}} for _ in range(12)]
    path = write_lines(tmp_path / "nested.jsonl", rows)
    first_by_uid = {}
    for row in rows:
        first_by_uid.setdefault(row["meta"]["uid"], row["body"]["text"].strip())
    expected = list(first_by_uid.values())
    for source in (path, "hf:json"):
        files = path if source == "hf:json" else None
        assert load_queries(source, data_files=files, field="body.text", dedup_key="meta.uid") == expected
        assert load_queries(source, data_files=files, field="body.text") == [r["body"]["text"].strip() for r in rows]


def test_config_split_and_files_reach_load_dataset(monkeypatch):
    from sami_kernels.recipes.sami.loop import split_queries  # the SAMI loop's own call; imports the training stack

    rng = random.Random(3)
    records, by_id = tldr_rows(rng, posts=3, rows=9)
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = from_mapping(
        SAMIConfig,
        {
            "data": {
                "source": "hf:openai/summarize_from_feedback",
                "config": "comparisons",
                "split": "validation",
                "data_files": ["a.json", "b.json"],
                "extractor": "tldr-post",
                "heldout_queries": 1,
            }
        },
    )
    train, heldout = split_queries(config)
    assert calls == [
        ("openai/summarize_from_feedback", "comparisons", {"split": "validation", "data_files": ["a.json", "b.json"]})
    ]
    assert sorted(train + heldout) == sorted(p.strip() for p in by_id.values())


def test_bad_keys_name_the_key(tmp_path):
    rng = random.Random(4)
    hh_path = write_lines(tmp_path / "hh.jsonl", hh_rows(rng, [sentence(rng, 4)], rows=3)[0])
    known = r"\['hh-first-human-turn', 'tldr-post'\]"
    with pytest.raises(ValueError, match=rf"data.extractor: unknown extractor 'hh'; known: {known}"):
        load_queries(hh_path, extractor="hh")
    conflict = {"source": hh_path, "field": "chosen", "extractor": "tldr-post"}
    with pytest.raises(ValueError, match=r"data.field 'chosen' conflicts with data.extractor 'tldr-post'"):
        from_mapping(SAMIConfig, {"data": conflict})
    with pytest.raises(ValueError, match=r"data.config: only hf:<name> sources"):
        load_queries(hh_path, config="comparisons")
    with pytest.raises(ValueError, match=r"data.data_files: only hf:<name> sources take it; data.source is 'builtin"):
        load_queries("builtin:dialogue", data_files=hh_path)
    with pytest.raises(ValueError, match=r"data.source: 'hf:' needs a dataset name"):
        load_queries("hf:", data_files=hh_path)
    with pytest.raises(ValueError, match=r"data.field: expected dict keys joined by dots"):
        load_queries(hh_path, field="info..post")
    columns = r"\(columns: \['chosen', 'rejected'\]\); data.extractor 'tldr-post' reads 'info.post'"
    with pytest.raises(ValueError, match=rf"data.field: hf:json has no column 'info' {columns}"):
        load_queries("hf:json", data_files=hh_path, extractor="tldr-post")
    with pytest.raises(ValueError, match=r"data.split 'test'\): .*split"):
        load_queries("hf:json", data_files=hh_path, split="test", extractor="hh-first-human-turn")


def test_bad_records_name_the_record_and_its_keys(tmp_path):
    rng = random.Random(5)
    tldr, _ = tldr_rows(rng, posts=2, rows=4)
    tldr[2]["info"].pop("post")
    path = write_lines(tmp_path / "tldr.jsonl", tldr)
    keys = r"\(keys of 'info': \['article', 'id', 'site', 'subreddit', 'title'\]\)"
    with pytest.raises(
        ValueError, match=rf"data.field: .*tldr.jsonl: record 3 has no non-empty string field 'info.post' {keys}"
    ):
        load_queries(path, extractor="tldr-post")
    tldr[2]["info"]["post"] = sentence(rng, 6)
    tldr[1]["info"].pop("id")
    with pytest.raises(ValueError, match=r"data.dedup_key: .*tldr.jsonl: record 2 has no field 'info.id'"):
        load_queries(write_lines(tmp_path / "tldr.jsonl", tldr), extractor="tldr-post")
    tldr[1]["info"] = "a post"
    with pytest.raises(ValueError, match=r"record 2 has no non-empty string field 'info.post' \('info' is a str, not"):
        load_queries(write_lines(tmp_path / "tldr.jsonl", tldr), extractor="tldr-post")

    hh, _ = hh_rows(rng, [sentence(rng, 4)], rows=3)
    hh[1]["chosen"] = "\n\nAssistant: " + sentence(rng, 5)  # no Human turn to take the query from
    path = write_lines(tmp_path / "hh.jsonl", hh)
    with pytest.raises(
        ValueError, match=r"data.extractor 'hh-first-human-turn': hf:json: record 2: no query in its 'chosen'"
    ):
        load_queries("hf:json", data_files=path, extractor="hh-first-human-turn")
