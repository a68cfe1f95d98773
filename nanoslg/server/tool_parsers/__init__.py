"""Tool-call parsers for tool_choice=auto, one per model family's format (server.tool_parser=...):
each turns a completion's text into its content and its calls, and says while streaming how much of
the text is surely content."""
