"""The pipeline's typed config and the small decisions its flow asks of lib."""
