"""A stand-in for the k3s binary, for tests: records how it was started and behaves like k3s at start.

- Every start appends one JSON line ``{"argv", "env", "config", "pid"}`` (``env``: the ``K3S_*``
  variables) to ``fake-k3s-calls.jsonl`` beside the config file it reads (``K3S_CONFIG_FILE``,
  ``--config``, or ``/etc/rancher/k3s/config.yaml``).
- ``server``: a joining server (``K3S_URL`` or ``server:``) needs a token, as k3s does. Then it writes
  the node token into ``<data-dir>/server/node-token`` (keeping an existing one, or the one it joined
  with) and an admin kubeconfig pointing at ``https://127.0.0.1:6443`` into ``write-kubeconfig``.
- ``agent``: exits 1 with k3s's complaint unless a server URL and a token are set.
- Then it runs until SIGTERM, like the daemon, unless ``FAKE_K3S_ONESHOT=1``.
- ``FAKE_K3S_IGNORE_TERM=1``: it ignores SIGTERM (set before the start is recorded), like a k3s
  slow to stop: only SIGKILL ends it.
"""

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import yaml


def config_path(argv):
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
        if arg in ("--config", "-c") and index + 1 < len(argv):
            return Path(argv[index + 1])
    return Path(os.environ.get("K3S_CONFIG_FILE") or "/etc/rancher/k3s/config.yaml")


def write(path, text, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


KUBECONFIG = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
"""


def main():
    if os.environ.get("FAKE_K3S_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    argv = sys.argv[1:]
    mode = argv[0] if argv else ""
    path = config_path(argv)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        config = {}
    record = {
        "argv": sys.argv,
        "env": {k: v for k, v in os.environ.items() if k.startswith("K3S_")},
        "config": config,
        "pid": os.getpid(),
    }
    with open(path.parent / "fake-k3s-calls.jsonl", "a") as calls:
        calls.write(json.dumps(record) + "\n")
    url = os.environ.get("K3S_URL") or config.get("server")
    token = os.environ.get("K3S_TOKEN") or config.get("token")
    if mode == "agent":
        if not url or not token:
            print(
                'level=fatal msg="--server is required"' if not url else 'level=fatal msg="--token is required"', file=sys.stderr
            )
            return 1
        if not str(url).startswith("https://"):
            print(f'level=fatal msg="server URL must be https: {url}"', file=sys.stderr)
            return 1
    elif mode == "server":
        if url and not token:
            print('level=fatal msg="--token is required when joining a server"', file=sys.stderr)
            return 1
        data_dir = Path(config.get("data-dir") or "/var/lib/rancher/k3s")
        token_file = data_dir / "server" / "node-token"
        if not token_file.exists():
            token = token or f"K10{secrets.token_hex(32)}::server:{secrets.token_hex(16)}"
            write(token_file, token + "\n")
        kubeconfig = Path(config.get("write-kubeconfig") or "/etc/rancher/k3s/k3s.yaml")
        if not kubeconfig.exists():
            write(kubeconfig, KUBECONFIG.format(ca=secrets.token_hex(24), cert=secrets.token_hex(24), key=secrets.token_hex(24)))
    else:
        print(f"fake k3s: unknown command {mode!r}", file=sys.stderr)
        return 2
    if os.environ.get("FAKE_K3S_ONESHOT") == "1":
        return 0
    if os.environ.get("FAKE_K3S_IGNORE_TERM") != "1":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
