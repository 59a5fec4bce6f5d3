"""``install --takeover``: cut over from a legacy unit that binds the public port itself.
``runner`` runs the plan (and resumes a killed run); ``cutover`` is what PID 1 runs for the
moment the legacy unit stops and the socket binds."""
