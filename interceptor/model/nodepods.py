"""Which pods of this node get their DNS captured: a pure function of the service map.

Never captured, so that no forwarding loop can form and nobody is surprised:
* hostNetwork pods (they share the node's stack: there is no veth to attach to);
* DNS-server pods: endpoints of the cluster DNS service, pods labelled ``k8s-app=kube-dns``,
  or annotated ``dns-interceptor.io/dns-server: "true"``;
* pods annotated ``dns-interceptor.io/capture: "false"``;
* pods in namespaces labelled ``dns-interceptor.io/capture=disabled``.
"""

from __future__ import annotations

from dataclasses import dataclass

from interceptor.model.objects import EndpointSlice, Namespace, Pod
from interceptor.model.servicemap import ServiceMap

OPT_OUT_ANNOTATION = "dns-interceptor.io/capture"
OPT_OUT_NAMESPACE_LABEL = "dns-interceptor.io/capture"
DNS_SERVER_ANNOTATION = "dns-interceptor.io/dns-server"
DNS_SERVER_LABELS = {("k8s-app", "kube-dns")}


@dataclass(frozen=True, slots=True)
class NodePod:
    namespace: str
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Skipped:
    namespace: str
    name: str
    why: str


def node_pods(smap: ServiceMap, node: str) -> tuple[list[NodePod], list[Skipped]]:
    """(pods to capture, pods of this node left alone with the reason)."""
    dns_ns, _, dns_name = smap.settings.dns_service.partition("/")
    dns_ips: set[str] = set()
    disabled_ns: set[str] = set()
    pods: list[Pod] = []
    for obj in smap.objects.values():
        if isinstance(obj, EndpointSlice) and obj.namespace == dns_ns and obj.service == dns_name:
            for ep in obj.endpoints:
                dns_ips.update(ep.addresses)
        elif isinstance(obj, Namespace):
            if dict(obj.labels).get(OPT_OUT_NAMESPACE_LABEL) == "disabled":
                disabled_ns.add(obj.name)
        elif isinstance(obj, Pod) and obj.node_name == node:
            pods.append(obj)
    keep: list[NodePod] = []
    skipped: list[Skipped] = []
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        annotations = dict(pod.annotations)
        why = None
        if pod.host_network:
            why = "hostNetwork"
        elif (
            annotations.get(DNS_SERVER_ANNOTATION) == "true"
            or DNS_SERVER_LABELS & set(pod.labels)
            or dns_ips & set(pod.ips)
        ):
            why = "DNS server"
        elif annotations.get(OPT_OUT_ANNOTATION) == "false":
            why = f"annotation {OPT_OUT_ANNOTATION}=false"
        elif pod.namespace in disabled_ns:
            why = f"namespace label {OPT_OUT_NAMESPACE_LABEL}=disabled"
        elif not pod.ips:
            why = "no IP yet"
        if why is None:
            keep.append(NodePod(pod.namespace, pod.name, pod.ips))
        else:
            skipped.append(Skipped(pod.namespace, pod.name, why))
    return keep, skipped


def node_pod_ips(smap: ServiceMap, node: str) -> set[str]:
    """Every address the API gives a pod of this node, captured or not."""
    return {
        ip
        for obj in smap.objects.values()
        if isinstance(obj, Pod) and obj.node_name == node
        for ip in obj.ips
    }
