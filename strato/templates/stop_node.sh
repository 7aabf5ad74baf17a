# Stop everything strato runs on this node: the monitor (head only) and the runtime.
{{ stop_monitor }}
for py in {{ pythons }}; do
  if [ -x "$py" ] || command -v "$py" >/dev/null 2>&1; then
    "$py" -m strato.cli stop --temp-dir {{ temp_dir }}
    break
  fi
done
rm -rf {{ cleanup_dirs }}
