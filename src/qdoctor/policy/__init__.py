"""Policies: evidence per layer, layer selection, recipes and the automatic plan search."""
