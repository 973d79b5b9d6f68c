"""Regenerate keepstore/data/arvados-config-keys.json from Arvados' config.default.yml.

Usage: python scripts/gen_arvados_keys.py PATH/TO/config.default.yml

The output is the tree of key names Arvados knows (values dropped), with every
"SAMPLE" placeholder map turned into "*". keepstore warns about keys outside this
tree (typos) and silently ignores the ones Arvados knows but keepstore does not
use, as a cluster-wide config file holds settings for every Arvados service.
"""

import json
import sys
from typing import Any

import yaml


def shape(node: Any) -> Any:
    if not isinstance(node, dict):
        return None
    if "SAMPLE" in node:
        return {"*": shape(node["SAMPLE"])}
    return {str(k): shape(v) for k, v in node.items()}


def main() -> None:
    with open(sys.argv[1]) as f:
        doc = yaml.safe_load(f)
    (cluster,) = doc["Clusters"].values()
    tree = shape(cluster)
    # Maps whose keys are free-form in Arvados even without a SAMPLE entry.
    tree["Volumes"]["*"]["DriverParameters"] = {"*": None}
    tree["RemoteClusters"] = {"*": tree["RemoteClusters"]["*"]}
    json.dump(tree, sys.stdout, indent=None, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
