"""Evaluation of trained models, as the evaluate stage runs it."""
