"""The Kubernetes manifests under ``k8s/`` are well-formed, agree with the code and hold no secret.

Pure Python (PyYAML): every YAML file parses and every object has ``apiVersion``/``kind``/``metadata.name``;
every path a kustomization names exists; the ``FlinkDeployment`` set equals the code's Flink jobs, each
with savepoint upgrades, S3 checkpoint/savepoint storage and a ``-py`` file of ``jobs/``; the base
deploys the ``pipeline`` job and the ``single-jobs`` component swaps in ingest, sessionize and triggers;
the ``KafkaTopic`` set equals ``connectors.settings.CONTRACT_TOPICS`` with the same topic configs; every
variable given to a clickpulse container is a field of a settings class; secrets only arrive by
reference. When ``kubectl`` is
installed, the base and every overlay are also rendered with ``kubectl kustomize`` and checked as output,
each also with the single-jobs component the way k8s/README.md tells.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
import yaml
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from connectors.flink import FlinkSettings
from connectors.settings import CONTRACT_TOPICS
from jobs.cli import JOBS
from udfs.rules import DEFAULT_SECRET_ENV, Allowlist, parse_rules_document

pytestmark = [
    pytest.mark.unit,
    # importing every settings module imports PyFlink, whose decorators warn about its own deprecations
    pytest.mark.filterwarnings("ignore:.*deprecated since version.*:DeprecationWarning"),
]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATION = "kustomization.yaml"
#: The kustomize component that runs the single Flink jobs instead of the pipeline.
SINGLE_JOBS = K8S / "components" / "single-jobs"
#: The FlinkDeployments of the default set (the base) and of the single-jobs component.
PIPELINE_DEPLOYMENTS = {"clickpulse-pipeline"}
SINGLE_JOB_DEPLOYMENTS = {"clickpulse-ingest", "clickpulse-sessionize", "clickpulse-triggers"}
#: The one image every clickpulse workload runs (kustomize `images:` sets its registry and tag).
IMAGE = "clickpulse"
#: Where the image puts the repository (k8s/Dockerfile).
IMAGE_REPO = "/opt/clickpulse"
#: Names that hold secret values: they may only be set by reference (secretKeyRef / secretRef).
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|KEY")
#: Not settings of clickpulse, read by the S3 filesystem plugin of the Flink pods (from a Secret only).
S3_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# ------------------------------------------------------------------------------------------ loading


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a (multi-document) YAML file."""
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob(KUSTOMIZATION))


def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = load_docs(directory / KUSTOMIZATION)
    return doc


def generator_sources(kust: dict[str, Any], kind: str) -> Iterator[tuple[dict[str, Any], str]]:
    """``(generator, relative path)`` for every ``envs``/``files`` entry of ``configMapGenerator`` or
    ``secretGenerator`` (a ``files`` entry may be ``key=path``)."""
    for gen in kust.get(kind) or []:
        for rel in gen.get("envs") or []:
            yield gen, rel
        for entry in gen.get("files") or []:
            yield gen, entry.split("=", 1)[-1]


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines the way kustomize reads an ``envs`` file (``#`` comments, blank lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=value: {line!r}"
        out[key.strip()] = value
    return out


def env_source(directory: Path, rel: str) -> Path:
    """A generator's env file, or its checked-in ``.example`` when the real (gitignored) one is absent."""
    path = directory / rel
    return path if path.is_file() else path.with_name(path.name + ".example")


def config_data(directory: Path) -> dict[str, str]:
    """What the kustomization in ``directory`` puts into the ConfigMap clickpulse-config (envs + literals)."""
    data: dict[str, str] = {}
    for gen in kustomization(directory).get("configMapGenerator") or []:
        if gen["name"] != "clickpulse-config":
            continue
        for rel in gen.get("envs") or []:
            data.update(read_env_file(directory / rel))
        data.update(dict(lit.split("=", 1) for lit in gen.get("literals") or []))
    return data


def resource_files() -> set[Path]:
    """Files listed under ``resources`` of some kustomization (complete objects)."""
    found: set[Path] = set()
    for d in kustomization_dirs():
        for rel in kustomization(d).get("resources") or []:
            path = (d / rel).resolve()
            if path.is_file():
                found.add(path)
    return found


def patch_files() -> set[Path]:
    return {
        (d / p["path"]).resolve()
        for d in kustomization_dirs()
        for p in kustomization(d).get("patches") or []
        if "path" in p
    }


def data_files() -> set[Path]:
    """YAML files that are not Kubernetes objects: transformer configs and generator inputs."""
    found: set[Path] = set()
    for d in kustomization_dirs():
        kust = kustomization(d)
        found |= {(d / rel).resolve() for rel in kust.get("configurations") or []}
        for kind in ("configMapGenerator", "secretGenerator"):
            found |= {(d / rel).resolve() for _, rel in generator_sources(kust, kind)}
    return found


def objects() -> list[dict[str, Any]]:
    """Every complete object of every resource file."""
    return [doc for path in sorted(resource_files()) for doc in load_docs(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in objects() if doc["kind"] == kind]


def of_kind_in(directory: Path, kind: str) -> list[dict[str, Any]]:
    """Complete objects of ``kind`` listed directly in the kustomization of ``directory``."""
    files = [directory / rel for rel in kustomization(directory).get("resources") or []]
    return [doc for f in files if f.is_file() for doc in load_docs(f) if doc["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in of_kind(kind)}


def deleted_by(kust: dict[str, Any]) -> set[tuple[str, str]]:
    """``(kind, name)`` of the objects the inline ``$patch: delete`` patches of a kustomization remove."""
    found = set()
    for patch in kust.get("patches") or []:
        doc = yaml.safe_load(patch["patch"]) if "patch" in patch else None
        if isinstance(doc, dict) and doc.get("$patch") == "delete":
            found.add((doc["kind"], doc["metadata"]["name"]))
    return found


def names_rendered(directory: Path, kind: str) -> set[str]:
    """Names of the ``kind`` objects the kustomization in ``directory`` renders, read without kustomize:
    its resources (files and directories), then each component's (whose deletions apply to everything
    before them), less its own deletions."""
    kust = kustomization(directory)

    def add(rel: str) -> set[str]:
        path = directory / rel
        if path.is_file():
            return {d["metadata"]["name"] for d in load_docs(path) if d["kind"] == kind}
        return names_rendered(path, kind)

    names: set[str] = set()
    for rel in kust.get("resources") or []:
        names |= add(rel)
    for rel in kust.get("components") or []:
        names = (names | add(rel)) - {n for k, n in deleted_by(kustomization(directory / rel)) if k == kind}
    return names - {n for k, n in deleted_by(kust) if k == kind}


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a workload (a FlinkDeployment's shared and per-role pod templates included)."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "FlinkDeployment":
        templates = [spec.get("podTemplate")]
        templates += [(spec.get(role) or {}).get("podTemplate") for role in ("jobManager", "taskManager")]
        return [t["spec"] for t in templates if t and t.get("spec")]
    if doc["kind"] == "Pod":
        return [spec]
    template = spec.get("template") or {}
    return [template["spec"]] if template.get("spec") else []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for ps in pod_specs(doc) for c in (ps.get("containers") or []) + (ps.get("initContainers") or [])
    ]


def clickpulse_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers running the clickpulse image (all of a FlinkDeployment's: they run ``spec.image``)."""
    if doc["kind"] == "FlinkDeployment":
        return containers(doc) if doc["spec"].get("image", "").split(":")[0] == IMAGE else []
    return [c for c in containers(doc) if c.get("image", "").split(":")[0] == IMAGE]


def flink_main_container(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``flink-main-container`` of a FlinkDeployment's shared pod template (env, mounts, security);
    the per-role templates add only what differs between JobManager and TaskManager (probes)."""
    (main,) = [
        c for c in doc["spec"]["podTemplate"]["spec"]["containers"] if c["name"] == "flink-main-container"
    ]
    return main


def env_lists(node: Any) -> Iterator[list[dict[str, Any]]]:
    """Every ``env:`` list anywhere in a document (containers, patches, templates)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_lists(item)


def env_value(container: dict[str, Any], name: str) -> Any:
    for entry in container.get("env") or []:
        if entry["name"] == name:
            return entry.get("value")
    return None


def is_secret_name(name: str) -> bool:
    """A variable holding a secret (``*_ENV`` variables only *name* another variable)."""
    return bool(SECRET_NAME.search(name.upper())) and not name.upper().endswith("_ENV")


# ------------------------------------------------------------------------------------- code facts


def flink_jobs_in_code() -> set[str]:
    """The jobs that run on Flink: their module builds a table environment (the others are consumers)."""
    return {job for job in JOBS if "create_table_env(" in (REPO / "jobs" / f"{job}.py").read_text("utf-8")}


def settings_classes() -> list[type[BaseSettings]]:
    """Every ``BaseSettings`` subclass defined in the ``connectors`` and ``jobs`` packages."""
    found: dict[str, type[BaseSettings]] = {}
    for package_name in ("connectors", "jobs"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj.__module__ == info.name:
                    found[f"{info.name}:{obj.__qualname__}"] = obj
    return list(found.values())


def field_env_names(cls: type[BaseSettings], name: str) -> set[str]:
    """The environment variables pydantic-settings reads field ``name`` of ``cls`` from (upper case)."""
    info = cls.model_fields[name]
    config = cls.model_config
    prefix = str(config.get("env_prefix") or "")
    names: set[str] = set()
    for alias in (info.validation_alias, info.alias):
        if isinstance(alias, AliasChoices):
            names |= {c if isinstance(c, str) else str(c.path[0]) for c in alias.choices}
        elif isinstance(alias, AliasPath):
            names.add(str(alias.path[0]))
        elif isinstance(alias, str):
            names.add(alias)
    if not names:
        names.add(prefix + name)
    return {n.upper() for n in names}


@pytest.fixture(scope="module")
def setting_env_names() -> set[str]:
    names = {
        env for cls in settings_classes() for field in cls.model_fields for env in field_env_names(cls, field)
    }
    assert {"KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "CLICKHOUSE_URL", "CLICKPULSE_FLINK_PARALLELISM"} <= names
    return names


def runs_keyed_python_operators(job: str) -> bool:
    """Whether the job's keyed operators run in Python: it sets the execution mode of FlinkSettings, or
    takes the Flink options of a job that does (the pipeline takes the triggers job's)."""
    module = importlib.import_module(f"jobs.{job}")
    source = inspect.getsource(module)
    if "python_operator_options(" in source:
        return True
    return any(
        isinstance(part, ModuleType)
        and part.__name__.startswith("jobs.")
        and f"{alias}.flink_options(" in source
        and runs_keyed_python_operators(part.__name__.removeprefix("jobs."))
        for alias, part in vars(module).items()
    )


def flink_version() -> str:
    """``<flink.version>`` of connectors/maven/pom.xml, the one place Java versions are pinned."""
    root = ElementTree.parse(REPO / "connectors" / "maven" / "pom.xml").getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:flink.version", ns)
    assert node is not None and node.text
    return node.text.strip()


def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------- every manifest


def test_every_yaml_file_parses_and_every_object_is_complete() -> None:
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert files
    kustomizations = {(d / KUSTOMIZATION).resolve() for d in kustomization_dirs()}
    data = data_files()
    patches = patch_files()
    for path in files:
        docs = load_docs(path)  # raises on invalid YAML
        assert docs, f"{path.relative_to(REPO)} is empty"
        if path.resolve() in kustomizations | data:
            continue
        for doc in docs:
            if isinstance(doc, list) and path.resolve() in patches:  # a JSON patch (RFC 6902)
                for op in doc:
                    assert op["op"] in ("add", "remove", "replace", "test"), path.relative_to(REPO)
                    assert str(op["path"]).startswith("/"), path.relative_to(REPO)
                continue
            where = f"{path.relative_to(REPO)}: {doc.get('kind')}"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
            assert isinstance(doc.get("kind"), str) and doc["kind"], where
            assert isinstance((doc.get("metadata") or {}).get("name"), str), f"{where} has no metadata.name"


def test_every_path_a_kustomization_names_exists() -> None:
    dirs = kustomization_dirs()
    assert {d.relative_to(K8S).as_posix() for d in dirs} >= {"base", "overlays/local"}
    for d in dirs:
        kust = kustomization(d)
        where = (d / KUSTOMIZATION).relative_to(REPO)
        for rel in (kust.get("resources") or []) + (kust.get("components") or []):
            path = d / rel
            assert path.is_file() or (path / KUSTOMIZATION).is_file(), f"{where}: resource {rel} is missing"
        for patch in kust.get("patches") or []:
            assert "path" in patch or "patch" in patch, f"{where}: patch without path or patch"
            if "path" in patch:
                assert (d / patch["path"]).is_file(), f"{where}: patch {patch['path']} is missing"
        for rel in kust.get("configurations") or []:
            assert (d / rel).is_file(), f"{where}: configuration {rel} is missing"
        for kind in ("configMapGenerator", "secretGenerator"):
            for _, rel in generator_sources(kust, kind):
                assert env_source(d, rel).is_file(), (
                    f"{where}: {kind} source {rel} (or {rel}.example) is missing"
                )


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    used = resource_files() | patch_files() | data_files()
    used |= {(d / KUSTOMIZATION).resolve() for d in kustomization_dirs()}
    orphans = [p.relative_to(REPO) for p in K8S.rglob("*.yaml") if p.resolve() not in used]
    assert not orphans, f"not referenced by any kustomization: {orphans}"


# -------------------------------------------------------------------------------- Flink jobs


def test_flink_deployments_are_exactly_the_flink_jobs_of_the_code() -> None:
    """One FlinkDeployment per Flink job: the pipeline in the base, the single jobs in the component."""
    flink_jobs = flink_jobs_in_code()
    assert flink_jobs == {"pipeline", "ingest", "sessionize", "triggers"}
    scripts = set()
    for doc in of_kind("FlinkDeployment"):
        args = doc["spec"]["job"]["args"]
        assert "-py" in args, f"{doc['metadata']['name']}: no -py argument"
        script = args[args.index("-py") + 1]
        assert script.startswith(f"{IMAGE_REPO}/jobs/"), script
        assert (REPO / script.removeprefix(IMAGE_REPO + "/")).is_file(), f"{script} is not a file of jobs/"
        scripts.add(Path(script).stem)
    assert scripts == flink_jobs
    assert len(of_kind("FlinkDeployment")) == len(flink_jobs)


def test_the_default_set_is_the_pipeline_and_the_component_swaps_in_the_single_jobs() -> None:
    base = K8S / "base"
    assert names_rendered(base, "FlinkDeployment") == PIPELINE_DEPLOYMENTS
    assert names_rendered(SINGLE_JOBS, "FlinkDeployment") == SINGLE_JOB_DEPLOYMENTS
    assert kustomization(SINGLE_JOBS)["kind"] == "Component"
    # the component removes the pipeline and its Kafka identity: never both sets at once
    assert deleted_by(kustomization(SINGLE_JOBS)) >= {
        ("FlinkDeployment", "clickpulse-pipeline"),
        ("KafkaUser", "clickpulse-pipeline"),
    }
    for d in kustomization_dirs():
        if (d / "..").resolve() == (K8S / "overlays").resolve():
            flink = names_rendered(d, "FlinkDeployment")
            assert flink in (PIPELINE_DEPLOYMENTS, SINGLE_JOB_DEPLOYMENTS), f"{d.relative_to(REPO)}: {flink}"


def test_the_pipeline_deployment_runs_jobs_pipeline_with_the_rules_file_and_no_delivery() -> None:
    (pipeline,) = [d for d in of_kind("FlinkDeployment") if d["metadata"]["name"] == "clickpulse-pipeline"]
    spec = pipeline["spec"]
    assert spec["job"]["args"] == ["-py", f"{IMAGE_REPO}/jobs/pipeline.py"]
    assert pipeline["metadata"]["labels"]["app.kubernetes.io/component"] == "pipeline"
    assert spec["podTemplate"]["metadata"]["labels"]["app.kubernetes.io/component"] == "pipeline"
    main = flink_main_container(pipeline)
    # the rules file of ConfigMap clickpulse-rules, mounted where CLICKPULSE_RULES_FILE points
    rules_file = Path(env_value(main, "CLICKPULSE_RULES_FILE"))
    (mount,) = [m for m in main["volumeMounts"] if Path(m["mountPath"]) == rules_file.parent]
    (volume,) = [v for v in spec["podTemplate"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "clickpulse-rules" and mount.get("readOnly") is True
    (gen,) = [g for g in kustomization(K8S / "base")["configMapGenerator"] if g["name"] == "clickpulse-rules"]
    assert rules_file.name in {rel.split("=", 1)[0].rsplit("/", 1)[-1] for rel in gen["files"]}
    # identity stitching (the ingest part) reads Redis, from the Secret
    (redis,) = [e for e in main["env"] if e["name"] == "REDIS_URL"]
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "clickpulse-connections", "key": "REDIS_URL"}
    assert env_value(main, "CLICKPULSE_FLINK_RESTORE") == "none"


def test_every_flink_deployment_upgrades_with_savepoints_on_s3() -> None:
    version = flink_version()
    major_minor = "_".join(version.split(".")[:2])
    dirs: list[str] = []
    for doc in of_kind("FlinkDeployment"):
        name = doc["metadata"]["name"]
        spec = doc["spec"]
        conf = spec["flinkConfiguration"]
        job = spec["job"]
        assert doc["apiVersion"] == "flink.apache.org/v1beta1", name
        assert spec["flinkVersion"] == f"v{major_minor}", name
        assert spec["image"].split(":")[0] == IMAGE, name
        assert job["upgradeMode"] == "savepoint", name
        assert job.get("state", "running") == "running", name
        assert job["jarURI"] == f"local:///opt/flink/opt/flink-python-{version}.jar", name
        assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver", name
        for key in ("execution.checkpointing.dir", "execution.checkpointing.savepoint-dir"):
            assert str(conf.get(key, "")).startswith("s3://"), f"{name}: {key} must be on s3://"
            dirs.append(conf[key])
        if conf.get("high-availability.type", "NONE").upper() != "NONE":
            assert str(conf["high-availability.storageDir"]).startswith("s3://"), name
        assert not any(
            k.startswith(("s3.access", "s3.secret", "fs.s3a.access", "fs.s3a.secret")) for k in conf
        ), f"{name}: S3 credentials belong in the Secret clickpulse-s3, not in flinkConfiguration"
        for key in ("python.executable", "python.client.executable"):
            assert str(conf.get(key, "")).startswith("/opt/venv/"), f"{name}: {key}"
        for role in ("jobManager", "taskManager"):
            assert spec[role]["resource"]["memory"] and spec[role]["resource"]["cpu"], f"{name}: {role}"
    assert len(dirs) == len(set(dirs)), "two jobs share a checkpoint or savepoint directory"


def test_every_flink_job_runs_at_the_parallelism_of_its_spec() -> None:
    """The job's CLICKPULSE_FLINK_PARALLELISM becomes parallelism.default and wins: it must equal the spec."""
    for doc in of_kind("FlinkDeployment"):
        name = doc["metadata"]["name"]
        parallelism = doc["spec"]["job"]["parallelism"]
        assert isinstance(parallelism, int) and parallelism >= 1, name
        slots = int(doc["spec"]["flinkConfiguration"]["taskmanager.numberOfTaskSlots"])
        assert slots >= 1, name
        main = flink_main_container(doc)
        assert env_value(main, "CLICKPULSE_FLINK_PARALLELISM") == str(parallelism), name


def test_every_kustomization_that_changes_parallelism_keeps_the_env_in_step() -> None:
    for d in kustomization_dirs():
        kust = kustomization(d)
        names = names_rendered(d, "FlinkDeployment")
        changes = any(
            "parallelism" in (d / p["path"]).read_text("utf-8")
            if "path" in p
            else "parallelism" in p["patch"]
            for p in kust.get("patches") or []
        ) or bool(of_kind_in(d, "FlinkDeployment"))
        if not changes:
            continue
        copied = {
            r["source"]["name"]
            for r in kust.get("replacements") or []
            if r["source"].get("kind") == "FlinkDeployment"
            and r["source"]["fieldPath"] == "spec.job.parallelism"
            and any("CLICKPULSE_FLINK_PARALLELISM" in fp for t in r["targets"] for fp in t["fieldPaths"])
        }
        assert copied == names, (
            f"{d.relative_to(REPO)}: replacements must copy spec.job.parallelism of {names}"
        )


def test_python_execution_mode_matches_the_job_settings() -> None:
    for doc in of_kind("FlinkDeployment"):
        args = doc["spec"]["job"]["args"]
        job = Path(args[args.index("-py") + 1]).stem
        default = FlinkSettings.model_fields["python_execution_mode"].default.value
        mode = doc["spec"]["flinkConfiguration"].get("python.execution-mode")
        if runs_keyed_python_operators(job):
            assert mode == default, f"{job}: python.execution-mode {mode} != settings default {default}"
        else:
            assert mode in (None, "process"), job


def test_triggers_leave_webhook_delivery_to_the_dispatch_deployment() -> None:
    """The jobs with trigger operators (pipeline, triggers) deliver nothing: the dispatch Deployment does."""
    firing = [
        d
        for d in of_kind("FlinkDeployment")
        if any(a.endswith(("jobs/triggers.py", "jobs/pipeline.py")) for a in d["spec"]["job"]["args"])
    ]
    assert len(firing) == 2
    for doc in firing:
        main = flink_main_container(doc)
        assert env_value(main, "CLICKPULSE_TRIGGERS_DISPATCH") == "false", doc["metadata"]["name"]
        assert not any("webhooks" in str(ref) for ref in main.get("envFrom") or []), (
            "webhook secrets in Flink pods"
        )
        assert not any("webhooks" in str(e.get("valueFrom")) for e in main.get("env") or [])


# ------------------------------------------------------------------------------ plain consumers


def test_every_other_job_is_a_deployment_running_clickpulse_run() -> None:
    plain = set(JOBS) - flink_jobs_in_code()
    assert plain == {"load", "dispatch"}
    commands = {
        tuple(c.get("command") or []) for doc in of_kind("Deployment") for c in clickpulse_containers(doc)
    }
    for job in plain:
        assert ("clickpulse", "run", job) in commands, f"no Deployment runs `clickpulse run {job}`"


def test_migrations_run_as_a_job() -> None:
    commands = [tuple(c.get("command") or []) for doc in of_kind("Job") for c in clickpulse_containers(doc)]
    assert ("clickpulse", "migrate") in commands
    assert (REPO / "sql").is_dir() and "COPY sql" in dockerfile(), "the image must ship sql/ for migrate"


def test_rules_files_parse_with_the_allowlists_they_run_with() -> None:
    for d in kustomization_dirs():
        kust = kustomization(d)
        for gen, rel in generator_sources(kust, "configMapGenerator"):
            if gen["name"] != "clickpulse-rules":
                continue
            doc = yaml.safe_load((d / rel).read_text("utf-8"))
            for allowlist in allowlists():
                parse_rules_document(doc, Allowlist.parse(allowlist.split(",")))


def allowlists() -> set[str]:
    """Every value CLICKPULSE_WEBHOOK_ALLOWLIST takes in the base or an overlay."""
    values = (config_data(d).get("CLICKPULSE_WEBHOOK_ALLOWLIST") for d in kustomization_dirs())
    found = {v for v in values if v is not None}
    assert found
    return found


# ----------------------------------------------------------------------------------------- Kafka


def test_one_kafka_topic_per_contract_topic_with_its_configs() -> None:
    topics = of_kind("KafkaTopic")
    kafka = by_name("Kafka")
    by_topic = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in topics}
    assert len(by_topic) == len(topics), "two KafkaTopics for one topic"
    assert set(by_topic) == set(CONTRACT_TOPICS)
    for name, topic in by_topic.items():
        spec = topic["spec"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", topic["metadata"]["name"]), name
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] in kafka, f"{name}: unknown Kafka cluster"
        assert isinstance(spec["partitions"], int) and spec["partitions"] >= 1, name
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1, name
        config = {k: str(v) for k, v in (spec.get("config") or {}).items()}
        assert config.items() >= CONTRACT_TOPICS[name].items(), (
            f"{name}: {config} lacks {CONTRACT_TOPICS[name]}"
        )
        if "compact" not in config.get("cleanup.policy", "delete"):
            assert int(config["retention.ms"]) > 0, f"{name}: no retention.ms"
    assert by_topic["rules"]["spec"]["config"]["cleanup.policy"] == "compact"


def test_kafka_runs_in_kraft_mode_and_the_bootstrap_setting_points_at_it() -> None:
    (kafka,) = of_kind("Kafka")
    name = kafka["metadata"]["name"]
    assert kafka["apiVersion"].startswith("kafka.strimzi.io/")
    pools = [p for p in of_kind("KafkaNodePool") if p["metadata"]["labels"]["strimzi.io/cluster"] == name]
    roles = {r for p in pools for r in p["spec"]["roles"]}
    assert roles == {"controller", "broker"}, "KRaft needs controller and broker roles in the node pools"
    assert kafka["spec"]["kafka"]["config"]["auto.create.topics.enable"] is False
    ports = {lsn["port"] for lsn in kafka["spec"]["kafka"]["listeners"]}
    host, _, port = config_data(K8S / "base")["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
    assert host == f"{name}-kafka-bootstrap" and int(port) in ports


# --------------------------------------------------------------------------- settings and secrets


def configured_names() -> dict[str, set[str]]:
    """Variable names clickpulse containers receive, by source: container env, ConfigMap clickpulse-config."""
    names: dict[str, set[str]] = {"env": set(), "configmap": set()}
    for doc in objects():
        for container in clickpulse_containers(doc):
            names["env"] |= {e["name"] for e in container.get("env") or []}
    for d in kustomization_dirs():
        names["configmap"] |= set(config_data(d))
    return names


def test_every_variable_given_to_clickpulse_is_a_setting(setting_env_names: set[str]) -> None:
    names = configured_names()
    assert names["configmap"] >= {"KAFKA_BOOTSTRAP_SERVERS"}
    unknown = (names["env"] | names["configmap"]) - setting_env_names
    assert not unknown, f"not a field of any settings class in connectors/ or jobs/: {sorted(unknown)}"


def test_secret_keys_are_settings_webhook_secrets_or_s3_credentials(setting_env_names: set[str]) -> None:
    """Keys of the Secrets the clickpulse containers read (taken from the checked-in examples)."""
    for d in kustomization_dirs():
        for gen, rel in generator_sources(kustomization(d), "secretGenerator"):
            keys = set(read_env_file(env_source(d, rel)))
            assert keys, f"{rel}: no keys"
            if gen["name"] in ("clickpulse-connections", "clickpulse-migrate-connections"):
                assert keys <= setting_env_names, keys - setting_env_names
            elif gen["name"] == "clickpulse-webhooks":
                assert DEFAULT_SECRET_ENV in keys
                assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) for k in keys), keys
            elif gen["name"] == "clickpulse-s3":
                assert keys == S3_CREDENTIAL_VARS
            elif gen["name"] == "clickpulse-collector-keys":
                assert keys == {"CLICKPULSE_WRITE_KEY"}
            else:
                assert gen["name"] == "clickpulse-servers", f"unexpected Secret {gen['name']}"
                assert keys == clickhouse_password_vars() | {"REDIS_PASSWORD"}


def clickhouse_users() -> dict[str, ElementTree.Element]:
    """The users of ``k8s/base/clickhouse/users.xml`` by name (the removed ``default`` excluded)."""
    root = ElementTree.parse(K8S / "base" / "clickhouse" / "users.xml").getroot()
    users = root.find("users")
    assert users is not None
    return {u.tag: u for u in users if u.get("remove") is None}


def clickhouse_password_vars() -> set[str]:
    """The server variables users.xml reads the passwords from (``<password from_env=...>``)."""
    found = set()
    for user in clickhouse_users().values():
        password = user.find("password")
        assert password is not None and password.get("from_env"), f"{user.tag}: no password from_env"
        found.add(str(password.get("from_env")))
    return found


def test_connection_examples_agree_with_the_services_and_server_passwords() -> None:
    """Each connection URL logs in as a ClickHouse user of users.xml with the password the server gets."""
    services = set(by_name("Service"))
    users = clickhouse_users()
    (statefulset,) = [s for s in of_kind("StatefulSet") if s["metadata"]["name"] == "clickhouse"]
    (server,) = containers(statefulset)
    server_secret_keys = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in server.get("env") or []
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    checked = 0
    for d in kustomization_dirs():
        sources = {
            g["name"]: read_env_file(env_source(d, rel))
            for g, rel in generator_sources(kustomization(d), "secretGenerator")
        }
        if "clickpulse-connections" not in sources:
            continue
        servers = sources["clickpulse-servers"]
        redis = urlsplit(sources["clickpulse-connections"]["REDIS_URL"])
        assert redis.hostname in services and redis.password == servers["REDIS_PASSWORD"]
        for secret in ("clickpulse-connections", "clickpulse-migrate-connections"):
            clickhouse = urlsplit(sources[secret]["CLICKHOUSE_URL"])
            assert clickhouse.hostname in services
            assert clickhouse.username in users, f"{secret}: no ClickHouse user {clickhouse.username}"
            password = users[str(clickhouse.username)].find("password")
            assert password is not None
            var = str(password.get("from_env"))
            ref = server_secret_keys[var]
            assert ref["name"] == "clickpulse-servers"
            assert clickhouse.password == servers[ref["key"]], f"{secret}: password of {clickhouse.username}"
            checked += 1
    assert checked


def test_no_secret_is_written_into_a_manifest() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_docs(path):
            where = path.relative_to(REPO)
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), (
                    f"{where}: Secret with inline values"
                )
            for env in env_lists(doc):
                for entry in env:
                    value = entry.get("value")
                    if value is None:
                        continue
                    assert not is_secret_name(entry["name"]), (
                        f"{where}: {entry['name']} must use secretKeyRef"
                    )
                    assert "@" not in urlsplit(str(value)).netloc, f"{where}: credentials in {entry['name']}"
    for d in kustomization_dirs():
        kust = kustomization(d)
        for gen in kust.get("secretGenerator") or []:
            assert not gen.get("literals"), (
                f"{d.relative_to(REPO)}: secretGenerator {gen['name']} has literals"
            )
        for key, value in config_data(d).items():
            place = f"{d.relative_to(REPO)}: ConfigMap clickpulse-config"
            assert not is_secret_name(key), f"{place}: {key} is a secret"
            assert "@" not in urlsplit(value).netloc, f"{place}: credentials in {key}"


def test_secret_env_files_are_gitignored_and_never_committed() -> None:
    patterns = [
        line.strip()
        for line in (K8S / ".gitignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for d in kustomization_dirs():
        for _, rel in generator_sources(kustomization(d), "secretGenerator"):
            path = (d / rel).relative_to(K8S).as_posix()
            assert any(fnmatch.fnmatch(path, p) for p in patterns), f"k8s/{path} is not gitignored"
            assert (d / (rel + ".example")).is_file(), f"k8s/{path}.example is missing"
    if shutil.which("git") and (REPO / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "k8s"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        assert not [f for f in tracked if f.endswith(".env") and "/secrets/" in f], (
            "a secret env file is committed"
        )


# ------------------------------------------------------------------------------------------ image


def test_image_resolves_jars_from_the_pom_and_matches_pyflink() -> None:
    text = dockerfile()
    version = flink_version()
    assert "connectors/maven/pom.xml" in text
    assert f"ARG FLINK_VERSION={version}" in text
    pins = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]
    assert f"apache-flink=={version}" in pins
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("COPY", "ADD") and not any(w.startswith("--from=") for w in words):
            assert not any(w.endswith(".jar") or ".jar" in w for w in words[1:]), (
                f"jar copied into the image: {line}"
            )
    assert not list(K8S.rglob("*.jar"))


# --------------------------------------------------------------------------- rendered (kubectl)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """``kubectl kustomize`` of the base and each overlay (secret env files made from the examples)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    for example in tree.rglob("*.env.example"):
        real = example.with_name(example.name.removesuffix(".example"))
        if not real.exists():
            shutil.copyfile(example, real)
    # the single-jobs component the way k8s/README.md tells: on the base, and in the local overlay, whose
    # replacements then name the single jobs (the component's) instead of the pipeline
    component = SINGLE_JOBS.relative_to(K8S).as_posix()
    variants = {"base+single-jobs": tree / "variants" / "base-single-jobs"}
    variants["base+single-jobs"].mkdir(parents=True)
    (variants["base+single-jobs"] / KUSTOMIZATION).write_text(
        yaml.safe_dump({"resources": ["../../base"], "components": [f"../../{component}"]}), "utf-8"
    )
    local = tree / "overlays" / "local-single-jobs"
    shutil.copytree(tree / "overlays" / "local", local)
    kust = kustomization(local)
    kust["components"] = [f"../../{component}"]
    kust["replacements"] = [
        r
        for r in kustomization(SINGLE_JOBS)["replacements"]
        if r["source"]["fieldPath"] == "spec.job.parallelism"
    ]
    (local / KUSTOMIZATION).write_text(yaml.safe_dump(kust), "utf-8")
    variants["overlays/local+single-jobs"] = local
    targets = {
        d.relative_to(K8S).as_posix(): tree / d.relative_to(K8S)
        for d in kustomization_dirs()
        if kustomization(d).get("kind") != "Component"  # rendered as part of the variants
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for rel, path in {**targets, **variants}.items():
        proc = subprocess.run(
            [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/{rel}: {proc.stderr}"
        out[rel] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def test_rendered_sets_are_the_pipeline_or_the_single_jobs(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The default renders the pipeline with its KafkaUser; the component the single jobs with theirs and no
    trace of the pipeline's identity; the Kafka listener admits the pods of the rendered jobs."""
    assert {"base", "overlays/local", "base+single-jobs", "overlays/local+single-jobs"} <= set(rendered)
    for rel, docs in rendered.items():
        flink = {d["metadata"]["name"]: d for d in docs if d["kind"] == "FlinkDeployment"}
        users = {d["metadata"]["name"] for d in docs if d["kind"] == "KafkaUser"}
        expected = SINGLE_JOB_DEPLOYMENTS if rel.endswith("+single-jobs") else PIPELINE_DEPLOYMENTS
        assert set(flink) == expected, rel
        assert users & (PIPELINE_DEPLOYMENTS | SINGLE_JOB_DEPLOYMENTS) == expected, rel
        (kafka,) = [d for d in docs if d["kind"] == "Kafka"]
        peers = {
            value
            for listener in kafka["spec"]["kafka"]["listeners"]
            for peer in listener.get("networkPolicyPeers") or []
            for expr in peer["podSelector"]["matchExpressions"]
            for value in expr["values"]
        }
        for doc in flink.values():
            assert doc["spec"]["podTemplate"]["metadata"]["labels"]["app.kubernetes.io/component"] in peers, (
                rel
            )
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "clickpulse", rel


def test_rendered_flink_jobs_keep_parallelism_and_env_equal(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for rel, docs in rendered.items():
        for doc in docs:
            if doc["kind"] != "FlinkDeployment":
                continue
            main = flink_main_container(doc)
            assert env_value(main, "CLICKPULSE_FLINK_PARALLELISM") == str(
                doc["spec"]["job"]["parallelism"]
            ), rel
            assert ":" in doc["spec"]["image"], (
                f"{rel}: the image transformer missed {doc['metadata']['name']}"
            )


def test_rendered_overlays_define_every_configmap_and_secret_they_use(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Every ConfigMap and Secret a pod uses is in the overlay, or made by Strimzi from a resource in it:
    a KafkaUser's Secret (its name) and the cluster CA certificate of a Kafka (``<name>-cluster-ca-cert``)."""
    for rel, docs in rendered.items():
        if not rel.startswith("overlays/"):
            continue
        defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
        defined |= {("Secret", d["metadata"]["name"]) for d in docs if d["kind"] == "KafkaUser"}
        defined |= {
            ("Secret", f"{d['metadata']['name']}-cluster-ca-cert") for d in docs if d["kind"] == "Kafka"
        }
        for doc in docs:
            for ps in pod_specs(doc):
                for volume in ps.get("volumes") or []:
                    if "configMap" in volume:
                        assert ("ConfigMap", volume["configMap"]["name"]) in defined, rel
                    if "secret" in volume:
                        assert ("Secret", volume["secret"]["secretName"]) in defined, rel
            for container in containers(doc):
                for ref in container.get("envFrom") or []:
                    if "configMapRef" in ref:
                        assert ("ConfigMap", ref["configMapRef"]["name"]) in defined, rel
                    if "secretRef" in ref:
                        assert ("Secret", ref["secretRef"]["name"]) in defined, rel
                for entry in container.get("env") or []:
                    source = entry.get("valueFrom") or {}
                    if "secretKeyRef" in source:
                        assert ("Secret", source["secretKeyRef"]["name"]) in defined, (
                            f"{rel}: {entry['name']}"
                        )
                    if "configMapKeyRef" in source:
                        assert ("ConfigMap", source["configMapKeyRef"]["name"]) in defined, rel
            if doc["kind"] == "FlinkDeployment":
                assert ("ServiceAccount", doc["spec"]["serviceAccount"]) in defined, rel
            if doc["kind"] == "RoleBinding":
                assert all(s.get("namespace") for s in doc["subjects"] if s["kind"] == "ServiceAccount"), rel
