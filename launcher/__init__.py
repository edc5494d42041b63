"""spindle launcher: runs the whole system as supervised local processes (the embedded mode)."""
