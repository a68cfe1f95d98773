"""The structured-output property test (CPU, GPU, parallel modes): seeded generators of JSON schemas of
many shapes, regexes and choices, the checks a completion that ended with "stop" must pass, and
`run_property`, which runs them all through an LLM in one batch."""

from __future__ import annotations

import json
import random
import re

import jsonschema

from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sampling_params import StructuredOutputs as S

PATTERNS = ["^[a-z]{1,5}$", "^[A-Z][a-z]{0,4}$", "^[0-9]{2,4}$", "^(red|green|blue)$", "^[a-f0-9]{4}$", "^x+y?$"]
WORDS = ["alpha", "beta", "gamma", "delta", "yes", "no", "maybe", "red", "green", "blue", "0", "42", "a b", "é"]
# (regex, as llguidance reads it: the whole output must match) -- the subset Python's re reads alike.
REGEXES = [
    r"[a-z]{1,8}@[a-z]{1,6}\.(com|org|net)",
    r"\d{4}-\d{2}-\d{2}",
    r"(yes|no|maybe)",
    r"-?\d{1,5}(\.\d{1,3})?",
    r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}",
    r"#[0-9a-f]{6}",
    r"\((\d{3})\) \d{3}-\d{4}",
    r"[a-z_][a-z0-9_]{0,10}",
    r"(ab|cd)+e",
    r"[01]{3,9}",
]


def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "string", "pattern", "boolean", "enum", "const", "null"])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = round(rng.uniform(-10, 10), 2)
        bound = "exclusiveMaximum" if rng.random() < 0.5 else "maximum"
        return {"type": "number", "minimum": lo, bound: lo + rng.randint(1, 100)}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8), "minLength": rng.randint(0, 1)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", "c", 1, 2, 3.5, None, True, "long value"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    return {"type": kind}


def gen_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random schema: objects (required and optional keys), arrays, enums, nesting, bounded
    numbers, strings with lengths or patterns, anyOf and $ref now and then."""
    r = rng.random()
    if depth >= 2 or (depth > 0 and r < 0.45):
        return _scalar(rng)
    if r < 0.7 or depth == 0 and r < 0.8:
        names = rng.sample(["id", "name", "tags", "score", "ok", "kind", "child", "items", "x"], rng.randint(1, 4))
        props = {n: gen_schema(rng, depth + 1) for n in names}
        schema = {"type": "object", "properties": props, "required": [n for n in names if rng.random() < 0.6]}
        if rng.random() < 0.9:  # closed objects finish; open ones may add keys until max_tokens
            schema["additionalProperties"] = False
        return schema
    if r < 0.9:
        lo = rng.randint(0, 1)
        return {
            "type": "array",
            "items": gen_schema(rng, depth + 1),
            "minItems": lo,
            "maxItems": lo + rng.randint(0, 3),
        }
    if r < 0.95 or depth > 0:  # a $ref points from the root
        return {"anyOf": [_scalar(rng), _scalar(rng)]}
    return {"$defs": {"leaf": _scalar(rng)}, "type": "object", "properties": {"v": {"$ref": "#/$defs/leaf"}}}


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [gen_schema(rng) for _ in range(n)]


def choices(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(WORDS, rng.randint(1, 5)) for _ in range(n)]


def check_json(text: str, schema: dict) -> None:
    """Raises unless text is JSON that the schema accepts."""
    value = json.loads(text, parse_constant=_not_json)  # NaN and Infinity are Python's, not JSON
    jsonschema.validators.validator_for(schema)(schema).validate(value)


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def check_regex(text: str, regex: str) -> None:
    if re.fullmatch(regex, text) is None:
        raise AssertionError(f"{text!r} does not match {regex}")


def check_choice(text: str, options: list[str]) -> None:
    if text not in options:
        raise AssertionError(f"{text!r} is not one of {options}")


MAX = 48  # tokens per constrained completion


def params_for(spec: S, i: int, **kw) -> SamplingParams:
    """Greedy for even i, sampled (seeded) for odd i."""
    sampling = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=1.0, top_p=0.95, seed=i)
    return SamplingParams(structured_outputs=spec, **{"max_tokens": MAX, **sampling, **kw})


def run_property(llm, seed: int, n_schemas: int, prompts=("Hello", "JSON please:")) -> dict:
    """Generates for n_schemas schemas (each greedy and sampled), the regexes and some choices in one
    batch; checks every output; returns counts per finish reason."""
    cases = []  # (spec, check, expected)
    for sch in schemas(n_schemas, seed):
        cases += [(S(json=sch), check_json, sch)] * 2
    for rx in REGEXES:
        cases += [(S(regex=rx), check_regex, rx)] * 2
    for ch in choices(12, seed):
        cases += [(S(choice=ch), check_choice, ch)] * 2
    params = [params_for(spec, i) for i, (spec, _, _) in enumerate(cases)]
    outs = llm.generate([prompts[i % len(prompts)] for i in range(len(cases))], params)
    counts: dict[str, int] = {}
    for (spec, check, expected), out in zip(cases, outs):
        c = out.outputs[0]
        counts[c.finish_reason] = counts.get(c.finish_reason, 0) + 1
        if c.finish_reason == "stop":
            check(c.text, expected)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == MAX, (spec, c)
    return counts
