"""Experiments that drive the server and the devices: the demo, the in-process simulator
(sequential or on Ray), and the protocol-level device swarm."""
