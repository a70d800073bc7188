"""Storage: atomic writes, the one safetensors I/O path, shards + index, ledgers, runs, the corpus."""
