"""CUDA-graph capture for start-up's many graphs in a row.

`torch.cuda.graph` synchronizes the device and empties the device and pinned-host caching
allocators before every capture, so that one capture has the most memory free. Start-up captures
hundreds of graphs in a row (a piece per layer per token count, a decode graph per batch bucket):
there each clean-up hands back the blocks the warm-up before it cached, and the next warm-up asks
the driver for them again. A Capturer gives the same graphs with the stream ordering only, and
empties the cache once, when the last graph is captured.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class Capturer:
    """Captures into one private memory pool, on one side stream ordered after the caller's."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    @contextmanager
    def capture(self, graph: torch.cuda.CUDAGraph):
        """Records the kernels the body queues into `graph` (run nothing on the device meanwhile)."""
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # the capture's inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                yield
            finally:
                graph.capture_end()
        caller.wait_stream(self.stream)

    def done(self) -> None:
        """After the last capture: the warm-ups' cached blocks go back to the driver."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
