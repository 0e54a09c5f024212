"""deploy/ agrees with itself and with the code: compose, Kubernetes, Dockerfiles, auth config.

There is no container engine here, so these checks stand in for `docker compose config` and
`kubectl apply --dry-run`: the files parse, names, ports, images and environment variables
match across files and with cars_ml, every entry-point command parses with that entry point's
own parser, and no credential is written anywhere but in the (git-ignored) env file.
"""

from __future__ import annotations

import configparser
import importlib
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

import cars_ml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(ROOT / "entrypoints"))

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
K8S = {
    p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
}
K8S_DOCS = [doc for docs in K8S.values() for doc in docs]
ENV_EXAMPLE = dict(
    line.split("=", 1)
    for line in (DEPLOY / ".env.example").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
# Names whose values must come from the env file / a Secret; of those, the PASSWORD-like ones
# are also searched for as literal values (user names such as "cars-ml" appear as labels).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER|USERNAME")
SECRET_VALUE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:[^@\s]+@")
IMAGE = f"cars-ml:{cars_ml.__version__}"
MODEL_URI = f"models:/{cars_ml.REGISTERED_MODEL_NAME}@{cars_ml.CHAMPION_ALIAS}"
SERVE_PORT = 8080


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==", 1) for d in deps)


def _dockerfile(name: str) -> str:
    return (DEPLOY / name).read_text().replace("\\\n", " ")


def _dockerfile_cmd(name: str) -> list[str]:
    (raw,) = re.findall(r"^CMD (\[.*\])\s*$", _dockerfile(name), re.MULTILINE)
    return json.loads(raw)


def _dockerfile_env(name: str) -> dict[str, str]:
    env = {}
    for line in re.findall(r"^ENV (.*)$", _dockerfile(name), re.MULTILINE):
        env.update(dict(item.split("=", 1) for item in shlex.split(line)))
    return env


def _k8s(kind: str, name: str) -> dict:
    (doc,) = [d for d in K8S_DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _containers() -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", c) for d in K8S_DOCS
            if d["kind"] in ("Deployment", "Job") for c in _pod(d)["containers"]]  # fmt: skip


def _k8s_env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _compose_command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _all_commands() -> list[tuple[str, list[str]]]:
    commands = [(f"compose {n}", _compose_command(s)) for n, s in SERVICES.items()]
    commands += [(w, [str(a) for a in c.get("command", []) + c.get("args", [])])
                 for w, c in _containers()]  # fmt: skip
    commands += [(n, _dockerfile_cmd(n)) for n in ("Dockerfile.mlflow", "Dockerfile.serve")]
    return commands


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_kubernetes_objects_are_complete_and_selectors_match():
    assert set(K8S) >= {"tracking-server.yaml", "tune-job.yaml", "train-job.yaml", "serving.yaml"}
    for doc in K8S_DOCS:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in K8S_DOCS
                  if d["kind"] in ("Deployment", "Job")]  # fmt: skip
    for doc in K8S_DOCS:
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), doc
            for port in doc["spec"]["ports"]:
                target = _k8s("Deployment", doc["metadata"]["name"])
                ports = [p["containerPort"] for c in _pod(target)["containers"] for p in c["ports"]]
                assert port["targetPort"] in ports


def test_tracking_uri_names_the_server_in_compose_and_kubernetes():
    uris = {SERVICES[n]["environment"]["MLFLOW_TRACKING_URI"] for n in ("serve", "tune")}
    uris |= {_k8s_env(c)["MLFLOW_TRACKING_URI"] for _, c in _containers() if c["name"] != "mlflow"}
    (uri,) = uris
    url = urlparse(uri)
    assert url.scheme == "http" and url.hostname in SERVICES
    server_args = _dockerfile_cmd("Dockerfile.mlflow")
    assert int(_flag(server_args, "--port")) == url.port
    assert f"127.0.0.1:{url.port}:{url.port}" in SERVICES["mlflow"]["ports"]
    service = _k8s("Service", url.hostname)
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    assert f"EXPOSE {url.port}" in _dockerfile("Dockerfile.mlflow")
    # The server accepts API calls only for allowed Host headers: the service name must match.
    allowed = _dockerfile_env("Dockerfile.mlflow")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"{url.hostname}:*" in allowed and f"{url.hostname}.*" in allowed


def test_tracking_server_runs_the_same_command_everywhere_behind_basic_auth():
    command = _dockerfile_cmd("Dockerfile.mlflow")
    k8s_container = _pod(_k8s("Deployment", "mlflow"))["containers"][0]
    assert k8s_container["args"] == command
    assert "command" not in SERVICES["mlflow"], "compose must use the image's command"
    assert SERVICES["mlflow"]["image"] == k8s_container["image"]
    assert SERVICES["mlflow"]["image"] == f"cars-ml/mlflow-server:{_pins()['mlflow']}"
    assert _flag(command, "--app-name") == "basic-auth"
    backend = urlparse(_flag(command, "--backend-store-uri"))
    assert backend.scheme == "postgresql" and backend.password is None
    assert (
        backend.hostname in SERVICES
        and backend.path.lstrip("/") == (SERVICES["postgres"]["environment"]["POSTGRES_DB"])
    )
    bucket = urlparse(_flag(command, "--artifacts-destination"))
    assert bucket.scheme == "s3"
    assert f"local/{bucket.netloc}" in SERVICES["minio-init"]["command"][0]
    endpoint = "http://minio:9000"
    assert SERVICES["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    assert _k8s_env(k8s_container)["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    assert "127.0.0.1:9000:9000" in SERVICES["minio"]["ports"]
    env = _dockerfile_env("Dockerfile.mlflow")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert f"COPY deploy/auth/basic_auth.ini {env['MLFLOW_AUTH_CONFIG_PATH']}" in _dockerfile(
        "Dockerfile.mlflow"
    )


def test_mlflow_image_pins_equal_pyproject():
    pins = _pins()
    text = _dockerfile("Dockerfile.mlflow")
    assert f'"mlflow[auth]=={pins["mlflow"]}"' in text
    assert f'"psycopg[binary]=={pins["psycopg[binary]"]}"' in text
    assert f'"boto3=={pins["boto3"]}"' in text


def test_basic_auth_config_has_no_password_and_names_databases_that_exist():
    config = configparser.ConfigParser()
    config.read(DEPLOY / "auth" / "basic_auth.ini")
    section = config["mlflow"]
    assert "admin_password" not in section, "the admin password comes from a secret"
    assert section["authorization_function"] == (
        "mlflow.server.auth:authenticate_request_basic_auth"
    )
    assert section["default_permission"] in ("READ", "NO_PERMISSIONS")
    url = urlparse(section["database_uri"])
    assert url.password is None and url.hostname in SERVICES
    init = (DEPLOY / "postgres" / "init.sql").read_text()
    assert f"CREATE DATABASE {url.path.lstrip('/')};" in init
    assert (
        "./postgres/init.sql:/docker-entrypoint-initdb.d/init.sql:ro"
        in (SERVICES["postgres"]["volumes"])
    )


def test_serving_container_serves_the_champion_on_one_port_with_a_ping_probe():
    command = _dockerfile_cmd("Dockerfile.serve")
    deployment = _k8s("Deployment", "cars-ml-serve")
    (container,) = _pod(deployment)["containers"]
    assert container["args"] == command
    assert command[:3] == ["mlflow", "models", "serve"]
    assert _flag(command, "-m") == MODEL_URI and _flag(command, "--env-manager") == "local"
    assert int(_flag(command, "-p")) == SERVE_PORT and _flag(command, "-h") == "0.0.0.0"
    assert f"EXPOSE {SERVE_PORT}" in _dockerfile("Dockerfile.serve")
    assert f"127.0.0.1:{SERVE_PORT}/ping" in _dockerfile("Dockerfile.serve")
    assert f"127.0.0.1:{SERVE_PORT}:{SERVE_PORT}" in SERVICES["serve"]["ports"]
    assert f"127.0.0.1:{SERVE_PORT}/ping" in " ".join(SERVICES["serve"]["healthcheck"]["test"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": SERVE_PORT}
    assert [p["containerPort"] for p in container["ports"]] == [SERVE_PORT]
    service = _k8s("Service", "cars-ml-serve")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [SERVE_PORT]
    # The serving image needs no S3 credentials: it reads through the server's artifact proxy.
    assert not [k for k in _k8s_env(container) if k.startswith("AWS_")]


def test_project_images_are_the_package_version():
    images = {SERVICES[n]["image"] for n in ("serve", "tune")}
    images |= {c["image"] for _, c in _containers() if c["name"] != "mlflow"}
    assert images == {IMAGE}
    for name in ("serve", "tune", "mlflow"):
        assert SERVICES[name]["build"]["context"] == ".."
        assert (ROOT / SERVICES[name]["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("where_args", _all_commands(), ids=lambda wa: wa[0])
def test_entry_point_commands_parse_with_their_own_parser(where_args):
    where, args = where_args
    scripts = [i for i, a in enumerate(args) if re.fullmatch(r"entrypoints/\w+\.py", a)]
    for index in scripts:
        script = args[index]
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        parser = importlib.import_module(Path(script).stem).build_parser()
        parser.exit_on_error = False
        try:
            parser.parse_args(args[index + 1 :])
        except SystemExit as exc:  # argparse reports unknown flags and bad values this way
            raise AssertionError(f"{where}: {shlex.join(args)} does not parse") from exc


def test_tune_workers_share_one_study_and_train_takes_its_best():
    job = _k8s("Job", "cars-ml-tune")
    assert job["spec"]["parallelism"] >= 2
    (tune,) = _pod(job)["containers"]
    (train,) = _pod(_k8s("Job", "cars-ml-train"))["containers"]
    compose_tune = _compose_command(SERVICES["tune"])
    study, storage = _flag(tune["args"], "--study_name"), _flag(tune["args"], "--storage")
    assert _flag(train["args"], "--params_from") == study
    assert _flag(train["args"], "--storage") == storage
    assert (_flag(compose_tune, "--study_name"), _flag(compose_tune, "--storage")) == (
        study,
        storage,
    )
    url = urlparse(storage)
    assert url.scheme == "postgresql" and url.password is None
    assert f"CREATE DATABASE {url.path.lstrip('/')};" in (DEPLOY / "postgres/init.sql").read_text()
    for container in (tune, train):
        assert "secretKeyRef" in _k8s_env(container)["PGPASSWORD"]
    assert SERVICES["tune"]["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")


def test_credentials_come_only_from_the_environment():
    secrets = {v for k, v in ENV_EXAMPLE.items() if SECRET_VALUE_NAME.search(k)}
    for where, args in _all_commands():
        text = " ".join(args)
        assert not URL_WITH_PASSWORD.search(text), f"{where}: a URL with a password"
        assert not [s for s in secrets if s in text], f"{where}: a credential in the command"
    for where, container in _containers():
        for name, value in _k8s_env(container).items():
            if SECRET_NAME.search(name):
                ref = value["secretKeyRef"] if isinstance(value, dict) else None
                assert ref, f"{where}: {name} must come from a Secret (secretKeyRef)"
                assert ref["name"] == "cars-ml-secrets" and ref["key"] in ENV_EXAMPLE
    for service_name, service in SERVICES.items():
        for name, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(name):
                match = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str(value))
                assert match, f"compose {service_name}: {name} must be ${{VAR:?...}} from .env"
                assert match.group(1) in ENV_EXAMPLE
    for path in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), *DEPLOY.glob("Dockerfile.*"),
                 DEPLOY / "auth" / "basic_auth.ini"]:  # fmt: skip
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), path
        assert not [s for s in secrets if s in text], f"{path}: an example credential"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_readme_mentions_only_deploy_files_that_exist():
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else ""
    # deploy/.env is the user's own copy of deploy/.env.example (git-ignored), not a repo file.
    for path in set(re.findall(r"\bdeploy/[\w./-]+\w", readme)) - {"deploy/.env"}:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
