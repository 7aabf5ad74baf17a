#!/usr/bin/env bash
# Install the system packages the SSH test harness needs (sshd, ip, rsync, and iptables
# for the serverless client's test of a head that only SSH reaches).
# Idempotent: does nothing when every binary is present; otherwise runs
# `apt-get update` once and installs only what is missing. Needs root (as in CI).
set -euo pipefail

declare -A want=(
  [/usr/sbin/sshd]=openssh-server
  [ip]=iproute2
  [rsync]=rsync
  [iptables]=iptables
)

missing=()
for bin in "${!want[@]}"; do
  if [[ "$bin" == /* ]]; then
    [[ -x "$bin" ]] && continue
  else
    command -v "$bin" >/dev/null 2>&1 && continue
  fi
  missing+=("${want[$bin]}")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Quiet on success; the whole apt output on failure.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$log" 2>&1; then
  echo "install-system-deps: installing ${missing[*]} failed:" >&2
  cat "$log" >&2
  exit 1
fi
mkdir -p /run/sshd
