"""deploy/compose and deploy/docker: files the stack mounts exist and the configs parse.

No container engine runs here, so the images are not built and the stack is not
started; these checks are what can be done without one.
"""

from __future__ import annotations

import re

import yaml

from tests.deploy.deploy_files import COMPOSE, DEPLOY, REPO
from unlearnd.serve.config import EngineConfig, TenantConfig


def test_compose_mounts_exist_and_services_are_complete() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"unlearnd", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):  # bind mounts of files in this repo
                assert (COMPOSE / source).exists(), (name, source)
        build = svc.get("build")
        if build:
            assert (COMPOSE / build["context"] / build["dockerfile"]).is_file(), name
    assert set(compose["volumes"]) >= {"unlearnd-state", "prometheus-data", "grafana-data"}


def test_compose_server_config_is_valid() -> None:
    config = yaml.safe_load((COMPOSE / "config" / "unlearnd.yaml").read_text())
    EngineConfig.model_validate(config["engine"])
    for t in config["tenants"]:
        TenantConfig.model_validate(t)
    assert config["host"] == "0.0.0.0" and config["state_dir"] == "/var/lib/unlearnd"


def test_images_run_unprivileged_with_a_health_check() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert user and not user[-1].startswith(("0", "root")), name
        assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.MULTILINE), name
        for src in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
            assert (REPO / src).exists(), (name, src)
        assert (DEPLOY / "docker" / f"{name}.dockerignore").is_file(), name
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert "pip uninstall -y torchvision torchaudio torchcodec" in cpu  # scripts/setup.sh fix
