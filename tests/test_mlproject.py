"""MLproject: entry points call only the CLI, defaults come from the params file, `mlflow run` trains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from helpers_train import split_table, write_images

ROOT = Path(__file__).parents[1]


def test_entry_points_only_call_covidtl_and_leave_defaults_to_params():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert project["python_env"] == "python_env.yaml"
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert env["python"] == "3.11.7" and env["dependencies"] == ["-e ."]
    points = project["entry_points"]
    assert set(points) >= {"main", "evaluate", "tune", "report"}
    for name, point in points.items():
        assert point["command"].startswith("covidtl "), name
    main = points["main"]["parameters"]
    assert set(main) >= {"model", "init", "dataset", "epochs", "lr", "batch_size", "seed"}
    # One source of defaults: `auto` = the value in the params file (-P params=FILE replaces it).
    for name in ("epochs", "batch_size", "seed", "lr"):
        assert main[name]["default"] == "auto", name
    assert points["tune"]["parameters"]["trials"]["default"] == "auto"
    assert main["dataset"]["default"] in params["data"]["datasets"]
    # The model and init too: train.model / train.init, as the chosen profile sets them.
    assert main["model"]["default"] == main["init"]["default"] == "auto"
    for name in ("main", "pretrain", "tune"):
        assert points[name]["parameters"]["model"]["default"] == "auto", name
        assert points[name]["parameters"]["profile"]["default"] == "paper", name
        assert "-S profile={profile} " in points[name]["command"], name


def tiny_project(tmp_path: Path, **profiles) -> Path:
    """The project files, a tiny split and other.yaml: params.yaml pointing at it, with `profiles` added."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, project / name)
    table = split_table(write_images(tmp_path / "images", per_class=8, size=40))
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    table.to_csv(tmp_path / "data" / "tiny" / "split.csv", index=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["workdir"] = str(tmp_path / "data")
    params["data"]["datasets"]["tiny"] = {"path": str(tmp_path / "images"), "series": True}
    params["train"].update(max_epochs=1, batch_size=8, seed=7)
    params["profiles"].update(profiles)
    (project / "other.yaml").write_text(yaml.safe_dump(params))
    return project


def mlflow_run(project: Path, uri: str, *parameters: str) -> None:
    """`mlflow run <project> --env-manager local -P ...` in experiment covidtl-tiny of `uri`."""
    bin_dir = str(Path(sys.executable).parent)  # this venv's covidtl and mlflow
    # A clean MLflow environment: no experiment or run inherited from whatever ran before.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_EXPERIMENT", "MLFLOW_RUN"))}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(
        [f"{bin_dir}/mlflow", "run", str(project), "--env-manager", "local",
         "--experiment-name", "covidtl-tiny", *[a for p in parameters for a in ("-P", p)]],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def the_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("covidtl-tiny").experiment_id])
    assert len(runs) == 1  # the run `mlflow run` opened is the one train() filled
    return runs[0]


def test_mlflow_run_trains_the_custom_cnn(tmp_path):
    """`mlflow run <project> --env-manager local -P params=other.yaml`: its epochs, batch size and
    seed come from that file (issue 8.9), not from the entry point's defaults."""
    project = tiny_project(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_run(project, uri, "model=custom_cnn", "init=random", "dataset=tiny", "params=other.yaml")
    run = the_run(uri)
    assert run.data.tags["kind"] == "train" and run.data.tags["model"] == "custom_cnn"
    assert run.data.metrics["epochs_used"] == 1 and "test_accuracy" in run.data.metrics
    assert run.data.params["train.batch_size"] == "8" and run.data.params["train.seed"] == "7"
    assert run.data.params["train.max_epochs"] == "1"
    assert (project / "models" / "custom_cnn-random-tiny" / "model" / "model.keras").is_file()


def test_mlflow_run_with_a_profile_trains_the_profiles_model(tmp_path, monkeypatch):
    """`mlflow run . -P profile=NAME`, model and init left at auto: the profile's recipe trains,
    and the run records it (train.model; `model` keeps the entry point's auto, which MLflow cannot change)."""
    from covidtl.evaluate import load_trained

    recipe = {"train.model": "vgg16", "train.init": "random", "train.head_units": 16,
              "train.image_size.vgg16": 32, "train.max_train_samples": 12}
    project = tiny_project(tmp_path, recipe=recipe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_run(project, uri, "dataset=tiny", "params=other.yaml", "profile=recipe")
    run = the_run(uri)
    assert run.data.tags["model"] == "vgg16" and run.data.tags["cell"] == "vgg16-random-tiny-recipe"
    params = run.data.params
    assert (params["train.model"], params["train.init"], params["model"]) == ("vgg16", "random", "auto")
    assert (project / "models" / "vgg16-random-tiny-recipe" / "model" / "model.keras").is_file()
    # What scores the run's model reads the model that ran, not the entry point's auto.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = load_trained(f"runs:/{run.info.run_id}/model")
    assert (loaded.name, loaded.init) == ("vgg16", "random")
