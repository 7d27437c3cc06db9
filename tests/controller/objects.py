"""Kubernetes-shaped object builders for controller tests."""


def namespace(name, meshed=True, labels=None):
    lbl = dict(labels or {})
    if meshed:
        lbl["shoal.io/mesh"] = "enabled"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": lbl}}


def pod(ns, name, node="node-1", ip="10.244.1.2", sa="default", labels=None, phase="Running",
        ports=None):
    container = {"name": "main", "command": ["sleep", "1"]}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [container]},
            "status": {"phase": phase, "podIP": ip}}


def service(ns, name, selector, port=80, target=8080, ip="10.96.0.10", labels=None):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
            "spec": {"selector": selector, "clusterIP": ip,
                     "ports": [{"name": "p", "port": port, "targetPort": target}]}}


def policy(ns, name, action="ALLOW", selector=None, rules=None):
    spec = {"action": action, "rules": rules if rules is not None else [{}]}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def peer_auth(ns, name, mode, selector=None):
    spec = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.shoal.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def added(*objs):
    return [("ADDED", o) for o in objs]
