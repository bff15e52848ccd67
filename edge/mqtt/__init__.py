"""The MQTT side: the connection (transport), the fast PUBLISH reader and topic matching.

The only package that imports paho.
"""
