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
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

IMPORT_PATH = "deploy.app:build_app"


@contextlib.contextmanager
def _env(variables: dict) -> Iterator[None]:
    """os.environ with `variables` set (as Ray sets a runtime_env's env_vars for the build), restored after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({str(name): str(value) for name, value in variables.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check(path: Path) -> list[str]:
    """The names of the config's applications built with `build_app`; ValueError naming the file, the application
    and what is wrong at the first that cannot be built."""
    from deploy.app import build_app

    try:
        config = yaml.safe_load(path.read_text())
        applications = config["applications"]
        if not isinstance(applications, list):
            raise TypeError("applications must be a list")
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the serve config {path}: {err}") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a serve config with applications (applications: [...]): {err}") from err
    built = []
    for index, application in enumerate(applications):
        if not isinstance(application, dict) or application.get("import_path") != IMPORT_PATH:
            continue
        name = application.get("name", f"#{index}")
        env_vars = (application.get("runtime_env") or {}).get("env_vars") or {}
        try:
            with _env(env_vars):
                build_app(application.get("args") or {})
        except (ValueError, TypeError, OSError) as err:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"{path}: application {name!r} cannot be built: {err}") from err
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
