"""Constitutions: principles with written antitheses, and the N constitutions SAMI contrasts for each query.

A principle set is a YAML or JSON file  {name, task, principles: [{name, principle, antithesis[, measure]}, ...]};
built-in sets live in sami_kernels/data/constitutions: "dialogue" (helpful, harmless), "summarisation"
(concise, comprehensive), "pool" (ten principles for the element-wise-opposite scheme) and "concise" (one
principle with a word-count measure: the demo's).

A principle may declare a judge-free measure of adherence,  measure: {metric: words | refusal, direction: lower |
higher}: a number per response (METRICS: its word count, or 1 if it refuses (REFUSAL) else 0) and the way following
the principle moves its mean (concise: words, lower). evaluation.py compares it under the principle and its flip.

A constitution is a tuple of clauses (principle name, follows): follows=False selects the antithesis. Schemes for
the N constitutions of one query; constitution 0 is the one the trained model should follow:
    "antithesis": c_0 = every principle; c_1..c_{N-1} = distinct random antithesis variants, each flipping a
                  non-empty subset of the principles (dialogue: harmless + not helpful, not harmless + not
                  helpful, ...). Needs N <= 2^K for K principles.
    "opposite":   draw k principles from the set; c_0 follows or flips each independently, c_1 is its
                  element-wise opposite, c_2.. are further distinct patterns. Needs N <= 2^k.
Text: the clauses in an order reshuffled for every prompt (render(..., rng)), one numbered line each.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).parents[2] / "data" / "constitutions"
SCHEMES = ("antithesis", "opposite")

Clause = tuple[str, bool]
Constitution = tuple[Clause, ...]

REFUSAL = re.compile(  # a crude refusal detector: an apology, or "I can't / won't / am unable to" + help verb
    r"\b(?:sorry|apologi(?:[sz]e|es)|I(?: am|['’]m) (?:unable|not able) to"
    r"|I (?:can ?not|can['’]t|won['’]t|will not) (?:help|assist|provide|do|share|answer|comply|support|give|write))\b",
    re.IGNORECASE,
)
METRICS = {
    "words": lambda response: float(len(response.split())),
    "refusal": lambda response: float(REFUSAL.search(response) is not None),
}
DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class Measure:
    metric: str  # a key of METRICS
    direction: str  # "lower" / "higher": the way following the principle moves the mean

    def mean(self, responses: list[str]) -> float:
        return sum(map(METRICS[self.metric], responses)) / len(responses)


@dataclass(frozen=True)
class Principle:
    name: str
    principle: str
    antithesis: str
    measure: Measure | None = None


@dataclass(frozen=True)
class PrincipleSet:
    name: str
    task: str
    principles: tuple[Principle, ...]

    def text(self, clause: Clause) -> str:
        name, follows = clause
        for p in self.principles:
            if p.name == name:
                return p.principle if follows else p.antithesis
        raise KeyError(f"principle {name!r} is not in the set {self.name!r}")

    def render(self, constitution: Constitution, rng: random.Random | None = None) -> str:
        """Numbered lines, in the given order or shuffled by rng (SAMI reshuffles per training prompt)."""
        clauses = list(constitution)
        if rng is not None:
            rng.shuffle(clauses)
        return "\n".join(f"{k}. {self.text(c)}" for k, c in enumerate(clauses, 1))

    def positive(self) -> Constitution:
        return tuple((p.name, True) for p in self.principles)

    def flipped(self, name: str) -> Constitution:
        """The positive constitution with just principle `name` replaced by its antithesis."""
        return tuple((p.name, p.name != name) for p in self.principles)


def load_principle_set(source: str) -> PrincipleSet:
    """A built-in set by name ("dialogue", "summarisation", "pool", "concise") or a YAML / JSON file path."""
    path = BUILTIN_DIR / f"{source}.yaml" if (BUILTIN_DIR / f"{source}.yaml").exists() else Path(source)
    if not path.exists():
        builtins = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
        raise ValueError(f"constitutions.set: {source!r} is neither a built-in set {builtins} nor an existing file")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("principles"), list) or not raw["principles"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'principles' list")
    principles = [parse_principle(entry, f"{path}: principles[{k}]") for k, entry in enumerate(raw["principles"])]
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate principle names in {names}")
    return PrincipleSet(str(raw.get("name", path.stem)), str(raw.get("task", "dialogue")), tuple(principles))


def parse_principle(entry, where: str) -> Principle:
    texts = ("name", "principle", "antithesis")
    if not isinstance(entry, dict) or not set(texts) <= set(entry) <= {*texts, "measure"}:
        raise ValueError(f"{where} must have the keys name, principle, antithesis and optionally measure")
    if not all(isinstance(entry[key], str) and entry[key].strip() for key in texts):
        raise ValueError(f"{where} has an empty or non-string name, principle or antithesis")
    measure = entry.get("measure")
    if measure is not None:
        if (
            not isinstance(measure, dict)
            or set(measure) != {"metric", "direction"}
            or measure["metric"] not in METRICS
            or measure["direction"] not in DIRECTIONS
        ):
            raise ValueError(
                f"{where}.measure must be {{metric: one of {sorted(METRICS)}, direction: one of {list(DIRECTIONS)}}}, "
                f"got {measure!r}"
            )
        measure = Measure(measure["metric"], measure["direction"])
    return Principle(entry["name"], entry["principle"].strip(), entry["antithesis"].strip(), measure)


def sample_constitutions(
    principles: PrincipleSet, n: int, rng: random.Random, *, scheme: str = "antithesis", draw: int = 2
) -> list[Constitution]:
    """N distinct constitutions for one query, constitution 0 first (see the module docstring)."""
    if n < 2:
        raise ValueError(f"constitutions.n must be >= 2 (SAMI contrasts constitutions), got {n}")
    if scheme == "antithesis":
        names = [p.name for p in principles.principles]
        if n > 2 ** len(names):
            raise ValueError(f"constitutions.n = {n} needs more than the 2^{len(names)} variants of {names}")
        flips = rng.sample(range(1, 2 ** len(names)), n - 1)  # non-empty subsets, as bit masks
        patterns = [0, *flips]
    elif scheme == "opposite":
        if not 1 <= draw <= len(principles.principles):
            raise ValueError(f"constitutions.draw must be in [1, {len(principles.principles)}], got {draw}")
        if n > 2**draw:
            raise ValueError(f"constitutions.n = {n} needs more than the 2^{draw} patterns of {draw} principles")
        names = [p.name for p in rng.sample(principles.principles, draw)]
        first = rng.randrange(2**draw)
        opposite = first ^ (2**draw - 1)
        rest = rng.sample([m for m in range(2**draw) if m not in (first, opposite)], n - 2)
        patterns = [first, opposite, *rest]
    else:
        raise ValueError(f"constitutions.scheme must be one of {SCHEMES}, got {scheme!r}")
    return [tuple((name, not (mask >> k) & 1) for k, name in enumerate(names)) for mask in patterns]
