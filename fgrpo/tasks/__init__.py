"""Prompt sets, scene renderers and rule-based scorers that define the RL tasks."""
