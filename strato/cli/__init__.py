"""The `strato` command: thin, calls launcher and runtime functions."""
