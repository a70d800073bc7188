"""Stage 1: capture activations (+ token ids, logits) into checksummed shards (torch / vLLM)."""
