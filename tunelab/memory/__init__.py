"""Memory planning: estimator, catalog of architectures, measurement, advisor and linter."""
