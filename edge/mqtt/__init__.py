"""The MQTT side: the connection (transport), the fast PUBLISH reader, topic matching.

The only package that imports paho; and only ``paho_seam`` touches paho's private names.
"""
