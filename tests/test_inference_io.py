"""Adapters from zips (and refused zips), merged-model and adapter-zip export, pushing to the Hub
(with the hub client replaced: no network in tests)."""

import os
import stat
import zipfile

import pytest
import torch

from test_inference_support import GREEDY, assets, base, engine  # noqa: F401  (fixtures)
from lora_app.inference import InferenceError, Mode, push_to_hub, zip_adapter
from lora_app.lora import adapter_names


def test_adapter_from_a_zip_equals_the_folder_and_is_unpacked_once(base, assets, tmp_path):
    archive = zip_adapter(assets["a"], tmp_path / "uploads" / "my-adapter.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    from_folder = base.generate("hello", settings=GREEDY, mode=base.load_adapter(assets["a"]))
    name = base.load_adapter(archive)
    assert name == "my-adapter"
    assert base.generate("hello", settings=GREEDY, mode=name).text == from_folder.text
    unpacked = [p for p in base.unzip_root.iterdir() if not p.name.startswith(".")]
    assert len(unpacked) == 1 and base.load_adapter(archive) == name  # cached: same name, nothing re-read


def test_zip_with_the_adapter_in_a_subfolder(base, assets, tmp_path):
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in assets["b"].iterdir():
            z.write(f, f"my-run/adapter/{f.name}")
    assert base.load_adapter(archive) == "my-run"


@pytest.mark.parametrize("entry, problem", [
    ("../evil.txt", "'..'"),
    ("adapter/../../evil.txt", "'..'"),
    ("/tmp/evil.txt", "absolute"),
    ("C:/evil.txt", "absolute"),
    ("link", "link"),
])
def test_unsafe_zips_are_refused_before_anything_is_written(base, assets, tmp_path, entry, problem):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in assets["a"].iterdir():
            z.write(f, f.name)
        info = zipfile.ZipInfo(entry)
        if entry == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
        else:
            z.writestr(info, "x")
    with pytest.raises(InferenceError, match=problem):
        base.load_adapter(archive)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil.txt")
    assert not base.unzip_root.exists() or not any(base.unzip_root.iterdir())
    assert adapter_names(base.model) == []


def test_not_a_zip_and_zip_bombs(base, tmp_path):
    from lora_app.inference.sources import extract_zip

    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InferenceError, match="not a readable zip"):
        base.load_adapter(fake)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("adapter_model.safetensors", b"\0" * 100_000)
    with pytest.raises(InferenceError, match="more than"):
        extract_zip(big, tmp_path / "out", max_bytes=50_000)


def test_export_merged_loads_with_plain_transformers_and_matches(base, assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["dora"])
    mix = {a: 0.7, b: 0.5}
    base.set_mode(b)
    folder = base.export_merged(tmp_path / "merged", mix)
    assert base.mode == Mode.of(b)  # the export left the mode alone
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(folder.glob("*.bin")) and not list(folder.glob("adapter*"))
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 90, (1, 16), generator=torch.Generator().manual_seed(0))
    base.set_mode(mix)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, base.model(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = plain.generate(**prompt, max_new_tokens=10, do_sample=False, eos_token_id=base.eos_token_ids)
    expected = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected == base.generate("hello", settings=GREEDY, mode=mix).text
    with pytest.raises(InferenceError, match="already exists"):
        base.export_merged(folder, mix)
    base.export_merged(folder, None, overwrite=True)  # None: the current mode's adapters


def test_adapter_zip_roundtrip(base, assets, tmp_path):
    name = base.load_adapter(assets["c"])
    archive = zip_adapter(assets["c"], tmp_path / "out" / "c.zip")
    with pytest.raises(InferenceError, match="already exists"):
        zip_adapter(assets["c"], archive)
    assert base.load_adapter(archive, name="c_again") == "c_again"
    assert base.generate("hi", settings=GREEDY, mode="c_again").text == base.generate("hi", settings=GREEDY,
                                                                                        mode=name).text
    with pytest.raises(InferenceError, match="not a complete adapter"):
        zip_adapter(tmp_path, tmp_path / "x.zip")


def test_push_to_hub_refuses_offline_and_without_token_and_uploads_otherwise(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(InferenceError, match="offline"):
        push_to_hub(folder, "me/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(InferenceError, match="no token"):
        push_to_hub(folder, "me/model")
    with pytest.raises(InferenceError, match="user/name"):
        push_to_hub(folder, "no-slash", token="hf_x")
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw))
                        or f"https://huggingface.co/{repo}")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert push_to_hub(folder, "me/model") == "https://huggingface.co/me/model"
    assert calls[0] == ("create", "me/model", {"token": "hf_env", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(folder) and calls[1][1]["repo_id"] == "me/model"

    def unreachable(**kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "upload_folder", unreachable)
    with pytest.raises(InferenceError, match="could not push .* Name or service not known"):
        push_to_hub(folder, "me/model")
