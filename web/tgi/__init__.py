"""The Hugging Face Inference API / TGI-compatible surface under /models."""
