"""Automation definitions: models, YAML loading, parameter schemas, expressions."""
