"""Stages: each composes models, rewards and data into one CLI command."""
