"""The GPU check (bench/gpu_check.py): its CPU mode end to end, and the pieces it relies on.

The GPU run itself needs the GPU machine (docs/cluster.md, "The GPU check"); what can be proved here
is that every stage runs and the report has every field, that the shared-GPU shim asks Ray for what
it should, and that the figures the report derives (targets, where the time goes) come out right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check, gpu_probes

REPO = Path(__file__).resolve().parents[1]

STAGES = [name for name, _, _ in gpu_check.Check.STAGES]


def test_epoch_lines_of_train_py_are_recognised() -> None:
    # the formats pipelines/train.py logs; the check times GPU utilisation over the epochs with them
    assert gpu_check.EPOCH_LINE.search(
        "(RayTrainWorker pid=1) [train] epoch 1/2 step 58/234 loss 0.0312 9000 img/s"
    )
    assert gpu_check.EPOCH_LINE.search("[train] epoch 2/2 done: loss 0.0101, 31000 img/s, 2 s")
    assert not gpu_check.EPOCH_LINE.search("[train] 60000 images, AutoEncoder(...)")
    src = (REPO / "pipelines" / "train.py").read_text()
    assert "[train] epoch {epoch + 1}/{config['epochs']} step" in src
    assert "[train] epoch {epoch + 1}/{config['epochs']} done" in src


def test_the_embed_summary_line_is_recognised() -> None:
    # the line imgsim.console.progress ends the embedding stage with; the check reads the rate from it
    from imgsim.console.progress import Progress

    p = Progress(12_000, "embed", "images", interval_s=1e9)
    p.set(12_000)
    p.note("worker seconds: read 0.2, decode 0.5, encode 0.7")
    line = p.line(final=True)
    p.close()
    m = gpu_check.EMBED_SUMMARY.search(f"{line}\n")
    assert m and m.group(1) == "12,000" and float(m.group(3).replace(",", "")) > 0, line


def test_shared_gpu_shim_asks_for_a_fraction_of_a_gpu_and_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.train as train_mod

    made = {}
    monkeypatch.setattr(train_mod, "TorchTrainer", lambda *a, **kw: made.update(kw) or "trainer")
    monkeypatch.setattr(train_mod, "ScalingConfig", train_mod.ScalingConfig)
    gpu_probes.patch_train_module(0.5, "gloo")

    gpu = train_mod.ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    assert gpu.num_gpus_per_worker == 0.5 and gpu.num_cpus_per_worker == 1
    cpu = train_mod.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1})
    assert cpu.num_gpus_per_worker == 0

    assert train_mod.TorchTrainer(lambda: None, scaling_config=gpu) == "trainer"
    assert made["torch_config"].backend == "gloo"


def test_source_hash_follows_the_package_sources(tmp_path: Path) -> None:
    (tmp_path / "imgsim").mkdir()
    (tmp_path / "imgsim" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("not a source")
    first = gpu_check.source_hash(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    assert gpu_check.source_hash(tmp_path) == first
    (tmp_path / "imgsim" / "a.py").write_text("x = 2\n")
    assert gpu_check.source_hash(tmp_path) != first


def _report(train_rate: float, kernels: float, util: float | None, device: str = "cuda") -> dict:
    return {
        "mode": {"device": device, "quick": False},
        "machine": {"cuda_device_name": "NVIDIA H100 80GB HBM3"},
        "stages": {
            "probe_kernels": {
                "status": "ok",
                "results": [
                    {
                        "name": "default",
                        "kernels_img_s": kernels,
                        "as_train_loop_img_s": kernels / 2,
                        "with_h2d_img_s": kernels / 3,
                        "cpu_2_threads_img_s": 1500.0,
                    },
                    {"name": "large_input", "kernels_img_s": 9000.0},
                ],
            },  # fmt: skip
            "train_gpu": {
                "status": "ok",
                "images_per_s": train_rate * 0.9,
                "images_per_s_after_first_epoch": train_rate,
                "util_window": {"gpu_util_mean": util},
                "seconds_before_first_epoch": 21.0,
            },
            "train_photo": {"status": "ok", "images_per_s": 8000.0, "util_window": {"gpu_util_mean": 75.0}},
            "eval": {"status": "ok", "metrics": {"precision_at_k": 0.81}},
        },
    }


def test_summary_checks_the_targets_and_says_where_the_time_goes() -> None:
    s = gpu_check.summarize(_report(train_rate=17000.0, kernels=120000.0, util=35.0))
    speed = s["targets"]["train_speedup_vs_2core_cpu"]
    assert speed["value"] == round(17000 / gpu_check.REFERENCE_2CORE_TRAIN_IMG_S, 2) and speed["met"] is False
    assert speed["vs_probe_2_cpu_threads"] == round(17000 / 1500, 2)
    assert s["targets"]["photo_gpu_util"] == {**s["targets"]["photo_gpu_util"], "value": 75.0, "met": True}
    assert s["precision_at_10"] == 0.81
    first = s["where_time_goes"][0]
    assert (
        first.startswith("train_gpu: 17000 img/s")
        and "the device waits for data" in first
        and "21 s" in first
    )

    fast = gpu_check.summarize(_report(train_rate=40000.0, kernels=45000.0, util=90.0))
    assert fast["targets"]["train_speedup_vs_2core_cpu"]["met"] is True
    assert "the computation itself is the limit" in fast["where_time_goes"][0]

    # on the CPU the targets are not judged
    cpu = gpu_check.summarize(_report(train_rate=1500.0, kernels=2000.0, util=None, device="cpu"))
    assert cpu["targets"]["train_speedup_vs_2core_cpu"]["met"] is None


def test_scripts_parse() -> None:
    for script in ("bench/gpu_check.sh", "bench/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)


@pytest.mark.slow
@pytest.mark.timeout(2600)
def test_quick_cpu_check_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=2400)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the check then stops its running command (and that command's Ray)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("the quick check took over 40 minutes:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").stat().st_size > 0 and (out / "gpu_samples.csv").is_file()
    assert report["complete"] is True and report["mode"]["device"] == "cpu"
    stages = report["stages"]
    assert list(stages) == STAGES
    assert all(rec["status"] == "ok" for rec in stages.values()), {k: v["status"] for k, v in stages.items()}
    for name in ("train_gpu", "train_gpu_shared", "train_cpu", "train_gpu_large_batch", "train_photo"):
        assert stages[name]["images_per_s"] > 0 and stages[name]["history"], name
        assert (
            stages[name]["util"]["cpu_util_mean"] is not None
            and stages[name]["util"]["gpu_util_mean"] is None
        )
    assert stages["train_gpu_shared"]["workers"] == 2 and stages["train_gpu_shared"]["backend"] == "gloo"
    assert stages["probe_shared_gpu"]["backends"]["gloo"]["works_with_two_ranks_on_one_device"] is True
    for name in ("index_gpu", "index_cpu"):
        assert stages[name]["images_per_s_end_to_end"] > 0 and stages[name]["embed_job_images_per_s"] > 0
    assert stages["dataset"]["train_images"] == 2000 and stages["dataset"]["test_images"] == 2000
    probe = {r["name"]: r for r in stages["probe_kernels"]["results"]}
    assert probe["default"]["kernels_img_s"] > 0 and probe["default"]["cpu_2_threads_img_s"] > 0
    summary = report["summary"]
    assert 0.0 < summary["precision_at_10"] <= 1.0
    assert summary["train_img_s"]["gpu_1_worker"] > 0 and summary["index_img_s"]["cpu"] > 0
    assert summary["targets"]["train_speedup_vs_2core_cpu"]["value"] > 0
    assert summary["where_time_goes"]
