"""Evaluation: sample a model on prompt sets and measure concepts, content and quality with a judge."""
