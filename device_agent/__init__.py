"""Runs on each device: measure it, derive the training budget, train the selected experts."""
