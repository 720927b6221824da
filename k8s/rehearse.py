#!/usr/bin/env python3
"""Turns a rendered overlay into local processes, one per pod, for the cluster
rehearsal (cli/tests/rehearsal.rs): what each pod's container would run, with the
environment the kubelet would give it, its mounted files written under a directory
of this machine.

For every replica of every Deployment and StatefulSet it prints (JSON, one object per
pod): the pod name (StatefulSet ordinals, distinct names for Deployment replicas), a
loopback address of its own (127.0.0.2, 127.0.0.3, ...; Linux routes all of 127/8 to
lo), the command line with $(VAR) expanded, the environment (ConfigMap and Secret
values resolved, POD_NAME from metadata.name), the working directory, the grace
period and the gRPC health probe (port and service) of its readinessProbe.

Files: mounted ConfigMaps are written to ROOT/pods/<pod>/<mount path>, volume claims
become ROOT/volumes/<pod>/<claim> (kept across a pod's restarts, as a PersistentVolume
is), emptyDirs ROOT/pods/<pod>/<mount path>; every path under a mount path in the
command line, the environment and the mounted files is rewritten to match.

Networking, emulated by rewriting addresses: there are no network namespaces here, so
each pod gets its own loopback address instead, and every "0.0.0.0:" (listen on all
of the pod's interfaces) becomes "<pod address>:", and every URL naming a Service
("//spur-learner:50051", also with .<namespace>[.svc[.cluster.local]]) becomes
"//<address of the pod it selects>:<target port>", in the command line, the
environment and the mounted files. A real cluster resolves the names with DNS and
routes a virtual IP; NetworkPolicies are not enforced.

usage: python k8s/rehearse.py --overlay dev --root DIR [--env K=V ...] [--kubectl kubectl]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402  (the renderer, env resolution and $(VAR) expansion)


def service_targets(ov, ips):
    """{(host, port): (ip, target port)} for every Service name a URL may use."""
    out = {}
    for svc in ov.services():
        name = svc["metadata"]["name"]
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
            ns = ov.namespace
            for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc",
                         f"{name}.{ns}.svc.cluster.local"):
                out[(host, p["port"])] = (ip, cp[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlay", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--env", action="append", default=[],
                    help="K=V added to every spur container's env (as an overlay patch would)")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    overlay_dir = check.K8S / "overlays" / args.overlay
    kust = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    _text, objs = check.render(args.kubectl, overlay_dir)
    ov = check.Overlay(args.overlay, objs, kust)
    contract = {s["metadata"]["name"]: set(check.secret_data(s))
                for s in ov.by_kind.get("Secret", {}).values()}
    extra = [kv.split("=", 1) for kv in args.env]

    # Pods and their addresses: StatefulSets first (learner, reward service), then
    # Deployments, in the order kustomize wrote them.
    order = sorted(ov.workloads, key=lambda w: w.kind != "StatefulSet")
    ips, n = {}, 2
    for wl in order:
        for i in range(wl.spec.get("replicas", 1)):
            pod = f"{wl.name}-{i}" if wl.kind == "StatefulSet" else f"{wl.name}-5d8f7c9b4-{i:05d}"
            ips[(wl, pod)] = f"127.0.0.{n}"
            n += 1
    services = service_targets(ov, ips)

    def rewrite_addresses(s, ip):
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
            if "configMap" in v:
                cm = ov.get("ConfigMap", v["configMap"]["name"]) or {}
                data = cm.get("data") or {}
                items = v["configMap"].get("items")
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
            "health": None if probe is None else {
                "addr": f"{ip}:{probe['port']}", "service": probe.get("service", "")},
        })
    json.dump(pods, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
