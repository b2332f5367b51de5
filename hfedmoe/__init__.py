"""HFedMoE edge kit: the shared core (model adapters, the paper's equations, wire format, transport)."""

__version__ = "0.1.0"
