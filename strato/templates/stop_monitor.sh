# Stop the cluster monitor by the pid in its pid file, if that pid still is the monitor,
# and wait until it has exited: `down` terminates nodes only after this succeeded.
# A subshell, so that `exit` never ends a script this is inlined into.
(
  pidfile={{ pid_file }}
  is_monitor() {
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'strato.launcher.monitor'
  }
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && is_monitor "$pid"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do is_monitor "$pid" || break; sleep 0.1; done
      if is_monitor "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do is_monitor "$pid" || break; sleep 0.1; done
      fi
      if is_monitor "$pid"; then
        echo "strato: the monitor (pid $pid) did not exit" >&2
        exit 1
      fi
      echo "monitor stopped (pid $pid)"
    fi
    rm -f "$pidfile"
  fi
)
