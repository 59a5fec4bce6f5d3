# Type stubs for systemd-python (ships no type information): only what alive-switch uses.
