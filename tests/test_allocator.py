"""The training commands' allocator (``lora_app.allocator``): jemalloc preloaded where the machine has
it, by starting the process again, never twice, never against the user's choice. The real relaunch is
tested end to end in ``test_worker.py`` (a CLI run logs which allocator it ran on)."""

import contextlib
import sys

import pytest

from lora_app import __main__ as entry, allocator


@pytest.fixture
def found(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc", lambda: "libjemalloc.so.2")


def test_jemalloc_joins_what_is_preloaded_already(found):
    assert allocator.environment({})["LD_PRELOAD"] == "libjemalloc.so.2"
    assert allocator.environment({"LD_PRELOAD": "libfoo.so"})["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so"


@pytest.mark.parametrize("env", [{"LD_PRELOAD": "/opt/libjemalloc.so.2"}, {allocator.SETTING: "system"}])
def test_nothing_changes_when_it_is_there_or_refused(found, env):
    assert allocator.environment(env) == env


def test_nothing_changes_without_jemalloc(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc", lambda: None)
    assert allocator.environment({}) == {}
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.SETTING, raising=False)
    assert "apt-get install libjemalloc2" in allocator.in_use()


class Relaunched(Exception):
    pass


def test_a_training_command_starts_again_on_jemalloc_and_other_commands_do_not(found, monkeypatch):
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env["LD_PRELOAD"]))
        raise Relaunched

    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.SETTING, raising=False)
    monkeypatch.setattr(sys, "argv", ["lora-app", "train", "--data", "x.json"])
    with pytest.raises(Relaunched):
        entry.main()
    assert calls == [(sys.executable, [sys.executable, "-m", "lora_app", "train", "--data", "x.json"],
                      "libjemalloc.so.2")]
    monkeypatch.setattr(sys, "argv", ["lora-app", "generate", "--help"])
    with contextlib.suppress(SystemExit):
        entry.main()  # generate's --help, in this process
    assert len(calls) == 1


def test_a_command_called_as_a_function_runs_in_this_process(found, monkeypatch):
    monkeypatch.setattr(allocator.os, "execve", lambda *args: pytest.fail("started again"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with contextlib.suppress(SystemExit):
        entry.main(["train", "--help"])
