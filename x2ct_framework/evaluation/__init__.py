"""Evaluation: metrics, named protocols, scoring, reports and prediction."""
