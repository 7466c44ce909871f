"""What the README tells a new user: its train command trains the paper's Hopper policy, and it points nowhere
a user cannot follow; and the scripts' defaults, which the committed run ids encode, stay as they are."""
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
import reproduce  # noqa: E402


def readme():
    return (ROOT / "README.md").read_text()


def test_the_train_command_trains_the_papers_hopper_policy():
    (command,) = [line for line in readme().splitlines() if line.startswith("pip install torch==2.13.0 && pip install -e . &&")]
    assert command.endswith("python cpg_continuous.py --env-id Hopper-v4 --policy-hidden 1024")


def test_docs_point_only_where_users_can_follow():
    # shared/ is the developers' folder; a user's checkout has none
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "shared/" not in path.read_text(), path


def budget_steps(budget):
    return int(budget[:-1]) * {"M": 10**6, "k": 1000}[budget[-1]] if budget[-1] in "Mk" else int(budget)


def test_committed_run_ids_are_those_reproduce_gives_them():
    # a run id leaves out every flag at the scripts' default: changing a default (say the policy to the
    # paper's [1024] for Hopper) would rename, and so orphan, the committed runs
    listed = subprocess.run(["git", "ls-files", "results/runs"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    folders = sorted({path.split("/")[2] for path in listed.stdout.split()})
    assert len(folders) > 50
    for folder in folders:
        _, budget, seed = re.fullmatch(r"(.+)__(\d+[kM]?)__s(\d+)", folder).groups()
        ids = {run["id"] for experiment in reproduce.EXPERIMENTS
               for run in reproduce.runs_of(experiment, [int(seed)], budget_steps(budget))}
        assert folder in ids
