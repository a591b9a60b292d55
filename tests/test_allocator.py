"""How processes get their memory (``lora_app.allocator``): training commands on jemalloc, generating
ones on huge pages, where the machine has them, by starting the process again, never twice, never
against the user's choice. The real relaunch is tested end to end in ``test_worker.py`` (a CLI run
logs which allocator it ran on) and here (``generate`` on huge pages)."""

import contextlib
import os
import subprocess
import sys

import pytest

from lora_app import __main__ as entry, allocator


@pytest.fixture
def found(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc", lambda: "libjemalloc.so.2")


@pytest.fixture
def on_request(monkeypatch):
    monkeypatch.setattr(allocator, "huge_pages_on_request", lambda: True)


def test_jemalloc_joins_what_is_preloaded_already(found):
    assert allocator.training_environment({})["LD_PRELOAD"] == "libjemalloc.so.2"
    assert allocator.training_environment({"LD_PRELOAD": "libfoo.so"})["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so"


@pytest.mark.parametrize("env", [{"LD_PRELOAD": "/opt/libjemalloc.so.2"}, {allocator.SETTING: "system"}])
def test_nothing_changes_when_it_is_there_or_refused(found, env):
    assert allocator.training_environment(env) == env


def test_nothing_changes_without_jemalloc(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc", lambda: None)
    assert allocator.training_environment({}) == {}
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.SETTING, raising=False)
    assert "apt-get install libjemalloc2" in allocator.in_use()


class Relaunched(Exception):
    pass


def test_huge_pages_join_the_tunables_set_already(on_request):
    assert allocator.generation_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    tunables = allocator.generation_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert tunables == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {allocator.SETTING: "system"}])
def test_huge_pages_are_not_asked_twice_or_against_the_users_choice(on_request, env):
    assert allocator.generation_environment(env) == env


@pytest.mark.parametrize("mode, libc, asked", [
    ("always [madvise] never", ("glibc", "2.36"), True),
    ("[always] madvise never", ("glibc", "2.36"), False),  # huge pages come anyway
    ("always madvise [never]", ("glibc", "2.36"), False),
    ("always [madvise] never", ("glibc", "2.31"), False),  # the tunable came with glibc 2.35
    ("always [madvise] never", ("", ""), False),  # another C library (musl)
    (None, ("glibc", "2.36"), False),  # no such file: not Linux, or no huge pages in this kernel
])
def test_huge_pages_are_asked_for_only_where_that_pays(monkeypatch, tmp_path, mode, libc, asked):
    thp = tmp_path / "enabled"
    if mode is not None:
        thp.write_text(mode + "\n")
    monkeypatch.setattr(allocator, "THP_MODE", thp)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: libc)
    assert allocator.huge_pages_on_request() is asked
    assert ("GLIBC_TUNABLES" in allocator.generation_environment({})) is asked


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
    monkeypatch.setattr(allocator, "huge_pages_on_request", lambda: False)
    monkeypatch.setattr(sys, "argv", ["lora-app", "generate", "--help"])
    with contextlib.suppress(SystemExit):
        entry.main()  # generate's --help, in this process: no huge pages to ask for here
    assert len(calls) == 1


def test_a_generating_command_starts_again_on_huge_pages(on_request, monkeypatch):
    calls = []

    def execve(path, args, env):
        calls.append((args, env["GLIBC_TUNABLES"], env.get("LD_PRELOAD")))
        raise Relaunched

    monkeypatch.setattr(allocator.os, "execve", execve)
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD", allocator.SETTING):
        monkeypatch.delenv(name, raising=False)
    for command in ("generate", "studio"):
        monkeypatch.setattr(sys, "argv", ["lora-app", command, "--help"])
        with pytest.raises(Relaunched):
            entry.main()
    assert calls == [([sys.executable, "-m", "lora_app", command, "--help"], "glibc.malloc.hugetlb=1", None)
                     for command in ("generate", "studio")]


@pytest.mark.skipif(not allocator.huge_pages_on_request(), reason="this machine gives huge pages without asking, "
                    "or never: the generating commands run as they are")
def test_the_generate_command_really_runs_on_huge_pages(tmp_path):
    """The real relaunch: every Python process started prints its tunables (a ``sitecustomize``), so
    ``generate --help`` shows the process the user started, then the one it started again."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nprint('tunables:', os.environ.get('GLIBC_TUNABLES'), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.SETTING)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "lora_app", "generate", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--prompt" in done.stdout
    assert done.stderr.splitlines() == ["tunables: None", "tunables: glibc.malloc.hugetlb=1"]


def test_a_command_called_as_a_function_runs_in_this_process(found, monkeypatch):
    monkeypatch.setattr(allocator.os, "execve", lambda *args: pytest.fail("started again"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with contextlib.suppress(SystemExit):
        entry.main(["train", "--help"])
