"""Write the pinned, trimmed copy of KubeRay's CRD schemas that tests/test_kuberay.py validates against.

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python scripts/kuberay_schemas.py /tmp/kuberay --version v1.7.0

Reads ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml (the CRDs the operator installs) and
writes deploy/kuberay/schemas/kuberay-crds.json: the `v1` OpenAPI schema of RayJob and RayService, trimmed so
that it can be committed and read:
- `description` texts and the `status` subtree (written by the operator, never by us) are dropped;
- subtrees repeated verbatim (the pod template of the head, of every worker group and of the submitter) are
  stored once under `$defs` and referenced;
- an object schema that lists `properties` and does not say `x-kubernetes-preserve-unknown-fields` gets
  `additionalProperties: false`: Kubernetes drops (or, with strict field validation, refuses) unknown fields
  there, so a misspelt key is an error here too;
- a field with a `default` is not `required` (Kubernetes applies defaults before it validates).
What a JSON-schema validator cannot check: the CRDs' CEL rules (`x-kubernetes-validations`) and `format`s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"
OUT = Path(__file__).resolve().parent.parent / "deploy" / "kuberay" / "schemas" / "kuberay-crds.json"
MIN_SHARED_CHARS = 2000  # smaller repeated subtrees are left inline


def _strip(node: Any) -> Any:
    """Drop descriptions; close objects that Kubernetes prunes (see the module docstring)."""
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strip(v) for k, v in node.items() if k != "description"}
    if "properties" in node:
        out["properties"] = {name: _strip(v) for name, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        # Kubernetes fills in defaults before it checks `required`: a field with a default may be left out.
        required = [r for r in node.get("required", []) if "default" not in node["properties"].get(r, {})]
        if "required" in node:
            out["required"] = required
    return out


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node: Any, counts: Counter) -> None:
    if isinstance(node, dict):
        counts[_key(node)] += 1
        for name, v in node.items():
            # `properties` maps names to schemas; its own dict is not a schema to share
            for child in v.values() if name == "properties" else [v]:
                _count(child, counts)
    elif isinstance(node, list):
        for v in node:
            _count(v, counts)


def _share(node: Any, shared: dict[str, str], defs: dict[str, Any]) -> Any:
    """Replace subtrees listed in ``shared`` (key -> name) by a $ref, outermost first."""
    if isinstance(node, list):
        return [_share(v, shared, defs) for v in node]
    if not isinstance(node, dict):
        return node
    key = _key(node)
    if key in shared:
        name = shared[key]
        if name not in defs:
            defs[name] = None  # reserve: a def never contains itself
            defs[name] = {k: _share_child(k, v, shared, defs) for k, v in node.items()}
        return {"$ref": f"#/$defs/{name}"}
    return {k: _share_child(k, v, shared, defs) for k, v in node.items()}


def _share_child(name: str, value: Any, shared: dict[str, str], defs: dict[str, Any]) -> Any:
    if name == "properties":
        return {prop: _share(v, shared, defs) for prop, v in value.items()}
    return _share(value, shared, defs)


def trim(crds: dict[str, dict]) -> dict[str, Any]:
    """{kind: CRD document} -> {"$defs": shared subtrees, "kinds": {kind: v1 schema without status}}."""
    kinds = {}
    for kind, crd in crds.items():
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strip(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        kinds[kind] = schema
    counts: Counter = Counter()
    _count(kinds, counts)
    repeated = [k for k, n in counts.items() if n > 1 and len(k) >= MIN_SHARED_CHARS]
    shared = {k: f"s{hashlib.sha256(k.encode()).hexdigest()[:10]}" for k in repeated}
    defs: dict[str, Any] = {}
    kinds = {kind: _share(schema, shared, defs) for kind, schema in kinds.items()}
    return {"$defs": dict(sorted(defs.items())), "kinds": kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "kuberay", type=Path, help="a checkout of github.com/ray-project/kuberay at --version"
    )
    parser.add_argument("--version", required=True, help="the release tag checked out, e.g. v1.7.0")
    parser.add_argument("--commit", help="the tag's commit, when the checkout is not a git repository")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    crds = {kind: yaml.safe_load((args.kuberay / CRD_DIR / f).read_text()) for kind, f in KINDS.items()}
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(args.kuberay), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    doc = {
        "$comment": "Generated by scripts/kuberay_schemas.py; do not edit. See that script for the trimming.",
        "source": f"https://github.com/ray-project/kuberay/tree/{args.version}/{CRD_DIR}",
        "kuberay_version": args.version,
        "commit": commit,
        "files": sorted(KINDS.values()),
        **trim(crds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
