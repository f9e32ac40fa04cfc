"""Hearing back from production: the request log and feedback, output checks, drift, canary rollouts."""
