"""The operations: what the CLI calls. Each works on one environment through a Site
(ops/site.py) and the adapters; nothing outside ops/ and the CLI imports this package."""
