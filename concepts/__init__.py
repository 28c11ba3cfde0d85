"""Concept data and the space concepts live in: loaders, the synthetic world, models, embedding."""
