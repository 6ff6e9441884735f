"""Files from sites: chunks stored once by content hash in the spool, the size limit at the call, and the
MLflow receiver logging a file and a model once when a delivery is written again (no Ray)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fl_ray.config import ConfigError, JobConfig, parse_config
from fl_ray.receivers.base import ReceiverContext
from fl_ray.receivers.mlflow import MLflowReceiver
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import Spool, blob_path
from fl_ray.tracking.writers import MLflowWriter

from recording_sender import RecordingSender


def test_chunks_are_stored_once_by_hash_and_checked(tmp_path):
    spool = Spool(tmp_path / "spool")
    data = bytes(range(256)) * 40
    sha = hashlib.sha256(data).hexdigest()
    pieces = [(0, data[:4000]), (4000, data[4000:8000]), (4000, data[4000:8000]), (8000, data[8000:])]
    assert [spool.put_chunk(sha, offset, piece, len(data)) for offset, piece in pieces] == [False, False, False, True]
    assert blob_path(spool.directory, sha).read_bytes() == data
    assert spool.put_chunk(sha, 0, data[:10], len(data))  # whole already: the sender stops at once
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ValueError, match="do not match the hash"):
        spool.put_chunk(wrong, 0, data, len(data))
    assert not blob_path(spool.directory, wrong).exists() and not list(spool.directory.glob("blobs/*.part"))
    with pytest.raises(ValueError, match="bad hash"):
        spool.put_chunk("../x", 0, b"", 0)
    spool.remove_blobs()
    assert not (spool.directory / "blobs").exists()


def test_max_artifact_mb_is_a_validated_field():
    assert JobConfig().tracking.max_artifact_mb == 100
    with pytest.raises(ConfigError, match=r"tracking.max_artifact_mb: .*greater than 0.*got 0"):
        parse_config({"tracking": {"max_artifact_mb": 0}})


def test_a_file_over_the_limit_fails_at_the_call(tmp_path):
    writer = MLflowWriter(RecordingSender("site-1"), max_artifact_bytes=2**20)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 3 * 2**20)
    with pytest.raises(ValueError, match=r"big.bin is 3 MB, over the limit of tracking.max_artifact_mb = 1 MB"):
        writer.log_artifact(str(big))
    with pytest.raises(ValueError, match="is not a file"):
        writer.log_artifact(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="not a valid artifact path"):
        writer.log_artifact(str(big), "../up")


def test_the_mlflow_receiver_logs_a_file_and_a_model_once(workspace, tmp_path):
    import mlflow.pytorch  # here: with pytorch-lightning installed it imports Lightning too, seconds of CPU

    spool = Spool(tmp_path / "job" / "spool")

    def put(path) -> str:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert spool.put_chunk(sha, 0, data, len(data))
        return sha

    (tmp_path / "notes.txt").write_text("kept once")
    model_dir = tmp_path / "model"
    mlflow.pytorch.save_model(
        torch.nn.Linear(2, 2), str(model_dir), input_example=np.zeros((2, 2), np.float32), pip_requirements=["torch"]
    )
    files = {p.relative_to(model_dir).as_posix(): put(p) for p in model_dir.rglob("*") if p.is_file()}
    manifest = json.dumps({"files": files, "step": 3, "params": {"p": "1"}, "tags": {"t": "x"}})
    batch = [
        TrackingEvent("site-1", 0, EventKind.ARTIFACT, "docs/notes.txt", put(tmp_path / "notes.txt"), None, 1),
        TrackingEvent("site-1", 1, EventKind.MODEL, "net", manifest, None, 2),
    ]
    ctx = ReceiverContext("files-job", "files", tmp_path / "job", workspace, ("site-1",), {})
    receiver = MLflowReceiver(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", buffer_flush_time=0)
    receiver.open(ctx)
    for _ in range(2):  # a delivery written again (a retry, or a restart from the mark)
        receiver.write(batch)
        receiver.flush()
    receiver.close("FINISHED")
    client = MlflowClient(receiver.tracking_uri)
    run_id = receiver.run_ids["site-1"]
    assert [f.path for f in client.list_artifacts(run_id, "docs")] == ["docs/notes.txt"]
    [model] = client.search_logged_models(
        experiment_ids=[receiver.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert model.name == "net" and model.params == {"p": "1"} and model.tags["t"] == "x"
    mlflow.set_tracking_uri(receiver.tracking_uri)
    assert mlflow.pytorch.load_model(f"models:/{model.model_id}")(torch.ones(4, 2)).shape == (4, 2)
