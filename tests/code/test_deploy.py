"""deploy/ agrees with itself and with the code: compose, Kubernetes, Dockerfiles, auth config.

It also holds every workload to least privilege: its own database role and MinIO user, a
read-only MLflow account for serving, non-root and read-only containers without capabilities,
CPU and memory limits, pinned images and a NetworkPolicy that opens only the paths needed.

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
INIT_SQL = (DEPLOY / "postgres" / "init.sql").read_text()
MINIO_INIT_PATH = DEPLOY / "minio" / "init.sh"
MINIO_INIT = MINIO_INIT_PATH.read_text() if MINIO_INIT_PATH.exists() else ""
# Workloads that only prepare storage: they run a third-party image, not the project's.
STORAGE_INIT = {"Job/cars-ml-minio-init"}
# Compose services that may start as root, each with only the capabilities listed.
ROOT_SERVICES = {"minio-volume-owner": ["CHOWN"]}
ROOT_CREDENTIALS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


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
    return [
        (f"{d['kind']}/{d['metadata']['name']}", c)
        for d in K8S_DOCS
        if d["kind"] in ("Deployment", "Job")
        for c in _pod(d)["containers"]
    ]


def _project_containers() -> list[tuple[str, dict]]:
    return [(w, c) for w, c in _containers() if w not in STORAGE_INIT]


def _workloads() -> list[dict]:
    return [d for d in K8S_DOCS if d["kind"] in ("Deployment", "Job")]


def _secret_key(container: dict, name: str) -> str:
    ref = _k8s_env(container)[name]
    assert isinstance(ref, dict) and "secretKeyRef" in ref, f"{name} must come from a Secret"
    return ref["secretKeyRef"]["key"]


def _compose_var(service: str, name: str) -> str:
    match = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str(SERVICES[service]["environment"][name]))
    assert match, f"compose {service}: {name} must be ${{VAR:?...}}"
    return match.group(1)


def _database_owners() -> dict[str, str]:
    return dict(re.findall(r"^CREATE DATABASE (\w+) OWNER (\w+);", INIT_SQL, re.MULTILINE))


def _k8s_env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _compose_command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _all_commands() -> list[tuple[str, list[str]]]:
    commands = [(f"compose {n}", _compose_command(s)) for n, s in SERVICES.items()]
    commands += [
        (w, [str(a) for a in c.get("command", []) + c.get("args", [])]) for w, c in _containers()
    ]
    commands += [(n, _dockerfile_cmd(n)) for n in ("Dockerfile.mlflow", "Dockerfile.serve")]
    return commands


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_kubernetes_objects_are_complete_and_selectors_match():
    assert set(K8S) >= {"tracking-server.yaml", "tune-job.yaml", "train-job.yaml", "serving.yaml"}
    for doc in K8S_DOCS:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in K8S_DOCS
        if d["kind"] in ("Deployment", "Job")
    ]
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
    uris |= {
        _k8s_env(c)["MLFLOW_TRACKING_URI"]
        for _, c in _project_containers()
        if c["name"] != "mlflow"
    }
    (uri,) = uris
    url = urlparse(uri)
    assert url.scheme == "http" and url.hostname in SERVICES
    server_args = _dockerfile_cmd("Dockerfile.mlflow")
    assert int(_flag(server_args, "--port")) == url.port
    assert f"127.0.0.1:{url.port}:{url.port}" in SERVICES["mlflow"]["ports"]
    service = _k8s("Service", url.hostname)
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    assert f"EXPOSE {url.port}" in _dockerfile("Dockerfile.mlflow")
    # The server accepts API calls only for exact Host headers: the service name and port the
    # clients use, and loopback for the health check; no wildcard.
    allowed = _dockerfile_env("Dockerfile.mlflow")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert allowed == [f"{url.hostname}:{url.port}", f"127.0.0.1:{url.port}"]


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
    assert backend.hostname in SERVICES
    assert _database_owners()[backend.path.lstrip("/")] == backend.username == "mlflow"
    bucket = urlparse(_flag(command, "--artifacts-destination"))
    assert bucket.scheme == "s3"
    assert (
        f"\nbucket={bucket.netloc} " in MINIO_INIT
        and 'mc mb --ignore-existing "local/$bucket"' in (MINIO_INIT)
    )
    assert SERVICES["minio-init"]["command"] == ["/init/init.sh"]
    assert "./minio:/init:ro" in SERVICES["minio-init"]["volumes"]
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
    assert _database_owners()[url.path.lstrip("/")] == url.username == "mlflow"
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
    images |= {c["image"] for _, c in _project_containers() if c["name"] != "mlflow"}
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
    assert _database_owners()[url.path.lstrip("/")] == url.username == "optuna"
    for container in (tune, train):
        assert _secret_key(container, "PGPASSWORD") == "OPTUNA_DB_PASSWORD"
    assert _compose_var("tune", "PGPASSWORD") == "OPTUNA_DB_PASSWORD"


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
                assert ref["key"] in ENV_EXAMPLE, f"{where}: {ref['key']} not in .env.example"
                # Root credentials live in their own Secret, which only storage init reads.
                secret = (
                    "cars-ml-storage-admin" if ref["key"] in ROOT_CREDENTIALS else "cars-ml-secrets"
                )
                assert ref["name"] == secret, f"{where}: {name} from {ref['name']}"
    for service_name, service in SERVICES.items():
        for name, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(name):
                match = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str(value))
                assert match, f"compose {service_name}: {name} must be ${{VAR:?...}} from .env"
                assert match.group(1) in ENV_EXAMPLE
    for path in [
        *DEPLOY.rglob("*.yaml"),
        *DEPLOY.rglob("*.yml"),
        *DEPLOY.glob("Dockerfile.*"),
        DEPLOY / "auth" / "basic_auth.ini",
        *DEPLOY.glob("postgres/*"),
        *DEPLOY.glob("minio/*"),
    ]:
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), path
        assert not [s for s in secrets if s in text], f"{path}: an example credential"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_readme_mentions_only_deploy_files_that_exist():
    # The README and the guides under docs/ (the deploy/ walk-through is docs/scale-out.md).
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text() if page.exists() else ""
        # deploy/.env is the user's own copy of deploy/.env.example (git-ignored), not a repo file.
        for path in set(re.findall(r"\bdeploy/[\w./-]+\w", text)) - {"deploy/.env"}:
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


# --- Least privilege ---------------------------------------------------------------------------


def _quantity(value: object) -> float:
    units = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def _all_k8s_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@pytest.mark.parametrize("doc", _workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_pods_run_unprivileged_on_read_only_file_systems(doc):
    pod = _pod(doc)
    pod_context = pod.get("securityContext", {})
    assert pod.get("automountServiceAccountToken") is False, "no pod here calls the API"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for container in _all_k8s_containers(pod):
        where = f"{doc['metadata']['name']}/{container['name']}"
        context = {**pod_context, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, where
        assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, where
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert context.get("privileged", False) is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not context.get("capabilities", {}).get("add"), where
        # A read-only root still needs a scratch /tmp (temporary files, downloaded models).
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert mounts.get("/tmp") in empty_dirs, f"{where}: /tmp must be an emptyDir"
        home = _k8s_env(container).get("HOME")
        assert home is None or home == "/tmp" or home in mounts, f"{where}: HOME not writable"
    for volume in pod.get("volumes", []):
        assert "hostPath" not in volume, f"{doc['metadata']['name']}: hostPath {volume['name']}"


@pytest.mark.parametrize("doc", _workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_containers_request_and_limit_cpu_and_memory(doc):
    for container in _all_k8s_containers(_pod(doc)):
        where = f"{doc['metadata']['name']}/{container['name']}"
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
            assert set(resources[kind]) <= {"cpu", "memory", "ephemeral-storage"}, where
        for resource in ("cpu", "memory"):
            request = _quantity(resources["requests"][resource])
            assert request <= _quantity(resources["limits"][resource]), f"{where}: {resource}"


def _images() -> list[tuple[str, str]]:
    images = [(f"compose {n}", s["image"]) for n, s in SERVICES.items()]
    images += [
        (f"{d['metadata']['name']}/{c['name']}", c["image"])
        for d in _workloads()
        for c in _all_k8s_containers(_pod(d))
    ]
    for name in ("Dockerfile.mlflow", "Dockerfile.serve"):
        images += [(name, image) for image in re.findall(r"^FROM (\S+)", _dockerfile(name), re.M)]
    return images


@pytest.mark.parametrize("where_image", _images(), ids=lambda wi: wi[0])
def test_images_are_pinned_by_version(where_image):
    where, image = where_image
    name, _, tag = image.rpartition("/")[2].partition(":")
    assert tag and tag != "latest", f"{where}: {image} must name a version"
    assert re.search(r"\d", tag), f"{where}: {image}'s tag {tag!r} is not a version"
    if where.startswith("compose "):
        assert "${" not in image, f"{where}: the image must not come from the environment"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_services_run_unprivileged_with_limits(name):
    service = SERVICES[name]
    assert service.get("read_only") is True, f"{name}: read_only: true"
    assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop: [ALL]"
    assert "no-new-privileges:true" in service.get("security_opt", []), name
    assert not service.get("privileged") and service.get("network_mode") != "host", name
    user = str(service.get("user", ""))
    if name in ROOT_SERVICES:
        # A root helper holds only the capabilities named and cannot reach the network.
        assert service.get("cap_add") == ROOT_SERVICES[name] and service["network_mode"] == "none"
    else:
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"{name}: user: UID:GID, not root"
        assert not service.get("cap_add"), f"{name}: no capabilities added"
    assert re.fullmatch(r"[1-9]\d*[kmg]", str(service.get("mem_limit"))), f"{name}: mem_limit"
    assert float(service.get("cpus", 0)) > 0, f"{name}: cpus"


def test_database_roles_are_separate_and_no_client_holds_the_superuser():
    roles = re.findall(r"^CREATE ROLE (\w+) (.*);$", INIT_SQL, re.MULTILINE)
    assert {role for role, _ in roles} == {"mlflow", "optuna"}
    for role, options in roles:
        assert {"LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"} <= set(options.split()), role
        assert re.search(r"PASSWORD :'\w+'$", options), f"{role}: password from the environment"
    assert _database_owners() == {"mlflow": "mlflow", "mlflow_auth": "mlflow", "optuna": "optuna"}
    assert "REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;" in INIT_SQL
    # init.sql reads each role's password from the variable the clients' PGPASSWORD comes from.
    for variable in ("MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD"):
        assert f" {variable}\n" in INIT_SQL and variable in ENV_EXAMPLE
        assert _compose_var("postgres", variable) == variable
    # The superuser password reaches PostgreSQL only; each client has its role's password.
    tracking = _pod(_k8s("Deployment", "mlflow"))["containers"][0]
    assert _secret_key(tracking, "PGPASSWORD") == "MLFLOW_DB_PASSWORD"
    assert _compose_var("mlflow", "PGPASSWORD") == "MLFLOW_DB_PASSWORD"
    for job in ("cars-ml-tune", "cars-ml-train"):
        (container,) = _pod(_k8s("Job", job))["containers"]
        assert _secret_key(container, "PGPASSWORD") == "OPTUNA_DB_PASSWORD"
        assert urlparse(_flag(container["args"], "--storage")).username == "optuna"
    assert urlparse(_flag(_compose_command(SERVICES["tune"]), "--storage")).username == "optuna"
    assert "POSTGRES_USER" not in SERVICES["postgres"]["environment"], "the superuser is postgres"
    for where, container in _containers():
        keys = [
            v["secretKeyRef"]["key"]
            for v in _k8s_env(container).values()
            if isinstance(v, dict) and "secretKeyRef" in v
        ]
        assert "POSTGRES_PASSWORD" not in keys, where
    users = {n for n, s in SERVICES.items() if "POSTGRES_PASSWORD" in (s.get("environment") or {})}
    assert users == {"postgres"}


def test_minio_clients_get_a_user_limited_to_the_artifact_bucket():
    bucket = urlparse(_flag(_dockerfile_cmd("Dockerfile.mlflow"), "--artifacts-destination"))
    policy = json.loads((DEPLOY / "minio" / "artifacts-policy.json").read_text())
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket.netloc}", f"arn:aws:s3:::{bucket.netloc}/*"}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert all(a.startswith("s3:") and "*" not in a and "Policy" not in a for a in actions)
    assert "mc admin policy create local mlflow-artifacts" in MINIO_INIT
    assert 'mc admin user add local "$MINIO_MLFLOW_USER" "$MINIO_MLFLOW_PASSWORD"' in MINIO_INIT
    assert 'mc admin policy attach local mlflow-artifacts --user "$MINIO_MLFLOW_USER"' in MINIO_INIT
    # The tracking server (the only S3 client; others use its proxy) logs in as that user.
    tracking = _pod(_k8s("Deployment", "mlflow"))["containers"][0]
    for name, key in (
        ("AWS_ACCESS_KEY_ID", "MINIO_MLFLOW_USER"),
        ("AWS_SECRET_ACCESS_KEY", "MINIO_MLFLOW_PASSWORD"),
    ):
        assert _secret_key(tracking, name) == key and _compose_var("mlflow", name) == key
    # Root credentials: MinIO itself and the one-shot init, nothing else.
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        users = {n for n, s in SERVICES.items() if key in str(s.get("environment"))}
        assert users == {"minio", "minio-init"}, key
        k8s_users = {w for w, c in _containers() if key in str(_k8s_env(c))}
        assert k8s_users == STORAGE_INIT, key
    (init,) = _pod(_k8s("Job", "cars-ml-minio-init"))["containers"]
    assert init["command"] == ["/bin/sh", "/init/init.sh"]
    assert {"name": "init", "configMap": {"name": "cars-ml-minio-init"}} in (
        _pod(_k8s("Job", "cars-ml-minio-init"))["volumes"]
    )


def test_serving_uses_a_read_only_mlflow_account_and_no_service_account_token():
    (container,) = _pod(_k8s("Deployment", "cars-ml-serve"))["containers"]
    assert _secret_key(container, "MLFLOW_TRACKING_USERNAME") == "MLFLOW_SERVE_USERNAME"
    assert _secret_key(container, "MLFLOW_TRACKING_PASSWORD") == "MLFLOW_SERVE_PASSWORD"
    assert _compose_var("serve", "MLFLOW_TRACKING_USERNAME") == "MLFLOW_SERVE_USERNAME"
    assert _compose_var("serve", "MLFLOW_TRACKING_PASSWORD") == "MLFLOW_SERVE_PASSWORD"
    assert _pod(_k8s("Deployment", "cars-ml-serve"))["automountServiceAccountToken"] is False
    for env in (_k8s_env(container), SERVICES["serve"]["environment"]):
        assert not [k for k in env if k.startswith(("AWS_", "PG"))], "serving needs no storage"
    # A user nobody granted anything: basic auth's default permission lets it read, no more.
    config = configparser.ConfigParser()
    config.read(DEPLOY / "auth" / "basic_auth.ini")
    assert config["mlflow"]["default_permission"] == "READ"
    serve_user = ENV_EXAMPLE["MLFLOW_SERVE_USERNAME"]
    assert serve_user not in (
        ENV_EXAMPLE["MLFLOW_TRACKING_USERNAME"],
        config["mlflow"]["admin_username"],
    )


APPS = {
    "mlflow",
    "postgres",
    "minio",
    "cars-ml-serve",
    "cars-ml-tune",
    "cars-ml-train",
    "cars-ml-minio-init",
}


def test_network_policy_denies_ingress_except_the_paths_needed():
    """Read plainly: one ingress policy per server names its port and its clients by name
    ("*" where the rule has no peers: anyone may connect)."""
    policies = {d["metadata"]["name"]: d["spec"] for d in K8S_DOCS if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert not deny.get("ingress")
    allowed = {}
    for spec in policies.values():
        if spec["policyTypes"] != ["Ingress"] or not spec["podSelector"]:
            continue
        assert set(spec["podSelector"]) == {"matchLabels"}, spec["podSelector"]
        server = spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        (rule,) = spec["ingress"]
        clients = {"*"}
        if "from" in rule:
            # One peer, naming its clients: no namespace or IP peers.
            ((peer,),) = [rule["from"]]
            (expression,) = peer["podSelector"]["matchExpressions"]
            assert expression["key"] == "app.kubernetes.io/name"
            assert expression["operator"] == "In"
            clients = set(expression["values"])
        ports = {p["port"] for p in rule["ports"]}
        assert server not in allowed, f"{server}: one ingress policy per server"
        allowed[server] = (ports, clients)
    assert allowed == {
        "mlflow": ({5000}, {"cars-ml-train", "cars-ml-tune", "cars-ml-serve"}),
        "postgres": ({5432}, {"mlflow", "cars-ml-tune", "cars-ml-train"}),
        "minio": ({9000}, {"mlflow", "cars-ml-minio-init"}),
        "cars-ml-serve": ({SERVE_PORT}, {"*"}),
    }
    # Every workload is one of the names above, and the ports opened are the ones the
    # services listen on.
    workloads = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for d in _workloads()
    }
    assert workloads <= APPS
    for server, (ports, _) in allowed.items():
        if server in ("postgres", "minio"):
            continue  # the user's own installations: no Service in deploy/k8s
        service = _k8s("Service", server)
        assert ports == {p["port"] for p in service["spec"]["ports"]}, server


def test_network_policy_denies_egress_except_the_paths_needed():
    """Read plainly: one egress policy per client names each server and port it may reach."""
    policies = {d["metadata"]["name"]: d["spec"] for d in K8S_DOCS if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-egress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Egress"]
    (dns,) = deny["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    allowed = {}
    for spec in policies.values():
        if spec["policyTypes"] != ["Egress"] or not spec["podSelector"]:
            continue
        client = spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        allowed[client] = {
            (rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], port["port"])
            for rule in spec["egress"]
            for port in rule["ports"]
        }
    assert allowed == {
        "cars-ml-train": {("mlflow", 5000), ("postgres", 5432)},
        "cars-ml-tune": {("mlflow", 5000), ("postgres", 5432)},
        "cars-ml-serve": {("mlflow", 5000)},
        "mlflow": {("postgres", 5432), ("minio", 9000)},
        "cars-ml-minio-init": {("minio", 9000)},
    }


def test_no_comment_loads_superuser_or_root_credentials_into_the_application_secret():
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        text = path.read_text()
        assert "cars-ml-secrets --from-env-file=deploy/.env" not in text, path.name
