"""Bootstrap scripts and per-provider defaults (rendered, never string-built in code)."""
