"""ray_cluster.yaml is what users hand to `ray up`: it must pass Ray's own cluster-config schema."""

from __future__ import annotations

import yaml

# The same two steps `ray up` takes (private module: Ray exposes no public validator).
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO_ROOT


def test_cluster_config_passes_rays_schema() -> None:
    config = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError naming the offending field
    assert config["file_mounts"] == {"~/gpt2-guide": "."}
    assert any("make install" in c for c in config["setup_commands"])
