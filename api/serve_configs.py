"""Where the project lives, and the applications of its `serve run` config files.

Tests, benchmarks and k8s/snapshot.py start the applications of configs/local.yaml
exactly as `serve run` would, through `serve_application`, so that no caller
re-parses the file its own way. Relative paths in configs resolve against
`common.paths.PROJECT_ROOT`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from common.paths import PROJECT_ROOT

LOCAL_CONFIG = PROJECT_ROOT / "configs" / "local.yaml"


def serve_application(name: str, config_path: Path = LOCAL_CONFIG) -> dict:
    """The application entry (name, route_prefix, import_path, args) called `name`.

    A fresh parse each call, so a caller may change its `args` for a test.
    """
    apps = yaml.safe_load(config_path.read_text())["applications"]
    for app in apps:
        if app["name"] == name:
            return app
    raise KeyError(f"{config_path} has no application {name!r}; it has {[a['name'] for a in apps]}")
