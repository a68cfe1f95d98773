"""The OpenAI-compatible HTTP server (Litestar on the engine's event loop); no torch here."""
