"""Running as a service: systemd notify and watchdog, metrics, logs, installation, ``run``."""
