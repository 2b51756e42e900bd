"""Renders a kustomize directory with kubectl and validates every resource:
built-in kinds against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field is an error) for the oldest and the newest
Kubernetes the manifests support, the PodMonitor against the Prometheus
Operator's CRD model, and so the PrometheusRule (a field the model does not know is an error).

Usage: validate_kubernetes.py DIR [--json]
Prints one line per resource and exits 1 on the first invalid one; with
--json, prints the rendered resources as one JSON list instead.
Run with the interpreter of scripts/install-deps's tool environment
(/opt/walrelay/venv/bin/python); kubectl is /opt/walrelay/bin/kubectl.
"""

import json
import os
import subprocess
import sys

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

TOOLS = os.environ.get("WALRELAY_TOOLS", "/opt/walrelay")
KUBERNETES_VERSIONS = ["1.31.0", "1.37.0"]  # PDB unhealthyPodEvictionPolicy is GA in 1.31
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): prometheus_operator.PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
}


def render(directory):
    kubectl = os.path.join(TOOLS, "bin", "kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", directory], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def dropped_fields(given, kept, path=""):
    """Fields of `given` that a model round trip did not keep."""
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            if key not in kept:
                yield where
            else:
                yield from dropped_fields(value, kept[key], where)
    elif isinstance(given, list):
        kept = kept if isinstance(kept, list) else []
        for i, value in enumerate(given):
            yield from dropped_fields(value, kept[i] if i < len(kept) else None, f"{path}[{i}]")


def validate(doc):
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    model = CUSTOM_KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if model is not None:
        try:
            parsed = model.model_validate(doc)
        except Exception as e:  # pydantic's ValidationError names field and problem
            return f"{name}: {e}"
        unknown = list(dropped_fields(doc, parsed.model_dump(by_alias=True, exclude_none=True)))
        if unknown:
            return f"{name}: unknown field(s) {', '.join(unknown)}"
        return None
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            return f"{name} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}"
        except kubernetes_validate.SchemaNotFoundError:
            return f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}"
    return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    docs = render(sys.argv[1])
    for doc in docs:
        problem = validate(doc)
        if problem:
            sys.exit(f"invalid: {problem}")
        if "--json" not in sys.argv:
            print(f"valid: {doc['kind']}/{doc['metadata']['name']}")
    if "--json" in sys.argv:
        json.dump(docs, sys.stdout)


if __name__ == "__main__":
    main()
