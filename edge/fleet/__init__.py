"""Fleet management over MQTT: signed envelopes, the gateway's agent, the operator's commands."""
