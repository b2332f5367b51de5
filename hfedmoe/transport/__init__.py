"""Bytes and topics over MQTT (or in memory): no torch in this package.

``base`` is the interface, ``memory`` its in-process twin, ``mqtt`` the paho implementation,
``broker`` the zero-setup embedded broker, ``topics`` the one place topics are spelled,
``chunks`` content-addressed transfer of large blobs, ``broker_config`` Mosquitto config/ACL.
"""

from hfedmoe.transport.base import Handler, Message, Transport

__all__ = ["Handler", "Message", "Transport"]
