"""Statistics: weight outliers, activation spikes and quantization error (pure functions)."""
