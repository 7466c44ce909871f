"""benchmarks/gpu_check.sh, the one GPU command, as far as it can run without a GPU: its no-GPU exit,
its stage runner (time limits that take the stage's children too), the parsing of pytest's output,
the table built from the benchmarks' own result rows, the steady-state SPS the benchmark reads from a
real run's TensorBoard log, and the benchmarks' --help. These are not GPU tests, though their module
name would match gpu_check.sh's `-k gpu`: it leaves them out."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_fused_loss  # noqa: E402
import bench_sps  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present (and this would run the whole check)")
def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    log = tmp_path / "x.log"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(log)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [
        "gpu_check: no CUDA GPU visible to torch here (torch.cuda.is_available() is false); nothing was run"]
    assert result.stdout in log.read_text()


def test_without_a_log_file_it_says_how_to_call_it():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "usage: bash benchmarks/gpu_check.sh LOGFILE"


def test_its_stages_build_the_fused_op_where_the_tests_look_for_it():
    # else the tests stage builds it a second time, with every pytest worker waiting on that build
    assert os.environ.get("TORCH_EXTENSIONS_DIR", str(gpu_check.EXTENSIONS_DIR)) == str(gpu_check.EXTENSIONS_DIR)


def test_a_stage_past_its_limit_is_ended_with_its_children(tmp_path):
    with open(tmp_path / "log", "a") as log:
        start = time.monotonic()
        stage = gpu_check.run_stage("slow", ["bash", "-c", "sleep 60 & echo child $!; wait"], 1, log)
    assert stage["status"] == "timeout" and time.monotonic() - start < 20
    child = int(stage["output"].split("child ")[1].split()[0])
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # gone, or dead and not yet reaped
    with open(tmp_path / "log", "a") as log:
        stage = gpu_check.run_stage("quick", [sys.executable, "-c", "print('hello'); raise SystemExit(3)"], 30, log)
    assert (stage["status"], stage["rc"], stage["output"].strip()) == ("failed", 3, "hello")
    assert gpu_check.stage_row(stage, "quick stage") == ("quick stage", "exit 3: hello", "", "FAILED")
    text = (tmp_path / "log").read_text()
    assert "===== slow: timeout" in text and "===== quick: failed (exit 3)" in text


SAMPLE_TESTS = '''
import pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.mark.skipif(True, reason="no GPU")
def test_skips():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_errors(broken):
    pass

@pytest.mark.parametrize("case", ["plain", "no CUDA GPU"])
def test_cuda_graph_replay_of_the_fused_op_is_bit_identical_to_eager(case):
    assert case == "plain"
'''


def test_outcomes_are_read_from_pytests_verbose_output(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(SAMPLE_TESTS)
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_sample.py", "-v", "-rfE", "-p", "no:cacheprovider"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    named = "tests/test_sample.py::test_cuda_graph_replay_of_the_fused_op_is_bit_identical_to_eager"
    assert gpu_check.outcomes_of(result.stdout) == {
        "tests/test_sample.py::test_passes": "PASSED", "tests/test_sample.py::test_fails": "FAILED",
        "tests/test_sample.py::test_skips": "SKIPPED", "tests/test_sample.py::test_errors": "ERROR",
        f"{named}[plain]": "PASSED", f"{named}[no CUDA GPU]": "FAILED"}
    # pytest-xdist's lines put the outcome first
    xdist = "[gw3] [ 40%] PASSED tests/test_a.py::test_x[f32-cuda] \n[gw0] [ 60%] FAILED tests/test_a.py::test_y \n"
    assert gpu_check.outcomes_of(xdist) == {"tests/test_a.py::test_x[f32-cuda]": "PASSED", "tests/test_a.py::test_y": "FAILED"}
    rows = gpu_check.rows_from_tests(gpu_check.outcomes_of(result.stdout))
    assert rows[0] == ("CUDA tests tests/test_sample.py", "2 passed, 3 failed, 1 skipped: test_fails, test_errors, "
                       "test_cuda_graph_replay_of_the_fused_op_is_bit_identical_to_eager[no CUDA GPU]",
                       "all pass", "FAILED")
    by_check = {row[0]: row for row in rows}
    assert by_check[gpu_check.NAMED_TESTS[named.split("::")[1]]][1:] == ("1/2 passed", "passes", "FAILED")
    assert by_check["CPG, same settings, completes"][3] == "NOT RUN"


def fused_report():
    """What bench_fused_loss.py --json writes, from its own row function, with made-up timings."""
    rows = []
    for kind, per_n in [("ppo", 1e-5), ("cpg", 4e-5)]:  # cpg is 4 times slower: it misses both targets
        for n in gpu_check.FUSED_SIZES:
            ext = per_n + n * 1e-11
            kernels = (n * 24 / 3.6e12 * (per_n / 1e-5), n * 16 / 3.6e12, n * 8 / 4e12)
            rows.append(bench_fused_loss.result_row("cuda", kind, n, torch.float32, 10, 5,
                                                    {"eager": 6e-5 + n * 5e-11, "ext": ext}, kernels))
    return {"rows": rows}


def sps_report():
    """What bench_sps.py --cuda --json writes, from its own case function, with made-up SPS."""
    cases = {"humanoid-1024x1024": bench_sps.case_report("humanoid-1024x1024", {"cuda": [1900.0], "eager": [620.0],
                                                                                "cpu": [700.0]}, {}),
             "hopper-64x64": bench_sps.case_report("hopper-64x64", {"cuda": [], "eager": [1500.0], "cpu": [3000.0]},
                                                   {"cuda": "CalledProcessError: RuntimeError: capture failed"})}
    return {"steps": 5000, "warmup_iterations": 1, "cpu_cores": 4, "cases": cases}


def test_the_table_from_the_benchmarks_results():
    fused = {row[0]: row for row in gpu_check.fused_rows(fused_report())}
    ppo = fused["fused op ppo fwd+bwd kernels, N=16M float32"]
    assert ppo[1].endswith("3600 GB/s = 90% of copy (4000 GB/s)") and ppo[3] == "ok"
    assert fused["fused op cpg fwd+bwd kernels, N=16M float32"][3] == "MISSED"
    wall = fused["fused op ppo wall time against eager"]
    assert wall[1].startswith("N=64 6.0x (0.010 ms), N=4096 ") and wall[3] == "ok"
    assert fused["fused op cpg wall time against eager"][3] == "MISSED"
    sps = gpu_check.sps_rows(sps_report())
    assert sps[0] == ("SPS Humanoid-v4 [1024, 1024] (after 1 warm-up iteration, 5000 steps)",
                      "--cuda 1900, --no-cuda-graphs 620, CPU 4 threads 700: cuda/CPU 2.71x, cuda/eager 3.06x",
                      "cuda/CPU >= 2.5, cuda/eager > 1.0", "ok")
    assert sps[1][1].startswith("--cuda failed, --no-cuda-graphs 1500, CPU 4 threads 3000: cuda/CPU -, cuda/eager -;")
    assert sps[1][1].endswith("cuda: CalledProcessError: RuntimeError: capture failed") and sps[1][3] == "FAILED"


def test_the_whole_run_from_stages_that_pretend(tmp_path, capsys):
    """gpu_check.main with stand-in stages: each prints or writes what the real one would."""
    (tmp_path / "fused.json").write_text(json.dumps(fused_report()))
    (tmp_path / "sps.json").write_text(json.dumps(sps_report()))
    say = lambda text: [sys.executable, "-c", f"print({text!r})"]  # noqa: E731
    stages = [
        ("setup", "setup", 30, say('{"device": "NVIDIA H200", "sms": 132, "torch": "2.11.0+cu130", "cuda": "13.0"}'), {}),
        ("build", "build", 30, say("built in 41 s: extension (cpu, cuda, built in /x)"), {}),
        ("tests", "CUDA tests", 30, lambda limit: say(f"tests/test_fast_path.py::test_cuda_cpg_completes_the_shifted_mean "
                                                      f"PASSED [100%] (limit {limit:.0f})"), {}),
        ("slow", "a stage that hangs", 4, ["sleep", "30"], {}),  # and uses up what is left
        ("late", "a stage with no time left", 30, ["true"], {}),
    ]
    rc = gpu_check.main(tmp_path / "log", stages, budget_s=12, min_stage_s=3, work=tmp_path)
    table = capsys.readouterr().out
    assert rc == 1
    assert "| setup | NVIDIA H200 (132 SMs), torch 2.11.0+cu130, CUDA 13.0; " in table
    assert "| fused op CUDA build | built in 41 s: extension (cpu, cuda, built in /x) | a CUDA kernel | ok |" in table
    assert next(line for line in table.splitlines() if "a stage that hangs" in line).endswith("|  | FAILED |")
    assert "| a stage with no time left | not started: out of time |  | SKIPPED |" in table
    assert "| CUDA tests tests/test_fast_path.py | 1 passed, 0 failed, 0 skipped | all pass | ok |" in table
    assert "| CPG, same settings, completes | 1/1 passed | passes | ok |" in table
    assert "| fused op cpg fwd+bwd kernels, N=16M float32 |" in table and "| SPS Hopper-v4 [64, 64] " in table
    assert table.splitlines()[-1].startswith("| whole check | ")
    assert table in (tmp_path / "log").read_text()


def test_steady_state_sps_comes_from_a_real_runs_iteration_times(tmp_path):
    # what bench_sps.py --cuda needs from the scripts: one TensorBoard charts/SPS point per iteration
    result = subprocess.run([sys.executable, str(ROOT / "cpg_continuous.py"), "--env-id", "tests.envs:Counter-v0",
                             "--policy-hidden", "8", "--value-hidden", "8", "--num-steps", "16", "--minibatch-size", "8",
                             "--update-epochs", "1", "--total-timesteps", "64", "--log-dir", str(tmp_path),
                             "--run-name", "r"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    points = bench_sps.iteration_times(tmp_path / "r")
    assert [step for step, _ in points] == [16, 32, 48, 64]
    (_, t1), (_, t4) = points[0], points[-1]
    assert bench_sps.sps_after_warmup(points, 1) == pytest.approx(48 / (t4 - t1))
    assert bench_sps.sps_after_warmup([(2000, 10.0), (1000, 8.0), (3000, 11.0)], 1) == pytest.approx(2000 / 3.0)
    with pytest.raises(ValueError, match=r"a warm-up of 4 iteration\(s\) needs more than 4 logged; the run logged 4$"):
        bench_sps.sps_after_warmup(points, 4)


def test_the_benchmarks_help_lists_each_case_once_and_explains_every_option():
    sps = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sps.py"), "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    listed = " ".join(sps.split("--cases CASE [CASE ...]")[2].split("--steps")[0].split())
    assert listed == "default: hopper-64x64 hopper-1024 humanoid-1024x1024; with --cuda: humanoid-1024x1024 hopper-64x64"
    fused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused_loss.py"), "--help"],
                           capture_output=True, text=True, timeout=120).stdout
    options = fused.split("options:")[1]
    for option in ("--sizes SIZES", "--device DEVICE"):
        assert options.split(option)[1].split("\n")[0].strip(), f"{option} has no help text"
