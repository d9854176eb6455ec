"""Build a serve config's applications here, before `serve run` starts Ray: `python -m deploy.check deploy/config.yaml`.

`serve run` keeps waiting on an application whose build failed (Ray Serve's own behaviour: the reason is in its
logs, `/health` is a 404 and no ready line comes), so a wrong argument, a model folder that is not there or an
admin token too short looked like a service that never starts. `make run` checks the config with this first: each
application whose `import_path` is ours is built as Serve would build it (`deploy.app:build_app` with its `args`,
its `runtime_env`'s `env_vars` set, such as `VIBE_ADMIN_TOKEN`), without Ray; the first error is printed with the
application's name and the exit code is 2. Nothing is started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import yaml

IMPORT_PATH = "deploy.app:build_app"
IMPORT_PATHS = (IMPORT_PATH, "deploy.app.build_app")  # (Serve takes the module and attribute either way)
REPO_ROOT = Path(__file__).resolve().parents[1]


def read_serve_config(path: Path | str) -> tuple[Path, dict]:
    """A serve config (its path: as given, or a relative one not found from the working folder taken from the
    repository root) and its contents; ValueError for a file that is not one with a list of applications."""
    path = Path(path)
    path = REPO_ROOT / path if not path.is_absolute() and not path.exists() else path
    try:
        config = yaml.safe_load(path.read_text())
        if not isinstance(config["applications"], list):
            raise TypeError("applications must be a list")
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the serve config {path}: {err}") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a serve config with applications (applications: [...]): {err}") from err
    return path, config


def check(path: Path | str) -> list[str]:
    """The names of the config's applications built with `build_app`; ValueError naming the file, the application
    and what is wrong at the first that cannot be built."""
    from deploy.app import build_app, worker_family
    from service.deployments import single_coordinator, worker_app_name

    path, config = read_serve_config(path)
    built = []
    families: dict[str, str] = {}  # the expert workers' name prefix -> the application that has it
    for index, application in enumerate(config["applications"]):
        if not isinstance(application, dict) or application.get("import_path") not in IMPORT_PATHS:
            continue
        name = application.get("name", f"#{index}")
        env_vars = (application.get("runtime_env") or {}).get("env_vars") or {}
        try:  # (os.environ as Ray sets a runtime_env's env_vars for the build, restored after)
            for override in application.get("deployments") or []:
                if isinstance(override, dict) and override.get("name") == "Coordinator":
                    single_coordinator(SimpleNamespace(**override))
            with mock.patch.dict(os.environ, {str(k): str(v) for k, v in env_vars.items()}):
                build_app(application.get("args") or {})
        except (ValueError, TypeError, OSError) as err:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"{path}: application {name!r} cannot be built: {err}") from err
        # two apps whose workers are named alike retire (or adopt) each other's as their own earlier ones
        app_name = (application.get("args") or {}).get("app_name")
        family = worker_family(app_name or worker_app_name(str(application.get("name", "default"))))
        if family in families:
            raise ValueError(f"{path}: applications {families[family]!r} and {name!r} name their expert workers alike "
                             f"({family}...): each would retire the other's as its own; give each its own app_name "
                             "(or leave it out: the application's name is used)")
        families[family] = name
        built.append(name)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a `serve run` config (deploy/config.yaml)")
    args = parser.parse_args(argv)
    try:
        built = check(args.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: {', '.join(built) or 'no application of ours'} built; starting Serve", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
