"""Configuration: the recipe document, its schema, building components from it, optimizers."""
