"""The planner: a few of the run's longest steps, measured in a fresh process, predict its peak memory
and its time; the alternatives that fit are priced from the same measurement."""

import json

import pytest

from lora_app.training.plan import Plan, main

QA = [("What is the capital of France?", "Paris is the capital."), ("Say hi.", "Hi there!"), ("2+2?", "It is 4."),
      ("Name a color.", "Blue, like the sky.")]


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA * 8]))
    return str(path)


def test_a_plan_measures_the_longest_steps_and_prices_the_alternatives(tiny_llama, qa_data, tmp_path, capsys):
    out = tmp_path / "plan.json"
    flags = ["--model", tiny_llama, "--data", qa_data, "--rank", "8", "--max-steps", "10", "--seq-len", "128",
             "--val-fraction", "0.1", "--eval-every", "5"]
    assert main(["plan", *flags, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("plan: fits: peak") and "for 10 steps" in said
    plan = Plan.load(out)
    assert plan.fits and plan.total_steps == 10 and plan.device == "cpu"
    assert 0 < plan.peak_bytes < plan.available_bytes and plan.formula_bytes > 0
    assert plan.seconds_per_token > 0 and plan.train_seconds > 0
    labels = [alt["label"] for alt in plan.alternatives]
    assert labels == ["micro-batch halved (same effective batch)", "gradient checkpointing", "4-bit base (QLoRA)",
                      "rank 4", "sequence length 64"]
    by_label = {alt["label"]: alt for alt in plan.alternatives}
    assert by_label["micro-batch halved (same effective batch)"]["changes"] == {"batch_size": 2, "grad_accum": 2}
    # the alternatives move the measured figures the way the formula and the token counts say
    assert by_label["gradient checkpointing"]["seconds"] > plan.train_seconds
    assert by_label["sequence length 64"]["seconds"] <= plan.train_seconds
    assert by_label["rank 4"]["peak_bytes"] <= plan.peak_bytes
    assert Plan(**json.loads(out.read_text())) == plan


def test_a_plan_of_bad_settings_says_what_is_wrong(qa_data, capsys):
    assert main(["plan", "--data", qa_data, "--rank", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
