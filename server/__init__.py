"""Coordinates federated rounds over MQTT and aggregates sparse updates."""
