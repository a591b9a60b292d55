"""Which adapter is best: probe answers at every evaluation, blind votes and their ratings, promoting a
checkpoint, and all of it kept in the run store."""

import json
import random
import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import save_tiny
from lora_app.errors import NoCheckpoint
from lora_app.training.config import TrainConfig
from lora_app.training.probes import Probe, probes_for, token_f1
from lora_app.training.rating import BASE_RATING, next_pair, ratings
from lora_app.training.store import RunStore

QA = [("What is the capital of France?", "Paris is the capital."), ("Say hi.", "Hi there!"), ("2+2?", "It is 4."),
      ("Name a color.", "Blue, like the sky.")]


def vote(a, b, winner, prompt="p"):
    return {"prompt": prompt, "a_run": a[0], "a_step": a[1], "b_run": b[0], "b_step": b[1], "winner": winner}


# ---- rating --------------------------------------------------------------------------------------
def test_ratings_follow_the_votes_in_any_order():
    x, y, z = ("r", 0), ("r", 4), ("r", 8)
    votes = [vote(y, x, "a"), vote(x, y, "b"), vote(z, y, "a"), vote(y, z, "tie"), vote(z, x, "a")]
    rated = ratings(votes)
    assert rated[z] > rated[y] > BASE_RATING > rated[x]
    shuffled = votes[:]
    random.Random(0).shuffle(shuffled)
    assert ratings(shuffled) == pytest.approx(rated)  # Bradley-Terry: the order of the votes does not matter
    # sides do not matter either: the same vote seen from B's side
    flipped = [vote((v["b_run"], v["b_step"]), (v["a_run"], v["a_step"]), {"a": "b", "b": "a", "tie": "tie"}[v["winner"]])
               for v in votes]
    assert ratings(flipped) == pytest.approx(rated)


def test_a_one_sided_record_is_finite_and_ties_are_even():
    rated = ratings([vote(("r", 4), ("r", 0), "a")] * 5)
    assert BASE_RATING < rated[("r", 4)] < BASE_RATING + 800 and rated[("r", 0)] < BASE_RATING
    even = ratings([vote(("r", 4), ("r", 0), "tie")] * 3)
    assert even[("r", 4)] == pytest.approx(even[("r", 0)]) == pytest.approx(BASE_RATING)
    assert ratings([]) == {}


def test_next_pair_asks_about_the_least_voted_different_answers():
    answers = [dict(run_id="r", step=s, prompt=p, answer=a) for s, p, a in
               [(0, "p", "same"), (4, "p", "same"), (8, "p", "other"), (0, "q", "x"), (4, "q", "y")]]
    seen = set()
    for seed in range(20):
        pair = next_pair(answers, [], random.Random(seed))
        assert pair["a_answer"] != pair["b_answer"]  # identical answers are never a question
        seen.add((pair["prompt"], frozenset([pair["a"], pair["b"]])))
    assert seen == {("p", frozenset([("r", 0), ("r", 8)])), ("p", frozenset([("r", 4), ("r", 8)])),
                    ("q", frozenset([("r", 0), ("r", 4)]))}
    voted = [vote(("r", 0), ("r", 8), "a"), vote(("r", 8), ("r", 4), "b"), vote(("r", 4), ("r", 0), "a", "q")] * 2
    voted.append(vote(("r", 0), ("r", 8), "a"))
    pair = next_pair(answers, voted, random.Random(1))
    assert {pair["a"], pair["b"]} != {("r", 0), ("r", 8)}  # that pair had a vote more than the others
    assert next_pair(answers[:2], []) is None


def test_token_f1():
    assert token_f1("Paris is the capital.", "paris is the capital") == 1.0
    assert token_f1("Paris", "Paris is the capital.") == pytest.approx(2 * 1 * 0.25 / 1.25)
    assert token_f1("London", "Paris") == 0.0 and token_f1("", "") == 1.0 and token_f1("", "Paris") == 0.0


def test_probes_come_typed_and_from_validation_rows_once_each():
    from lora_app.data import Sample

    rows = [Sample("1", ({"role": "user", "content": q}, {"role": "assistant", "content": a})) for q, a in QA * 2]
    rows.insert(0, Sample("0", text="raw text has no question"))
    probes = probes_for(["Say hi.", "Who are you?"], 3, rows)
    assert [p.prompt for p in probes] == ["Say hi.", "Who are you?", "What is the capital of France?", "2+2?",
                                          "Name a color."]
    assert probes[0] == Probe("Say hi.", ({"role": "user", "content": "Say hi."},))  # typed: no reference
    assert probes[2].reference == "Paris is the capital." and probes[2].messages == rows[1].messages[:1]


def test_probe_settings_are_checked():
    base = dict(data="x.json", output="out")
    assert set(TrainConfig(**base, probe_rows=2).problems()) == {"probe_rows"}  # no validation rows to take
    assert "at most 8" in TrainConfig(**base, probe_prompts=["a"] * 5, probe_rows=4, val_fraction=0.1).problems()[
        "probe_prompts"]
    assert set(TrainConfig(**base, probe_prompts=["ok", " "]).problems()) == {"probe_prompts"}


# ---- the store ------------------------------------------------------------------------------------
def test_store_keeps_answers_votes_and_promotion_and_migrates_old_stores(tmp_path):
    db = sqlite3.connect(tmp_path / "runs.db")  # a store written before probes: no tables, no column
    db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, output TEXT NOT NULL, device TEXT NOT NULL "
               "DEFAULT 'cpu', status TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, heartbeat "
               "REAL, pid INTEGER, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, cancel_requested REAL NOT "
               "NULL DEFAULT 0, config TEXT NOT NULL, estimate TEXT, summary TEXT, error TEXT)")
    db.execute("INSERT INTO runs (id, name, output, status, created, config) VALUES ('old', 'old', ?, 'completed', 1, "
               "'{}')", (str(tmp_path / "old"),))
    db.commit()
    db.close()
    store = RunStore(tmp_path)
    assert store.get("old").promoted_step is None and store.get("old").phases == []
    run = store.create_run({}, output=tmp_path / "r")
    answers = [dict(probe=i, prompt=f"p{i}", reference=None, answer=f"a{i}", score=None, seconds=0.1) for i in range(2)]
    for step in (0, 4, 8):
        store.log_probes(run.id, step, answers)
    store.add_vote("p0", (run.id, 0), (run.id, 8), "b")
    store.add_vote("p0", (run.id, 0), ("old", 8), "a")
    assert len(store.probe_answers(run.id)) == 6 and len(store.votes(run.id)) == 1
    assert len(store.votes(run.id, "old")) == 2
    with pytest.raises(ValueError):
        store.add_vote("p0", (run.id, 0), (run.id, 8), "A")
    store.truncate_metrics(run.id, 4)  # a resumed run answers again from where it resumes
    assert sorted({a["step"] for a in store.probe_answers(run.id)}) == [0, 4]
    with pytest.raises(NoCheckpoint) as err:
        store.promote(run.id, 4)
    assert err.value.step == 4 and err.value.saved == "none"
    (run.checkpoint_adapter(4)).mkdir(parents=True)
    assert store.get(run.id).checkpoint_steps() == [4]
    promoted = store.promote(run.id, 4)
    assert promoted.adapter_path == run.checkpoint_adapter(4) and promoted.final_adapter_path == run.adapter_path
    assert store.promote(run.id, None).adapter_path == run.final_adapter_path
    store.delete(run.id)
    assert store.probe_answers(run.id) == [] and store.votes(run.id, "old") == []


# ---- a run that probes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A short CLI run with typed and validation probes, evaluated and checkpointed every 2 steps."""
    from lora_app.training.cli import main

    root = tmp_path_factory.mktemp("probed")
    model = save_tiny("llama", root / "tiny-llama")
    data = root / "qa.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA * 6]))
    prompts = root / "probes.txt"
    prompts.write_text("Who are you?\n\nSay hi.\n")
    code = main(["--model", str(model), "--data", str(data), "--output", str(root / "run"), "--store", str(root / "store"),
                 "--rank", "4", "--alpha", "8", "--lr", "0.01", "--max-steps", "4", "--seq-len", "64",
                 "--val-fraction", "0.25", "--eval-every", "2", "--save-every", "2", "--probe-prompts", str(prompts),
                 "--probe-rows", "2", "--probe-tokens", "6", "--probe-budget", "0"])
    assert code == 0
    store = RunStore(root / "store")
    return store, store.list()[0], model


def test_a_run_answers_its_probes_at_the_start_every_evaluation_and_the_end(probed_run):
    store, run, model = probed_run
    answers = store.probe_answers(run.id)
    assert sorted({a["step"] for a in answers}) == [0, 2, 4]
    prompts = [a["prompt"] for a in answers if a["step"] == 0]
    assert prompts[:2] == ["Who are you?", "Say hi."] and len(prompts) == 4  # 2 typed + 2 validation rows
    scored = [a for a in answers if a["reference"] is not None]
    assert scored and all(0 <= a["score"] <= 1 for a in scored)
    assert all(a["score"] is None for a in answers if a["reference"] is None)
    assert run.summary["probe_seconds"] > 0
    lines = (Path(run.output) / "probes.jsonl").read_text().splitlines()
    assert len(lines) == len(answers)  # the run folder has them too (a --no-store run keeps them)
    assert "probes at step 0: 4 answers" in (Path(run.output) / "train.log").read_text()
    assert (run.checkpoint_adapter(2) / "prompt_format.json").is_file()  # a checkpoint chats as training did


def test_probing_keeps_to_its_time_budget(tmp_path):
    """A round that would take probing over its share of the run is skipped, and the log says so;
    the first (the base model) and the last always run."""
    from lora_app.training.trainer import Callbacks, train

    model = save_tiny("llama", tmp_path / "tiny")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA * 4]))
    said, steps = [], []
    config = TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "run"), rank=4, max_steps=6,
                         seq_len=64, eval_every=2, probe_prompts=["Say hi."], probe_tokens=4, probe_budget=1e-6)
    train(config, Callbacks(log=said.append, on_probes=lambda step, answers: steps.append(step)))
    assert steps == [0, 6]
    assert sum("skipped" in line and "budget" in line for line in said) == 2  # steps 2 and 4


def test_step_0_answers_are_the_base_models_own(probed_run):
    """The adapter starts at zero, so the answers at step 0 are the base model's, as plain transformers
    generates them from the prompt training renders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, run, model = probed_run
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model)
    first = next(a for a in store.probe_answers(run.id) if a["step"] == 0 and a["prompt"] == "Who are you?")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = base.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    assert first["answer"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_probes_and_promote_from_the_command_line(probed_run, capsys):
    from lora_app.training.runs_cli import main

    store, run, _ = probed_run
    assert main(["probes", run.name, "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "## Who are you?" in out and "base (step 0):" in out and "step 4:" in out and "reference:" in out
    assert main(["promote", "no-such-run", "2", "--store", str(store.root)]) == 2
    assert "No run 'no-such-run' in the run store" in capsys.readouterr().err
    assert main(["promote", run.output, "3", "--store", str(store.root)]) == 2
    assert "no checkpoint at step 3 (checkpoints: 2, 4)" in capsys.readouterr().err
    assert main(["promote", run.id, "2", "--store", str(store.root)]) == 0
    assert store.get(run.id).adapter_path == run.checkpoint_adapter(2)
    assert main(["promote", run.id, "final", "--store", str(store.root)]) == 0
    assert store.get(run.id).promoted_step is None


def test_votes_rate_the_steps_and_promotion_changes_what_chat_and_export_use(probed_run, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from lora_app.ui import adapters, judge, runs_tab

    store, run, model = probed_run
    monkeypatch.setenv("LORA_APP_RUNS", str(store.root))
    monkeypatch.setenv("LORA_APP_HOME", str(tmp_path / "home"))
    timeline, _, _, promote_choices, note = judge.view(run.id, None)
    assert "base (step 0)" in timeline and promote_choices["choices"] == [("final adapter", "final"),
                                                                          ("checkpoint at step 2", "2"),
                                                                          ("checkpoint at step 4", "4")]
    assert "final adapter" in note
    # blind votes: the pair's origins stay hidden until the vote, and the rating chart follows the votes
    shown, pair = judge.draw_pair(run.id, None)
    assert "step" not in shown.lower() and pair["a_answer"] != pair["b_answer"]
    said, _, rating, _, _ = judge.vote(pair, run.id, None, winner="a")
    assert "A was" in said and "B was" in said
    winner = [trace for trace in rating.data][0]
    points = dict(zip(winner.x, winner.y))
    assert points[pair["a"][1]] > BASE_RATING > points[pair["b"][1]]
    # promote step 2: chat and the merged export take the checkpoint's adapter; the final one stays
    before = runs_tab.export_merged(run.id)
    note, _ = judge.promote(run.id, "2")
    assert "checkpoint at step 2" in note
    promoted = store.get(run.id)
    assert adapters.adapter_name(promoted).endswith("-step2")
    assert any(label.endswith("(step 2)") for label, _ in adapters.adapter_choices(str(model)))
    after = runs_tab.export_merged(run.id)
    assert "merged-step2" in after and "merged-step2" not in before
    final = load_file(Path(run.output) / "merged" / "model.safetensors")
    step2 = load_file(Path(run.output) / "merged-step2" / "model.safetensors")
    key = next(k for k in final if "q_proj" in k)
    assert not torch.equal(final[key], step2[key])
    base = adapters.base_for(str(model))
    name = adapters.resolve(base, f"run:{run.id}")  # what chat and compare load for the run
    assert any(Path(info.folder) == promoted.adapter_path for info in base.adapters() if info.name == name)
    judge.promote(run.id, "final")
    assert store.get(run.id).promoted_step is None and (Path(run.output) / "adapter").is_dir()
