"""Stage 4: validate transforms, fold them into a checkpoint, and prove the fold kept the function."""
