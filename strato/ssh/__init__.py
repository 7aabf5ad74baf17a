"""The one SSH transport, used by providers and the launcher alike.

- ``connect``: where to connect (the tests' address map), host keys pinned per cluster
  and node on first contact and verified after (``HostKeyMismatchError``), the
  connection pool, waiting for a booting machine's sshd;
- ``commands``: run a command with bash, output streamed line by line, env never shown;
- ``files``: copy files and directories both ways over SFTP (like ``cp -rT``);
- ``terminal``: give the local terminal to a shell on the node;
- ``tunnel``: a socket to a port on the node's side (a ``direct-tcpip`` channel).

The names below are the public surface; import them from ``strato.ssh``.
"""

from strato.ssh.commands import (
    TAIL_LINES,
    CommandTimeoutError,
    LineCallback,
    print_line,
    run,
    silent,
)
from strato.ssh.connect import (
    ADDRESS_MAP_ENV,
    ADDRESS_MAP_STRICT_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    KEY_REFUSED_TIMEOUT,
    KEY_REFUSED_TIMEOUT_ENV,
    AddressNotMappedError,
    SSHTarget,
    close_all,
    disconnect,
    fingerprint,
    forget_host_keys,
    host_key_file,
    key_refused_timeout,
    known_host_name,
    known_hosts_path,
    pin_host_key,
    pinned_hosts_path,
    resolve_address,
    set_address_map,
    wait_for_ssh,
)
from strato.ssh.files import FileTransferError, get, put
from strato.ssh.terminal import interactive_shell, ssh_command_line
from strato.ssh.tunnel import open_tunnel

__all__ = [
    "ADDRESS_MAP_ENV",
    "ADDRESS_MAP_STRICT_ENV",
    "DEFAULT_CONNECT_TIMEOUT",
    "KEY_REFUSED_TIMEOUT",
    "KEY_REFUSED_TIMEOUT_ENV",
    "TAIL_LINES",
    "AddressNotMappedError",
    "CommandTimeoutError",
    "FileTransferError",
    "LineCallback",
    "SSHTarget",
    "close_all",
    "disconnect",
    "fingerprint",
    "forget_host_keys",
    "get",
    "host_key_file",
    "interactive_shell",
    "key_refused_timeout",
    "known_host_name",
    "known_hosts_path",
    "open_tunnel",
    "pin_host_key",
    "pinned_hosts_path",
    "print_line",
    "put",
    "resolve_address",
    "run",
    "set_address_map",
    "silent",
    "ssh_command_line",
    "wait_for_ssh",
]
