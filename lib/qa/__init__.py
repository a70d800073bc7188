"""Stage 5: QA metrics per checkpoint variant, the eval config, and the report."""
