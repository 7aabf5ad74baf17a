# Start the cluster monitor in the background (detached from this session), replacing a
# previous one. It writes its own pid file once running; wait for that.
set -eu
dir={{ monitor_dir }}
mkdir -p "$dir"
chmod 700 "$dir"
{{ stop_monitor }}
rm -f "$dir/monitor.pid"
nohup setsid {{ python }} -m strato.launcher.monitor --spec "$dir/spec.json" \
  --pid-file "$dir/monitor.pid" >>"$dir/monitor.log" 2>&1 </dev/null &
for _ in $(seq 1 100); do
  [ -s "$dir/monitor.pid" ] && { echo "monitor running (pid $(cat "$dir/monitor.pid"))"; exit 0; }
  sleep 0.1
done
echo "strato: the monitor did not start; last lines of $dir/monitor.log:" >&2
tail -n 20 "$dir/monitor.log" >&2 || true
exit 1
