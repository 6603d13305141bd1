"""Optuna search over schedule and algorithm knobs, and its storage."""
