"""``python -m switcher`` runs the CLI (used by retire timers when not run from a script)."""

from switcher.cli import main

main()
