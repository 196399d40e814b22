"""benchmarks/gpu_check.py end to end on the CPU with a tiny checkpoint: every stage's code path (tests, a present
checkpoint, ours and transformers' runs with batch sizes, the tables), and a stage killed at its budget, so a lent
GPU's minutes go to measuring. `ours-compiled` and `transformers` differ from the two runs here by one flag each
(generate_ids(compile=True), tested in test_fast_path.py; transformers without cache_implementation="static"); on
2 CPU cores inductor's compile alone would take a minute."""

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(out, ckpt, *extra):
    cmd = [sys.executable, str(SCRIPT), str(out), "--device", "cpu", "--ckpt", str(ckpt), "--new-tokens", "4",
           "--batch-sizes", "2,1", "--threads", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_every_stage_on_cpu(checkpoint, tmp_path):
    ckpt = checkpoint("pg1-legacy-mqa-224")
    done = run(tmp_path, ckpt, "--pytest-args", "-k 'test_float32_prefill and pg1-legacy'",
               "--stages", "tests,checkpoint,ours,transformers-static")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    stages = data["stages"]
    assert stages["tests"]["status"] == "passed" and "1 passed" in stages["tests"]["detail"], stages["tests"]
    assert stages["checkpoint"]["status"] == "present"
    runs = {r["impl"]: r for r in data["runs"]}
    assert set(runs) == {"ours", "transformers-static"}
    for impl, r in runs.items():
        assert stages[impl]["status"] == "ok", (impl, stages[impl])
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and len(r["ids"]) == 4, impl
        want = {"2"} if impl == "transformers-static" else {"2", "1"}  # static: the first size only
        assert set(r["images_s"]) == want, (impl, r["images_s"])
    md = (tmp_path / "results.md").read_text()
    assert "| ours |" in md and "| transformers-static |" in md and "img/s B=1" in md and "img/s B=2" in md
    assert data["env"]["torch"] and data["env"]["transformers"] != "missing"
    assert "1 passed" in (tmp_path / "tests.log").read_text()


def test_a_stage_past_its_budget_is_killed_and_the_results_stay(checkpoint, tmp_path):
    ckpt = checkpoint("pg1-legacy-mqa-224")
    done = run(tmp_path, ckpt, "--stages", "ours,transformers", "--budgets", "ours=1,transformers=1")
    assert done.returncode == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stages"]["ours"]["status"] == "out of time"
    assert data["stages"]["transformers"]["status"] == "out of time"  # the next stage still ran
    assert "| ours | out of time |" in (tmp_path / "results.md").read_text()


def test_no_checkpoint_skips_the_runs(tmp_path):
    done = run(tmp_path / "out", tmp_path / "absent", "--stages", "ours")
    assert done.returncode == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["stages"]["ours"]["status"] == (
        "skipped: no checkpoint")
