"""The node demo: a Kubernetes node built from network namespaces, pods with kube-style
resolv.conf, a kube-dns stand-in, and the agent capturing the pods' DNS with BPF."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from devlab.netns import Lab, PodSpec, sh
from interceptor.node.runtime import example_cluster

B, D, G, R = "\033[1m", "\033[2m", "\033[32m", "\033[0m"
POD = "frontend-7d4b9c-x2x8q"


def say(text: str) -> None:
    print(f"\n{B}{text}{R}")


def why(text: str) -> None:
    print(f"{D}  {text}{R}")


def show(lab: Lab, pod: str, *cmd: str) -> str:
    print(f"{G}  [{pod}]$ {' '.join(cmd)}{R}")
    r = lab.run_in_pod(pod, *cmd, timeout=20)
    out = r.stdout.strip() or r.stderr.strip()
    for ln in out.splitlines():
        print("    " + ln)
    return out


def dig(lab: Lab, pod: str, *args: str) -> str:
    """dig with the lines a newcomer needs: status, answers, and who replied."""
    print(f"{G}  [{pod}]$ dig {' '.join(args)}{R}")
    r = lab.run_in_pod(pod, "dig", "+time=2", "+tries=1", *args, timeout=20)
    keep = []
    for ln in r.stdout.splitlines():
        if "status:" in ln:
            keep.append(ln.split(", id")[0].replace(";; ->>HEADER<<- ", ""))
        elif ln.startswith(";; SERVER:"):
            keep.append(ln[3:])
        elif ln.strip() and not ln.startswith(";"):
            keep.append(ln)
    for ln in keep:
        print("    " + ln)
    return r.stdout


def run_node_demo() -> int:
    lab = Lab("demo", [PodSpec(POD, "10.244.1.10", "shop"), PodSpec("db-0", "10.244.1.20", "shop")])
    pin = Path("/sys/fs/bpf/interceptor-demo")
    try:
        say("1. A node with two pods, built from network namespaces")
        lab.up()
        why(
            "pods get kube-style /etc/resolv.conf: nameserver 10.96.0.10, search "
            "shop.svc.cluster.local svc.cluster.local cluster.local, options ndots:5"
        )
        show(lab, POD, "cat", "/etc/resolv.conf")

        say(
            "2. kube-dns at 10.96.0.10 (dnsmasq here): it knows the cluster's services and "
            "the outside world, but nothing about the mesh"
        )
        lab.start_upstream(
            "--host-record=www.example.org,192.0.2.1",
            "--host-record=frontend.shop.svc.cluster.local,10.96.10.10",
            "--host-record=cart.shop.svc.cluster.local,10.96.10.11",
            "--local=/cluster.local/",
        )
        dig(lab, POD, "api.payments.example.com")
        why("without the interceptor the mesh host does not resolve: kube-dns cannot know it")

        say("3. Start the agent: BPF on each pod's veth, resolver on 169.254.20.10, no iptables")
        t0 = time.monotonic()
        agent = lab.start_agent(example_cluster(), pin_dir=pin)
        why(f"ready in {time.monotonic() - t0:.1f}s; what it attached:")
        filters = sh("tc", "filter", "show", "dev", lab.host_veth(POD), "ingress", netns=lab.node)
        for ln in filters.stdout.splitlines():
            if "dnsi" in ln:
                print("    " + ln.split(" not_in_hw")[0])
        rules = sh("nft", "list", "ruleset", netns=lab.node, check=False).stdout.strip()
        why(f"nftables ruleset on the node: {'empty' if not rules else rules}")

        say("4. The pods change nothing, and their DNS is now answered on the node")
        show(lab, POD, "getent", "ahosts", "cart")
        why(
            "glibc walked the search path: cart.shop.svc.cluster.local, answered locally "
            "with both families of a dual-stack service"
        )
        dig(lab, POD, "api.payments.example.com")
        why(
            "the mesh host gets its Istio-style VIP, and the reply comes from 10.96.0.10: "
            "the pod cannot tell the difference"
        )
        dig(lab, "db-0", "+tcp", "db.shop.svc.cluster.local")
        why("TCP works too: every segment is rewritten both ways")
        dig(lab, POD, "www.example.org")
        why("not a cluster name: forwarded to the server the pod asked (10.96.0.10)")
        dig(lab, POD, "example.com.shop.svc.cluster.local")
        why("ndots:5 junk never leaves the node: NXDOMAIN at once")

        say("5. Fail open: kill the agent with SIGKILL")
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        t0 = time.monotonic()
        out = dig(lab, POD, "frontend.shop.svc.cluster.local")
        why(
            f"answered by kube-dns {time.monotonic() - t0:.2f}s after the kill: the BPF "
            "program found no resolver socket and let the packet through untouched"
        )
        print(
            f"\n{B}Done.{R} Everything is being cleaned up.  `make test` runs all of this as "
            "tests; the README has the details."
        )
        return 0 if "10.96.10.10" in out else 1
    finally:
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)
