"""Data: group sources, tokenizers, the packed-sequence cache, and the mixture sampler."""
