"""Decoders: payload bytes to samples, one plugin per wire format."""
