"""trackers.py: TensorBoard event files and the offline W&B run hold what was logged, at the logged steps."""
import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trackers import WANDB_STEP, Trackers, wandb_installed


def log_a_run(run_dir, wandb_project=None):
    trackers = Trackers(str(run_dir), {"lr": 0.1}, wandb_project=wandb_project)
    for step in (2, 4, 6):
        trackers.scalars({"train/loss": 1.0 / step, "train/lr": 0.1 * step}, step)
    grid = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    trackers.image("samples", grid, 6)
    trackers.close()
    return grid


def read_tensorboard(run_dir):
    events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_events_hold_the_scalars_and_the_image(tmp_path):
    log_a_run(tmp_path)
    events = read_tensorboard(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr"}
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    np.testing.assert_allclose([e.value for e in loss], [1 / 2, 1 / 4, 1 / 6], rtol=1e-6)  # stored as float32
    images = events.Images("samples")
    assert [(i.step, i.width, i.height) for i in images] == [(6, 6, 8)]


def test_a_resumed_run_drops_the_events_past_its_step(tmp_path):
    log_a_run(tmp_path)
    trackers = Trackers(str(tmp_path), {}, start_step=4)  # resumed from the step-4 checkpoint
    trackers.scalars({"train/loss": 0.5}, 6)
    trackers.close()
    loss = read_tensorboard(tmp_path).Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(2, 0.5), (4, 0.25), (6, 0.5)]


def test_a_disabled_tracker_writes_nothing(tmp_path):
    trackers = Trackers(str(tmp_path), {}, wandb_project="never", enabled=False)
    trackers.scalars({"train/loss": 1.0}, 1)
    trackers.image("samples", np.zeros((2, 2, 3), np.uint8), 1)
    trackers.close()
    assert os.listdir(tmp_path) == []


def wandb_records(path):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of
    chunks: crc32 u32, length u16, type u8 with 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_sessions(run_dir):
    """The history rows ({key: value}) of each offline W&B session of a run, one .wandb file each, in
    the order the sessions started (a resumed run adds a session: `wandb sync` uploads them in that order)."""
    sessions = []
    for path in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")):
        records = list(wandb_records(path))
        (start,) = (r.run.start_time.ToMicroseconds() for r in records if r.WhichOneof("record_type") == "run")
        rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
                if r.WhichOneof("record_type") == "history"]
        sessions.append((start, rows))
    return [rows for _, rows in sorted(sessions, key=lambda session: session[0])]


def steps_and_losses(rows):
    return [(r[WANDB_STEP], r["train/loss"]) for r in rows if "train/loss" in r]


needs_wandb = pytest.mark.skipif(not wandb_installed(), reason="wandb is optional and not installed")


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@needs_wandb
def test_wandb_offline_holds_the_same_scalars(tmp_path, wandb_offline):
    log_a_run(tmp_path, wandb_project="map-dit-test")
    (rows,) = wandb_sessions(tmp_path)
    assert steps_and_losses(rows) == [(2, 1 / 2), (4, 1 / 4), (6, 1 / 6)]
    assert rows[-1][WANDB_STEP] == 6 and "samples/_type" in rows[-1]  # the image, logged at step 6
    assert [r["_step"] for r in rows] == [0, 1, 2, 3]  # W&B's own step counts the log calls
    (path,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    with open(os.path.join(tmp_path, "wandb-id.txt")) as f:
        assert os.path.basename(path) == f"run-{f.read().strip()}.wandb"  # the id a resume reuses


@needs_wandb
def test_wandb_keeps_the_steps_a_resumed_run_logs_again(tmp_path, wandb_offline):
    log_a_run(tmp_path, wandb_project="map-dit-test")  # steps 2, 4, 6, then a crash
    trackers = Trackers(str(tmp_path), {}, wandb_project="map-dit-test", start_step=4)  # resumed at step 4
    trackers.scalars({"train/loss": 0.5}, 6)
    trackers.scalars({"train/loss": 0.4}, 8)
    trackers.close()
    first, resumed = wandb_sessions(tmp_path)
    assert steps_and_losses(resumed) == [(6, 0.5), (8, 0.4)]
    tensorboard = read_tensorboard(tmp_path).Scalars("train/loss")
    assert steps_and_losses(resumed) == [(e.step, pytest.approx(e.value)) for e in tensorboard if e.step > 4]


@needs_wandb
def test_wandb_keeps_a_step_below_its_own_current_step(tmp_path, wandb_offline):
    """Offline, a resumed session counts W&B's step from 0 again; online, the server hands the resumed run
    its last step + 1 and W&B ignores a log(step=s) below its current step ("Tried to log to step 6 that is
    less than the current step 8 ... this data will be ignored"). One session past step 8 is in that state."""
    trackers = Trackers(str(tmp_path), {}, wandb_project="map-dit-test")
    for step in (2, 4, 6, 8):
        trackers.scalars({"train/loss": 1.0 / step}, step)
    trackers.scalars({"train/loss": 0.5}, 6)
    trackers.close()
    (rows,) = wandb_sessions(tmp_path)
    assert steps_and_losses(rows) == [(2, 1 / 2), (4, 1 / 4), (6, 1 / 6), (8, 1 / 8), (6, 0.5)]
