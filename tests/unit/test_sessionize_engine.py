"""The sessions engine setting: default, environment and flag, and the per-engine operator ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.flink import job_options
from connectors.settings import compose, environment
from jobs import sessionize
from jobs.pipeline import PipelineJobSettings, add_pipeline_args
from jobs.sessionize import SessionizeJobSettings, SessionsEngine, add_sessionize_args

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

JAVA = Path(__file__).resolve().parents[2] / "connectors" / "jvm" / "src" / "main" / "java"


def test_default_is_the_jvm_operator(tmp_path: Path) -> None:
    s = compose(
        SessionizeJobSettings,
        environment({}, state_dir=tmp_path),
        job_options("sessionize", [], add_sessionize_args),
    )
    assert s.sessionize.engine is SessionsEngine.JVM


def test_environment_and_flag_choose_the_engine(tmp_path: Path) -> None:
    env = environment({"CLICKPULSE_SESSIONIZE_ENGINE": "python"}, state_dir=tmp_path)
    s = compose(SessionizeJobSettings, env, job_options("sessionize", [], add_sessionize_args))
    assert s.sessionize.engine is SessionsEngine.PYTHON
    flag = job_options("pipeline", ["--engine", "jvm"], add_pipeline_args, shared_flags=True)
    assert compose(PipelineJobSettings, env, flag).sessionize.engine is SessionsEngine.JVM
    with pytest.raises(SystemExit):
        job_options("sessionize", ["--engine", "scala"], add_sessionize_args)


def test_engines_keep_their_state_apart() -> None:
    """The states are incompatible: the uids and state names must differ (a restore then fails loudly
    instead of reading the other engine's bytes)."""
    assert sessionize.UID_SESSIONS != sessionize.UID_SESSIONS_JVM
    assert sessionize.STATE_NAME != sessionize.STATE_NAME_JVM
    operator = JAVA / (sessionize.JVM_OPERATOR.replace(".", "/") + ".java")
    assert operator.exists(), operator
