"""The Kubernetes deployment (deploy/): the Helm values validate against the chart's own
schemas and say what tally's production needs; the Dockerfile installs from the lock
file, copies every file the code location reads, and its command serves the code
location from nothing but what it copied."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from sandbox_fixture import reference_dir

from resources.db import PROJECT_ROOT, SQL_DIR
from resources.providers.resource import _SETTINGS as PROVIDER_SETTINGS

DEPLOY = PROJECT_ROOT / "deploy"
VALUES_FILE = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART_SCHEMA = "dagster-helm-values.schema.json"
SUBCHART_SCHEMA = "dagster-user-deployments-values.schema.json"
SUBCHART = "dagster-user-deployments"
KUBERNETES_DEFINITIONS = "https://kubernetesjsonschema.dev/v1.18.0/_definitions.json"


# --- the chart's schemas, as Helm applies them -------------------------------------


def _load_schema(name: str) -> dict[str, Any]:
    return json.loads((reference_dir() / name).read_text())


def _view_of_an_override_file(schema: dict[str, Any]) -> dict[str, Any]:
    """Helm validates the chart's defaults merged with our file: maps merge, lists
    replace. So for our file alone, `required` is dropped on maps (the defaults fill
    them) but kept inside list items (written whole); and, since the chart silently
    ignores a key its schema does not name, an object with named properties admits no
    other keys (a misspelt key would otherwise do nothing)."""

    def walk(node: Any, in_item: bool) -> Any:
        if isinstance(node, list):
            return [walk(child, in_item) for child in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "required" and not in_item:
                continue
            if key == "$ref" and value.startswith("#/definitions/") and not in_item:
                out[key] = value.replace("#/definitions/", "#/override_definitions/", 1)
            elif key in ("properties", "definitions"):
                out[key] = {name: walk(child, in_item) for name, child in value.items()}
            else:
                out[key] = walk(value, in_item or key == "items")
        if (
            node.get("type") == "object"
            and node.get("properties")
            and "additionalProperties" not in node
        ):
            out["additionalProperties"] = False
        return out

    view = walk({k: v for k, v in schema.items() if k != "definitions"}, in_item=False)
    view["override_definitions"] = walk(schema["definitions"], in_item=False)
    # Inside list items the original definitions apply (with their `required`).
    view["definitions"] = walk(schema["definitions"], in_item=True)
    return view


def _remote_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value.startswith(KUBERNETES_DEFINITIONS):
                yield value.split("#", 1)[1]
            else:
                yield from _remote_refs(value)
    elif isinstance(node, list):
        for child in node:
            yield from _remote_refs(child)


# The Kubernetes types tally's values use, as in the v1.18 API (strict: unknown keys
# fail, so a misspelt secretKeyRef cannot drop a secret). Every other Kubernetes type
# the schemas point at (probes, affinity, volumes, ...) is accepted as is: the remote
# definitions are not fetched in a test.
_SELECTOR = {
    "type": "object",
    "required": ["key"],
    "properties": {
        "key": {"type": "string"},
        "name": {"type": "string"},
        "optional": {"type": "boolean"},
    },
    "additionalProperties": False,
}
_KUBERNETES_TYPES = {
    "io.k8s.api.core.v1.EnvVar": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "value": {"type": "string"},
            "valueFrom": {"$ref": "#/definitions/io.k8s.api.core.v1.EnvVarSource"},
        },
        "additionalProperties": False,
    },
    "io.k8s.api.core.v1.EnvVarSource": {
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {
            "secretKeyRef": _SELECTOR,
            "configMapKeyRef": _SELECTOR,
            "fieldRef": {"type": "object"},
            "resourceFieldRef": {"type": "object"},
        },
        "additionalProperties": False,
    },
    "io.k8s.api.core.v1.SecretEnvSource": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}},
        "additionalProperties": False,
    },
}


def _kubernetes_resource(*schemas: dict[str, Any]) -> Resource:
    document: dict[str, Any] = {}
    for pointer in {ref for schema in schemas for ref in _remote_refs(schema)}:
        node = document
        for part in pointer.strip("/").split("/"):
            node = node.setdefault(part, {})
    document["definitions"].update(_KUBERNETES_TYPES)
    return Resource.from_contents(document, default_specification=DRAFT7)


@dataclass(frozen=True)
class ChartValidators:
    chart: Draft7Validator
    subchart: Draft7Validator
    # Keys of the chart's `dagster-user-deployments` section that only the chart reads
    # (its switches `enabled`, `enableSubchart`), not the subchart.
    chart_only_keys: frozenset[str]

    def errors(self, values: dict[str, Any]) -> list[str]:
        """Every schema error of `values` (chart) and of the part Helm hands the
        user-deployments subchart (its section plus `global`), one line each."""
        section = values.get(SUBCHART, {})
        subchart_values = {k: v for k, v in section.items() if k not in self.chart_only_keys}
        subchart_values["global"] = values.get("global", {})
        found = [("chart", error) for error in self.chart.iter_errors(values)]
        found += [(SUBCHART, error) for error in self.subchart.iter_errors(subchart_values)]
        # An anyOf error says only "not valid under any"; its context says why.
        return [
            f"{where}: {'.'.join(map(str, error.absolute_path)) or '<root>'}: {message}"
            for where, error in found
            for message in [error.message, *(cause.message for cause in error.context or ())]
        ]


@pytest.fixture(scope="module")
def validators() -> ChartValidators:
    chart, subchart = _load_schema(CHART_SCHEMA), _load_schema(SUBCHART_SCHEMA)
    registry: Registry = Registry().with_resource(
        KUBERNETES_DEFINITIONS, _kubernetes_resource(chart, subchart)
    )
    views = [_view_of_an_override_file(schema) for schema in (chart, subchart)]
    for view in views:
        Draft7Validator.check_schema(view)
    chart_only = set(chart["definitions"]["UserDeployments"]["properties"]) - set(
        subchart["properties"]
    )
    chart_validator, subchart_validator = (
        Draft7Validator(view, registry=registry) for view in views
    )
    return ChartValidators(chart_validator, subchart_validator, frozenset(chart_only))


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES_FILE.read_text())


def test_vendored_schemas_are_the_shared_ones():
    shared = PROJECT_ROOT.parent / "shared" / "reference"
    vendored = Path(__file__).resolve().parent / "reference"
    for name in (CHART_SCHEMA, SUBCHART_SCHEMA):
        assert (vendored / name).exists(), f"tests/reference/{name} is missing"
        if (shared / name).exists():
            assert (vendored / name).read_bytes() == (shared / name).read_bytes(), name


def test_values_validate_against_the_charts_schemas(validators, values):
    assert validators.errors(values) == []


def _mutated(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    mutated = copy.deepcopy(values)
    *parents, last = path.split(".")
    node: Any = mutated
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return mutated


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("runLauncher.type", "Bogus", "runLauncher.type: 'Bogus' is not one of"),
        ("dagsterDaemon.runCoordinator.type", "Queued", "runCoordinator.type: 'Queued'"),
        ("dagsterDaemon.runCoordinator.config.queuedRunCoordinator.maxConcurrentRuns", "8", ""),
        (
            "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.tagConcurrencyLimits.0.limit",
            _DELETE,
            "'limit' is a required property",
        ),
        (f"{SUBCHART}.deployments.0.port", _DELETE, "'port' is a required property"),
        (f"{SUBCHART}.deployments.0.codeServerArg", ["-m", "x"], "codeServerArg"),
        (f"{SUBCHART}.deployments.0.env.0.valueFrom", {"secretKeyref": {"key": "K"}}, ""),
        ("postgresql.postgresqlHost", 5432, "5432 is not of type 'string'"),
    ],
)
def test_a_broken_values_file_fails_validation(validators, values, path, value, expected):
    errors = validators.errors(_mutated(values, path, value))
    assert errors, f"{path} = {value!r} passed the chart's schema"
    assert any(expected in error for error in errors), errors


# --- what the values say --------------------------------------------------------


def _repo_instance() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _camel_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {_camel(key): _camel_keys(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_camel_keys(child) for child in node]
    return node


def test_runs_are_kubernetes_jobs_and_storage_is_postgres(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert "k8sRunLauncher" in values["runLauncher"]["config"]
    # The chart always writes PostgreSQL storage; ours is external, its password a Secret.
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlHost"]
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert "postgres" in _repo_instance()["storage"]


def test_the_daemon_queues_runs_as_dagster_yaml_does(values):
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] is True
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] is True
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    repo = _repo_instance()
    assert repo["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert queued == _camel_keys(repo["run_coordinator"]["config"])
    partition_limits = [
        limit for limit in queued["tagConcurrencyLimits"] if limit["key"] == "dagster/partition"
    ]
    assert partition_limits == [
        {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    ]


def test_run_monitoring_enforces_the_jobs_one_hour_limit(values):
    from pipelines.jobs import daily_billing, issue_credits

    monitoring = values["dagsterDaemon"]["runMonitoring"]
    repo = _repo_instance()["run_monitoring"]
    assert monitoring["enabled"] is repo["enabled"] is True
    assert monitoring["pollIntervalSeconds"] == repo["poll_interval_seconds"]
    # The chart writes no max_runtime_seconds: the limit is each job's own tag.
    for job in (daily_billing, issue_credits):
        assert job.tags["dagster/max_runtime"] == str(repo["max_runtime_seconds"]), job.name
    assert values["telemetry"]["enabled"] is _repo_instance()["telemetry"]["enabled"]


def _deployment(values: dict[str, Any]) -> dict[str, Any]:
    section = values[SUBCHART]
    assert section["enabled"] is True and section["enableSubchart"] is True
    (deployment,) = section["deployments"]
    return deployment


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


_ENV_READS = {"os.environ.get", "os.getenv", "os.environ.setdefault", "os.environ.pop"}


def env_names_read_by_tally() -> set[str]:
    """Every environment variable tally's code reads, from its source: literal names
    given to os.environ / os.getenv, or to a module's helper that passes one of its
    parameters to os.environ.get (`_setting(value, "SMTP_HOST")`), and the provider
    table's variables."""
    names = {name for entry in PROVIDER_SETTINGS.values() for name in entry[1::2]}
    for path in sorted(PROJECT_ROOT.glob("[apr]*/**/*.py")):
        if path.parts[len(PROJECT_ROOT.parts)] not in ("assets", "pipelines", "resources"):
            continue
        tree = ast.parse(path.read_text())
        helpers: dict[str, int] = {}
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            parameters = [argument.arg for argument in function.args.args]
            for call in ast.walk(function):
                if isinstance(call, ast.Call) and _call_name(call) in _ENV_READS and call.args:
                    first = call.args[0]
                    if isinstance(first, ast.Name) and first.id in parameters:
                        helpers[function.name] = parameters.index(first.id)
        for node in ast.walk(tree):
            literal: ast.expr | None = None
            if isinstance(node, ast.Call) and node.args:
                name = _call_name(node)
                if name in _ENV_READS:
                    literal = node.args[0]
                elif name in helpers and len(node.args) > helpers[name]:
                    literal = node.args[helpers[name]]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                literal = node.slice
            if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                names.add(literal.value)
    return names


def test_the_env_reader_finds_what_tally_reads():
    # A few names from each kind of read, so an empty or broken scan cannot pass.
    found = env_names_read_by_tally()
    assert {"DATABASE_URL", "TALLY_HOME", "SMTP_HOST", "SMTP_PASSWORD", "ALERT_EMAIL_TO"} <= found
    assert {"STRIPE_API_KEY", "POLAR_ACCESS_TOKEN", "STRIPE_API_BASE"} <= found


# Which of tally's variables hold credentials: API keys and tokens, passwords, and the
# database and webhook URLs (a URL carries its password or token).
_CREDENTIAL = re.compile(r"(KEY|TOKEN|PASSWORD|USERNAME|_URL)$")


def test_the_code_location_gets_tally_settings_from_secrets(values):
    env = {entry["name"]: entry for entry in _deployment(values)["env"]}
    read = env_names_read_by_tally()
    assert set(env) <= read, f"not read by tally: {sorted(set(env) - read)}"
    provider_keys = {entry[1] for entry in PROVIDER_SETTINGS.values()}
    needed = provider_keys | {"DATABASE_URL", "BILLING_DATABASE_URL", "SMTP_PASSWORD"}
    assert needed <= read
    assert needed <= set(env), f"missing: {sorted(needed - set(env))}"
    for name, entry in env.items():
        if _CREDENTIAL.search(name):
            assert "value" not in entry, f"{name} is a literal; use valueFrom.secretKeyRef"
            assert entry["valueFrom"]["secretKeyRef"]["name"], name
    for name in needed:
        assert env[name]["valueFrom"]["secretKeyRef"].get("optional") is not True, name
    # Production talks to the providers' own APIs, never a sandbox base URL.
    base_urls = {entry[3] for entry in PROVIDER_SETTINGS.values()}
    assert not base_urls & set(env)
    assert _deployment(values)["includeConfigInLaunchedRuns"]["enabled"] is True


def test_no_credential_is_written_in_the_values():
    text = VALUES_FILE.read_text()
    assert not re.search(r"\b(sk|rk)_(live|test)_\w+", text)
    assert not re.search(r"\bpolar_(oat|pat)_\w+", text)
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with a password"


# --- the Dockerfile -----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    """The instructions of deploy/Dockerfile (continuation lines joined, comments out)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = f"{pending} {stripped}" if pending else stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _only(keyword: str) -> str:
    (instruction,) = [i for i in dockerfile() if i.keyword == keyword]
    return instruction.arguments


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(instruction.arguments))
    return env


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for instruction in dockerfile():
        if instruction.keyword == "COPY":
            *sources, target = shlex.split(instruction.arguments)
            assert not any(source.startswith("--") for source in sources), instruction
            copies.append((sources, target))
    return copies


def _pip_installs() -> list[list[str]]:
    installs = []
    for instruction in dockerfile():
        if instruction.keyword == "RUN":
            for command in instruction.arguments.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
    return installs


def test_the_image_is_python_311_slim_and_runs_as_a_non_root_user(values):
    assert _only("FROM") == "python:3.11-slim"
    user = _only("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid"
    security = _deployment(values)["podSecurityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == user


def test_the_image_installs_what_make_install_does_from_the_lock_file():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "-c requirements.lock" in makefile
    installs = [words for words in _pip_installs() if words[:2] != ["--upgrade", "pip>=24"]]
    assert installs, "the Dockerfile installs nothing"
    for words in installs:
        constraints = [after for flag, after in zip(words, words[1:], strict=False) if flag == "-c"]
        assert constraints == ["requirements.lock"], f"pip install {' '.join(words)}"
    # The project itself, without the dev extra; its dependencies come from pyproject's
    # own list (the RUN reads project.dependencies), pinned by the lock file.
    assert any(words[-2:] == ["-e", "."] for words in installs)
    assert not any("[dev]" in word for words in installs for word in words)
    run_text = " ".join(i.arguments for i in dockerfile() if i.keyword == "RUN")
    assert "['project']['dependencies']" in run_text
    assert "optional-dependencies" not in run_text


def _needed_at_run_time() -> set[str]:
    """What the code location reads from the project root: the packages pyproject
    installs, everything the code opens as PROJECT_ROOT / "<name>" (sql/, dagster.yaml,
    workspace.yaml, ...), and what the editable install is built from."""
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {pattern.rstrip("*") for pattern in includes} | {"pyproject.toml"}
    needed.add(str(SQL_DIR.relative_to(PROJECT_ROOT)))
    for package in ("assets", "pipelines", "resources"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            needed |= set(re.findall(r'PROJECT_ROOT / "([^"]+)"', path.read_text()))
    # Local state lives where TALLY_HOME says (the image sets it), not in the tree.
    if "TALLY_HOME" in _env():
        needed.discard(".tally")
    return needed


def test_the_image_copies_every_file_the_code_location_reads():
    needed = _needed_at_run_time()
    assert {"sql", "dagster.yaml", "workspace.yaml", "pipelines"} <= needed
    copied = {source.rstrip("/") for sources, _ in _copies() for source in sources}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    assert "." not in copied, "copy named paths; the clone holds .venv and .tally"


def _code_server_command() -> list[str]:
    command = json.loads(_only("CMD"))
    assert command[:3] == ["dagster", "code-server", "start"]
    return command


def test_the_chart_and_the_image_serve_workspace_yamls_code_location(values):
    deployment = _deployment(values)
    command = _code_server_command()
    port = command[command.index("-p") + 1]
    assert int(port) == deployment["port"] == int(_only("EXPOSE"))
    # The chart's container runs `dagster code-server start -h 0.0.0.0 -p <port>` + args.
    chart_command = ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", str(port)]
    assert command == chart_command + deployment["codeServerArgs"]
    (location,) = yaml.safe_load((PROJECT_ROOT / "workspace.yaml").read_text())["load_from"]
    module = location["python_module"]
    assert command[command.index("-m") + 1] == module["module_name"]
    assert command[command.index("-a") + 1] == module["attribute"]


def _image_tree(root: Path) -> Path:
    """The image's filesystem as far as tally is concerned: the COPY instructions
    applied to an empty `root` (WORKDIR under it), and the ENV paths re-rooted."""
    workdir = root / _only("WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    for sources, target in _copies():
        destination = workdir / target
        for source in sources:
            origin = PROJECT_ROOT / source
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(origin, destination, ignore=ignore, dirs_exist_ok=True)
            else:
                target_path = destination / origin.name if target.endswith("/") else destination
                target_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target_path)
    return workdir


def _image_env(root: Path, workdir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "BILLING_DATABASE_URL", "DAGSTER_HOME")
    }
    for key, value in _env().items():
        if value.startswith("/"):
            value = str(root / value.lstrip("/"))
            Path(value).mkdir(parents=True, exist_ok=True)
        env[key] = value
    # Only the copied tree: the clone's editable install must not answer imports.
    env["PYTHONPATH"] = str(workdir)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_image_tree_alone_holds_the_code_location(tmp_path):
    workdir = _image_tree(tmp_path)
    script = (
        "import json, pipelines.definitions as d, resources.db as db, pipelines.local as local\n"
        "from dagster import AssetKey\n"
        "defs = d.defs.get_repository_def()\n"
        "print(json.dumps({\n"
        "  'module': d.__file__, 'sql': str(db.SQL_DIR),\n"
        "  'sql_files': sorted(\n"
        "    str(p.relative_to(db.SQL_DIR)) for p in db.SQL_DIR.rglob('*.sql')),\n"
        "  'migrations_lock': bool(db.load_sql('db/migrations_lock.sql')),\n"
        "  'home': str(local.local_dagster_home()),\n"
        "  'assets': sorted(k.to_user_string() for k in defs.asset_graph.get_all_asset_keys()),\n"
        "}))\n"
    )
    env = _image_env(tmp_path, workdir)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(seen["module"]).is_relative_to(workdir)
    assert Path(seen["sql"]) == workdir / "sql"
    expected_sql = sorted(str(p.relative_to(SQL_DIR)) for p in SQL_DIR.rglob("*.sql"))
    assert seen["sql_files"] == expected_sql
    assert seen["migrations_lock"] is True
    # `tally` run in the pod (kubectl exec) builds its instance in the image's writable
    # DAGSTER_HOME from the copied dagster.yaml (its storage section left out).
    assert Path(seen["home"]) == Path(env["DAGSTER_HOME"])
    written = yaml.safe_load((Path(seen["home"]) / "dagster.yaml").read_text())
    assert written["run_coordinator"] == _repo_instance()["run_coordinator"]
    from pipelines.definitions import defs

    here = defs.get_repository_def().asset_graph.get_all_asset_keys()
    assert seen["assets"] == sorted(key.to_user_string() for key in here)


def test_the_images_command_serves_the_code_location(tmp_path):
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._grpc.client import DagsterGrpcClient
    from dagster._grpc.types import ListRepositoriesResponse
    from dagster._serdes import deserialize_value

    from pipelines.definitions import defs

    workdir = _image_tree(tmp_path)
    port = _free_port()
    command = _code_server_command()
    command[command.index("-p") + 1] = str(port)
    command[command.index("-h") + 1] = "127.0.0.1"
    command[0] = str(Path(sys.executable).with_name("dagster"))
    server = subprocess.Popen(
        command,
        cwd=workdir,
        env=_image_env(tmp_path, workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = DagsterGrpcClient(port=port, host="127.0.0.1")
    try:
        listing: Any = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                listing = deserialize_value(client.list_repositories())
            except Exception:  # noqa: BLE001 - not listening or still loading the code
                listing = None
            if isinstance(listing, ListRepositoriesResponse):
                break
            time.sleep(0.5)  # poll interval while the server loads; the deadline bounds it
        assert isinstance(listing, ListRepositoriesResponse), (
            f"code server did not serve the location: {listing!r}; "
            f"stderr: {server.stderr.read()[-3000:] if server.poll() is not None else ''}"
        )
        (symbol,) = listing.repository_symbols
        origin = RemoteRepositoryOrigin(
            GrpcServerCodeLocationOrigin(host="127.0.0.1", port=port, location_name="tally"),
            symbol.repository_name,
        )
        snap = deserialize_value(client.external_repository(origin), RepositorySnap)
        repository = defs.get_repository_def()
        served_assets = {node.asset_key for node in snap.asset_nodes}
        assert served_assets == set(repository.asset_graph.get_all_asset_keys())
        assert {s.name for s in snap.schedules} == {s.name for s in repository.schedule_defs}
        assert {s.name for s in snap.sensors} == {s.name for s in repository.sensor_defs}
        jobs = {job.name for job in [*(snap.job_datas or []), *(snap.job_refs or [])]}
        assert {"daily_billing", "issue_credits"} <= jobs
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
