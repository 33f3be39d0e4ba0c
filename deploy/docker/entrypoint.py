#!/usr/bin/env python3
"""Container entrypoint: `unlearnd serve` with secrets taken from the environment.

The server config file (mounted, e.g. from a ConfigMap) holds no secrets: tenant keys
and the admin key are read by the server itself through `api_key_env` / `admin_key_env`.
The registry's database URL carries a password, so it comes from the environment too:
when UNLEARND_DATABASE_URL is set, it is written into a private copy of the config
(`database_url`) before the server starts. Every argument is passed on to `unlearnd serve`.
"""

from __future__ import annotations

import os
import sys
import tempfile

import yaml


def main(argv: list[str]) -> None:
    args = list(argv)
    url = os.environ.get("UNLEARND_DATABASE_URL")
    if url and "--config" in args:
        i = args.index("--config") + 1
        with open(args[i]) as f:
            config = yaml.safe_load(f) or {}
        config["database_url"] = url
        base = os.path.dirname(os.path.abspath(args[i]))
        # Relative paths are relative to the config file: keep them meaning the same.
        for entry, keys in [(config, ("model", "state_dir"))] + [
                (t, ("adapter", "policy")) for t in config.get("tenants") or []]:
            for key in keys:
                if entry.get(key) and not os.path.isabs(str(entry[key])):
                    entry[key] = os.path.join(base, str(entry[key]))
        fd, merged = tempfile.mkstemp(prefix="unlearnd-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:  # mode 0600: it holds the database password
            yaml.safe_dump(config, f)
        args[i] = merged
    os.execvp("unlearnd", ["unlearnd", "serve", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
