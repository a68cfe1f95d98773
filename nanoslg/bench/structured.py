"""offline_json (W11): the offline workload with every other request constrained by a JSON schema, to
set against the unconstrained offline run of the same numbers. The schema asks for more items than any
output holds, so each constrained request runs to its max_tokens ("length") exactly as its free twin
would: both runs generate the same tokens, and the difference is the grammar's cost."""

from __future__ import annotations

from nanoslg.bench.workloads import BenchRequest, Offline, TokenSpace, make_requests
from nanoslg.core.config import BenchConfig
from nanoslg.core.registry import BENCHMARKS
from nanoslg.core.sampling_params import StructuredOutputs

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "name": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"enum": ["new", "used", "rare", "sale"]}, "maxItems": 3},
        "price": {"type": "number", "minimum": 0, "maximum": 10_000},
        "in_stock": {"type": "boolean"},
    },
    "required": ["id", "name", "tags", "price", "in_stock"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 2048}  # more than any output can hold


def schema(name_max_length: int | None) -> dict:
    """SCHEMA with the items' "name" bounded to that many characters (None: unbounded). A bounded
    string is the slowest state for llguidance's masks; an unbounded one the cheapest."""
    name = {"type": "string"} if name_max_length is None else {"type": "string", "maxLength": name_max_length}
    item = {**ITEM, "properties": {**ITEM["properties"], "name": name}}
    return {**SCHEMA, "items": item}


@BENCHMARKS.register("offline_json")
class OfflineJson(Offline):
    name = "offline_json"
    description = "offline, every other request constrained by a JSON schema (structured-output cost)"

    def requests(self, b: BenchConfig, space: TokenSpace) -> list[BenchRequest]:
        reqs = make_requests(b, space)
        spec = StructuredOutputs(json=schema(b.extra.get("name_max_length", 24)))
        for r in reqs[::2]:
            r.structured = spec
        return reqs
