"""The Ray executor on a local Ray instance (2 CPUs) with tiny models: same rows as local, worker and
driver faults survived, LoRA through Ray, and one install line when Ray is missing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from icl_locate.cli import main

ray = pytest.importorskip("ray")

BASE = [
    "sweep",
    "--model",
    "tiny:llama",
    "--pairs",
    "fra-eng,eng-fra",
    "--conditions",
    "instructions+examples,examples",
    "--seeds",
    "0",
    "--ks",
    "1",
    "--n-test",
    "3",
    "--layers",
    "all",
]
SLOW = ["--max-new-tokens", "40"]  # units long enough to be caught mid-way
RAY = ["--executor", "ray", "--workers", "2", "--cpus-per-worker", "1"]


def cli(store, data_dir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "icl_locate.cli",
        *BASE,
        *SLOW,
        "--store",
        str(store),
        "--data-dir",
        str(data_dir),
        *extra,
    ]


def rows(store) -> list[tuple]:
    db = sqlite3.connect(store)
    out = db.execute(
        "SELECT unit_id, item, variant, layer, prompt_token_ids, hidden_ranges, generation, "
        "sentence_score, stats FROM predictions ORDER BY 1, 2, 3, 4"
    ).fetchall()
    db.close()
    return out


def n_units(store) -> int:
    try:
        db = sqlite3.connect(store)
        n = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        db.close()
        return n
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, data_dir):
    store = tmp_path_factory.mktemp("local") / "local.sqlite"
    subprocess.run(cli(store, data_dir), check=True, capture_output=True)
    return store


def computing_actor_pids() -> list[int]:
    """Ray actor processes that are inside a unit right now (Ray titles them ray::UnitActor.compute)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::UnitActor.compute" in line]


def test_ray_sweep_equals_local(tmp_path, data_dir, local_store):
    store = tmp_path / "ray.sqlite"
    done = subprocess.run(cli(store, data_dir, *RAY), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(store) == rows(local_store) and n_units(store) == 4
    assert "worker 1 <- " in done.stderr  # both workers were used


def test_worker_killed_mid_unit_is_replaced_and_the_unit_recomputed(tmp_path, data_dir, local_store):
    store = tmp_path / "ray.sqlite"
    proc = subprocess.Popen(cli(store, data_dir, *RAY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        pids = computing_actor_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.01)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "no worker was caught inside a unit"
    assert proc.returncode == 0, err[-2000:]
    assert "died while computing" in err
    assert rows(store) == rows(local_store)  # nothing lost, nothing twice


def test_driver_killed_then_rerun_resumes(tmp_path, data_dir, local_store):
    store = tmp_path / "ray.sqlite"
    proc = subprocess.Popen(cli(store, data_dir, *RAY), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while n_units(store) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < n_units(store) < 4, "the driver must be killed mid-way for this test to mean anything"
    done = subprocess.run(cli(store, data_dir, *RAY), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(store) == rows(local_store)


def test_a_unit_that_keeps_failing_stops_with_one_line(tmp_path, data_dir, capsys):
    """A worker that cannot load its model: bounded retries, one line naming the unit and the error."""
    store = tmp_path / "ray.sqlite"
    code = main(
        [
            *BASE,
            "--max-new-tokens",
            "4",
            "--store",
            str(store),
            "--data-dir",
            str(data_dir),
            *RAY,
            "--dtype",
            "float16",
            "--device",
            "meta",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icl-locate: error")]
    assert code == 2 and len(err) == 1, err
    assert "flores" in err[0] and "times" in err[0]
    assert n_units(store) == 0


def test_lora_sweep_through_ray_equals_local(tmp_path, data_dir):
    common = [
        "lora-sweep",
        "--model",
        "tiny:llama",
        "--pair",
        "fra-eng",
        "--layers",
        "1,3",
        "--train-size",
        "8",
        "--val-size",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--lr",
        "1e-3",
        "--n-test",
        "2",
        "--data-dir",
        str(data_dir),
    ]
    assert main([*common, "--out-dir", str(tmp_path / "local")]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "ray"), *RAY]) == 0
    for layer in (1, 3):
        a = load_file(tmp_path / "local" / "adapters" / f"layer{layer:02d}" / "adapter_model.safetensors")
        b = load_file(tmp_path / "ray" / "adapters" / f"layer{layer:02d}" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and a
        for key in a:
            assert (a[key] - b[key]).abs().max() < 1e-5, key
    bleu = {}
    for where in ("local", "ray"):
        db = sqlite3.connect(tmp_path / where / "study.sqlite")
        bleu[where] = db.execute("SELECT layer, value FROM lora ORDER BY layer").fetchall()
        db.close()
    assert bleu["local"] == bleu["ray"] and len(bleu["ray"]) == 2


def test_without_ray_one_install_line(monkeypatch, tmp_path, data_dir, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main([*BASE, "--store", str(tmp_path / "s.sqlite"), "--data-dir", str(data_dir), *RAY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["icl-locate: error: the ray executor needs Ray: pip install 'icl-locate[ray]'"]
    assert not (tmp_path / "s.sqlite").exists()


def test_ctrl_c_stops_workers_and_exits_130(tmp_path, data_dir):
    store = tmp_path / "ray.sqlite"
    argv = cli(store, data_dir, *RAY)
    argv[argv.index("--n-test") + 1] = "24"  # units long enough to interrupt one
    # As a terminal's Ctrl-C: a shell that starts the tests in the background (`cmd &` without job control)
    # leaves SIGINT ignored, and an ignored signal stays ignored across exec, so the sweep would never see it.
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint
    )
    seen = []
    for line in proc.stderr:  # this driver's own progress: the first unit is done, the others are running
        seen.append(line)
        if line.startswith("sweep [1/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, "".join(seen)[-2000:] + rest[-2000:]
    assert "Rerun the same command to resume" in rest
    assert 1 <= n_units(store) < 4
    deadline = time.time() + 20
    while computing_actor_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert computing_actor_pids() == []  # the workers are gone
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and n_units(store) == 4


def test_two_node_cluster_by_address(tmp_path, data_dir, local_store):
    """--ray-address joins a running cluster (here two Ray nodes on this machine, one CPU each)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        store = tmp_path / "ray.sqlite"
        done = subprocess.run(
            cli(store, data_dir, *RAY, "--ray-address", cluster.address), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert rows(store) == rows(local_store)
    finally:
        cluster.shutdown()
