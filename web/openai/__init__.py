"""The OpenAI-compatible surface under /v1: completions, chat, files and batches."""
