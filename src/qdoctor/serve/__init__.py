"""Serving: runtime profiles (what vLLM / transformers run) and the inference-cost model."""
