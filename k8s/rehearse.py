#!/usr/bin/env python3
"""Turns a rendered overlay into local processes, one per pod, for the cluster
rehearsal (cli/tests/rehearsal.rs): what each pod's container would run, with the
environment the kubelet would give it, its mounted files written under a directory
of this machine.

For every replica of every Deployment and StatefulSet it prints (JSON, one object per
pod): the pod name (StatefulSet ordinals, distinct names for Deployment replicas), its
address, the command line with $(VAR) expanded, the environment (ConfigMap and Secret
values resolved, POD_NAME from metadata.name), the working directory, the grace
period, the gRPC health probe (port and service) of its readinessProbe, the uid and
gid of its securityContext, the local directories of its mounts, and with --net
netns the hosts file the pod gets.

Files: mounted ConfigMaps and Secrets are written to ROOT/pods/<pod>/<mount path>,
volume claims become ROOT/volumes/<pod>/<claim> (kept across a pod's restarts, as a
PersistentVolume is), emptyDirs ROOT/pods/<pod>/<mount path>; every path under a mount
path in the command line, the environment and the mounted files is rewritten to match.
--secret NAME/KEY=FILE supplies the data of a Secret no overlay makes (spur-tls).

Networking, two ways:
- --net netns: each pod runs in a network namespace of its own (the test makes them)
  with address SUBNET.2, SUBNET.3, ... on a bridge whose SUBNET.1 is the "node". Its
  hosts file maps every Service name (name, name.<namespace>, .svc, .svc.cluster.local)
  to the address of the pod the Service selects, and the pod's own name to its
  address; nothing is rewritten: the manifests' URLs and 0.0.0.0 listeners work as
  they are. A Service whose port differs from its target port cannot be emulated by
  names alone and is refused.
- --net loopback (where namespaces are unavailable): each pod gets a loopback address
  of its own (127.0.0.2, 127.0.0.3, ...; Linux routes all of 127/8 to lo), and every
  "0.0.0.0:" becomes "<pod address>:", and every URL naming a Service
  ("//spur-learner:50051", also qualified) becomes "//<pod address>:<target port>",
  in the command line, the environment and the mounted files.
Either way a Service is its one selected pod (no virtual IP, no load balancing), names
come from hosts files or rewriting rather than DNS, and NetworkPolicies are not
enforced.

usage: python k8s/rehearse.py --overlay dev --root DIR [--net netns --subnet 10.244.0]
           [--env K=V ...] [--secret NAME/KEY=FILE ...] [--kubectl kubectl]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402  (the renderer, env resolution and $(VAR) expansion)


def service_names(svc, namespace):
    """Every name a pod may use for a Service."""
    name = svc["metadata"]["name"]
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.cluster.local"]


def service_targets(ov, ips):
    """{(host, port): (ip, target port)} for every Service name a URL may use."""
    out = {}
    for svc in ov.services():
        pods = [(wl, ip) for (wl, _pod), ip in ips.items() if check.service_selects(svc, wl)]
        if not pods:
            continue
        wl, ip = pods[0]  # one-replica StatefulSets behind every Service spur calls
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort", p["port"])
            cp = next((check.container_port(c, target) for c in wl.containers()
                       if check.container_port(c, target)), None)
            if cp is None:
                continue
            for host in service_names(svc, ov.namespace):
                out[(host, p["port"])] = (ip, cp[0])
    return out


def hosts_file(ov, ips, pod, ip, targets):
    """/etc/hosts of one pod in its own network namespace: itself, then every Service
    name at the address of the pod behind it (and a StatefulSet pod's name under its
    governing Service)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost", f"{ip}\t{pod}"]
    for (host, port), (tip, tport) in sorted(targets.items()):
        if port != tport:
            sys.exit(f"Service {host} port {port} targets container port {tport}: "
                     "--net netns maps names to pods, not ports")
    seen = set()
    for (host, _port), (tip, _tport) in sorted(targets.items()):
        if host not in seen:
            seen.add(host)
            lines.append(f"{tip}\t{host}")
    for (wl, other), oip in ips.items():
        governing = wl.spec.get("serviceName")
        if wl.kind == "StatefulSet" and governing:
            ns = ov.namespace
            lines.append(f"{oip}\t{other}.{governing} {other}.{governing}.{ns}.svc "
                         f"{other}.{governing}.{ns}.svc.cluster.local")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlay", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--net", choices=("loopback", "netns"), default="loopback")
    ap.add_argument("--subnet", default="10.244.0",
                    help="with --net netns: pods get SUBNET.2, SUBNET.3, ...")
    ap.add_argument("--env", action="append", default=[],
                    help="K=V added to every spur container's env (as an overlay patch would)")
    ap.add_argument("--secret", action="append", default=[],
                    help="NAME/KEY=FILE: a key of a Secret the overlay does not make")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    overlay_dir = check.K8S / "overlays" / args.overlay
    kust = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    _text, objs = check.render(args.kubectl, overlay_dir)
    ov = check.Overlay(args.overlay, objs, kust)
    contract = {s["metadata"]["name"]: set(check.secret_data(s))
                for s in ov.by_kind.get("Secret", {}).values()}
    ap_secrets = {}
    for spec in args.secret:
        ref, path = spec.split("=", 1)
        name, key = ref.split("/", 1)
        ap_secrets.setdefault(name, {})[key] = Path(path).read_text()
    extra = [kv.split("=", 1) for kv in args.env]

    # Pods and their addresses: StatefulSets first (learner, reward service), then
    # Deployments, in the order kustomize wrote them.
    order = sorted(ov.workloads, key=lambda w: w.kind != "StatefulSet")
    ips, n = {}, 2
    for wl in order:
        for i in range(wl.spec.get("replicas", 1)):
            pod = f"{wl.name}-{i}" if wl.kind == "StatefulSet" else f"{wl.name}-5d8f7c9b4-{i:05d}"
            ips[(wl, pod)] = f"{args.subnet}.{n}" if args.net == "netns" else f"127.0.0.{n}"
            n += 1
    services = service_targets(ov, ips)

    def rewrite_addresses(s, ip):
        if args.net == "netns":
            return s  # names resolve through the pod's hosts file
        s = s.replace("0.0.0.0:", f"{ip}:")
        for (host, port), (tip, tport) in services.items():
            s = s.replace(f"//{host}:{port}", f"//{tip}:{tport}")
        return s

    pods = []
    for (wl, pod), ip in ips.items():
        c = wl.pod["containers"][0]
        if not check.spur_role(c):
            continue
        wl.pod_name = lambda pod=pod: pod
        env = check.container_env(ov, wl, c, contract)
        for k, v in extra:
            env[k] = v
        argv = [check.expand(a, env) for a in list(c["command"]) + list(c.get("args") or [])]
        volumes = {v["name"]: v for v in wl.pod.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in wl.spec.get("volumeClaimTemplates") or []}
        mounts, files = {}, {}
        for m in c.get("volumeMounts") or []:
            mp = m["mountPath"].rstrip("/")
            if m["name"] in claims:
                local = root / "volumes" / pod / m["name"]
            else:
                local = root / "pods" / pod / mp.lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            mounts[mp] = str(local)
            v = volumes.get(m["name"], {})
            source = None
            if "configMap" in v:
                source = v["configMap"]
                data = (ov.get("ConfigMap", source["name"]) or {}).get("data") or {}
            elif "secret" in v:
                source = v["secret"]
                made = ov.get("Secret", source["secretName"])
                data = check.secret_data(made) if made else ap_secrets.get(
                    source["secretName"])
                if data is None:
                    sys.exit(f"{pod} mounts Secret {source['secretName']}, which the overlay "
                             "does not make: pass its keys with --secret")
            if source is not None:
                items = source.get("items")
                pairs = [(i["path"], data[i["key"]]) for i in items] if items else data.items()
                for rel, text in pairs:
                    files[local / rel] = text
        by_len = sorted(mounts, key=len, reverse=True)

        def relocate(s):
            for mp in by_len:
                if s == mp or s.startswith(mp + "/"):
                    return mounts[mp] + s[len(mp):]
            return s

        # Quoted paths in mounted files (spur.toml's store, say), in one pass so
        # that a relocated path is not relocated again.
        quoted = re.compile('"(' + "|".join(re.escape(mp) for mp in by_len) + ')(?=[/"])')

        def relocate_text(text):
            return quoted.sub(lambda m: '"' + mounts[m.group(1)], text) if by_len else text

        for path, text in files.items():
            path.write_text(rewrite_addresses(relocate_text(text), ip))
        argv = [rewrite_addresses(relocate(a), ip) for a in argv]
        env = {k: rewrite_addresses(relocate(v), ip) for k, v in env.items()}
        probe = (c.get("readinessProbe") or {}).get("grpc")
        security = {**(wl.pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
        workdir = c.get("workingDir", check.IMAGE_WORKDIR)
        pods.append({
            "pod": pod,
            "workload": wl.name,
            "role": check.spur_role(c),
            "ip": ip,
            "argv": argv,
            "env": env,
            # The image's working directory holds what the repository root does.
            "cwd": str(check.ROOT) if workdir == check.IMAGE_WORKDIR else relocate(workdir),
            "grace_s": wl.pod.get("terminationGracePeriodSeconds", 30),
            # The user the container runs as, and the directories its mounts became
            # (what a kubelet would make writable to it through fsGroup).
            "run_as": None if security.get("runAsUser") is None else {
                "uid": security["runAsUser"],
                "gid": security.get("runAsGroup", security["runAsUser"])},
            "mounts": sorted(set(mounts.values())),
            "health": None if probe is None else {
                "addr": f"{ip}:{probe['port']}", "service": probe.get("service", "")},
        })
        if args.net == "netns":
            pods[-1]["hosts"] = hosts_file(ov, ips, pod, ip, services)
    json.dump(pods, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
