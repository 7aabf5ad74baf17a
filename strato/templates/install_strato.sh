# Install {{ version }} into {{ venv }} once per version, safely when several nodes
# share this home directory (NFS): the first node to take the lock installs, the others
# wait for it and then find the done marker.
set -eu
venv={{ venv }}
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if ! flock -w {{ lock_timeout }} 9; then
  echo "strato: gave up waiting for $venv.lock after {{ lock_timeout }}s" >&2
  exit 1
fi
if [ -f "$venv/.strato-installed" ]; then
  echo "{{ version }} is already installed in $venv"
  exit 0
fi
rm -rf "$venv"
{{ base_python }} -m venv {{ venv_args }} "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet {{ pip_args }} {{ wheel }}
"$venv/bin/python" -c "import strato.cli"
touch "$venv/.strato-installed"
echo "installed {{ version }} in $venv"
