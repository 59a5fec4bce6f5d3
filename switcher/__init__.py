"""alive-switch: zero-downtime blue/green deploys for systemd-run web apps."""

__version__ = "0.1.0"
