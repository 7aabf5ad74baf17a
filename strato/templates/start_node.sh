# (Re)start this node's strato runtime: stop the one running from the same temp dir (by
# the pids in its node files), then start a fresh one. The token comes in STRATO_TOKEN.
set -eu
{{ python }} -m strato.cli stop --temp-dir {{ temp_dir }} >/dev/null 2>&1 || true
exec {{ python }} -m strato.cli start --temp-dir {{ temp_dir }} {{ start_args }}
