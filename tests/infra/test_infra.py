"""The production stack in infra/ holds together: every file parses, names and ports agree across services,
secrets only come from the environment, and the Kubernetes pool template passes Prefect's own validation.

Docker cannot run on the build machines, so these checks read the files (with Prefect's and MLflow's own
validators where they exist); `docker compose config` is used as a cross-check when the plugin is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
INIT_SCRIPT = INFRA / "postgres" / "init-databases.sh"
K8S = INFRA / "k8s"
STACK_SERVICES = {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "worker"}
POSTGRES_PORT = 5432  # the postgres image's port; the service runs no command that changes it
MINIO_S3_PORT = 9000  # `minio server` without --address
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR, and $$ (a literal $).
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# ---------------------------------------------------------------- helpers: compose semantics, read by hand


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def variable_references(text: str) -> Iterator[tuple[str, str]]:
    """(name, operator) for each variable a compose string references; operator is '' for a plain ${VAR}."""
    for m in _VARIABLE.finditer(text):
        if not m.group("escaped"):
            yield (m.group("braced") or m.group("bare"), m.group("op") or "")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one string (the subset the spec defines for ${...})."""

    def replace(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg") or ""
        value = env.get(name)
        present, non_empty = value is not None, bool(value)
        if op == ":-":
            return value if non_empty else arg
        if op == "-":
            return value if present else arg
        if op in (":?", "?"):
            if non_empty if op == ":?" else present:
                return value
            raise KeyError(f"required variable {name} is missing: {arg}")
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if present else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return node


def undeclared_variables(compose_raw: dict, env_example: dict[str, str]) -> set[str]:
    """Variables that get neither a default in compose nor a line in .env.example."""
    missing = set()
    for text in walk_strings(compose_raw):
        for name, op in variable_references(text):
            if op not in (":-", "-") and name not in env_example:
                missing.add(name)
    return missing


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on", {})
    return {name: {} for name in deps} if isinstance(deps, list) else deps


def parse_port(spec: str | dict) -> tuple[str, int, int, str]:
    """(host_ip, published, target, protocol) for short ("127.0.0.1:80:8080/tcp") or long port syntax."""
    if isinstance(spec, dict):
        return (spec.get("host_ip", ""), int(spec["published"]), int(spec["target"]), spec.get("protocol", "tcp"))
    spec, _, protocol = str(spec).partition("/")
    parts = spec.rsplit(":", 2)
    host_ip = parts[0] if len(parts) == 3 else ""
    published = parts[-2] if len(parts) >= 2 else parts[-1]
    return (host_ip, int(published), int(parts[-1]), protocol or "tcp")


def listening_port(service: dict) -> int:
    """The port the service's process listens on, from its own `--port` argument."""
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    return int(argv[argv.index("--port") + 1])


def named_volume(spec: str | dict) -> str | None:
    if isinstance(spec, dict):
        return spec["source"] if spec.get("type", "volume") == "volume" else None
    source = spec.split(":", 1)[0]
    return None if source.startswith((".", "/", "~")) else source


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def template_defaults(template: dict) -> dict[str, Any]:
    # What a Prefect worker fills in when a deployment sets no job variables: the non-null defaults.
    props = template["variables"]["properties"]
    return {name: spec["default"] for name, spec in props.items() if spec.get("default") is not None}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(compose_raw: dict, env_example: dict[str, str]) -> dict:
    """The compose file as compose sees it once infra/.env is a copy of .env.example."""
    return interpolate_tree(compose_raw, env_example)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def base_job_template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


# ---------------------------------------------------------------- every file parses


def test_every_yaml_and_json_file_in_infra_parses():
    parsed = []
    for path in sorted(INFRA.rglob("*")):
        if path.suffix in (".yml", ".yaml"):
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path} holds no document"
            parsed.append(path.relative_to(INFRA).as_posix())
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
            parsed.append(path.relative_to(INFRA).as_posix())
    assert {"docker-compose.yml", "k8s/base-job-template.json", "k8s/worker.yaml", "k8s/secret.example.yaml"} <= set(
        parsed
    )


# ---------------------------------------------------------------- compose: structure and references


def test_compose_defines_the_stack_services(services):
    assert STACK_SERVICES <= set(services)


def test_every_depends_on_names_a_defined_service_with_a_matching_condition(services):
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            condition = spec.get("condition", "service_started")
            if services[dep].get("restart") == "no":
                assert condition == "service_completed_successfully", f"{name} -> one-shot {dep}"
            elif "healthcheck" in services[dep]:
                assert condition == "service_healthy", f"{name} -> {dep} should wait for health"


def test_every_variable_has_a_default_or_a_line_in_env_example(compose_raw, env_example):
    assert undeclared_variables(compose_raw, env_example) == set()


def test_an_undeclared_variable_is_caught():
    snippet = {
        "services": {"x": {"environment": {"A": "${NOT_IN_EXAMPLE:?boom}", "B": "${HAS_DEFAULT:-1}", "C": "$$LITERAL"}}}
    }
    assert undeclared_variables(snippet, {}) == {"NOT_IN_EXAMPLE"}


def test_interpolation_matches_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$SET ${SET:+alt}", env) == "v d  d $SET alt"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate("${POSTGRES_PASSWORD:?set it}", env)


def test_secrets_are_required_and_never_literal(compose_raw, env_example):
    for text in walk_strings(compose_raw):
        for name, op in variable_references(text):
            if SECRET_NAME.search(name) and name != "HF_TOKEN":
                assert op == ":?", f"${{{name}}} must fail loudly when missing (use :?)"
    for name, service in compose_raw["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert "${" in value, f"{name}.{key} is a literal; secrets come from infra/.env"
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert value == "" or "change-me" in value, f".env.example {key} must hold a placeholder"


def test_the_real_env_file_is_git_ignored():
    result = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert result.returncode == 0


def test_every_named_volume_is_declared_and_used(compose):
    declared = set(compose.get("volumes") or {})
    used = {
        volume
        for service in compose["services"].values()
        for volume in map(named_volume, service.get("volumes", []))
        if volume
    }
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_published_ports_are_unique_and_match_what_the_process_listens_on(services):
    published = []
    for name, service in services.items():
        for _host_ip, port, target, protocol in map(parse_port, service.get("ports", [])):
            published.append((port, protocol))
            if "--port" in str(service.get("command", "")):
                assert target == listening_port(service), f"{name} publishes {target}, listens elsewhere"
    assert len(published) == len(set(published)), f"duplicate published ports: {published}"
    assert parse_port("127.0.0.1:9001:9001") == ("127.0.0.1", 9001, 9001, "tcp")
    assert parse_port("5000:5000/udp") == ("", 5000, 5000, "udp")


def test_images_are_pinned(services):
    for name, service in services.items():
        image = service.get("image", "")
        assert image, f"{name} has no image name"
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned"


def test_long_running_services_restart_and_report_health(services):
    for name, service in services.items():
        if service.get("restart") == "no":
            continue  # one-shot
        assert service.get("restart") in ("always", "unless-stopped"), name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


# ---------------------------------------------------------------- compose: the worker


def test_worker_image_is_built_from_a_dockerfile_that_runs_a_prefect_worker(services):
    build = services["worker"]["build"]
    context = (INFRA / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    assert dockerfile == INFRA / "Dockerfile.worker" and dockerfile.is_file()
    instructions = dockerfile_instructions(dockerfile)
    command = [json.loads(rest) for keyword, rest in instructions if keyword in ("ENTRYPOINT", "CMD")]
    argv = [arg for part in command for arg in part]
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "gpu-pool"
    assert argv[argv.index("--type") + 1] == "process"
    assert "--with-healthcheck" in argv
    assert "command" not in services["worker"], "compose must not replace the image's worker command"
    assert any(k == "RUN" and "pip install" in rest and ".[gpu]" in rest for k, rest in instructions)


def test_worker_build_context_lets_the_project_through():
    allowed = {
        line.strip().lstrip("!").rstrip("/")
        for line in (INFRA / "Dockerfile.worker.dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    }
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Each package's folder: its own package-dir entry, else its parent's folder joined with its last name.
    mapping = setuptools.get("package-dir", {})

    def folder(package: str) -> str:
        if package in mapping:
            return mapping[package]
        parent, _, name = package.rpartition(".")
        return f"{folder(parent)}/{name}" if parent else package

    assert {folder(p).split("/")[0] for p in setuptools["packages"]} <= allowed
    assert {"pyproject.toml", "prefect.yaml", "data_contracts"} <= allowed


def test_worker_reaches_prefect_and_mlflow_by_service_name_and_port(services):
    env = environment(services["worker"])
    for variable, expected_service, path in (
        ("PREFECT_API_URL", "prefect-server", "/api"),
        ("MLFLOW_TRACKING_URI", "mlflow", ""),
    ):
        url = urlsplit(env[variable])
        assert url.scheme == "http"
        assert url.hostname == expected_service and url.hostname in services
        assert url.port == listening_port(services[url.hostname]), f"{variable} port"
        assert url.path.rstrip("/") == path
    assert env["PREFECT_API_AUTH_STRING"] == environment(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"]


def test_worker_gets_hf_token_from_the_host_and_a_gpu(compose_raw, services):
    raw = environment(compose_raw["services"]["worker"])["HF_TOKEN"]
    assert [name for name, _ in variable_references(raw)] == ["HF_TOKEN"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_worker_healthcheck_polls_the_port_prefect_serves_it_on(services):
    from prefect.settings.models.worker import WorkerWebserverSettings

    port = int(environment(services["worker"]).get("PREFECT_WORKER_WEBSERVER_PORT", WorkerWebserverSettings().port))
    assert f"localhost:{port}/health" in " ".join(services["worker"]["healthcheck"]["test"])


def test_worker_volumes_match_the_image_paths(services):
    env = dict(
        item.split("=", 1)
        for keyword, rest in dockerfile_instructions(INFRA / "Dockerfile.worker")
        if keyword == "ENV"
        for item in rest.split()
    )
    targets = {spec.split(":")[1] for spec in services["worker"]["volumes"]}
    assert env["HF_HOME"] in targets
    assert "/opt/ftflow/runs" in targets  # PipelineConfig.output_dir defaults to runs/ under WORKDIR /opt/ftflow


def test_deployments_in_prefect_yaml_can_start_inside_the_worker_image():
    instructions = dockerfile_instructions(INFRA / "Dockerfile.worker")
    (workdir,) = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    env = {
        k: v
        for keyword, rest in instructions
        if keyword == "ENV"
        for k, _, v in [i.partition("=") for i in rest.split()]
    }
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        steps = deployment.get("pull", project.get("pull")) or []
        directories = [
            s["prefect.deployments.steps.set_working_directory"]["directory"]
            for s in steps
            if "prefect.deployments.steps.set_working_directory" in s
        ]
        # Pull steps are resolved against the flow run's environment, so $PWD must mean the code folder there.
        resolved = [d.replace("{{ $PWD }}", env.get("PWD", "<unset>")) for d in directories]
        assert resolved in ([], [workdir]), f"{deployment['name']} would start in {resolved}, the code is in {workdir}"
        entry_file = deployment["entrypoint"].split(":")[0]
        assert (ROOT / entry_file).is_file(), entry_file


def test_mlflow_accepts_the_worker_host_header_and_refuses_others(services, monkeypatch):
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", environment(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"])
    allowed = get_allowed_hosts_from_env()
    worker_host = urlsplit(environment(services["worker"])["MLFLOW_TRACKING_URI"]).netloc
    assert is_allowed_host_header(allowed, worker_host)
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "attacker.example.com:5000")


# ---------------------------------------------------------------- compose: databases and the artifact store


def init_script_facts() -> tuple[set[str], dict[str, str], dict[str, str]]:
    """(databases, database -> owner, role -> environment variable holding its password)."""
    text = INIT_SCRIPT.read_text()
    owners = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", text))
    psql_vars = dict(re.findall(r'-v (\w+)="\$(\w+)"', text))
    role_password_vars = {
        role: psql_vars[var] for role, var in re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD :'(\w+)';", text)
    }
    return set(owners), owners, role_password_vars


def test_init_script_is_valid_bash_and_mounted_into_initdb(services):
    assert subprocess.run(["bash", "-n", str(INIT_SCRIPT)]).returncode == 0
    mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in services["postgres"]["volumes"]}
    source = [src for dst, src in mounts.items() if dst.startswith("/docker-entrypoint-initdb.d/")]
    assert [(INFRA / s).resolve() for s in source] == [INIT_SCRIPT]


def test_database_urls_name_databases_and_roles_the_init_script_creates(services):
    databases, owners, role_password_vars = init_script_facts()
    postgres_env = environment(services["postgres"])
    urls = {
        "prefect-server": environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"],
        "mlflow": environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"],
    }
    assert urlsplit(urls["prefect-server"]).scheme == "postgresql+asyncpg"  # Prefect needs the async driver
    for service, url in urls.items():
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        assert parts.hostname == "postgres" and parts.port == POSTGRES_PORT, service
        assert database in databases, f"{service} uses database {database} the init script never creates"
        assert owners[database] == parts.username, f"{service} connects as a role that does not own {database}"
        # The password in the URL is the one the init script gave that role.
        assert parts.password == postgres_env[role_password_vars[parts.username]], service
    assert {urlsplit(u).path.lstrip("/") for u in urls.values()} == {"prefect", "mlflow"}


def test_mlflow_backend_uri_names_a_driver_its_image_installs(services):
    # A bare postgresql:// means psycopg2 under SQLAlchemy 2.0 and psycopg 3 under 2.1: name the driver.
    scheme = urlsplit(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]).scheme
    dialect, _, driver = scheme.partition("+")
    assert dialect == "postgresql" and driver in ("psycopg", "psycopg2"), scheme
    package = {"psycopg": "psycopg", "psycopg2": "psycopg2-binary"}[driver]
    installs = " ".join(
        rest for keyword, rest in dockerfile_instructions(INFRA / "Dockerfile.mlflow") if keyword == "RUN"
    )
    assert re.search(rf'"{re.escape(package)}[\[=]', installs), f"Dockerfile.mlflow does not install {package}"


def test_mlflow_artifacts_go_to_the_bucket_minio_init_creates(services):
    mlflow, init = services["mlflow"], services["minio-init"]
    command = mlflow["command"]
    destination = urlsplit(command[command.index("--artifacts-destination") + 1])
    assert "--serve-artifacts" in command
    assert destination.scheme == "s3" and destination.hostname == environment(init)["MLFLOW_BUCKET"]
    endpoint = urlsplit(environment(mlflow)["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.port == MINIO_S3_PORT
    assert environment(mlflow)["AWS_ACCESS_KEY_ID"] == environment(init)["MLFLOW_S3_ACCESS_KEY"]
    assert environment(mlflow)["AWS_SECRET_ACCESS_KEY"] == environment(init)["MLFLOW_S3_SECRET_KEY"]


# ---------------------------------------------------------------- compose: docker's own parser, when present


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        version = subprocess.run(["docker-compose", "version"], capture_output=True, text=True).stdout
        if "v2." in version or "version 2" in version.lower():
            return ["docker-compose"]
    return None


def run_compose_config(command: list[str], env_file: Path, names_to_drop: set[str]) -> subprocess.CompletedProcess:
    clean_env = {k: v for k, v in os.environ.items() if k not in names_to_drop}
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=ROOT,
        timeout=60,
    )


def test_docker_compose_config_agrees(compose_raw, services, env_example, tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip("the docker compose v2 plugin is not installed here; the file checks above still ran")
    names = {name for text in walk_strings(compose_raw) for name, _ in variable_references(text)}
    result = run_compose_config(command, ENV_EXAMPLE, names)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert set(resolved["services"]) == set(services)
    for name in ("worker", "mlflow", "prefect-server", "postgres"):
        assert environment(resolved["services"][name]) == environment(services[name]), name
    # A missing secret stops compose with the variable's name.
    incomplete = tmp_path / "incomplete.env"
    incomplete.write_text("".join(f"{k}={v}\n" for k, v in env_example.items() if k != "POSTGRES_PASSWORD"))
    failed = run_compose_config(command, incomplete, names)
    assert failed.returncode != 0 and "POSTGRES_PASSWORD" in failed.stderr


# ---------------------------------------------------------------- Kubernetes


def test_every_manifest_has_a_kind_api_version_and_name_in_the_namespace():
    docs = k8s_documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "Secret",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "ftflow", doc["metadata"]["name"]


def secret_keys(docs: list[dict], name: str) -> set[str]:
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def secret_refs(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_refs(value)


def test_base_job_template_passes_prefects_work_pool_validation(base_job_template):
    from prefect.server.schemas.actions import WorkPoolCreate

    assert {"job_configuration", "variables"} <= set(base_job_template)
    pool = WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=base_job_template)
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_a_template_using_an_undeclared_variable_is_refused(base_job_template):
    from prefect.server.schemas.actions import WorkPoolCreate

    broken = json.loads(json.dumps(base_job_template))
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ priority }}"
    with pytest.raises(ValueError, match="priority"):
        WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=broken)


def test_rendered_job_requests_a_gpu_and_reads_only_existing_secret_keys(base_job_template):
    from prefect.utilities.templating import apply_values

    job = apply_values(base_job_template["job_configuration"], template_defaults(base_job_template))
    manifest = job["job_manifest"]
    assert "{{" not in json.dumps(manifest), "a placeholder was left without a value"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert manifest["metadata"]["namespace"] == "ftflow"

    docs = k8s_documents()
    keys = secret_keys(docs, "ftflow-secrets")
    refs = set(secret_refs(manifest))
    assert {key for _, key in refs} >= {"HF_TOKEN", "MLFLOW_TRACKING_URI"}
    assert all(name == "ftflow-secrets" and key in keys for name, key in refs), refs - {
        ("ftflow-secrets", k) for k in keys
    }

    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} <= claims


def test_job_pod_runs_as_the_image_user_with_its_cache_paths(base_job_template):
    instructions = dockerfile_instructions(INFRA / "Dockerfile.worker")
    (uid,) = [int(m) for k, rest in instructions if k == "RUN" for m in re.findall(r"useradd .*--uid (\d+)", rest)]
    pod = base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    hf_home = next(
        item.split("=", 1)[1]
        for k, rest in instructions
        if k == "ENV"
        for item in rest.split()
        if item.startswith("HF_HOME=")
    )
    assert hf_home in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}


def test_worker_deployment_can_create_jobs_and_polls_the_documented_pool():
    docs = k8s_documents()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    service_account = pod["serviceAccountName"]
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == service_account for d in docs)
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": service_account, "namespace": "ftflow"} in binding["subjects"]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"]]
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])

    (container,) = pod["containers"]
    argv = container["command"]
    pool = argv[argv.index("--pool") + 1]
    assert argv[argv.index("--type") + 1] == "kubernetes"
    readme = (K8S / "README.md").read_text()
    assert (
        f"prefect work-pool create {pool} --type kubernetes --base-job-template infra/k8s/base-job-template.json"
        in readme
    )

    env = {e["name"]: e for e in container["env"]}
    keys = secret_keys(docs, "ftflow-secrets")
    assert all(name == "ftflow-secrets" and key in keys for name, key in secret_refs(container))
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"] in keys
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == "ftflow"


def test_kubernetes_worker_runs_the_same_prefect_version_as_the_compose_server(compose_raw, env_example):
    (deployment,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    server_image = interpolate(compose_raw["services"]["prefect-server"]["image"], env_example)
    assert image.startswith(server_image) and image.endswith("-kubernetes")


# ---------------------------------------------------------------- compose: Prefect results in the shared bucket

RESULTS_SCRIPT = INFRA / "prefect" / "results_storage.py"


def test_prefect_results_go_to_a_bucket_minio_init_creates_with_keys_only_the_worker_holds(services):
    from prefect.filesystems import RemoteFileSystem

    worker, init, results = services["worker"], services["minio-init"], services["prefect-results-init"]
    env, init_env, results_env = environment(worker), environment(init), environment(results)
    block_type, _, block_name = env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"].partition("/")
    assert block_type == RemoteFileSystem.get_block_type_slug() and block_name == results_env["FTFLOW_RESULTS_BLOCK"]
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert urlsplit(results_env["FTFLOW_RESULTS_BASEPATH"]).hostname == init_env["PREFECT_RESULTS_BUCKET"]
    assert init_env["PREFECT_RESULTS_BUCKET"] != init_env["MLFLOW_BUCKET"]
    endpoint = urlsplit(results_env["FTFLOW_RESULTS_ENDPOINT"])
    assert endpoint.hostname == "minio" and endpoint.port == MINIO_S3_PORT
    # The worker's results key pair is the one minio-init scopes to the results bucket, not MLflow's.
    assert (
        env["AWS_ACCESS_KEY_ID"]
        == init_env["PREFECT_S3_ACCESS_KEY"]
        != environment(services["mlflow"])["AWS_ACCESS_KEY_ID"]
    )
    assert env["AWS_SECRET_ACCESS_KEY"] == init_env["PREFECT_S3_SECRET_KEY"]
    script = " ".join(init["command"])
    assert "$$PREFECT_RESULTS_BUCKET" in script.replace("${", "$") or "PREFECT_RESULTS_BUCKET" in script
    assert depends_on(worker)["prefect-results-init"]["condition"] == "service_completed_successfully"
    assert depends_on(results)["prefect-server"]["condition"] == "service_healthy"
    # The worker image can reach s3:// at all.
    runs = " ".join(rest for keyword, rest in dockerfile_instructions(INFRA / "Dockerfile.worker") if keyword == "RUN")
    assert "s3fs" in runs


def test_the_results_block_script_makes_a_block_prefect_loads(services, monkeypatch, tmp_path):
    # Run the one-shot's script against a real (temporary) Prefect API: the block it saves loads back.
    import runpy

    from prefect.filesystems import RemoteFileSystem
    from prefect.testing.utilities import prefect_test_harness

    results = services["prefect-results-init"]
    command = results["command"]
    assert command[-1].endswith(RESULTS_SCRIPT.name)
    assert any(str(v).startswith("./prefect/results_storage.py:") for v in results["volumes"])
    for key, value in environment(results).items():
        if key.startswith("FTFLOW_"):
            monkeypatch.setenv(key, value)
    with prefect_test_harness(server_startup_timeout=120):
        runpy.run_path(str(RESULTS_SCRIPT), run_name="__main__")
        block = RemoteFileSystem.load(environment(results)["FTFLOW_RESULTS_BLOCK"])
    assert block.basepath == environment(results)["FTFLOW_RESULTS_BASEPATH"]
    assert block.settings["client_kwargs"]["endpoint_url"] == environment(results)["FTFLOW_RESULTS_ENDPOINT"]
    assert "key" not in block.settings and "secret" not in block.settings  # keys stay in the worker's env


def test_the_local_default_keeps_results_in_a_local_folder():
    # Nothing outside the compose stack names a results block: `ftflow run` and `make serve` keep Prefect's
    # default, a folder (PREFECT_LOCAL_STORAGE_PATH, ~/.prefect/storage).
    for path in (ROOT / "infra" / "local" / "serve.sh", ROOT / "Makefile", ROOT / "prefect.yaml"):
        assert "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK" not in path.read_text(), path


def test_an_arm_can_ask_for_n_gpus(base_job_template):
    """Issue 15: a sweep arm's flow-run Job requests the GPUs its deployment's job variables name."""
    from prefect.utilities.templating import apply_values

    values = {**template_defaults(base_job_template), "gpu_count": 4}
    pod = apply_values(base_job_template["job_configuration"], values)["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4 and resources["requests"]["nvidia.com/gpu"] == 4
