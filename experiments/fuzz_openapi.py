"""schemathesis over every operation of the served OpenAPI schema, valid and invalid bodies alike.

    python experiments/fuzz_openapi.py [--cases 2000] [--model-path PATH] [--max-model-len 64]

Starts `python run.py` on loopback (the tiny checkpoint the tests build, or --model-path), then
generates cases per operation and generation mode (positive: bodies the schema allows; negative:
bodies it forbids) and runs schemathesis' own checks `not_a_server_error` and
`positive_data_acceptance` on every answer. Errors must be in OpenAI's shape.

Positive cases that break a rule no JSON Schema can state (the prompt's token count against the
context, n x prompts, min_tokens against max_tokens; the served schema's descriptions list them:
nanoslg/server/openapi.py CROSS_FIELD_RULES) are counted and not sent: the server refuses them with
a 400 by design. tests/test_server_fuzz.py runs `fuzz` with a few cases per operation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

MAX_CHOICES = 256  # nanoslg.server.protocol.MAX_CHOICES


@dataclass
class FuzzStats:
    statuses: Counter = field(default_factory=Counter)  # (path, mode, status) -> count
    generated: int = 0
    skipped_cross_field: Counter = field(default_factory=Counter)  # rule -> count
    server_errors: list[str] = field(default_factory=list)
    positive_rejections: list[str] = field(default_factory=list)
    bad_error_shape: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> dict:
        return {
            "generated": self.generated,
            "sent": self.sent,
            "skipped_cross_field": dict(self.skipped_cross_field),
            "5xx": len(self.server_errors),
            "positive_data_rejections": len(self.positive_rejections),
            "errors_not_in_openai_shape": len(self.bad_error_shape),
            "statuses": {f"{p} {m} {s}": n for (p, m, s), n in sorted(self.statuses.items())},
        }


class CrossFieldRules:
    """Which schema-valid bodies the server refuses by a rule no JSON Schema states: the prompt's token
    count, a combination of fields, or whether a structured-output spec compiles. The last two are
    decided by the server's own code for them (server/structured.py, server/tools.py, the engine's
    grammar compiler), run here on the decoded body."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tok, self.ctx = tokenizer, max_model_len
        self._grammars = None

    def _fits(self, n_prompt: int, max_tokens: int | None, body: dict) -> str | None:
        if n_prompt >= self.ctx:
            return "prompt longer than the context"
        limit = self.ctx - n_prompt
        if max_tokens is not None and max_tokens > limit:
            return "prompt + max_tokens over the context"
        if (body.get("min_tokens") or 0) > (max_tokens if max_tokens is not None else limit):
            return "min_tokens over max_tokens"
        return None

    def broken(self, path: str, body) -> str | None:
        from nanoslg.server.errors import APIError

        try:  # fields that do not go together first: the server checks them before the context
            return self._structured(path, body) or self._broken(path, body)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, APIError):
            return None  # a shape the schema should have ruled out (or a template that refuses): the server answers it

    def _structured(self, path: str, body) -> str | None:
        if path not in ("/v1/completions", "/v1/chat/completions") or not isinstance(body, dict):
            return None
        import asyncio

        import msgspec

        from nanoslg.core.errors import RequestError
        from nanoslg.core.sampling_params import SamplingParams
        from nanoslg.engine.structured import Grammars
        from nanoslg.server import protocol as P
        from nanoslg.server.body import decode_body
        from nanoslg.server.errors import APIError
        from nanoslg.server.structured import constraints
        from nanoslg.server.tools import ToolUse

        chat = path == "/v1/chat/completions"
        try:  # as the server decodes it (16.0 is 16)
            req = decode_body(msgspec.json.encode(body), P.ChatCompletionRequest if chat else P.CompletionRequest)
        except APIError:
            return None  # the schema should have ruled it out: the server answers it
        try:
            kw, field = constraints(req)
            if chat:
                ToolUse(req, "hermes").constrain(SamplingParams(**kw), field)
        except (APIError, RequestError):
            return "structured-output or tool fields that do not go together"
        if kw.get("logit_bias") and max(kw["logit_bias"]) >= len(self.tok):
            return "logit_bias key outside the vocabulary"
        spec = kw.get("structured_outputs")
        if spec is not None:
            if self._grammars is None:
                self._grammars = Grammars(self.tok, len(self.tok), (self.tok.eos_token_id,))
            try:
                asyncio.run(self._grammars.compile(spec))
            except RequestError:
                return "a structured-output spec that does not compile"
        return None

    def _broken(self, path: str, body) -> str | None:
        if not isinstance(body, dict):
            return None
        if body.get("stream_options") is not None and body.get("stream") is not True:
            return "stream_options without stream"
        if path == "/v1/completions":
            prompt = body["prompt"]
            prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], (int, float)) else prompt
            if (body.get("n") or 1) * len(prompts) > MAX_CHOICES:
                return "n x prompts"
            max_tokens = 16 if body.get("max_tokens") is None else body["max_tokens"]
            for p in prompts:
                n = len(self.tok.encode(p)) if isinstance(p, str) else len(p)
                if why := self._fits(n, max_tokens, body):
                    return why
            return None
        if path == "/v1/chat/completions":
            if body.get("top_logprobs") is not None and not body.get("logprobs"):
                return "top_logprobs without logprobs"
            import msgspec

            from nanoslg.server import protocol as P
            from nanoslg.server.body import decode_body
            from nanoslg.server.chat_template import render_chat
            from nanoslg.server.tools import ToolUse

            # rendered as the server renders it (tools go through the template too)
            req = decode_body(msgspec.json.encode(body), P.ChatCompletionRequest)
            text = render_chat(self.tok, req, ToolUse(req, "hermes").template_tools())
            n = len(self.tok.encode(text, add_special_tokens=False))
            mt = body.get("max_completion_tokens")
            return self._fits(n, mt if mt is not None else body.get("max_tokens"), body)
        return None


def fuzz(url: str, rules: CrossFieldRules, cases: dict[str, int], seed: int = 0) -> FuzzStats:
    """`cases[path]` examples per generation mode for each operation (5 for the unnamed ones)."""
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json")
    stats = FuzzStats()
    for op in [r.ok() for r in schema.get_all_operations()]:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:

            @settings(
                max_examples=cases.get(op.path, 5),
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case) -> None:
                stats.generated += 1
                label = f"{case.method} {case.path} {str(case.body)[:300]!r}"
                if mode is GenerationMode.POSITIVE and (why := rules.broken(case.path, case.body)):  # noqa: B023
                    stats.skipped_cross_field[why] += 1
                    return
                resp = case.call(base_url=url, timeout=120)
                stats.statuses[(case.path, mode.value, resp.status_code)] += 1  # noqa: B023
                try:
                    case.validate_response(resp, checks=[not_a_server_error, positive_data_acceptance])
                except (Exception, BaseExceptionGroup) as e:  # schemathesis' FailureGroup: what the checks found
                    kind = stats.server_errors if resp.status_code >= 500 else stats.positive_rejections
                    kind.append(f"{label} -> {resp.status_code} {resp.text[:300]} ({type(e).__name__})")
                if resp.status_code >= 400:
                    try:
                        err = json.loads(resp.text)["error"]
                        ok = set(err) == {"message", "type", "param", "code"} and err["message"]
                    except (ValueError, KeyError, TypeError):
                        ok = False
                    if not ok:
                        stats.bad_error_shape.append(f"{label} -> {resp.status_code} {resp.text[:300]}")

            one()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="generated cases in all (at least)")
    ap.add_argument("--model-path", help="a checkpoint; default: a tiny random Llama built here")
    ap.add_argument("--max-model-len", type=int, default=64, help="a short context bounds what a case costs")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers import AutoTokenizer

    from nanoslg.bench.serving import ServerProcess

    path = args.model_path or build_tiny(Path("outputs/fuzz"))
    srv = ServerProcess(
        [f"model.path={path}", "cache=sdpa", f"model.max_model_len={args.max_model_len}", "server.port=0"],
        start_timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    srv.start()
    # Each POST operation runs its positive and its negative mode; the four GET ones take no input (one case).
    per_mode = -(-(args.cases - 4) // 4)
    t = time.perf_counter()
    try:
        rules = CrossFieldRules(AutoTokenizer.from_pretrained(path), args.max_model_len)
        cases = {"/v1/completions": per_mode, "/v1/chat/completions": per_mode}
        stats = fuzz(srv.url, rules, cases)
    finally:
        code = srv.stop()
    out = {**stats.summary(), "seconds": round(time.perf_counter() - t, 1), "server_exit": code}
    print(json.dumps(out, indent=2))
    for name, items in (("5xx", stats.server_errors), ("positive rejections", stats.positive_rejections)):
        for item in items[:10]:
            print(f"{name}: {item}")
    return 0 if not (stats.server_errors or stats.positive_rejections or stats.bad_error_shape) else 1


def build_tiny(root: Path) -> str:
    """The tests' tiny Llama (conftest.make_checkpoint), built once under `root`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_checkpoint

    from nanoslg.model.demo import build_tokenizer

    path = root / "tiny_llama"
    if not (path / "config.json").exists():
        build_tokenizer(vocab_size=512, max_chars=200_000).save_pretrained(root / "tokenizer")
        make_checkpoint(str(root), "tiny_llama", root / "tokenizer", tie_word_embeddings=False)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
