#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in k8s/ (`make test` runs them through
cli/tests/k8s.rs; `make k8s-check` runs them alone).

For every overlay in k8s/overlays/ it
  1. renders it with `kubectl kustomize`;
  2. validates every object against the API schemas of Kubernetes 1.27 and 1.33
     (`kubernetes-validate --strict`);
  3. runs `spur <role> --check-config` with each spur container's command line and
     environment (ConfigMap and Secret values resolved, mounted ConfigMaps written to
     a temporary copy of their mount path) and keeps the config it resolves;
  4. checks that the objects hang together (CHECKS below).
Then it breaks the manifests in memory, one way per check (MUTATIONS), and makes sure
that check notices: a check that cannot fail proves nothing.

What it cannot show (a real cluster can): scheduling, volume attachment, that a CNI
enforces the NetworkPolicies, GPUs, and the image itself (no container engine here).

usage: python k8s/check.py --spur target/debug/spur [--kubectl kubectl]
"""

import argparse
import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMA_VERSIONS = ["1.27.0", "1.33.0"]
# Where the Dockerfile puts things; spur containers are the ones that run this binary.
SPUR_BIN = "/opt/spur/bin/spur"
IMAGE_WORKDIR = "/opt/spur"
UID = 10001
ROLES = ("learner", "actor", "reward-service")
# The gRPC health service name each serving role reports (tonic-health).
HEALTH_SERVICE = {"learner": "spur.v1.Learner", "reward-service": "spur.v1.RewardService",
                  "actor": "spur.v1.Actor"}
# Roles whose startupProbe asks for their service too; an actor's startup asks for the
# server as a whole, since its readiness waits on the learner.
STARTUP_ON_SERVICE = {"learner", "reward-service"}
GPU = "nvidia.com/gpu"
# The overlay whose example Secret documents the keys every overlay may reference.
SECRET_CONTRACT_OVERLAY = "dev"
CLUSTER_SCOPED = {"Namespace"}
# SIGKILL must not come before the drain is over: grace >= drain + this margin.
GRACE_MARGIN_MS = 5000
# Secrets made outside the overlays (components/tls/certificate.yaml, cert-manager or
# kubectl create secret) and the keys pods may use from them.
EXTERNAL_SECRETS = {"spur-tls": {"tls.crt", "tls.key", "ca.crt"}}
# The config section that holds each serving role's listen and health_listen.
ROLE_SECTION = {"learner": "learner", "reward-service": "reward_service", "actor": "actor"}


# ----------------------------------------------------------------------------- model


class Workload:
    """A Deployment or StatefulSet and the containers of its pod template."""

    def __init__(self, obj):
        self.obj = obj
        self.kind = obj["kind"]
        self.name = obj["metadata"]["name"]
        self.spec = obj["spec"]
        self.template = self.spec["template"]
        self.pod = self.template["spec"]
        self.labels = self.template.get("metadata", {}).get("labels", {}) or {}
        self.annotations = self.template.get("metadata", {}).get("annotations", {}) or {}

    def containers(self):
        return self.pod.get("containers", []) + self.pod.get("initContainers", [])

    def pod_name(self):
        if self.kind == "StatefulSet":
            return f"{self.name}-0"
        return f"{self.name}-7d9f8b6c5-x2x4q"


def spur_role(container):
    """The spur role a container runs, or None for other containers."""
    command = container.get("command") or []
    if not command or command[0] != SPUR_BIN:
        return None
    for arg in list(command[1:]) + list(container.get("args") or []):
        if arg in ROLES:
            return arg
        if not arg.startswith("-"):
            return arg  # an unknown subcommand: reported by the roles check
    return None


class Overlay:
    def __init__(self, name, objects, kustomization):
        self.name = name
        self.objects = objects
        self.kustomization = kustomization
        self.namespace = kustomization.get("namespace")
        self.gpu = any(str(c).rstrip("/").endswith("components/gpu")
                       for c in kustomization.get("components", []) or [])
        self.refresh()

    def refresh(self):
        self.workloads = [Workload(o) for o in self.objects
                          if o.get("kind") in ("Deployment", "StatefulSet")]
        self.by_kind = {}
        for o in self.objects:
            self.by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    def get(self, kind, name):
        return self.by_kind.get(kind, {}).get(name)

    def services(self):
        return list(self.by_kind.get("Service", {}).values())


def secret_data(secret):
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


# ------------------------------------------------------------ rendering and schemas


def render(kubectl, overlay_dir):
    """kubectl kustomize's output: (text, objects)."""
    out = subprocess.run([kubectl, "kustomize", str(overlay_dir)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay_dir} failed:\n{out.stderr}")
    return out.stdout, [o for o in yaml.safe_load_all(out.stdout) if o]


def yamllint(paths):
    """yamllint with k8s/.yamllint; its problem lines."""
    exe = shutil.which("yamllint")
    cmd = [exe] if exe else [sys.executable, "-m", "yamllint"]
    out = subprocess.run(cmd + ["-f", "parsable", "-c", str(K8S / ".yamllint")]
                         + [str(p) for p in paths], capture_output=True, text=True, timeout=120)
    errors = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    if out.returncode != 0 and not errors:
        errors = [f"yamllint exited {out.returncode}"]
    return errors


def validate_schemas(files, version):
    """kubernetes-validate --strict on the rendered files; its error lines."""
    exe = shutil.which("kubernetes-validate")
    cmd = [exe] if exe else [sys.executable, "-m", "kubernetes_validate"]
    out = subprocess.run(cmd + ["--strict", "--quiet", "-k", version] + [str(f) for f in files],
                         capture_output=True, text=True, timeout=300)
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    # A kind without a schema is only a warning for the tool; here it is an error.
    errors = [l for l in lines if not l.startswith("INFO")]
    if out.returncode != 0 and not errors:
        errors = [f"kubernetes-validate exited {out.returncode}"]
    return errors


# ------------------------------------------------------------ environment and config


VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text, env):
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return VAR_REF.sub(sub, text)


def container_env(ov, wl, c, contract):
    """The container's environment as the kubelet would build it (secrets from the
    overlay, else placeholders for the documented keys)."""
    env = {}

    def secret_value(name, key):
        s = ov.get("Secret", name)
        if s is not None:
            return secret_data(s).get(key)
        return "placeholder" if key in contract.get(name, set()) else None

    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            cm = ov.get("ConfigMap", src["configMapRef"]["name"]) or {}
            for k, v in (cm.get("data") or {}).items():
                env[prefix + k] = v
        if "secretRef" in src:
            s = ov.get("Secret", src["secretRef"]["name"])
            for k, v in (secret_data(s) if s else {}).items():
                env[prefix + k] = v
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
            continue
        ref = e.get("valueFrom", {})
        value = None
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            cm = ov.get("ConfigMap", r["name"]) or {}
            value = (cm.get("data") or {}).get(r["key"])
        elif "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            value = secret_value(r["name"], r["key"])
        elif "fieldRef" in ref:
            field = ref["fieldRef"]["fieldPath"]
            value = {"metadata.name": wl.pod_name(),
                     "metadata.namespace": ov.namespace or "default"}.get(field, "x")
        elif "resourceFieldRef" in ref:
            value = "1"
        if value is not None:
            env[e["name"]] = value
    return env


class ConfigRunner:
    """`spur <role> --check-config` for containers, cached by what it depends on."""

    def __init__(self, spur):
        self.spur = spur
        self.cache = {}
        self.runs = 0

    def run(self, ov, wl, c, contract):
        """(resolved config dict or None, error text or None)."""
        env = container_env(ov, wl, c, contract)
        argv = [expand(a, env) for a in list(c["command"][1:]) + list(c.get("args") or [])]
        # Mounted ConfigMaps: their files, at a temporary copy of the mount path.
        files = {}
        volumes = {v["name"]: v for v in wl.pod.get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m["name"], {})
            if "configMap" not in v:
                continue
            cm = ov.get("ConfigMap", v["configMap"]["name"]) or {}
            data = cm.get("data") or {}
            items = v["configMap"].get("items")
            pairs = [(i["path"], data.get(i["key"], "")) for i in items] if items else data.items()
            for rel, text in pairs:
                files[m["mountPath"].rstrip("/") + "/" + rel] = text
        key = (tuple(argv), tuple(sorted(env.items())), tuple(sorted(files.items())),
               c.get("workingDir", IMAGE_WORKDIR))
        if key in self.cache:
            return self.cache[key]
        with tempfile.TemporaryDirectory(prefix="spur-k8s-") as tmp:
            for path, text in files.items():
                target = Path(tmp + path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            mounts = sorted({str(Path(p).parent) for p in files}, key=len, reverse=True)

            def relocate(s):
                for mp in mounts:
                    if s == mp or s.startswith(mp + "/"):
                        return tmp + s
                return s

            argv = [relocate(a) for a in argv]
            env = {k: relocate(v) for k, v in env.items()}
            workdir = c.get("workingDir", IMAGE_WORKDIR)
            # The image's working directory holds prompts/, judges/ and configs/, as
            # the repository root does.
            cwd = ROOT if workdir == IMAGE_WORKDIR else Path(tmp)
            proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp}
            proc_env.update(env)
            self.runs += 1
            out = subprocess.run([self.spur] + argv + ["--check-config"], env=proc_env,
                                 cwd=cwd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            result = (None, (out.stderr.strip() or out.stdout.strip())[-2000:])
        else:
            try:
                result = (tomllib.loads(out.stdout), None)
            except tomllib.TOMLDecodeError as e:
                result = (None, f"--check-config printed no TOML config: {e}")
        self.cache[key] = result
        return result


# ------------------------------------------------------------------------ helpers


def selects(selector, labels):
    """A Kubernetes label selector (matchLabels and matchExpressions)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(svc, wl):
    sel = svc["spec"].get("selector") or {}
    return bool(sel) and all(wl.labels.get(k) == v for k, v in sel.items())


def container_port(c, port):
    """The declared container port a probe or targetPort names: (number, name) or None."""
    for p in c.get("ports") or []:
        if port == p["containerPort"] or port == p.get("name"):
            return p["containerPort"], p.get("name")
    return None


def probe_port(probe):
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return kind, probe[kind].get("port")
    return None, None


def url_host_port(url):
    m = re.match(r"^https?://([^/:]+)(?::(\d+))?", url)
    if not m:
        return None, None
    default = 443 if url.startswith("https") else 80
    return m.group(1), int(m.group(2) or default)


def health_port(cfg, role):
    """The port the kubelet's gRPC probes must ask: the role's plain health port
    (`health_listen`, for probes that cannot do mutual TLS) when set, else its main
    listen port."""
    section = cfg[ROLE_SECTION[role]]
    addr = section.get("health_listen") or section.get("listen")
    return listen_port(addr)[1] if addr else None


def listen_port(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def mount_of(c, path):
    """The volumeMount that holds `path`, longest mount path first."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def full_args(c):
    return list(c.get("command") or []) + list(c.get("args") or [])


def spur_containers(ov):
    for wl in ov.workloads:
        for c in wl.containers():
            role = spur_role(c)
            if role:
                yield wl, c, role


def gpu_limit(c):
    limits = (c.get("resources") or {}).get("limits") or {}
    return int(limits.get(GPU, 0) or 0)


# ------------------------------------------------------------------------ checks
# Each check takes the context and returns a list of error strings.


class Context:
    def __init__(self, ov, runner, contract):
        self.ov = ov
        self.contract = contract
        self.configs = {}  # (workload name, container name) -> resolved config
        self.config_errors = []
        for wl, c, role in spur_containers(ov):
            cfg, err = runner.run(ov, wl, c, contract)
            if err:
                self.config_errors.append(f"{wl.name}/{c['name']}: spur {role} "
                                          f"--check-config refused it: {err}")
            else:
                self.configs[(wl.name, c["name"])] = cfg

    def config(self, wl, c):
        return self.configs.get((wl.name, c["name"]))


def check_config_accepted(ctx):
    return list(ctx.config_errors)


def check_roles(ctx):
    errs = []
    seen = {}
    for wl, c, role in spur_containers(ctx.ov):
        if role not in ROLES:
            errs.append(f"{wl.name}/{c['name']}: unknown spur subcommand {role!r}")
        seen.setdefault(role, []).append(wl)
    for role in ROLES:
        if len(seen.get(role, [])) != 1:
            errs.append(f"exactly one workload must run spur {role}, found "
                        f"{[w.name for w in seen.get(role, [])]}")
    return errs


def check_namespace(ctx):
    ov, errs = ctx.ov, []
    if not ov.namespace:
        return ["kustomization sets no namespace"]
    for o in ov.objects:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in CLUSTER_SCOPED:
            if o["kind"] == "Namespace" and o["metadata"]["name"] != ov.namespace:
                errs.append(f"{name}: not the overlay's namespace {ov.namespace}")
        elif o["metadata"].get("namespace") != ov.namespace:
            errs.append(f"{name}: namespace {o['metadata'].get('namespace')!r}, "
                        f"not {ov.namespace!r}")
    return errs


def check_selectors(ctx):
    ov, errs = ctx.ov, []
    for wl in ov.workloads:
        if not selects(wl.spec.get("selector"), wl.labels):
            errs.append(f"{wl.kind}/{wl.name}: selector does not match its pod labels")
        if wl.kind == "StatefulSet":
            svc = ov.get("Service", wl.spec.get("serviceName", ""))
            if svc is None or svc["spec"].get("clusterIP") != "None" \
                    or not service_selects(svc, wl):
                errs.append(f"StatefulSet/{wl.name}: serviceName "
                            f"{wl.spec.get('serviceName')!r} is not a headless Service "
                            "selecting its pods")
    for svc in ov.services():
        if not any(service_selects(svc, wl) for wl in ov.workloads):
            errs.append(f"Service/{svc['metadata']['name']}: selector "
                        f"{svc['spec'].get('selector')} matches no pod template")
    return errs


def check_ports(ctx):
    """Service targetPorts are declared container ports; roles listen on all
    interfaces, on their declared ports; metrics ports agree everywhere."""
    ov, errs = ctx.ov, []
    for svc in ov.services():
        for wl in ov.workloads:
            if not service_selects(svc, wl):
                continue
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort", p["port"])
                if not any(container_port(c, target) for c in wl.containers()):
                    errs.append(f"Service/{svc['metadata']['name']}: targetPort {target!r} "
                                f"is no container port of {wl.name}")
    for wl, c, role in spur_containers(ov):
        cfg = ctx.config(wl, c)
        if cfg is None:
            continue
        where = f"{wl.name}/{c['name']}"
        listens = {"learner": cfg["learner"]["listen"],
                   "reward-service": cfg["reward_service"]["listen"]}
        wanted = [(role, listens[role])] if role in listens else []
        if role in ROLE_SECTION and cfg[ROLE_SECTION[role]].get("health_listen"):
            wanted.append(("health", cfg[ROLE_SECTION[role]]["health_listen"]))
        if cfg["run"]["prometheus_listen"]:
            wanted.append(("metrics", cfg["run"]["prometheus_listen"]))
        for what, addr in wanted:
            host, port = listen_port(addr)
            if host not in ("0.0.0.0", "::"):
                errs.append(f"{where}: {what} listens on {addr}, unreachable from other pods")
            if not container_port(c, port):
                errs.append(f"{where}: {what} listens on port {port}, not a container port")
        prom = cfg["run"]["prometheus_listen"]
        if prom and wl.annotations.get("prometheus.io/scrape") == "true":
            if wl.annotations.get("prometheus.io/port") != str(listen_port(prom)[1]):
                errs.append(f"{where}: prometheus.io/port "
                            f"{wl.annotations.get('prometheus.io/port')} but metrics on {prom}")
    return errs


def check_probes(ctx):
    """Startup, readiness and liveness on every container, on declared ports, gRPC
    health for every spur role (numeric port, the port the role serves health on, the
    role's service for readiness)."""
    ov, errs = ctx.ov, []
    for wl in ov.workloads:
        for c in wl.containers():
            where = f"{wl.name}/{c['name']}"
            role = spur_role(c)
            cfg = ctx.config(wl, c) if role else None
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    errs.append(f"{where}: no {kind}")
                    continue
                how, port = probe_port(probe)
                if how is None:
                    errs.append(f"{where}: {kind} is neither grpc, httpGet nor tcpSocket")
                    continue
                if not container_port(c, port):
                    errs.append(f"{where}: {kind} port {port!r} is no container port")
                if how == "grpc" and not isinstance(port, int):
                    errs.append(f"{where}: {kind} grpc port must be a number, got {port!r}")
                if role in HEALTH_SERVICE:
                    if how != "grpc":
                        errs.append(f"{where}: {kind} must use the gRPC health service")
                        continue
                    if cfg and port != health_port(cfg, role):
                        section = cfg[ROLE_SECTION[role]]
                        errs.append(f"{where}: {kind} asks port {port}, the role serves "
                                    f"health on {health_port(cfg, role) or 'no port'} "
                                    f"(listen {section.get('listen') or 'none'}, "
                                    f"health_listen {section.get('health_listen') or 'off'})")
                    asks_service = kind == "readinessProbe" or \
                        (kind == "startupProbe" and role in STARTUP_ON_SERVICE)
                    if asks_service and probe["grpc"].get("service") != HEALTH_SERVICE[role]:
                        errs.append(f"{where}: {kind} must ask for "
                                    f"{HEALTH_SERVICE[role]} (NOT_SERVING while draining)")
            live = c.get("livenessProbe") or {}
            if live and live.get("periodSeconds", 10) * live.get("failureThreshold", 3) < 60:
                errs.append(f"{where}: livenessProbe kills after less than 60 s of silence")
    return errs


def check_vars(ctx):
    """Every $(VAR) in command and args is defined in the container's env."""
    ov, errs = ctx.ov, []
    for wl in ov.workloads:
        for c in wl.containers():
            names = {e["name"] for e in c.get("env") or []}
            for src in c.get("envFrom") or []:
                ref = src.get("configMapRef") or src.get("secretRef") or {}
                obj = ov.get("ConfigMap" if "configMapRef" in src else "Secret",
                             ref.get("name", ""))
                data = (obj or {}).get("data") or {}
                names |= {src.get("prefix", "") + k for k in data}
            for arg in full_args(c):
                for m in VAR_REF.finditer(str(arg)):
                    if m.group(1) and m.group(1) not in names:
                        errs.append(f"{wl.name}/{c['name']}: $({m.group(1)}) in its "
                                    "command line is not defined in env")
    return errs


def check_refs(ctx):
    """ConfigMaps, Secrets, keys, claims and volumes that pods refer to exist."""
    ov, errs = ctx.ov, []

    def secret_keys(name):
        s = ov.get("Secret", name)
        return set(secret_data(s)) if s is not None else ctx.contract.get(name)

    for wl in ov.workloads:
        volumes = {v["name"]: v for v in wl.pod.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in wl.spec.get("volumeClaimTemplates") or []}
        for name, v in volumes.items():
            if "configMap" in v:
                cm = ov.get("ConfigMap", v["configMap"]["name"])
                if cm is None:
                    errs.append(f"{wl.name}: volume {name}: no ConfigMap "
                                f"{v['configMap']['name']}")
                for i in v["configMap"].get("items") or []:
                    if cm is not None and i["key"] not in (cm.get("data") or {}):
                        errs.append(f"{wl.name}: volume {name}: no key {i['key']}")
            if "secret" in v and secret_keys(v["secret"]["secretName"]) is None:
                errs.append(f"{wl.name}: volume {name}: no Secret {v['secret']['secretName']}")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if ov.get("PersistentVolumeClaim", claim) is None:
                    errs.append(f"{wl.name}: volume {name}: no PersistentVolumeClaim {claim}")
        for c in wl.containers():
            where = f"{wl.name}/{c['name']}"
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claims:
                    errs.append(f"{where}: mounts undefined volume {m['name']}")
            for src in c.get("envFrom") or []:
                if "configMapRef" in src and ov.get("ConfigMap", src["configMapRef"]["name"]) \
                        is None and not src["configMapRef"].get("optional"):
                    errs.append(f"{where}: no ConfigMap {src['configMapRef']['name']}")
                if "secretRef" in src and secret_keys(src["secretRef"]["name"]) is None:
                    errs.append(f"{where}: no Secret {src['secretRef']['name']}")
            for e in c.get("env") or []:
                ref = e.get("valueFrom") or {}
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    cm = ov.get("ConfigMap", r["name"])
                    if (cm is None or r["key"] not in (cm.get("data") or {})) \
                            and not r.get("optional"):
                        errs.append(f"{where}: env {e['name']}: no key {r['key']} in "
                                    f"ConfigMap {r['name']}")
                if "secretKeyRef" in ref:
                    # Even optional keys must be documented (the dev example Secret).
                    r = ref["secretKeyRef"]
                    keys = secret_keys(r["name"])
                    if keys is None or r["key"] not in keys:
                        errs.append(f"{where}: env {e['name']}: key {r['key']} of Secret "
                                    f"{r['name']} is neither in this overlay nor in the "
                                    f"documented example (overlays/{SECRET_CONTRACT_OVERLAY})")
    return errs


def check_security(ctx):
    """Non-root uid 10001, no privilege escalation, no capabilities, seccomp, read-only
    root with /tmp writable, no service account token, no service-link variables."""
    ov, errs = ctx.ov, []
    for wl in ov.workloads:
        pod = wl.pod
        psc = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            errs.append(f"{wl.name}: automountServiceAccountToken must be false")
        if pod.get("enableServiceLinks") is not False:
            errs.append(f"{wl.name}: enableServiceLinks must be false "
                        "(service variables next to SPUR_* overrides)")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            errs.append(f"{wl.name}: uses host namespaces")
        for c in wl.containers():
            where = f"{wl.name}/{c['name']}"
            sc = c.get("securityContext") or {}

            def eff(key):
                return sc.get(key, psc.get(key))

            if eff("runAsNonRoot") is not True:
                errs.append(f"{where}: runAsNonRoot must be true")
            if eff("runAsUser") != UID:
                errs.append(f"{where}: runAsUser must be {UID}, is {eff('runAsUser')}")
            if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
                errs.append(f"{where}: seccompProfile must be RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                errs.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                errs.append(f"{where}: privileged")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
                errs.append(f"{where}: must drop ALL capabilities and add none")
            if sc.get("readOnlyRootFilesystem") is not True:
                errs.append(f"{where}: readOnlyRootFilesystem must be true")
            if not any(m["mountPath"].rstrip("/") == "/tmp" for m in c.get("volumeMounts") or []):
                errs.append(f"{where}: no writable /tmp volume on a read-only root")
    return errs


def check_state(ctx):
    """Learner and reward service: one-replica StatefulSets whose state lives on their
    own ReadWriteOnce volume; the learner always resumes; actors are a Deployment."""
    ov, errs = ctx.ov, []
    for wl, c, role in spur_containers(ov):
        where = f"{wl.kind}/{wl.name}"
        if role == "actor":
            if wl.kind != "Deployment":
                errs.append(f"{where}: actors must be a Deployment")
            continue
        if wl.kind != "StatefulSet" or wl.spec.get("replicas", 1) != 1:
            errs.append(f"{where}: {role} must be a StatefulSet with exactly 1 replica "
                        f"(has {wl.spec.get('replicas', 1)})")
        templates = {t["metadata"]["name"]: t for t in wl.spec.get("volumeClaimTemplates") or []}
        cfg = ctx.config(wl, c)
        args = full_args(c)
        if role == "learner":
            if "--resume" not in args:
                errs.append(f"{where}: the learner must start with --resume")
            path, what = arg_value(args, "--run-dir"), "--run-dir"
        else:
            path = cfg["reward_service"]["store"] if cfg else None
            what = "reward_service.store"
        if path is None:
            errs.append(f"{where}: no {what}")
            continue
        if not path.startswith("/"):
            path = c.get("workingDir", IMAGE_WORKDIR) + "/" + path
        m = mount_of(c, path)
        t = templates.get(m["name"]) if m else None
        if t is None or "ReadWriteOnce" not in (t["spec"].get("accessModes") or []) \
                or (m or {}).get("readOnly"):
            errs.append(f"{where}: {what} {path} is not on a writable ReadWriteOnce "
                        "volumeClaimTemplate")
    return errs


def check_grace(ctx):
    errs = []
    for wl, c, role in spur_containers(ctx.ov):
        cfg = ctx.config(wl, c)
        if cfg is None:
            continue
        grace = wl.pod.get("terminationGracePeriodSeconds", 30) * 1000
        drain = cfg["run"]["drain_timeout_ms"]
        if grace < drain + GRACE_MARGIN_MS:
            errs.append(f"{wl.name}: terminationGracePeriodSeconds {grace // 1000} is not "
                        f"above run.drain_timeout_ms {drain} (+{GRACE_MARGIN_MS} ms)")
    return errs


def check_gpu(ctx):
    """GPUs only where the gpu component puts them (and on the LLM judge), CUDA devices
    exactly where there is a GPU, a memory-backed /dev/shm on every GPU pod."""
    ov, errs = ctx.ov, []
    for wl in ov.workloads:
        for c in wl.containers():
            where = f"{wl.name}/{c['name']}"
            role = spur_role(c)
            gpus = gpu_limit(c)
            if role:
                want = ov.gpu and role in ("learner", "actor")
                if bool(gpus) != want:
                    errs.append(f"{where}: {gpus} GPUs; the {role} gets one only in "
                                "overlays with components/gpu")
                cfg = ctx.config(wl, c)
                if cfg:
                    device = cfg["learner"]["device"] if role == "learner" \
                        else cfg["model"]["device"]
                    if device.startswith("cuda") and not gpus:
                        errs.append(f"{where}: device {device} without a GPU")
                    if device == "cpu" and gpus:
                        errs.append(f"{where}: a GPU but device cpu")
            elif gpus != 1 and c["name"] == "vllm":
                errs.append(f"{where}: the judge needs one GPU")
            elif gpus and c["name"] != "vllm":
                errs.append(f"{where}: unexpected GPU")
            if gpus:
                m = mount_of(c, "/dev/shm")
                vol = {v["name"]: v for v in wl.pod.get("volumes") or []}.get(
                    m["name"] if m else "", {})
                if m is None or m["mountPath"] != "/dev/shm" \
                        or (vol.get("emptyDir") or {}).get("medium") != "Memory":
                    errs.append(f"{where}: a GPU pod needs a memory-backed /dev/shm")
    return errs


def resolve_address(ov, url):
    """The (Service, workloads, container port number) an in-cluster URL reaches."""
    host, port = url_host_port(url)
    if host is None:
        return None, f"{url!r} is not an http(s) URL"
    parts = host.split(".")
    name = parts[0]
    if len(parts) > 1 and parts[1] != ov.namespace:
        return None, f"{url}: Service {name} in another namespace {parts[1]}"
    svc = ov.get("Service", name)
    if svc is None:
        return None, f"{url}: no Service named {name}"
    sp = next((p for p in svc["spec"].get("ports") or [] if p["port"] == port), None)
    if sp is None:
        return None, f"{url}: Service {name} has no port {port}"
    targets = []
    for wl in ov.workloads:
        if service_selects(svc, wl):
            for c in wl.containers():
                cp = container_port(c, sp.get("targetPort", port))
                if cp:
                    targets.append((wl, cp[0]))
    if not targets:
        return None, f"{url}: Service {name} port {port} reaches no container port"
    return (svc, targets), None


def expected_connections(ctx):
    """(source workload, destination workload, port) for every connection spur makes,
    from the resolved configs; plus errors for addresses that lead nowhere."""
    ov, conns, errs = ctx.ov, set(), []
    for wl, c, role in spur_containers(ov):
        cfg = ctx.config(wl, c)
        if cfg is None:
            continue
        urls = []
        if role == "actor":
            urls.append(("actor.learner_addr", cfg["actor"]["learner_addr"], "learner"))
        if cfg["intrinsic"]["enabled"] and role in ("actor", "learner"):
            urls.append(("reward_service.addr", cfg["reward_service"]["addr"], "reward-service"))
        if role == "reward-service" and cfg["reward_service"]["judge"] == "openai":
            urls.append(("reward_service.openai_base_url",
                         cfg["reward_service"]["openai_base_url"], None))
        for key, url, want_role in urls:
            found, err = resolve_address(ov, url)
            if err:
                errs.append(f"{wl.name}: {key}: {err}")
                continue
            for dst, port in found[1]:
                roles = {spur_role(x) for x in dst.containers()}
                if want_role and want_role not in roles:
                    errs.append(f"{wl.name}: {key} {url} reaches {dst.name}, not the {want_role}")
                conns.add((wl.name, dst.name, port))
    return conns, errs


def check_addresses(ctx):
    """Every address in the resolved configs names a Service port that leads to the
    right role's container port."""
    return expected_connections(ctx)[1]


def check_judge_model(ctx):
    """The model the reward service asks for is the one the LLM server serves."""
    ov, errs = ctx.ov, []
    for wl, c, role in spur_containers(ov):
        cfg = ctx.config(wl, c)
        if role != "reward-service" or not cfg or cfg["reward_service"]["judge"] != "openai":
            continue
        found, _ = resolve_address(ov, cfg["reward_service"]["openai_base_url"])
        for dst, _port in (found[1] if found else []):
            for jc in dst.containers():
                args = full_args(jc)
                served = arg_value(args, "--served-model-name") or arg_value(args, "--model")
                if served is not None and served != cfg["reward_service"]["openai_model"]:
                    errs.append(f"{wl.name}: asks for model "
                                f"{cfg['reward_service']['openai_model']!r}, {dst.name} "
                                f"serves {served!r}")
    return errs


# NetworkPolicy evaluation: who may open a TCP connection to whom.


def policy_types(p):
    types = p["spec"].get("policyTypes")
    if types:
        return types
    return ["Ingress"] + (["Egress"] if "egress" in p["spec"] else [])


def peer_matches(peer, labels, ns_labels, same_ns):
    if "ipBlock" in peer:
        return False  # external addresses; pods are not matched by ipBlocks here
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif not same_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], labels)


def ports_match(rule_ports, number, name, protocol):
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        port = p.get("port")
        if port is None or port == number or (name and port == name):
            return True
        if isinstance(port, int) and p.get("endPort") and port <= number <= p["endPort"]:
            return True
    return False


def allowed(ov, direction, pod_labels, peer_labels, peer_ns, number, name, protocol):
    """Whether the policies on a pod of `ov` allow this direction of a connection."""
    ns_labels = {"kubernetes.io/metadata.name": peer_ns}
    pols = [p for p in ov.by_kind.get("NetworkPolicy", {}).values()
            if selects(p["spec"].get("podSelector", {}), pod_labels)
            and direction in policy_types(p)]
    if not pols:
        return True  # not isolated
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in pols:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            hit = peers is None or any(peer_matches(x, peer_labels, ns_labels,
                                                    peer_ns == ov.namespace) for x in peers)
            if hit and ports_match(rule.get("ports"), number, name, protocol):
                return True
    return False


def check_network(ctx):
    """Exactly the connections spur makes are allowed between its pods; every pod can
    resolve DNS; metrics ports are open to the monitoring namespace; nothing else
    (another namespace, say) gets in."""
    ov, errs = ctx.ov, []
    want, _ = expected_connections(ctx)
    ns = ov.namespace
    for src in ov.workloads:
        for dst in ov.workloads:
            for c in dst.containers():
                for p in c.get("ports") or []:
                    if p.get("protocol", "TCP") != "TCP":
                        continue
                    conn = (src.name, dst.name, p["containerPort"])
                    ok = allowed(ov, "Egress", src.labels, dst.labels, ns,
                                 p["containerPort"], p.get("name"), "TCP") and \
                        allowed(ov, "Ingress", dst.labels, src.labels, ns,
                                p["containerPort"], p.get("name"), "TCP")
                    if conn in want and not ok:
                        errs.append(f"{src.name} cannot reach {dst.name}:{p['containerPort']}, "
                                    "which its config uses")
                    if ok and conn not in want:
                        errs.append(f"{src.name} may reach {dst.name}:{p['containerPort']}, "
                                    "which spur never uses")
    dns = {"k8s-app": "kube-dns"}
    monitoring = {"app.kubernetes.io/name": "prometheus"}
    for wl in ov.workloads:
        for proto in ("UDP", "TCP"):
            if not allowed(ov, "Egress", wl.labels, dns, "kube-system", 53, "dns", proto):
                errs.append(f"{wl.name}: no DNS ({proto} 53 to kube-dns)")
        for c in wl.containers():
            for p in c.get("ports") or []:
                num, name = p["containerPort"], p.get("name")
                scraped = name == "metrics" and \
                    wl.annotations.get("prometheus.io/scrape") == "true"
                if scraped and not allowed(ov, "Ingress", wl.labels, monitoring, "monitoring",
                                           num, name, "TCP"):
                    errs.append(f"{wl.name}: Prometheus in namespace monitoring cannot "
                                f"scrape port {num}")
                if allowed(ov, "Ingress", wl.labels, {}, "elsewhere", num, name, "TCP"):
                    errs.append(f"{wl.name}: port {num} is open to other namespaces")
                if not scraped and allowed(ov, "Ingress", wl.labels, monitoring, "monitoring",
                                           num, name, "TCP"):
                    errs.append(f"{wl.name}: port {num} is open to the monitoring namespace")
    return errs


CHECKS = {
    "check-config": check_config_accepted,
    "roles": check_roles,
    "namespace": check_namespace,
    "selectors": check_selectors,
    "ports": check_ports,
    "probes": check_probes,
    "vars": check_vars,
    "refs": check_refs,
    "security": check_security,
    "state": check_state,
    "grace": check_grace,
    "gpu": check_gpu,
    "addresses": check_addresses,
    "judge-model": check_judge_model,
    "network": check_network,
}


def run_checks(ov, runner, contract):
    ctx = Context(ov, runner, contract)
    return {name: fn(ctx) for name, fn in CHECKS.items()}


# ------------------------------------------------------------------------ mutations
# Each breaks one thing in a copy of an overlay's objects; the named check must fail.


def find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def pod(objects, kind, name):
    return find(objects, kind, name)["spec"]["template"]["spec"]


def container(objects, kind, name, index=0):
    return pod(objects, kind, name)["containers"][index]


def set_env(c, name, value):
    c.setdefault("env", []).append({"name": name, "value": value})


LEARNER = ("StatefulSet", "spur-learner")
REWARD = ("StatefulSet", "spur-reward-service")
ACTOR = ("Deployment", "spur-actor")


def _retarget(objs):
    find(objs, "Service", "spur-learner")["spec"]["ports"][0]["targetPort"] = "grpcx"


def _probe_port(objs):
    container(objs, *LEARNER)["readinessProbe"]["grpc"]["port"] = 50099


def _probe_service(objs):
    container(objs, *REWARD)["readinessProbe"]["grpc"].pop("service")


def _var(objs):
    c = container(objs, *ACTOR)
    c["args"] = [a.replace("$(POD_NAME)", "$(POD_NAM)") for a in c["args"]]


def _secret_key(objs):
    for e in container(objs, *LEARNER)["env"]:
        if e["name"] == "SPUR_SERVICE_TOKEN":
            e["valueFrom"]["secretKeyRef"]["key"] = "service-tokn"


def _config_map(objs):
    for v in pod(objs, *ACTOR)["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = "spur-config"


def _writable_root(objs):
    container(objs, *REWARD)["securityContext"]["readOnlyRootFilesystem"] = False


def _probe_on_tls_port(objs):
    # The kubelet cannot present a client certificate: this probe would never pass.
    container(objs, *LEARNER)["readinessProbe"]["grpc"]["port"] = 50051


def _actor_health_off(objs):
    set_env(container(objs, *ACTOR), "SPUR_ACTOR__HEALTH_LISTEN", "")


def _actor_readiness_unnamed(objs):
    container(objs, *ACTOR)["readinessProbe"]["grpc"].pop("service")


def _root(objs):
    container(objs, *ACTOR)["securityContext"]["runAsUser"] = 0


def _token(objs):
    pod(objs, *ACTOR)["automountServiceAccountToken"] = True


def _two_reward(objs):
    find(objs, *REWARD)["spec"]["replicas"] = 2


def _no_resume(objs):
    c = container(objs, *LEARNER)
    c["args"] = [a for a in c["args"] if a != "--resume"]


def _store_on_root(objs):
    set_env(container(objs, *REWARD), "SPUR_REWARD_SERVICE__STORE", "runs/labels.redb")


def _grace(objs):
    pod(objs, *LEARNER)["terminationGracePeriodSeconds"] = 10


def _gpu(objs):
    container(objs, *ACTOR)["resources"].setdefault("limits", {})[GPU] = 1


def _cuda_without_gpu(objs):
    set_env(container(objs, *LEARNER), "SPUR_LEARNER__DEVICE", "cuda")


def _address(objs):
    set_env(container(objs, *ACTOR), "SPUR_ACTOR__LEARNER_ADDR", "http://spur-learnr:50051")


def _loopback(objs):
    set_env(container(objs, *LEARNER), "SPUR_LEARNER__LISTEN", "127.0.0.1:50051")


def _drop_actor_policy(objs):
    objs.remove(find(objs, "NetworkPolicy", "spur-actor"))


def _open_learner(objs):
    p = find(objs, "NetworkPolicy", "spur-learner")
    p["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]})


def _bad_config(objs):
    set_env(container(objs, *LEARNER), "SPUR_LEARNER__LR", "-1")


def _namespace(objs):
    find(objs, "Service", "spur-learner")["metadata"]["namespace"] = "default"


def _selector(objs):
    find(objs, "Service", "spur-reward-service")["spec"]["selector"][
        "app.kubernetes.io/component"] = "reward"


def _judge_model(objs):
    c = container(objs, "Deployment", "spur-judge")
    c["args"] = [("Qwen/Qwen2.5-14B-Instruct" if a == "Qwen/Qwen2.5-7B-Instruct" else a)
                 for a in c["args"]]


MUTATIONS = [
    # (overlay, check that must fail, what is broken, how)
    ("dev", "check-config", "SPUR_LEARNER__LR=-1", _bad_config),
    ("dev", "namespace", "a Service in another namespace", _namespace),
    ("dev", "selectors", "a Service selector that matches no pod", _selector),
    ("dev", "ports", "a Service targetPort that is no container port", _retarget),
    ("dev", "ports", "the learner listening on loopback", _loopback),
    ("dev", "probes", "a readiness probe on an undeclared port", _probe_port),
    ("dev", "probes", "readiness without the role's health service", _probe_service),
    ("dev-tls", "probes", "a probe on the mutual-TLS port, not health_listen",
     _probe_on_tls_port),
    ("dev", "probes", "actor probes with actor.health_listen off", _actor_health_off),
    ("dev", "probes", "actor readiness that ignores the learner (no service)",
     _actor_readiness_unnamed),
    ("dev", "vars", "an undefined $(VAR) in the actor's args", _var),
    ("dev", "refs", "a Secret key nobody documents", _secret_key),
    ("dev", "refs", "a ConfigMap that does not exist", _config_map),
    ("dev", "security", "a writable root filesystem", _writable_root),
    ("dev", "security", "uid 0", _root),
    ("dev", "security", "a mounted service account token", _token),
    ("dev", "state", "two reward service replicas", _two_reward),
    ("dev", "state", "a learner without --resume", _no_resume),
    ("dev", "state", "the label store on the container's disk", _store_on_root),
    ("dev", "grace", "a grace period below the drain timeout", _grace),
    ("dev", "gpu", "a GPU outside the gpu overlays", _gpu),
    ("dev", "gpu", "learner.device = cuda without a GPU", _cuda_without_gpu),
    ("dev", "addresses", "actor.learner_addr naming no Service", _address),
    ("dev", "network", "the actors' egress policy gone", _drop_actor_policy),
    ("dev", "network", "the learner open to every namespace", _open_learner),
    ("judge-vllm", "judge-model", "vLLM serving another model", _judge_model),
]


def run_mutations(overlays, runner, contract, tmp):
    failures, lines = [], []
    for ov_name, check, what, mutate in MUTATIONS:
        base = overlays[ov_name]
        objs = copy.deepcopy(base.objects)
        mutate(objs)
        broken = Overlay(ov_name, objs, base.kustomization)
        errs = run_checks(broken, runner, contract)[check]
        if errs:
            lines.append(f"  {ov_name}: {what}: caught by `{check}` ({errs[0]})")
        else:
            failures.append(f"mutation not caught: {ov_name}: {what} (check `{check}`)")
    # The schemas: a named port in a gRPC probe, which the API server rejects.
    objs = copy.deepcopy(overlays["dev"].objects)
    container(objs, *LEARNER)["livenessProbe"]["grpc"]["port"] = "grpc"
    bad = Path(tmp) / "mutated.yaml"
    bad.write_text(yaml.safe_dump_all(objs))
    errs = validate_schemas([bad], SCHEMA_VERSIONS[0])
    if errs:
        lines.append(f"  dev: a named gRPC probe port: caught by the schemas ({errs[0]})")
    else:
        failures.append("mutation not caught: a named gRPC probe port (schemas)")
    # yamllint: a key given twice (kustomize keeps the last one, silently).
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  name: b\n")
    errs = yamllint([bad])
    if errs:
        lines.append(f"  a duplicated key: caught by yamllint ({errs[0].split(': ', 1)[-1]})")
    else:
        failures.append("mutation not caught: a duplicated key (yamllint)")
    return lines, failures


# ------------------------------------------------------------------------ main


def check_image_layout():
    """The manifests assume the Dockerfile's paths and user."""
    text = (ROOT / "Dockerfile").read_text()
    errs = []
    for needle in (f'ENTRYPOINT ["{SPUR_BIN}"]', f"WORKDIR {IMAGE_WORKDIR}", f"USER {UID}"):
        if needle not in text:
            errs.append(f"Dockerfile: expected `{needle}`, which the manifests rely on")
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spur", required=True, help="the spur binary to run --check-config with")
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--no-mutations", action="store_true")
    args = ap.parse_args()
    started = time.time()

    failures = check_image_layout()
    overlays = {}
    with tempfile.TemporaryDirectory(prefix="spur-k8s-render-") as tmp:
        files = []
        for d in sorted((K8S / "overlays").iterdir()):
            if not (d / "kustomization.yaml").exists():
                continue
            kust = yaml.safe_load((d / "kustomization.yaml").read_text())
            text, objs = render(args.kubectl, d)
            overlays[d.name] = Overlay(d.name, objs, kust)
            f = Path(tmp) / f"{d.name}.yaml"
            f.write_text(text)
            files.append(f)
        if SECRET_CONTRACT_OVERLAY not in overlays:
            raise SystemExit(f"no overlay {SECRET_CONTRACT_OVERLAY}")
        print(f"rendered {len(overlays)} overlays: "
              + ", ".join(f"{n} ({len(o.objects)} objects)" for n, o in overlays.items()))

        errs = yamllint([K8S] + files)
        print("yamllint (sources and rendered overlays): "
              + ("ok" if not errs else f"{len(errs)} problems"))
        failures += errs

        for version in SCHEMA_VERSIONS:
            errs = validate_schemas(files, version)
            print(f"kubernetes-validate --strict -k {version}: "
                  + ("ok" if not errs else f"{len(errs)} errors"))
            failures += errs

        contract = {s["metadata"]["name"]: set(secret_data(s))
                    for s in overlays[SECRET_CONTRACT_OVERLAY].by_kind.get("Secret", {}).values()}
        contract.update(EXTERNAL_SECRETS)
        runner = ConfigRunner(args.spur)
        for name, ov in overlays.items():
            results = run_checks(ov, runner, contract)
            bad = {k: v for k, v in results.items() if v}
            print(f"{name}: " + ("all checks ok" if not bad else
                                 f"failed: {', '.join(bad)}"))
            for check, errs in bad.items():
                failures += [f"{name}: {check}: {e}" for e in errs]
        print(f"spur --check-config accepted every spur container ({runner.runs} runs)"
              if not any("check-config" in f for f in failures) else
              "spur --check-config refused some containers")

        if not args.no_mutations:
            lines, missed = run_mutations(overlays, runner, contract, tmp)
            print(f"{len(lines)} deliberate breakages, each caught by its check:"
                  if not missed else "deliberate breakages:")
            print("\n".join(lines))
            failures += missed

    print(f"checks: {len(CHECKS)} per overlay + schemas; {time.time() - started:.1f} s")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
