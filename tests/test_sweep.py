"""Sweeps: the grid as written (each mistake refused with what to write instead), its combinations in
order with their folders, and `python -m lora_app sweep` training every combination as an ordinary
run, or nothing when anything is wrong."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_app.errors import TrainConfigError
from lora_app.training.config import TrainConfig
from lora_app.training.store import RunStore
from lora_app.training.sweep import MAX_RUNS, expand, main, parse_grid

ROOT = Path(__file__).resolve().parents[1]
QA = [("What is the capital of France?", "Paris."), ("Say hi.", "Hi!"), ("2+2?", "4"), ("A pet?", "A cat.")]


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA * 4]))
    return str(path)


def refusal(spec) -> str:
    """The one grid problem ``spec`` is refused with."""
    with pytest.raises(TrainConfigError) as err:
        parse_grid(spec)
    assert set(err.value.problems) == {"grid"}
    return err.value.problems["grid"]


# ---- the grid -------------------------------------------------------------------------------------
def test_a_grid_is_read_from_one_string_or_one_flag_per_axis():
    expected = {"rank": [8, 16], "alpha": [16.0, 32.0]}
    assert parse_grid("rank=8,16; alpha=16,32") == expected
    assert parse_grid("rank = 8, 16\nalpha=16,32\n") == expected
    assert parse_grid(["rank=8,16", "alpha=16,32"]) == expected
    assert list(parse_grid(["alpha=16", "rank=8"])) == ["alpha", "rank"]  # the axes keep their order


def test_values_take_their_settings_types():
    grid = parse_grid(["lr=1e-4,2e-4", "batch-size=2,4", "gradient_checkpointing=yes,no", "variant=lora,dora"])
    assert grid == {"lr": [1e-4, 2e-4], "batch_size": [2, 4], "gradient_checkpointing": [True, False],
                    "variant": ["lora", "dora"]}
    assert type(grid["batch_size"][0]) is int and type(grid["lr"][0]) is float
    # none unsets what may be unset; | separates values that hold commas
    assert parse_grid(["lora-plus-ratio=none,16", "targets=q_proj,v_proj|all-linear"]) == \
        {"lora_plus_ratio": [None, 16.0], "targets": ["q_proj,v_proj", "all-linear"]}
    assert parse_grid("train_on_prompt=TRUE,0") == {"train_on_prompt": [True, False]}


@pytest.mark.parametrize("spec, expected", [
    ("rank=x", "rank takes whole numbers; got 'x'"),
    ("rank=8.5", "rank takes whole numbers; got '8.5'"),
    ("lr=fast", "lr takes numbers; got 'fast'"),
    ("gradient_checkpointing=maybe", "gradient_checkpointing takes true or false; got 'maybe'"),
    ("variant=lora,mystery", "variant takes one of lora, rslora, dora, lora-fa, vera, delta-lora; got 'mystery'"),
    ("rank=none", "rank takes whole numbers; got 'none'"),  # rank cannot be unset
])
def test_a_value_of_the_wrong_type_is_named(spec, expected):
    assert refusal(spec) == expected


def test_an_unknown_setting_is_refused_with_the_closest_ones():
    assert refusal("rnak=2") == "unknown setting 'rnak' in the grid (did you mean rank?)"
    assert "did you mean lr?" in refusal("learning-rate=1e-4")  # the setting's name in words leads to it
    assert "train --help" in refusal("wibble=1")  # nothing close: where the settings are listed


@pytest.mark.parametrize("name", ["data", "val_data", "output", "resume", "data-mapping", "probe_prompts"])
def test_settings_every_run_shares_cannot_be_swept(name):
    assert refusal(f"{name}=a,b").startswith(f"{name.replace('-', '_')} cannot be swept: ")


@pytest.mark.parametrize("spec, words", [
    ("", "the grid is empty"), ([], "the grid is empty"), (" ; \n", "the grid is empty"),
    ("rank=", "rank has no values in 'rank='"),
    ("rank=8,,16", "rank has an empty value in 'rank=8,,16'"),
    ("rank 8,16", "'rank 8,16' is not setting=value,value (e.g. rank=8,16)"),
    (["rank=8", "rank=16"], "rank is in the grid twice: give all its values at once"),
    ("rank=8;Rank=16", "rank is in the grid twice"),
    ("rank=8,8", "rank gets the same value twice ('8' and '8')"),
    ("lr=1e-4,0.0001", "lr gets the same value twice ('1e-4' and '0.0001')"),
])
def test_a_malformed_grid_says_what_to_write(spec, words):
    assert words in refusal(spec)


def test_a_grid_of_more_than_the_limit_says_how_many_runs_it_would_make():
    assert MAX_RUNS == 16
    assert len(expand(TrainConfig(data="d", output="o"), parse_grid("rank=1,2,3,4; alpha=1,2,3,4"))) == 16
    assert refusal("rank=1,2,3,4,5; alpha=1,2,3,4") == \
        "the grid makes 20 runs (5 rank x 4 alpha); a sweep runs at most 16: give fewer values"


# ---- the combinations -------------------------------------------------------------------------------
def test_combinations_come_first_axis_slowest_each_in_its_own_folder(tmp_path):
    base = TrainConfig(data="d.json", output=str(tmp_path / "sweep"), rank=4, lr=1e-3, seq_len=96)
    runs = expand(base, parse_grid("rank=8,16; alpha=16,32"))
    assert [name for name, _ in runs] == ["rank8-alpha16", "rank8-alpha32", "rank16-alpha16", "rank16-alpha32"]
    assert [(c.rank, c.alpha) for _, c in runs] == [(8, 16.0), (8, 32.0), (16, 16.0), (16, 32.0)]
    assert [c.output for _, c in runs] == [str(tmp_path / "sweep" / name) for name, _ in runs]
    assert all((c.lr, c.seq_len, c.data) == (1e-3, 96, "d.json") for _, c in runs)  # the rest as given
    assert (base.rank, base.output) == (4, str(tmp_path / "sweep"))  # the base itself is left as it was


def test_folder_names_are_readable_and_safe():
    runs = expand(TrainConfig(data="d"), parse_grid(["lr=1e-4,2e-05", "double_quant=true,false",
                                                     "targets=q_proj,v_proj|.*proj", "max_steps=none,5"]))
    assert runs[0][0] == "lr0.0001-double_quant-targetsq_proj_v_proj-max_stepsnone"
    assert runs[-1][0] == "lr2e-05-no_double_quant-targets._proj-max_steps5"
    assert all(config.output is None for _, config in runs)  # without an output, the studio's worker sets it


def test_an_invalid_combination_is_named_with_its_problem():
    base = TrainConfig(data="d", output="o")
    with pytest.raises(TrainConfigError) as err:
        expand(base, parse_grid("variant=lora,delta-lora; quantization=none,4bit"))
    assert set(err.value.problems) == {"variantdelta-lora-quantization4bit"}
    assert "needs quantization 'none'" in err.value.problems["variantdelta-lora-quantization4bit"]
    with pytest.raises(TrainConfigError) as err:
        expand(base, parse_grid("rank=0,8; alpha=16,32"))
    assert set(err.value.problems) == {"rank0-alpha16", "rank0-alpha32"}
    assert "rank must be a whole number > 0" in str(err.value)


def test_the_bases_own_problems_are_left_to_its_checks():
    runs = expand(TrainConfig(), parse_grid("rank=8,16"))  # no data, no output: the sweep command checks those
    assert [name for name, _ in runs] == ["rank8", "rank16"]


# ---- the command ---------------------------------------------------------------------------------------
def test_a_sweep_trains_every_combination_as_a_run_and_compares_them(tiny_llama, qa_data, tmp_path, capsys):
    store = tmp_path / "store"
    code = main(["sweep", "--model", tiny_llama, "--data", qa_data, "--output", str(tmp_path / "sweep"),
                 "--max-steps", "2", "--seq-len", "96", "--batch-size", "4", "--val-fraction", "0.25",
                 "--grid", "rank=2,4", "--grid", "alpha=4,8", "--store", str(store)])
    out = capsys.readouterr().out
    assert code == 0, out
    settings = {"rank2-alpha4": (2, 4.0), "rank2-alpha8": (2, 8.0), "rank4-alpha4": (4, 4.0), "rank4-alpha8": (4, 8.0)}
    names = list(settings)
    assert f"sweep: 4 runs in {tmp_path / 'sweep'}" in out and "  rank4-alpha8: rank=4 alpha=8" in out
    for name, (rank, alpha) in settings.items():
        config = TrainConfig.from_file(tmp_path / "sweep" / name / "config.json")
        assert (config.rank, config.alpha, config.max_steps) == (rank, alpha, 2)
        assert (tmp_path / "sweep" / name / "adapter" / "adapter_model.safetensors").is_file()
    runs = RunStore(store).list()
    assert sorted(run.name for run in runs) == names and {run.status for run in runs} == {"completed"}
    table = out[out.index("\nrun "):].strip().splitlines()
    assert table[0].split() == ["run", "status", "final", "loss", "eval", "loss", "tokens/s"]
    assert [line.split()[:2] for line in table[1:]] == [[name, "completed"] for name in names]
    summary = json.loads((tmp_path / "sweep" / "rank2-alpha4" / "summary.json").read_text())
    assert table[1].split()[2:4] == [f"{summary['final_loss']:.4f}", f"{summary['eval_loss']:.4f}"]


def test_a_mistake_trains_and_registers_nothing_and_needs_no_torch(qa_data, tmp_path):
    taken = tmp_path / "taken"
    (taken / "rank4" / "adapter").mkdir(parents=True)  # the folder of one of the runs holds a run already
    code = ("import sys; from lora_app.training.sweep import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    store = tmp_path / "store"
    mistakes = {"unknown setting 'rnak' in the grid (did you mean rank?)": ["--grid", "rnak=2", "--output", "out"],
                "rank takes whole numbers; got 'x'": ["--grid", "rank=2,x", "--output", "out"],
                "run rank0: rank must be a whole number > 0": ["--grid", "rank=0,2", "--output", "out"],
                "no output given (--output)": ["--grid", "rank=2,4"],
                "run rank4: The output folder": ["--grid", "rank=2,4", "--output", str(taken)],
                "a sweep starts new runs": ["--grid", "rank=2", "--output", "out", "--resume"]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for expected, flags in mistakes.items():
        out = subprocess.run([sys.executable, "-c", code, "sweep", "--data", qa_data, *flags, "--store", str(store)],
                             cwd=tmp_path, capture_output=True, text=True, env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error:") and expected in out.stderr, out.stderr
        assert "run rank2" not in out.stderr  # only the runs that cannot start are named
        assert out.stderr.count("no output given") <= 1  # a mistake every run shares is said once
    assert not (tmp_path / "out").exists() and sorted(p.name for p in taken.iterdir()) == ["rank4"]
    assert RunStore(store).list() == []


def test_what_needs_the_model_is_checked_for_every_run_before_any_trains(tiny_llama, qa_data, tmp_path, capsys):
    store = tmp_path / "store"
    code = main(["sweep", "--model", tiny_llama, "--data", qa_data, "--output", str(tmp_path / "sweep"),
                 "--max-steps", "1", "--grid", "seq_len=96,4096", "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:")
    assert "run seq_len4096: sequence length 4096 is beyond the model's maximum of 128 positions" in err
    assert "seq_len96" not in err  # the run that could start is not named
    assert not (tmp_path / "sweep").exists() and RunStore(store).list() == []  # not even the first run trained


def test_a_sweep_stops_at_ctrl_c_and_starts_no_other_run(tmp_path, capsys, monkeypatch):
    import signal

    import lora_app.training.run as run

    started = []

    def start(config, store, run_id, *, as_json, main_process):
        started.append(config.rank)
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the first run ...
        except KeyboardInterrupt:
            return 1  # ... which records it and returns, as training.run does
        return 0

    monkeypatch.setattr(run, "start", start)
    monkeypatch.setattr("lora_app.training.trainer.preflight", lambda config: None)
    monkeypatch.setattr("lora_app.training.sweep.quick_check", lambda config: None)
    handler = signal.getsignal(signal.SIGINT)
    code = main(["--data", "d.json", "--output", str(tmp_path / "sweep"), "--grid", "rank=2,4", "--no-store"])
    assert (code, started) == (130, [2])
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[-2:]]
    assert rows == [["rank2", "interrupted", "-"], ["rank4", "not", "started"]]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is as it was after the sweep
