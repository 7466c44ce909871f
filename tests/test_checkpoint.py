"""checkpoint.pt and --resume: a run cut by SIGTERM and resumed ends exactly as if never cut."""
import json

import pytest
import torch

from tests.helpers import SCRIPTS, STAGGERED, TINY, cli_in_process, interrupt, run_script, scalars_of, summary_of

# six iterations each, cut after the second: the signal comes in the third (or, late, the second)
HOPPER = ["--env-id", "Hopper-v4", *TINY, "--num-envs", 2, "--num-steps", 32, "--minibatch-size", 32,
          "--total-timesteps", 384]
CASES = [
    ("ppo_continuous.py", HOPPER),
    ("cpg_continuous.py", [*HOPPER, "--norm-obs", "--norm-reward"]),  # the wrappers' running statistics
    ("vpg_continuous.py", [*HOPPER, "--anneal-lr"]),
    ("ppo_continuous.py", [*STAGGERED, "--total-timesteps", 576]),  # an env restored from its attributes
]
SAME_IN_BOTH = ["global_step", "episodes", "final_return", "max_return", "max_log10_ratio", "nonfinite_updates"]


@pytest.mark.parametrize("script,args", CASES, ids=["ppo-hopper", "cpg-hopper-norm", "vpg-hopper-anneal",
                                                    "ppo-staggered"])
def test_cut_and_resumed_run_is_bit_identical_to_an_uncut_one(script, args, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = run_script(script, *args, "--save-model", "--log-dir", tmp_path, "--run-name", "whole")
    assert result.returncode == 0, result.stderr
    assert not (whole / "checkpoint.pt").exists()  # nothing is left to resume

    result = interrupt(script, *args, "--save-model", "--log-dir", tmp_path, "--run-name", "cut", after=2)
    assert result.returncode == 130, result.stderr
    assert summary_of(cut)["status"] == "interrupted" and f"--resume {cut}" in result.stderr
    # saved by the signal: the start of the iteration it came in, not the first iteration's save
    last_printed = int(result.stdout.splitlines()[-1].split()[1].split("/")[0])
    checkpoint = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] in (last_printed, last_printed + 1)
    assert f"the checkpoint holds global step {checkpoint['global_step']} " in result.stderr  # not the step reached

    result = run_script(script, "--resume", cut)
    assert result.returncode == 0, result.stderr
    assert summary_of(cut)["status"] == "completed" and not (cut / "checkpoint.pt").exists()
    expected, resumed = summary_of(whole), summary_of(cut)
    assert {key: resumed[key] for key in SAME_IN_BOTH} == {key: expected[key] for key in SAME_IN_BOTH}
    expected = torch.load(whole / "model.pt", weights_only=False)["agent"]
    resumed = torch.load(cut / "model.pt", weights_only=False)["agent"]
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    # what the cut run logged after its checkpoint is purged: each scalar's (step, value)s, but the
    # timing's, are the uncut run's, none twice
    expected, resumed = scalars_of(whole, steps=True), scalars_of(cut, steps=True)
    del expected["charts/SPS"], resumed["charts/SPS"]
    assert resumed == expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_what_it_cannot_continue(script, tmp_path):
    other_algo = "vpg" if script == "ppo_continuous.py" else "ppo"
    for name in ["completed", "exploded", "empty", "other"]:
        (tmp_path / name).mkdir()
    for status in ["completed", "exploded"]:
        (tmp_path / status / "summary.json").write_text(json.dumps({"status": status}))
    torch.save({"algo": other_algo, "args": {}}, tmp_path / "other" / "checkpoint.pt")
    for args, message in [
        (["--resume", tmp_path / "empty", "--seed", 2], "--resume takes no other flag"),
        (["--resume", tmp_path / "completed"], "has completed: there is nothing to resume"),
        (["--resume", tmp_path / "exploded"], "has exploded: there is nothing to resume"),
        (["--resume", tmp_path / "empty"], "no checkpoint to resume from"),
        (["--resume", tmp_path / "other"], f"is a {other_algo} run"),
    ]:
        code, stderr = cli_in_process(script, *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, stderr)
    assert not any((tmp_path / "empty").iterdir())
