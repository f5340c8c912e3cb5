"""Stage-1 training: a few steps, checkpoint + resume, and 2-process DDP (gloo) under ``accelerate launch``."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neural_core.train.stage1 import main

REPORTS = ["The lungs are clear. No focal consolidation.", "Right lower lobe consolidation, consistent with pneumonia.",
           "Patchy bilateral opacities suggestive of viral pneumonia.", "No pleural effusion or pneumothorax."]


@pytest.fixture()
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    with (tmp_path / "m.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "report", "label", "patient_id"])
        for i in range(24):
            img = (rng.random((64, 64)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"im{i}.png")
            w.writerow([f"im{i}.png", REPORTS[i % 4], int(i % 4 != 0), f"P{i // 2}"])
    return tmp_path / "m.csv"


def _log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_checkpoint_and_resume(manifest, tmp_path):
    out = tmp_path / "run"
    args = ["--manifest", str(manifest), "--out", str(out), "--config", "tiny", "--batch", "4", "--epochs", "3",
            "--ckpt-every", "2", "--warmup", "2"]
    assert main(args + ["--max-steps", "3"]) == 0
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["step"] == 3
    assert (out / "last" / "report_model.json").exists() and (out / "split.json").exists()
    # resume: continues from step 3, not from 0
    assert main(args + ["--resume", "--max-steps", "5"]) == 0
    steps = [e for e in _log(out) if e["event"] == "done"]
    assert [e["step"] for e in steps] == [3, 5]
    starts = [e for e in _log(out) if e["event"] == "start"]
    assert len(starts) == 2
    split = json.loads((out / "split.json").read_text())["patients"]
    assert len(set(split.values()) - {"train", "val", "test"}) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_gloo(manifest, tmp_path):
    out = tmp_path / "ddp"
    # torchrun on a machine without GPUs: accelerate picks MULTI_CPU with the gloo backend. A port of our own, not
    # the default 29500 that any other DDP run on the machine (another test session, a leftover) would also use.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEURAL_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "neural_core.train.stage1", "--manifest", str(manifest), "--config", "tiny",
           "--batch", "2", "--epochs", "1", "--max-steps", "3", "--warmup", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=840)   # under the suite's 900 s per test
    except subprocess.TimeoutExpired:   # a hang is a failure (no retry): kill the whole process group, show stderr
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail("2-process DDP run did not finish in 840 s:\n" + err[-3000:])
    assert proc.returncode == 0, err[-3000:]
    start = [e for e in _log(out) if e["event"] == "start"][0]
    assert start["processes"] == 2
    assert [e for e in _log(out) if e["event"] == "done"][0]["step"] == 3
