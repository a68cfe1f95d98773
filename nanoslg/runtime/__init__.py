"""One rank's step: the model runner, the CUDA-graph runner, and the start-up build (model, KV
backend, KV pool size, streams). Every parallel strategy builds its ranks from here."""
