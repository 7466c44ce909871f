"""Every GPU check in one run, started by benchmarks/gpu_check.sh (which first makes sure there is a GPU
and installs missing wheels): the fused op's CUDA build, every CUDA test, the fused op's kernel
bandwidth and wall time, and --cuda training speed. Each stage runs in its own process group under a
time limit, cut to what is left of one budget for the whole, so the command ends in under 5 minutes;
a failing or cut stage is reported and the next one runs. The full output goes to the log file; the
end is one compact table, on stdout and in the log. Exit 0 when every check passed and met its
target, 1 otherwise.

    python benchmarks/gpu_check.py LOG      # normally through: bash benchmarks/gpu_check.sh LOG
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 290  # from the start of gpu_check.sh, wheel install included: under 5 minutes
MIN_STAGE_S = 15  # a stage given less than this is not started
PY = sys.executable
# one build of the fused op for every stage, in the folder the tests build in (tests/conftest.py), so
# the tests find it done
EXTENSIONS_DIR = ROOT / "build" / "torch_extensions"

# test rows of the table: a test by name, for the checks the issue names on their own
NAMED_TESTS = {
    "test_cuda_ppo_explodes_at_step_1000_with_the_eager_postmortem":
        "PPO --cuda --mean-shift 100 Humanoid explodes at step 1000, postmortem replays NaN on CPU and CUDA",
    "test_cuda_cpg_completes_the_shifted_mean": "CPG, same settings, completes",
    "test_cuda_graph_replay_of_the_fused_op_is_bit_identical_to_eager":
        "fused op fwd+bwd replayed from torch.cuda.graph = eager, bit for bit",
    "test_cuda_policy_mean_waits_once_per_env_step": "rollout policy mean: one host wait per env step (pinned copies)",
    "test_cuda_graphs_are_all_captured_in_start_up": "every CUDA graph captured in start-up, which SPS leaves out",
}
FUSED_SIZES = [64, 4096, 65536, 16777216]
TARGET_PCT_COPY = 80  # the fused op's fwd+bwd kernels at 16M float32, % of copy bandwidth
TARGET_OVER_EAGER = 5  # the fused op's wall time against eager, N <= 65536


# --- stages --------------------------------------------------------------------------------------


def run_stage(name, command, limit_s, log, env=None):
    """Run `command` in a new process group, its output appended to the open `log`, killed with its
    children after `limit_s`. Returns {name, status ('ok', 'failed', 'timeout'), rc, seconds, output}."""
    log.write(f"\n===== {name}: {' '.join(map(str, command))}  (limit {limit_s:.0f} s)\n")
    log.flush()
    start_offset, start = os.fstat(log.fileno()).st_size, time.monotonic()
    proc = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit_s)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        status = "timeout"
    kill_group(proc)  # also whatever it left running
    rc = proc.returncode if status == "timeout" else rc
    seconds = time.monotonic() - start
    with open(log.name, "rb") as f:
        f.seek(start_offset)
        output = f.read().decode(errors="replace")
    log.write(f"===== {name}: {status} (exit {rc}) after {seconds:.0f} s\n")
    log.flush()
    return {"name": name, "status": status, "rc": rc, "seconds": seconds, "output": output}


def kill_group(proc, grace_s=5):
    """End the stage's whole process group (pytest workers, training runs): SIGTERM while its leader
    runs, so runs can write their summaries, then SIGKILL to whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def pytest_command(limit_s):
    """Every CUDA test of the suite, in parallel where pytest-xdist is installed (the GPU runs are mostly
    host-bound), each test under its own timeout where pytest-timeout is, so one hang cannot hide the rest."""
    # test_gpu_check.py's tests are this script's own, for machines without a GPU
    command = [PY, "-m", "pytest", "tests", "-k", "(cuda or gpu) and not test_gpu_check", "-v", "-rfE",
               "-p", "no:cacheprovider"]
    try:
        import xdist

        workers = min(10, os.cpu_count() or 1)
        steal = tuple(map(int, xdist.__version__.split(".")[:2])) >= (3, 2)
        command += ["-n", str(workers), "--dist", "worksteal" if steal else "load"]
    except ImportError:
        pass
    try:
        import pytest_timeout  # noqa: F401

        command += ["--timeout", str(int(max(30, limit_s - 20)))]
    except ImportError:
        pass
    return command


# --- reading the stages' results -----------------------------------------------------------------

OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE = re.compile(r"(tests/[\w/.-]+\.py::[\w.]+(?:\[[^\]\n]*\])?)")
WORSE = ["PASSED", "XFAIL", "XPASS", "SKIPPED", "FAILED", "ERROR"]  # a later, worse report wins


def outcomes_of(output):
    """{test id: outcome} from pytest -v output, with or without xdist; partial output gives partial results."""
    outcomes = {}
    for line in output.splitlines():
        node, outcome = NODE.search(line), OUTCOME.search(line)
        if node and outcome:
            old = outcomes.get(node.group(1))
            if old is None or WORSE.index(outcome.group(1)) > WORSE.index(old):
                outcomes[node.group(1)] = outcome.group(1)
    return outcomes


def counts(outcomes):
    return {kind: sum(o == kind for o in outcomes) for kind in ("PASSED", "FAILED", "ERROR", "SKIPPED")}


def rows_from_tests(outcomes):
    """One row per test file, then one per named check."""
    rows = []
    files = sorted({node.split("::")[0] for node in outcomes})
    for file in files:
        in_file = [o for node, o in outcomes.items() if node.startswith(file + "::")]
        c = counts(in_file)
        bad = [node.split("::")[1] for node, o in outcomes.items()
               if node.startswith(file + "::") and o in ("FAILED", "ERROR")]
        result = f"{c['PASSED']} passed, {c['FAILED'] + c['ERROR']} failed, {c['SKIPPED']} skipped"
        if bad:
            result += ": " + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        rows.append((f"CUDA tests {file}", result, "all pass", "ok" if c["PASSED"] and not bad else "FAILED"))
    for name, check in NAMED_TESTS.items():
        found = [o for node, o in outcomes.items() if node.split("::")[1].split("[")[0] == name]
        c = counts(found)
        if not found:
            rows.append((check, f"{name} did not run", "passes", "NOT RUN"))
        else:
            ok = c["PASSED"] == len(found)
            rows.append((check, f"{c['PASSED']}/{len(found)} passed", "passes", "ok" if ok else "FAILED"))
    return rows


def ratio(x):
    return f"{x:.2f}x" if x is not None else "-"


def sps_rows(report):
    rows = []
    for name, case in (report or {}).get("cases", {}).items():
        sps = case["sps"]
        cell = lambda side: f"{sps[side]:.0f}" if sps.get(side) else "failed"  # noqa: E731
        result = (f"--cuda {cell('cuda')}, --no-cuda-graphs {cell('eager')}, CPU {report['cpu_cores']} threads "
                  f"{cell('cpu')}: cuda/CPU {ratio(case['cuda_over_cpu'])}, cuda/eager {ratio(case['cuda_over_eager'])}")
        if case.get("errors"):
            result += "; " + "; ".join(f"{side}: {error}" for side, error in case["errors"].items())
        target = f"cuda/CPU >= {case['target_cuda_over_cpu']}"
        if case.get("target_cuda_over_eager"):
            target += f", cuda/eager > {case['target_cuda_over_eager']}"
        verdict = "ok" if case["met"] else ("FAILED" if case.get("errors") else "MISSED")
        rows.append((f"SPS {case['env_id']} {case['policy_hidden']} (after {report['warmup_iterations']} warm-up "
                     f"iteration, {report['steps']} steps)", result, target, verdict))
    return rows


def fused_rows(report):
    rows = []
    by_kind = {}
    for row in (report or {}).get("rows", []):
        if row["device"] == "cuda":
            by_kind.setdefault(row["kind"], {})[row["n"]] = row
    for kind, sizes in by_kind.items():
        big = sizes.get(max(FUSED_SIZES))
        if big and "pct_copy" in big:
            rows.append((f"fused op {kind} fwd+bwd kernels, N=16M {big['dtype']}",
                         f"{big['kernel_ms']:.4f} ms (fwd {big['fwd_kernel_ms']:.4f}), {big['gbs']:.0f} GB/s = "
                         f"{big['pct_copy']:.0f}% of copy ({big['copy_gbs']:.0f} GB/s)",
                         f">= {TARGET_PCT_COPY}% of copy", "ok" if big["pct_copy"] >= TARGET_PCT_COPY else "MISSED"))
        small = [sizes[n] for n in FUSED_SIZES[:-1] if n in sizes]
        if small:
            rows.append((f"fused op {kind} wall time against eager",
                         ", ".join(f"N={r['n']} {r['eager_over_ext']:.1f}x ({r['wall_ms']['ext']:.3f} ms)" for r in small),
                         f">= {TARGET_OVER_EAGER}x at N <= 65536",
                         "ok" if all(r["eager_over_ext"] >= TARGET_OVER_EAGER for r in small) else "MISSED"))
    return rows


def stage_row(stage, what):
    """A stage that did not end well, as a row (None when it did)."""
    if stage["status"] == "ok":
        return None
    if stage["status"] == "skipped":
        return (what, "not started: out of time", "", "SKIPPED")
    if stage["status"] == "timeout":
        return (what, f"cut at its limit after {stage['seconds']:.0f} s", "", "FAILED")
    lines = [line.strip() for line in stage["output"].splitlines() if line.strip() and not line.startswith("=====")]
    return (what, f"exit {stage['rc']}: {(lines or [''])[-1][:200]}", "", "FAILED")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def markdown(rows):
    rows = [("check", "result", "target", "verdict"), ("---",) * 4, *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows)


# --- the run ---------------------------------------------------------------------------------------

SETUP = """import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"device": torch.cuda.get_device_name(), "sms": p.multi_processor_count,
                  "torch": torch.__version__, "cuda": torch.version.cuda}))"""
BUILD = """import time, fused_loss as F
start = time.perf_counter()
F.load_extension(required=True)
print(f"built in {time.perf_counter() - start:.0f} s: {F.backend_info()}")
assert "cuda" in F._state.devices, f"no CUDA kernel: {F._state.cuda_error}"
"""


def default_stages(work):
    """(name, what the table calls it, limit in s, command or a function of the limit, extra env); the
    benchmarks write their results as JSON into `work`."""
    return [
        ("setup", "setup: GPU, torch", 30, [PY, "-c", SETUP], {}),
        ("build", "fused op CUDA build", 150, [PY, "-c", BUILD], {}),
        ("fused", "fused op benchmark", 60,
         [PY, "benchmarks/bench_fused_loss.py", "--device", "cuda", "--kind", "ppo,cpg", "--no-compile",
          "--sizes", ",".join(map(str, FUSED_SIZES)), "--json", work / "fused.json"], {}),
        # two threads per test process: up to 10 of them share the 16 cores
        ("tests", "CUDA tests", 150, pytest_command, {"OMP_NUM_THREADS": "2"}),
        ("sps", "--cuda SPS benchmark", 130,
         [PY, "benchmarks/bench_sps.py", "--cuda", "--steps", "5000", "--warmup-iterations", "1", "--repeats", "1",
          "--json", work / "sps.json"], {}),
    ]


def main(log_path, stages=None, budget_s=BUDGET_S, min_stage_s=MIN_STAGE_S, work=None):
    """Run the stages (default_stages unless given), print the table; 0 when every row is ok, else 1."""
    start = float(os.environ.get("GPU_CHECK_START", time.time()))
    deadline = start + budget_s
    work = Path(work or tempfile.mkdtemp(prefix="gpu_check_"))
    stages = stages or default_stages(work)
    env = {"PYTHONUNBUFFERED": "1", "FUSED_LOSS_BACKEND": "extension", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR)}
    results = {}
    with open(log_path, "a") as log:
        for name, what, cap, command, extra in stages:
            limit = min(cap, deadline - time.time() - 5)
            if limit < min_stage_s:
                results[name] = {"name": name, "status": "skipped", "rc": None, "seconds": 0.0, "output": ""}
            else:
                command = command(limit) if callable(command) else command
                results[name] = run_stage(name, command, limit, log, {**env, **extra})
            stage = results[name]
            print(f"[{time.time() - start:4.0f} s] {name}: {stage['status']} ({stage['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
        output = lambda name: results[name]["output"] if name in results else ""  # noqa: E731

        rows = []
        info = next((json.loads(line) for line in output("setup").splitlines() if line.startswith("{")), None)
        if info:
            rows.append(("setup", f"{info['device']} ({info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}; "
                         f"{os.environ.get('GPU_CHECK_WHEELS', 'no wheels installed')}", "", "ok"))
        built = [line for line in output("build").splitlines() if line.startswith("built in")]
        if built:
            rows.append(("fused op CUDA build", built[-1][:200], "a CUDA kernel", "ok"))
        rows += [row for row in [stage_row(results[name], what) for name, what, *_ in stages] if row]
        rows += rows_from_tests(outcomes_of(output("tests")))
        rows += fused_rows(read_json(work / "fused.json"))
        rows += sps_rows(read_json(work / "sps.json"))
        elapsed = time.time() - start
        rows.append(("whole check", f"{elapsed:.0f} s", "< 300 s", "ok" if elapsed < 300 else "MISSED"))
        table = markdown(rows)
        log.write(f"\n===== table\n{table}\n")
    print(table)
    return 0 if all(row[3] == "ok" for row in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_check.py LOGFILE")
    sys.exit(main(sys.argv[1]))
