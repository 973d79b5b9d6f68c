"""docs/keepstore.example.yml stays true: it loads without warnings and its values are the defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

from keepstore.config import Config, from_document

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "keepstore.example.yml"


def test_example_config_loads_cleanly_with_default_values() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    config = from_document(doc, source=str(EXAMPLE), env={})
    # Arvados' own defaults (128 buffers, 64 requests) draw the same "possible configuration mistake" warning
    # from the Go keepstore; nothing else may warn.
    assert [w for w in config.warnings if not w.startswith("Possible configuration mistake")] == []
    # Every value the example shows is the built-in default (the example documents the defaults).
    minimal = {
        "Clusters": {
            "zzzzz": {
                "SystemRootToken": config.system_root_token,
                "ManagementToken": config.management_token,
                "Services": doc["Clusters"]["zzzzz"]["Services"],
                "Collections": {"BlobSigningKey": config.blob_signing_key},
                "Volumes": {"zzzzz-nyw5e-000000000000000": {"Driver": "Directory", "DriverParameters": {"Root": "/x"}}},
            }
        }
    }
    defaults = from_document(minimal, source="<minimal>", env={})
    for field in Config.__dataclass_fields__:
        if field in ("source", "warnings", "storage_classes", "volumes"):
            continue
        assert getattr(config, field) == getattr(defaults, field), field
    (vol,) = config.volumes
    assert (vol.replication, vol.read_only, vol.storage_classes) == (1, False, ("default",))
