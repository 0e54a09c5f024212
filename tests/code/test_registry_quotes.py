"""Registered model names with quotes work in every registry query (real SQLite registry).

MLflow's filter parser strips one pair of quotes and does not unescape, so ``name = 'a''b'``
matches nothing and a quote inside single quotes breaks the query.
"""

from __future__ import annotations

import mlflow
import pytest

from cars_ml import tracking
from cars_ml.promotion import moves, registry

NAMES = ["cars'model", 'cars"model', "cars'\"model", "it's_100%"]


def _register(client, name: str, count: int) -> list[str]:
    client.create_registered_model(name)
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "test_f1_macro", 0.5)
    client.set_terminated(run.info.run_id)
    return [
        str(
            client.create_model_version(
                name, f"runs:/{run.info.run_id}/model", run.info.run_id
            ).version
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_quoted_model_name_in_every_registry_query(tracking_uri, name):
    client = mlflow.MlflowClient()
    versions = _register(client, name, 2)
    # Siblings a loose (LIKE) match would also find: they must never show up.
    _register(client, name.replace("'", "x").replace('"', "y"), 1)
    _register(client, name + "2", 1)

    assert [str(v.version) for v in registry.list_versions(name)] == versions
    assert all(v.name == name for v in registry.list_versions(name))
    table = registry.candidate_table(name)
    assert list(table["version"]) == versions and list(table["test_f1_macro"]) == [0.5, 0.5]

    moves.apply_promotion(name, versions[1], "best", None, run_id=None)
    assert registry.current_champion(name) == versions[1]
    assert registry.sync_stage(name, versions[1]) is False
    assert registry.sync_stage(name, versions[0]) is True
    stages = {str(v.version): v.current_stage for v in registry.list_versions(name)}
    assert stages == {versions[0]: "Production", versions[1]: "Archived"}


def test_unknown_quoted_name_has_no_versions(tracking_uri):
    assert registry.list_versions("nobody's model") == []


@pytest.mark.parametrize("value", ["plain", "it's", 'say "hi"', "both ' and \""])
def test_find_finished_run_with_quotes_in_tag_values(tracking_uri, value):
    with tracking.start_run("step", tags={"pipeline_step_key": value}):
        run_id = tracking.active_run_id()
    with tracking.start_run("other", tags={"pipeline_step_key": value + "x"}):
        pass
    found = tracking.find_finished_run({"pipeline_step_key": value})
    assert found is not None and found.info.run_id == run_id


def test_filter_equals_quoting():
    assert tracking.filter_equals("name", "a'b") == ('name = "a\'b"', True)
    assert tracking.filter_equals("name", 'a"b') == ("name = 'a\"b'", True)
    clause, exact = tracking.filter_equals("tags.`k`", "a'\"b")
    assert clause == "tags.`k` LIKE 'a__b'" and exact is False
