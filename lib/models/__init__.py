"""Loading HF models the real way, and the per-family adapters that hold all architecture knowledge."""
