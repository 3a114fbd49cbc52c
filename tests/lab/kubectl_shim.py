"""A stand-in for kubectl that runs deploy/smoke-test.sh against a lab node.

Only the kubectl layer is replaced: the agent, its BPF programs, the pods' glibc and dig and
the "kube-dns" dnsmasq are the real ones.  Each verb the smoke test uses maps onto the lab:

* ``exec POD -- CMD`` runs CMD in the lab pod's network namespace (``ip netns exec`` shows it
  the pod's resolv.conf); ``exec <agent> -- CMD`` runs CMD inside the agent's own mount and
  network namespaces with the agent's environment and capability set, as ``kubectl exec``
  into the DaemonSet's container would;
* ``get --raw .../pods/NAME:PORT/proxy/PATH`` fetches http://127.0.0.1:PORT/PATH in the node
  namespace (the agent listens on 0.0.0.0 there, as on a node);
* ``rollout status`` waits for the agent's /readyz; ``get`` returns the lab's names;
  namespace and pod creation are no-ops (the lab pods exist already).

Configuration: a JSON file named by $SHIM_CONFIG (written by the test).  Unknown commands fail
loudly, so the smoke script cannot silently drift from what is tested here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

FETCH = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
    "except urllib.error.HTTPError as e:\n"
    "    sys.stdout.write(e.read().decode()); sys.exit(1)\n"
    "sys.stdout.write(r.read().decode())\n"
)


def die(msg: str) -> NoReturn:
    sys.stderr.write(f"kubectl-shim: {msg}\n")
    sys.exit(2)


def parse(argv: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """(namespace, positional words, --flag=value options) of a kubectl command line."""
    ns = None
    words: list[str] = []
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            words.append("--")
            words.extend(argv[i + 1 :])
            break
        if a in ("-n", "--namespace", "--context", "-l", "-o", "--field-selector", "--raw"):
            value = argv[i + 1]
            if a in ("-n", "--namespace"):
                ns = value
            else:
                opts[a] = value
            i += 2
            continue
        if a.startswith("--"):
            key, _, value = a.partition("=")
            opts[key] = value
        else:
            words.append(a)
        i += 1
    return ns, words, opts


def fetch(cfg: dict[str, Any], port: str, path: str) -> tuple[int, str]:
    r = subprocess.run(
        ["ip", "netns", "exec", cfg["node_netns"], sys.executable, "-c", FETCH]
        + [f"http://127.0.0.1:{port}/{path}"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return r.returncode, r.stdout


def agent_exec(cfg: dict[str, Any], cmd: list[str]) -> int:
    """CMD as `kubectl exec` into the agent's container would run it."""
    pid = cfg["agent_pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = [e.decode() for e in environ if e]
    if cmd[0] == "interceptor":  # the image's console script is this venv's
        cmd = [cfg["python"], "-m", "interceptor", *cmd[1:]]
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "-n", *cfg["setpriv"], "env", "-i", *env, *cmd],
        cwd="/",
        timeout=60,
    ).returncode


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(os.environ["SHIM_CONFIG"]).read_text())
    ns, words, opts = parse(argv)
    verb = words[0] if words else ""
    agent = cfg["agent_name"]
    if verb == "rollout" and words[1:3] == ["status", "ds/dns-interceptor"]:
        deadline = time.monotonic() + 30
        while fetch(cfg, cfg["health_port"], "readyz")[0] != 0:
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.5)
        print('daemon set "dns-interceptor" successfully rolled out')
        return 0
    if verb == "get" and "--raw" in opts:
        m = re.fullmatch(
            r"/api/v1/namespaces/kube-system/pods/([^/:]+):(\d+)/proxy/(.*)", opts["--raw"]
        )
        if not m or m.group(1) != agent:
            die(f"unexpected raw path {opts['--raw']}")
        rc, body = fetch(cfg, m.group(2), m.group(3))
        sys.stdout.write(body)
        return rc
    if verb == "get" and words[1:2] == ["pods"] and ns == "kube-system":
        print(agent)
        return 0
    if verb == "get" and words[1:2] == ["pod"]:
        key = f"{ns}/{words[2]}"
        if key not in cfg["pods"] or opts.get("-o") != "jsonpath={.spec.nodeName}":
            die(f"unexpected get pod {key} {opts}")
        sys.stdout.write(cfg["node_name"])
        return 0
    if verb == "get" and words[1:3] == ["service", "kubernetes"] and ns == "default":
        sys.stdout.write(cfg["kubernetes_ip"])
        return 0
    if verb in ("create", "delete") and words[1:2] == ["namespace"]:
        return 0
    if verb == "run":
        key = f"{ns}/{words[1]}"
        if key not in cfg["pods"] or not opts.get("--image"):
            die(f"unexpected run {key} {opts}")
        return 0
    if verb == "wait" and opts.get("--for") == "condition=Ready":
        return 0 if f"{ns}/{words[1].removeprefix('pod/')}" in cfg["pods"] else 1
    if verb == "exec":
        cmd = words[words.index("--") + 1 :]
        if ns == "kube-system" and words[1] == agent:
            return agent_exec(cfg, cmd)
        key = f"{ns}/{words[1]}"
        if key not in cfg["pods"]:
            die(f"no pod {key}")
        return subprocess.run(
            ["ip", "netns", "exec", cfg["pods"][key], *cmd], timeout=60
        ).returncode
    die(f"unsupported command: kubectl {' '.join(argv)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
