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


SHARE_PREFIX = "$share/"
"""An MQTT 5 shared subscription: ``$share/{group}/{filter}`` (also accepted by mosquitto, EMQX and
HiveMQ from MQTT 3.1.1 clients, as a broker extension)."""


def shared_group(topic_filter: str) -> str | None:
    """The share group of a shared subscription ('$share/group/filter' → 'group'), else None."""
    if topic_filter.startswith(SHARE_PREFIX):
        parts = topic_filter.split("/", 2)
        return parts[1] if len(parts) == 3 else None
    return None


def shared_subscription_filter(topic_filter: str) -> str:
    """The plain filter inside a shared subscription ('$share/group/filter' → 'filter').

    The broker delivers a shared subscription's messages with their own topics, so routing
    matches them against this plain filter.
    """
    if topic_filter.startswith(SHARE_PREFIX):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def shared_filter_error(topic_filter: str) -> str | None:
    """Why TOPIC_FILTER is not a usable shared subscription, or None (also for a plain filter).

    The group is one level without '+' or '#' (MQTT 5, 4.8.2) and a filter must follow it.
    EMQX's older ``$queue/`` prefix is refused: routing would never match its messages.
    """
    if topic_filter.startswith("$queue/"):
        return (f"{topic_filter!r}: EMQX's $queue/ prefix is not supported; use "
                f"'$share/<group>/{topic_filter.removeprefix('$queue/')}'")
    if topic_filter != "$share" and not topic_filter.startswith(SHARE_PREFIX):
        return None
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        return (f"{topic_filter!r}: a shared subscription is $share/<group>/<filter>, e.g. "
                "'$share/floorline/plant/+/vibration'")
    if "+" in parts[1] or "#" in parts[1]:
        return f"{topic_filter!r}: the share group {parts[1]!r} may not hold '+' or '#'"
    return None


def topic_level(topic: str, index: int) -> str | None:
    """TOPIC's level at INDEX (negative counts from the end), or None if missing or empty.

    How a pipeline names a message's asset from ``asset.topic_segment``.
    """
    levels = topic.split("/")
    try:
        return levels[index] or None
    except IndexError:
        return None
