"""Whether the server takes a request now, and the 503s a client may retry (with Retry-After).

`server.max_waiting` bounds the backlog: waiting sequences the running batch has no place for. A
burst that an idle engine can take at once is no backlog, however many requests arrive together.
While the server drains (after SIGTERM/SIGINT) it still answers, with 503s, so clients learn to go
elsewhere instead of finding the port closed; a non-streamed request the drain cut short is a 503
too (a stream says so in its last chunk: finish_reason "abort").
"""

from __future__ import annotations

from nanoslg.server.errors import APIError

RETRY_OVERLOADED_S = 1  # a backlog clears within a few steps


def shutting_down(retry_after_s: float) -> APIError:
    return APIError(
        503,
        "the server is shutting down; retry the request (on another replica, or here once it is back)",
        code="server_shutting_down",
        headers={"Retry-After": str(max(1, round(retry_after_s)))},
    )


class Admission:
    def __init__(self, engine, server_cfg):
        self.engine = engine
        self.max_waiting = server_cfg.max_waiting
        self.shutdown_timeout = server_cfg.shutdown_timeout

    def check(self) -> None:
        """Raises a 503 when the engine is draining or its backlog is full."""
        if not self.engine.accepting:
            raise shutting_down(self.shutdown_timeout)
        backlog = self.engine.backlog
        if backlog >= self.max_waiting:
            raise APIError(
                503,
                f"the server is overloaded: {backlog} sequences wait for a place in the running batch "
                f"(server.max_waiting={self.max_waiting}); retry later",
                code="server_overloaded",
                headers={"Retry-After": str(RETRY_OVERLOADED_S)},
            )

    def check_finished(self, results: list) -> None:
        """A whole (non-streamed) answer that the drain aborted is not an answer: a 503 to retry."""
        if not self.engine.accepting and any(c.finish_reason == "abort" for r in results for c in r.outputs):
            raise shutting_down(self.shutdown_timeout)
