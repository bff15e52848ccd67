"""The pure stream stages after decoding: windows, batches, normalization and prediction encoding.

They know nothing of MQTT or threads, so tests drive them with plain lists.
"""
