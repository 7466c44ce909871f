"""A training script's command line with a checkpoint at every iteration boundary, stopped dead where FAULT says
until the test that started it kills it: `python fault_runner.py SCRIPT ARGS...`.

FAULT (optional): `NAME:N:WHEN` stops at the N-th write in this process of the run's file NAME (checkpoint.pt,
summary.json, model.pt), WHEN `partial` (half its temporary file written), `written` (all of it, not yet renamed)
or `replaced` (renamed); `rollout:N` stops as the N-th rollout starts. There it prints `paused at FAULT`."""
import collections
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the tests' envs (tests.envs:...)


def pause(fault):
    print(f"paused at {fault}", flush=True)
    time.sleep(600)
    sys.exit("never killed")


def stop_at_write(module, name, n, when, fault):
    write_atomically, counts = module.write_atomically, collections.Counter()

    def faulty(path, write, durable=False):
        counts[os.path.basename(path)] += 1
        if (os.path.basename(path), counts[os.path.basename(path)]) != (name, n):
            return write_atomically(path, write, durable)
        if when == "replaced":
            write_atomically(path, write, durable)
            pause(fault)

        def write_then_pause(tmp):
            write(tmp)
            if when == "partial":
                os.truncate(tmp, os.path.getsize(tmp) // 2)
            pause(fault)

        write_atomically(path, write_then_pause, durable)

    module.write_atomically = faulty


def stop_at_rollout(module, n, fault):
    collect_rollout, calls = module.collect_rollout, []

    def faulty(*args):
        calls.append(1)
        if len(calls) == n:
            pause(fault)
        return collect_rollout(*args)

    module.collect_rollout = faulty


def main():
    script, *argv = sys.argv[1:]
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CHECKPOINT_INTERVAL_S = 0
    fault = os.environ.get("FAULT")
    if fault:
        name, n, *when = fault.split(":")
        if name == "rollout":
            stop_at_rollout(module, int(n), fault)
        else:
            stop_at_write(module, name, int(n), when[0], fault)
    sys.argv = [script, *argv]
    module.main()


if __name__ == "__main__":
    main()
