"""Security of the Kubernetes manifests: Kafka identities and ACLs, ClickHouse users, NetworkPolicies and
hardened pods.

The ACLs a job needs are not copied by hand: each job's wiring runs with the environment its manifest
gives it (``jobs.<job>.main`` with the table environment, the graph and the submission replaced by
recorders for the Flink jobs; the loader's and the dispatch loop's configs for the consumers), and the
Kafka tables and configs it makes name the topics, groups and transactional ids. NetworkPolicies are
checked by evaluating them for the pods the manifests make (labels of the pod templates, plus those Flink
and Strimzi add). Every check runs for both sets of Flink jobs: the base's (the ``pipeline`` job) and the
base with the ``single-jobs`` component (ingest, sessionize, triggers), composed here without kustomize.
Pure Python, no JVM.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest

from connectors.settings import CONTRACT_TOPICS, Connections, KafkaSecurityProtocol, compose
from jobs.cli import JOBS
from tests.unit.test_k8s_manifests import (
    K8S,
    SINGLE_JOBS,
    clickhouse_users,
    config_data,
    containers,
    deleted_by,
    env_source,
    flink_main_container,
    generator_sources,
    kustomization,
    load_docs,
    pod_specs,
    read_env_file,
)

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("ignore:.*deprecated since version.*:DeprecationWarning"),
]

BASE = K8S / "base"
#: The sets of Flink jobs a deployment can have: the base's default, and the base with the component.
PIPELINE, SINGLE = "pipeline", "single-jobs"
VARIANTS = (PIPELINE, SINGLE)
#: Kafka workloads of each set besides the Flink jobs: the consumers and the collector.
FLINK_JOBS = {PIPELINE: {"pipeline"}, SINGLE: {"ingest", "sessionize", "triggers"}}
#: Identities with no workload in the base: producers of events.raw and the writer of rules.
PRODUCER, OPERATOR = "clickpulse-producer", "clickpulse-operator"
#: Labels Flink's native Kubernetes mode puts on the pods of a FlinkDeployment.
FLINK_POD = {"type": "flink-native-kubernetes"}
#: Placeholder for values that come from a Secret.
SECRET_VALUE = "from-a-secret"

Acls = dict[tuple[str, str, str], set[str]]


# ------------------------------------------------------------------------------------------ the base


def json_patch(doc: Any, ops: Any) -> None:
    """Apply the RFC 6902 operations kustomize patches use here (test, add, replace, remove) in place."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = last if isinstance(node, dict) else (len(node) if last == "-" else int(last))
        if op["op"] == "test":
            assert node[key] == op["value"], op
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            node[key] = copy.deepcopy(op["value"])
        else:
            assert op["op"] == "remove", op
            del node[key]


@functools.cache
def base_objects(variant: str = PIPELINE) -> list[dict[str, Any]]:
    """Every object of a resource file of the base kustomization (parsed once: do not modify them); for
    ``single-jobs`` with the component applied: its resources added, its deletions and JSON patches done."""
    objects = [doc for rel in kustomization(BASE)["resources"] for doc in load_docs(BASE / rel)]
    if variant == PIPELINE:
        return objects
    assert variant == SINGLE, variant
    kust = kustomization(SINGLE_JOBS)
    deleted = deleted_by(kust)
    objects = [copy.deepcopy(d) for d in objects if (d["kind"], d["metadata"]["name"]) not in deleted]
    objects += [doc for rel in kust["resources"] for doc in load_docs(SINGLE_JOBS / rel)]
    for patch in kust.get("patches") or []:
        if "path" not in patch:
            continue
        (ops,) = load_docs(SINGLE_JOBS / patch["path"])  # a list of operations
        target = patch["target"]
        matched = [
            d
            for d in objects
            if d["kind"] == target["kind"]
            and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
        ]
        assert matched, f"{patch['path']}: no target"
        for doc in matched:
            json_patch(doc, ops)
    return objects


def base_of_kind(kind: str, variant: str = PIPELINE) -> list[dict[str, Any]]:
    return [d for d in base_objects(variant) if d["kind"] == kind]


def workloads(variant: str = PIPELINE) -> list[dict[str, Any]]:
    kinds = {"Deployment", "StatefulSet", "Job", "FlinkDeployment"}
    return [d for d in base_objects(variant) if d["kind"] in kinds]


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"].get("app.kubernetes.io/component", doc["metadata"]["name"]))


def main_container(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "FlinkDeployment":
        return flink_main_container(doc)
    (container,) = containers(doc)
    return container


def pod_env(doc: dict[str, Any]) -> dict[str, str]:
    """The environment of a workload's main container: the ConfigMap clickpulse-config of the base, then
    the container's ``env`` (values from Secrets replaced by a placeholder)."""
    container = main_container(doc)
    env: dict[str, str] = {}
    if any("configMapRef" in r for r in container.get("envFrom") or []):
        env.update(config_data(BASE))
    for entry in container.get("env") or []:
        env[entry["name"]] = entry["value"] if "value" in entry else SECRET_VALUE
    return env


def kafka_cluster(variant: str = PIPELINE) -> dict[str, Any]:
    (kafka,) = base_of_kind("Kafka", variant)
    return kafka


def kafka_users(variant: str = PIPELINE) -> dict[str, dict[str, Any]]:
    return {u["metadata"]["name"]: u for u in base_of_kind("KafkaUser", variant)}


def user_acls(user: dict[str, Any]) -> Acls:
    """A KafkaUser's ACLs as ``{(resource type, name, pattern type): operations}``."""
    acls: Acls = {}
    for acl in user["spec"]["authorization"]["acls"]:
        res = acl["resource"]
        key = (res["type"], res["name"], res.get("patternType", "literal"))
        acls.setdefault(key, set()).update(acl["operations"])
    return acls


#: Kafka workloads that are no job of ``clickpulse run``: the command after ``clickpulse``.
SERVICES = ("collector",)


def kafka_workloads(variant: str = PIPELINE) -> dict[str, dict[str, Any]]:
    """Workloads running a clickpulse job (every job reads Kafka) or the collector, by the KafkaUser they
    log in as."""
    found = {}
    for doc in workloads(variant):
        if job_of(doc) not in (*JOBS, *SERVICES):
            continue
        user = pod_env(doc).get("CLICKPULSE_KAFKA_SASL_USERNAME")
        assert user, f"{doc['metadata']['name']}: no CLICKPULSE_KAFKA_SASL_USERNAME"
        assert user not in found, f"{user} shared by two workloads"
        found[user] = doc
    # every job of the code is deployed: the consumers always, the Flink jobs of the variant's set
    flink_jobs = set().union(*FLINK_JOBS.values())
    assert set(JOBS) >= flink_jobs
    assert {job_of(d) for d in found.values()} == set(JOBS) - flink_jobs | FLINK_JOBS[variant] | set(SERVICES)
    return found


# ------------------------------------------------------------------------------ what the code needs


class Need:
    """Topics, groups and transactional ids a job uses: the ACLs it needs."""

    def __init__(self) -> None:
        self.acls: Acls = {}

    def add(self, kind: str, name: str, pattern: str, *ops: str) -> None:
        self.acls.setdefault((kind, name, pattern), set()).update(ops)

    def read(self, topic: str, group: str | None) -> None:
        self.add("topic", topic, "literal", "Describe", "Read")
        if group:
            self.add("group", group, "literal", "Read")

    def write(self, topic: str, transactional_prefix: str | None = None) -> None:
        self.add("topic", topic, "literal", "Describe", "Write")
        if transactional_prefix:
            self.add("transactionalId", transactional_prefix, "prefix", "Describe", "Write")


class RecordingTableEnv:
    """Stands in for the table environment of a job's ``main``: nothing may reach Flink."""

    def execute_sql(self, sql: str) -> None:
        raise AssertionError(f"unexpected SQL outside create_table: {sql[:80]}")

    def from_path(self, name: str) -> str:
        return name

    def create_statement_set(self) -> Any:
        return SimpleNamespace(add_insert=lambda *_: None)

    def to_data_stream(self, table: Any) -> Any:
        return table

    def from_data_stream(self, stream: Any, *_: Any) -> Any:
        return SimpleNamespace(stream=stream, select=lambda *_: stream)


def flink_job_needs(job: str, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Need:
    """Run ``jobs.<job>.main`` with ``env``, recording the Kafka tables it creates."""
    module = importlib.import_module(f"jobs.{job}")
    flink = importlib.import_module("connectors.flink")
    tables: dict[str, dict[str, str]] = {}

    def create_table(_t_env: Any, name: str, _columns: str, options: Mapping[str, str]) -> None:
        tables[name] = dict(options)

    t_env = RecordingTableEnv()
    replaced = {
        "create_table": create_table,
        "environment": lambda *_, **__: dict(env),
        "setup_logging": lambda *_, **__: None,
        "stop_on_signals": lambda *_, **__: None,
        "create_table_env": lambda *_, **__: (None, t_env),
        "run_job": lambda *_, **__: "finished",
        # the graph and the rules snapshot are not the point: only the Kafka tables are
        "build": lambda *args, **__: ("enriched", "dlq") if len(args) == 3 else "actions",
        "function_config": lambda *_, **__: None,
        "with_event_time": lambda _t_env, stream, *_, **__: stream,
    }
    monkeypatch.setattr(flink, "create_table", create_table)
    # a job composed of other jobs' parts (the pipeline) runs its own build over their stand-ins, and
    # its parts create their sources and sinks as they do in it
    source = inspect.getsource(module)
    parts = [
        m
        for alias, m in vars(module).items()
        if isinstance(m, ModuleType) and m.__name__.startswith("jobs.") and f"{alias}.build(" in source
    ]
    for target in (module, *parts):
        for name, value in replaced.items():
            if name == "build" and target is module and parts:
                continue
            if hasattr(target, name):
                monkeypatch.setattr(target, name, value)
    assert module.main([]) == 0
    assert tables, f"{job}: no Kafka table recorded"
    need = Need()
    for name, opts in tables.items():
        assert opts["connector"] == "kafka", name
        if "sink.delivery-guarantee" in opts:
            exactly_once = opts["sink.delivery-guarantee"] == "exactly-once"
            need.write(opts["topic"], opts["sink.transactional-id-prefix"] if exactly_once else None)
        else:
            need.read(opts["topic"], opts.get("properties.group.id"))
    return need


def consumer_needs(job: str, env: Mapping[str, str]) -> Need:
    """The topics of the loader's and the dispatch loop's configs (and the collector's sink), built from
    ``env`` as their main() does."""
    need = Need()
    if job == "collector":  # the topic its Kafka sink writes (connectors.collector.main)
        need.write(Connections.from_env(env).topic("events.raw"))
        return need
    module = importlib.import_module(f"jobs.{job}")
    if job == "load":
        cfg = compose(module.LoadJobSettings, env).loader_config()
        need.read(cfg.events_topic, cfg.group_id)
        need.read(cfg.sessions_topic, cfg.group_id)
        need.write(cfg.dlq_topic)  # rows ClickHouse rejects
    elif job == "dispatch":
        s = compose(module.DispatchJobSettings, env)
        dc = s.dispatch.dispatch_config(s.connections, s.consumer, s.consumer.group(module.JOB))
        need.read(dc.actions_topic, dc.group_id)
        need.read(dc.rules_topic, None)  # the rule book reads the compacted topic without a group
        need.write(dc.dlq_topic)
        need.read(dc.spill_topic, dc.group_id)  # actions spilled while their destination is backlogged
        need.write(dc.spill_topic)
    else:
        raise AssertionError(f"no consumer wiring known for {job}")
    return need


def job_of(doc: dict[str, Any]) -> str:
    if doc["kind"] == "FlinkDeployment":
        args = doc["spec"]["job"]["args"]
        return Path(args[args.index("-py") + 1]).stem
    command = main_container(doc).get("command") or []
    if command[:2] == ["clickpulse", "collector"]:
        return "collector"
    return str(command[2]) if command[:2] == ["clickpulse", "run"] else ""


def needs(doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Need:
    env = {**pod_env(doc), "CLICKPULSE_STATE_DIR": str(tmp_path)}
    env.pop("CLICKPULSE_RULES_FILE", None)  # the mounted file is not here; the topic is what counts
    job = job_of(doc)
    if doc["kind"] == "FlinkDeployment":
        return flink_job_needs(job, env, monkeypatch)
    return consumer_needs(job, env)


# ------------------------------------------------------------------------------------------- Kafka


def test_the_kafka_listeners_use_tls_scram_and_acls() -> None:
    kafka = kafka_cluster()["spec"]
    listeners = kafka["kafka"]["listeners"]
    assert listeners
    for listener in listeners:
        assert listener["tls"] is True, f"listener {listener['name']} without TLS"
        assert listener["authentication"]["type"] == "scram-sha-512", listener["name"]
    assert kafka["kafka"]["authorization"]["type"] == "simple"
    assert "userOperator" in kafka["entityOperator"], "KafkaUsers need the User Operator"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kafka_workload_has_exactly_the_acls_its_job_wiring_needs(
    variant: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    users = kafka_users(variant)
    workloads_by_user = kafka_workloads(variant)
    for user_name, doc in workloads_by_user.items():
        assert user_name in users, f"{doc['metadata']['name']}: no KafkaUser {user_name}"
        user = users[user_name]
        assert component(user) == component(doc), user_name
        with monkeypatch.context() as m:
            expected = needs(doc, m, tmp_path).acls
        assert user_acls(user) == expected, f"{user_name}: ACLs differ from what {job_of(doc)} uses"
    assert set(users) - set(workloads_by_user) == {PRODUCER, OPERATOR}, "a KafkaUser no workload uses"


def test_the_identities_without_a_workload_touch_only_their_topic() -> None:
    users = kafka_users()
    assert user_acls(users[PRODUCER]) == {("topic", "events.raw", "literal"): {"Describe", "Write"}}
    assert user_acls(users[OPERATOR]) == {("topic", "rules", "literal"): {"Describe", "Read", "Write"}}


def writers(topic: str, variant: str = PIPELINE) -> set[str]:
    return {
        name
        for name, user in kafka_users(variant).items()
        for (kind, res, pattern), ops in user_acls(user).items()
        if kind == "topic" and ops & {"Write", "All"} and (res == topic or pattern != "literal" or res == "*")
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_operator_writes_rules_and_only_the_trigger_job_writes_actions(variant: str) -> None:
    assert writers("rules", variant) == {OPERATOR}
    firing = "clickpulse-pipeline" if variant == PIPELINE else "clickpulse-triggers"
    assert writers("actions", variant) == {firing}
    assert all(writers(t, variant) for t in CONTRACT_TOPICS), "a contract topic nobody may write"


def test_the_pipeline_user_may_use_every_topic_of_the_job_and_nothing_else() -> None:
    """What the pipeline reads and writes (the topics of the architecture's data flow), with its group and
    its exactly-once sinks' transactional ids; actions at-least-once, without transactions."""
    acls = user_acls(kafka_users()["clickpulse-pipeline"])
    topics = {name: ops for (kind, name, _), ops in acls.items() if kind == "topic"}
    assert topics == {
        "events.raw": {"Describe", "Read"},
        "rules": {"Describe", "Read"},
        **{t: {"Describe", "Write"} for t in ("events.enriched", "events.dlq", "sessions", "events.late")},
        "actions": {"Describe", "Write"},
    }
    groups = {name for (kind, name, _) in acls if kind == "group"}
    assert groups == {"clickpulse-pipeline", "clickpulse-pipeline-rules"}
    transactional = {name for (kind, name, _) in acls if kind == "transactionalId"}
    assert transactional == {
        f"clickpulse-pipeline-{t}" for t in ("events.enriched", "events.dlq", "sessions", "events.late")
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_acl_is_a_wildcard_or_reaches_the_cluster(variant: str) -> None:
    for name, user in kafka_users(variant).items():
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == kafka_cluster(variant)["metadata"]["name"]
        assert user["spec"]["authentication"]["type"] == "scram-sha-512", name
        assert user["spec"]["authorization"]["type"] == "simple", name
        for (kind, res, pattern), ops in user_acls(user).items():
            assert kind in ("topic", "group", "transactionalId"), f"{name}: {kind} ACL"
            assert "*" not in res and "All" not in ops, f"{name}: {kind} {res} {ops}"
            assert pattern == ("prefix" if kind == "transactionalId" else "literal"), f"{name}: {res}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kafka_workload_logs_in_with_its_own_user_over_tls(variant: str) -> None:
    """Protocol, mechanism, user, password from the user's Secret and the mounted cluster CA; the
    settings model turns them into the client properties of Flink's sources and sinks."""
    ca_secret = f"{kafka_cluster(variant)['metadata']['name']}-cluster-ca-cert"
    for user_name, doc in kafka_workloads(variant).items():
        name = doc["metadata"]["name"]
        env = pod_env(doc)
        assert env["CLICKPULSE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["CLICKPULSE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        container = main_container(doc)
        (password,) = [e for e in container["env"] if e["name"] == "CLICKPULSE_KAFKA_SASL_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": user_name, "key": "password"}, name
        ca_file = Path(env["CLICKPULSE_KAFKA_SSL_CA_FILE"])
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == ca_file.parent]
        (volume,) = [
            v for ps in pod_specs(doc) for v in ps.get("volumes") or [] if v["name"] == mount["name"]
        ]
        assert volume["secret"]["secretName"] == ca_secret, name
        assert {"key": "ca.crt", "path": ca_file.name} in volume["secret"]["items"], name
        conn = Connections.from_env({**env, "CLICKPULSE_KAFKA_SASL_PASSWORD": "pw"})
        assert conn.kafka_security_protocol is KafkaSecurityProtocol.SASL_SSL
        props = conn.kafka_properties()
        assert (
            "ScramLoginModule" in props["sasl.jaas.config"]
            and f'username="{user_name}"' in props["sasl.jaas.config"]
        )
        assert props["ssl.truststore.location"] == str(ca_file)


def test_workloads_without_kafka_have_no_kafka_identity() -> None:
    (migrate,) = [d for d in workloads() if component(d) == "migrate"]
    assert "CLICKPULSE_KAFKA_SASL_USERNAME" not in pod_env(migrate)
    assert component(migrate) not in {component(u) for u in kafka_users().values()}


# -------------------------------------------------------------------------------------- ClickHouse


def clickhouse_server() -> tuple[dict[str, Any], dict[str, Any]]:
    (sts,) = [d for d in base_of_kind("StatefulSet") if d["metadata"]["name"] == "clickhouse"]
    (server,) = containers(sts)
    return sts, server


def grants(user: ElementTree.Element) -> list[str]:
    return [str(q.text).strip() for q in user.findall("grants/query")]


def url_user(secret: str) -> str:
    """The ClickHouse user in CLICKHOUSE_URL of a connection Secret (from the local overlay's example)."""
    local = K8S / "overlays" / "local"
    for gen, rel in generator_sources(kustomization(local), "secretGenerator"):
        if gen["name"] == secret:
            return str(urlsplit(read_env_file(env_source(local, rel))["CLICKHOUSE_URL"]).username)
    raise AssertionError(f"no Secret {secret}")


def clickhouse_secret_of(doc: dict[str, Any]) -> str:
    (entry,) = [e for e in main_container(doc)["env"] if e["name"] == "CLICKHOUSE_URL"]
    return str(entry["valueFrom"]["secretKeyRef"]["name"])


def test_clickhouse_server_matches_the_engine_the_tests_run() -> None:
    chdb = pytest.importorskip("chdb")
    major_minor = ".".join(str(chdb.engine_version).split(".")[:2])
    (image,) = [i for i in kustomization(BASE)["images"] if i["name"] == "clickhouse/clickhouse-server"]
    assert str(image["newTag"]) == major_minor or str(image["newTag"]).startswith(major_minor + ".")


def test_clickhouse_users_have_least_privilege_and_no_access_management() -> None:
    users = clickhouse_users()
    database = config_data(BASE)["CLICKPULSE_CLICKHOUSE_DATABASE"]
    root = ElementTree.parse(BASE / "clickhouse" / "users.xml").getroot()
    removed = [u.tag for u in root.findall("users/*") if u.get("remove")]
    assert removed == ["default"], "the image's default user (full rights, no password) must go"
    for name, user in users.items():
        assert user.findtext("access_management", "0").strip() == "0", f"{name} manages access"
        for query in grants(user):
            assert query.endswith(f" ON {database}.*"), f"{name}: {query}"
            assert "ACCESS MANAGEMENT" not in query and "ALL" not in query.split(), f"{name}: {query}"
            assert "WITH GRANT OPTION" not in query, f"{name}: {query}"
    readonly_users = {
        d["metadata"]["name"]: pod_env(d)["CLICKPULSE_CLICKHOUSE_READONLY_USER"]
        for d in clickhouse_workloads()
        if "CLICKPULSE_CLICKHOUSE_READONLY_USER" in pod_env(d)
    }
    workload_users = {
        d["metadata"]["name"]: url_user(clickhouse_secret_of(d))
        for d in clickhouse_workloads()
        if d["metadata"]["name"] not in readonly_users
    }
    assert set(workload_users) == {"clickpulse-load", "clickpulse-migrate"}
    writer = users[workload_users["clickpulse-load"]]
    assert grants(writer) == [f"GRANT SELECT, INSERT ON {database}.*"]
    migrate = users[workload_users["clickpulse-migrate"]]
    assert "INSERT" in grants(migrate)[0] and "CREATE TABLE" in grants(migrate)[0]
    readers = [u for n, u in users.items() if n not in workload_users.values()]
    assert len(readers) == 1, "one BI user"
    (reader,) = readers
    assert grants(reader) == [f"GRANT SELECT ON {database}.*"]
    profile = root.find(f"profiles/{reader.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1", "BI user without readonly=1"
    # the dashboard reads as that user: its URL names no user, the password is the one the server gets
    assert readonly_users == {"clickpulse-dashboard": reader.tag}
    (dashboard,) = [d for d in clickhouse_workloads() if d["metadata"]["name"] == "clickpulse-dashboard"]
    env = {e["name"]: e for e in main_container(dashboard)["env"]}
    assert urlsplit(env["CLICKHOUSE_URL"]["value"]).username is None
    _, server = clickhouse_server()
    reader_var = str(reader.find("password").get("from_env"))  # type: ignore[union-attr]
    (server_ref,) = [e["valueFrom"]["secretKeyRef"] for e in server["env"] if e["name"] == reader_var]
    assert env["CLICKPULSE_CLICKHOUSE_READONLY_PASSWORD"]["valueFrom"]["secretKeyRef"] == server_ref


def clickhouse_workloads() -> list[dict[str, Any]]:
    return [
        d
        for d in workloads()
        if any(e["name"] == "CLICKHOUSE_URL" for e in main_container(d).get("env") or [])
    ]


def test_clickhouse_grants_parse_and_name_real_privileges() -> None:
    chdb = pytest.importorskip("chdb")
    known = set(str(chdb.query("SELECT privilege FROM system.privileges", "CSV")).replace('"', "").split())
    for name, user in clickhouse_users().items():
        for query in grants(user):
            assert str(chdb.query(f"EXPLAIN AST {query} TO x", "CSV")).strip().strip('"') == "GrantQuery", (
                query
            )
            listed = query.removeprefix("GRANT ").rsplit(" ON ", 1)[0]
            for privilege in (p.strip() for p in listed.split(",")):
                assert set(privilege.split()) <= known, f"{name}: unknown privilege {privilege}"


def test_the_clickhouse_server_creates_no_user_of_its_own() -> None:
    sts, server = clickhouse_server()
    env = {e["name"]: e for e in server["env"]}
    assert env["CLICKHOUSE_SKIP_USER_SETUP"]["value"] == "1"
    assert not {"CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"} & set(env)
    (users_mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/etc/clickhouse-server/users.d"]
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == users_mount["name"]]
    (gen,) = [
        g for g in kustomization(BASE)["configMapGenerator"] if g["name"] == volume["configMap"]["name"]
    ]
    assert gen["files"] == ["clickpulse.xml=clickhouse/users.xml"]


# ------------------------------------------------------------------------------------- hardened pods


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_workload_runs_non_root_read_only_without_capabilities(variant: str) -> None:
    for doc in workloads(variant):
        for ps in pod_specs(doc):
            pod = ps.get("securityContext") or {}
            for container in (ps.get("containers") or []) + (ps.get("initContainers") or []):
                if doc["kind"] == "FlinkDeployment" and set(container) <= {"name", *PROBES}:
                    continue  # a role template's probes, merged into the shared container
                where = f"{doc['metadata']['name']}/{container['name']}"
                sc = container.get("securityContext") or {}
                assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("readOnlyRootFilesystem") is True, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                seccomp = sc.get("seccompProfile", pod.get("seccompProfile")) or {}
                assert seccomp.get("type") == "RuntimeDefault", where
                mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
                if doc["kind"] != "StatefulSet" or component(doc) == "clickhouse":
                    assert "/tmp" in mounts, f"{where}: no writable /tmp"


WRITABLE = {
    "FlinkDeployment": {"/tmp", "/opt/flink/log"},
    "clickhouse": {"/tmp", "/var/lib/clickhouse", "/var/log/clickhouse-server"},
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.mark.parametrize("variant", VARIANTS)
def test_flink_and_clickhouse_write_only_to_their_volumes(variant: str) -> None:
    for doc in workloads(variant):
        key = doc["kind"] if doc["kind"] == "FlinkDeployment" else doc["metadata"]["name"]
        if key not in WRITABLE:
            continue
        ps = pod_specs(doc)[0]
        volumes = {v["name"]: v for v in ps.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates") or []}
        container = main_container(doc)
        for mount in container["volumeMounts"]:
            if mount["mountPath"] in WRITABLE[key]:
                source = volumes.get(mount["name"], {})
                assert "emptyDir" in source or mount["name"] in claims, f"{key}: {mount['mountPath']}"
                assert not mount.get("readOnly"), mount
        assert WRITABLE[key] <= {m["mountPath"] for m in container["volumeMounts"]}, key


def probe_port(probe: dict[str, Any]) -> int:
    action = probe.get("httpGet") or probe.get("tcpSocket") or {}
    return int(action["port"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_flink_pods_are_probed_on_their_configured_ports(variant: str) -> None:
    for doc in base_of_kind("FlinkDeployment", variant):
        conf = doc["spec"]["flinkConfiguration"]
        expected = {
            "jobManager": {int(conf["rest.port"]), int(conf["jobmanager.rpc.port"])},
            "taskManager": {int(conf["taskmanager.rpc.port"])},
        }
        for role, ports in expected.items():
            (container,) = doc["spec"][role]["podTemplate"]["spec"]["containers"]
            assert container["name"] == "flink-main-container"
            for probe in PROBES:
                assert probe in container, f"{doc['metadata']['name']} {role}: no {probe}"
                assert probe_port(container[probe]) in ports, f"{doc['metadata']['name']} {role} {probe}"
    _, server = clickhouse_server()
    assert all(p in server for p in PROBES)


# ---------------------------------------------------------------------------------- network policies


@dataclasses.dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: namespace and labels (or an address outside the cluster)."""

    name: str
    labels: Mapping[str, str]
    namespace: str = "clickpulse"
    namespace_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ip: str | None = None  # outside the cluster


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: Mapping[str, Any], pod: Pod, own_namespace: str) -> bool:
    if "ipBlock" in peer:
        if pod.ip is None:
            return False
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(pod.ip)
        inside = addr in ipaddress.ip_network(block["cidr"])
        return inside and not any(addr in ipaddress.ip_network(c) for c in block.get("except") or [])
    if pod.ip is not None:
        return False
    if "namespaceSelector" in peer:
        if not selects(
            peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod.namespace, **pod.namespace_labels}
        ):
            return False
    elif pod.namespace != own_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], pod.labels)


def port_matches(ports: list[Mapping[str, Any]] | None, port: int) -> bool:
    return not ports or any(p.get("protocol", "TCP") == "TCP" and int(p["port"]) == port for p in ports)


def allowed(policies: list[dict[str, Any]], direction: str, pod: Pod, peer: Pod, port: int) -> bool:
    """Whether ``pod`` may send (Egress) to / receive (Ingress) from ``peer`` on TCP ``port``."""
    if pod.ip is not None or pod.namespace != "clickpulse":
        return True  # not governed by these policies
    relevant = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not relevant:
        return True
    key, side = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in relevant:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(side)
            if (not peers or any(peer_matches(p, peer, "clickpulse") for p in peers)) and port_matches(
                rule.get("ports"), port
            ):
                return True
    return False


def strimzi_listener_policies(variant: str = PIPELINE) -> list[dict[str, Any]]:
    """The listener NetworkPolicy Strimzi makes from ``networkPolicyPeers`` (ingress to the brokers)."""
    kafka = kafka_cluster(variant)
    return [
        {
            "spec": {
                "podSelector": {"matchLabels": BROKER.labels},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": lsn.get("networkPolicyPeers") or [], "ports": [{"port": lsn["port"]}]}
                    for lsn in kafka["spec"]["kafka"]["listeners"]
                ],
            }
        }
    ]


def flows_allowed(
    policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int, variant: str = PIPELINE
) -> bool:
    ingress = policies + (strimzi_listener_policies(variant) if dst is BROKER else [])
    return allowed(policies, "Egress", src, dst, port) and allowed(ingress, "Ingress", dst, src, port)


BROKER_SELECTOR = {"strimzi.io/cluster": "clickpulse", "strimzi.io/broker-role": "true"}
BROKER = Pod(
    "kafka-broker",
    {"strimzi.io/cluster": "clickpulse", "strimzi.io/kind": "Kafka", "strimzi.io/broker-role": "true"},
)
INTERNET = Pod("webhook receiver", {}, ip="203.0.113.10")


def pods(variant: str = PIPELINE) -> dict[str, Pod]:
    """The pods of the base by name (a FlinkDeployment's as ``<name>/jobmanager`` and ``/taskmanager``)."""
    found: dict[str, Pod] = {}
    for doc in workloads(variant):
        name = doc["metadata"]["name"]
        if doc["kind"] == "FlinkDeployment":
            labels = doc["spec"]["podTemplate"]["metadata"]["labels"]
            for role in ("jobmanager", "taskmanager"):
                found[f"{name}/{role}"] = Pod(
                    f"{name}/{role}", {**labels, **FLINK_POD, "component": role, "app": name}
                )
        else:
            found[name] = Pod(name, doc["spec"]["template"]["metadata"]["labels"])
    return found


def network_policies(variant: str = PIPELINE) -> list[dict[str, Any]]:
    return base_of_kind("NetworkPolicy", variant)


def test_the_namespace_denies_everything_not_allowed() -> None:
    deny = [
        p
        for p in network_policies()
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_allow_exactly_the_flows_of_the_pipeline(variant: str) -> None:
    policies = network_policies(variant)
    p = pods(variant)
    flink_jobs = [n.split("/")[0] for n in p if n.endswith("/jobmanager")]
    # the job that stitches identities (Redis) and the one that fires actions; another of the set
    identity, firing = (
        ("clickpulse-pipeline", "clickpulse-pipeline")
        if variant == PIPELINE
        else ("clickpulse-ingest", "clickpulse-triggers")
    )
    kafka_port = kafka_cluster(variant)["spec"]["kafka"]["listeners"][0]["port"]
    clickhouse = Pod("clickhouse", {"app.kubernetes.io/name": "clickhouse"})
    redis = Pod("redis", {"app.kubernetes.io/name": "redis"})
    operator_ns = Pod("flink-operator", {}, namespace="flink-operator")
    must = [
        *[
            (p[f"{job}/{role}"], BROKER, kafka_port)
            for job in flink_jobs
            for role in ("jobmanager", "taskmanager")
        ],
        (p["clickpulse-load"], BROKER, kafka_port),
        (p["clickpulse-dispatch"], BROKER, kafka_port),
        (p[f"{identity}/taskmanager"], redis, 6379),
        (p["clickpulse-load"], clickhouse, 8123),
        (p["clickpulse-migrate"], clickhouse, 8123),
        (Pod("bi", {"app.kubernetes.io/component": "bi"}), clickhouse, 8123),
        (p["clickpulse-dispatch"], INTERNET, 443),
        (p["clickpulse-collector"], BROKER, kafka_port),
        (INTERNET, p["clickpulse-collector"], 8088),
        (Pod("ingress-controller", {}, namespace="ingress-nginx"), p["clickpulse-collector"], 8088),
        (operator_ns, p[f"{firing}/jobmanager"], 8081),
        (p["clickpulse-dashboard"], clickhouse, 8123),
    ]
    for job in flink_jobs:
        conf = next(d for d in base_of_kind("FlinkDeployment", variant) if d["metadata"]["name"] == job)[
            "spec"
        ]["flinkConfiguration"]
        jm, tm = p[f"{job}/jobmanager"], p[f"{job}/taskmanager"]
        must += [(tm, jm, int(conf["jobmanager.rpc.port"])), (tm, jm, int(conf["blob.server.port"]))]
        must += [(jm, tm, int(conf["taskmanager.rpc.port"])), (tm, tm, int(conf["taskmanager.data.port"]))]
    for src, dst, port in must:
        assert flows_allowed(policies, src, dst, port, variant), f"{src.name} -> {dst.name}:{port} is blocked"
    must_not = [
        (p["clickpulse-migrate"], BROKER, kafka_port),
        (clickhouse, BROKER, kafka_port),
        (p["clickpulse-load"], redis, 6379),
        (p[f"{firing}/jobmanager"], redis, 6379),
        (p[f"{identity}/jobmanager"], redis, 6379),
        (p["clickpulse-dispatch"], clickhouse, 8123),
        (p[f"{identity}/taskmanager"], clickhouse, 8123),
        (Pod("stranger", {}), clickhouse, 8123),
        (Pod("stranger", {}), BROKER, kafka_port),
        (Pod("stranger", {}), redis, 6379),
        (p["clickpulse-load"], INTERNET, 443),
        (p["clickpulse-dispatch"], INTERNET, 80),
        (p["clickpulse-migrate"], INTERNET, 443),
        (clickhouse, INTERNET, 443),
        (redis, INTERNET, 443),
        (Pod("stranger", {}, namespace="elsewhere"), p[f"{identity}/jobmanager"], 8081),
        (p["clickpulse-load"], p[f"{identity}/jobmanager"], 6123),
        (p["clickpulse-collector"], clickhouse, 8123),
        (p["clickpulse-collector"], redis, 6379),
        (p["clickpulse-collector"], INTERNET, 443),
        (INTERNET, p["clickpulse-collector"], 22),
        # the dashboard has no login: nothing reaches it but the kubelet (probes, port-forward)
        (INTERNET, p["clickpulse-dashboard"], 8050),
        (Pod("stranger", {}), p["clickpulse-dashboard"], 8050),
        (p["clickpulse-dashboard"], BROKER, kafka_port),
        (p["clickpulse-dashboard"], redis, 6379),
        (p["clickpulse-dashboard"], INTERNET, 443),
    ]
    if variant == SINGLE:  # only ingest of the single jobs reaches Redis
        must_not += [(p["clickpulse-sessionize/taskmanager"], redis, 6379)]
        must_not += [(p["clickpulse-triggers/taskmanager"], redis, 6379)]
    for src, dst, port in must_not:
        assert not flows_allowed(policies, src, dst, port, variant), (
            f"{src.name} -> {dst.name}:{port} is open"
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_kafka_peers_are_the_identities(variant: str) -> None:
    """Listener peers, the egress policies to the brokers and the KafkaUsers name the same components (the
    component adds a peer and a policy for its jobs; the base's name the pipeline, whose pods it removes)."""
    components = {component(u) for u in kafka_users(variant).values()}
    (listener,) = kafka_cluster(variant)["spec"]["kafka"]["listeners"]
    peers = {v for peer in listener["networkPolicyPeers"] for expr in peer["podSelector"]["matchExpressions"]
             for v in expr["values"] if expr["key"] == "app.kubernetes.io/component"}  # fmt: skip
    egress = {
        v
        for p in network_policies(variant)
        if any(
            e.get("to") == [{"podSelector": {"matchLabels": BROKER_SELECTOR}}]
            for e in p["spec"].get("egress") or []
        )
        for expr in p["spec"]["podSelector"].get("matchExpressions") or []
        for v in expr["values"]
    }
    stale = {"pipeline"} if variant == SINGLE else set()
    assert peers - stale == components and egress - stale == components
    assert {component(d) for d in kafka_workloads(variant).values()} <= components
    if variant == PIPELINE:  # the base alone names exactly its identities, in one peer and one policy
        (peer,) = listener["networkPolicyPeers"]
        (egress_policy,) = [p for p in network_policies() if p["metadata"]["name"] == "kafka-clients"]
        (expr,) = egress_policy["spec"]["podSelector"]["matchExpressions"]
        assert set(expr["values"]) == components
