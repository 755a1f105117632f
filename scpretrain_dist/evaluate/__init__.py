"""Metrics, splits, evaluation protocols and the report."""
