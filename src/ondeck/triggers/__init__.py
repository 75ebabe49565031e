"""Verifying and decoding what arrives from outside: webhooks, Alertmanager, Slack."""
