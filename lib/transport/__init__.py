"""Stage 3: streaming float64 moments, Procrustes / PCA transports, head and neuron permutations."""
