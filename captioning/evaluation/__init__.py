"""Evaluation: caption metrics, scoring a run, figures."""
