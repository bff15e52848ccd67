"""MQTT topic filter matching, for routing messages to pipelines without asking paho."""

from __future__ import annotations


def matches(topic_filter: str, topic: str) -> bool:
    """True when TOPIC matches TOPIC_FILTER by MQTT rules ('+' one level, '#' the rest).

    Topics starting with '$' (broker internals such as $SYS) are not matched by a filter starting
    with a wildcard, as the MQTT specification requires.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level not in ("+", t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def shared_subscription_filter(topic_filter: str) -> str:
    """The plain filter inside an MQTT 5 shared subscription ('$share/group/filter')."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter
