import json

import numpy as np
import pytest
from PIL import Image

from genaug.artefacts import (DatasetWriter, folder_lock, load_hf_dataset, open_image, read_dataset, read_manifest,
                              read_safetensors, safe_child)
from genaug.errors import DataError, ModelError


def _img(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8))


def test_writer_reader_round_trip_and_imagefolder(tmp_path):
    names = ["red circle", "blue/square", "ünïcode ../x"]
    with DatasetWriter(tmp_path / "ds", names, split="train", info={"made_by": "test"}) as w:
        for i in range(6):
            w.add(f"item-{i}", _img(i * 40), label=i % 3, prompt=f"p{i}", seed=i, strength=0.5)
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == names and len(ds) == 6
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.records[4]["prompt"] == "p4" and ds.records[4]["class_name"] == "blue/square"
    assert np.asarray(ds.image(3))[0, 0, 0] == 120
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["splits"]["train"] == {"num_items": 6, "complete": True}
    hf = load_hf_dataset(tmp_path / "ds")["train"]
    assert len(hf) == 6 and hf[2]["label"] == 2 and hf[2]["prompt"] == "p2"
    assert hf[5]["image"].size == (8, 8)


def test_writer_resumes_after_a_torn_line(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, ["a"]) as w:
        w.add("x0", _img(1), 0)
        w.add("x1", _img(2), 0)
    meta = root / "train" / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes() + b'{"file_name": "images/x2.png", "la')  # killed mid-line
    with DatasetWriter(root, ["a"]) as w:
        assert w.done_ids == {"x0", "x1"}
        w.add("x2", _img(3), 0)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x0", "x1", "x2"]


@pytest.mark.parametrize("threads", [0, 2])
def test_writer_adds_encoded_files_by_link_or_copy(tmp_path, monkeypatch, threads):
    """add_file keeps a PNG's bytes (no re-encoding): hard-linked where it can, copied where links fail."""
    import os

    with DatasetWriter(tmp_path / "shard", ["a"]) as w:
        w.add("x0", _img(7), 0, seed=3)
        w.add("x1", _img(9), 0, seed=4)
    shard = tmp_path / "shard" / "train" / "images"
    link = os.link

    def link_refused_for_x1(source, target, **kw):  # as from another file system (writer threads may run late)
        if str(source).endswith("x1.png"):
            raise OSError(18, "Invalid cross-device link")
        return link(source, target, **kw)

    monkeypatch.setattr(os, "link", link_refused_for_x1)
    with DatasetWriter(tmp_path / "merged", ["a"], threads=threads) as w:
        w.add_file("x0", shard / "x0.png", 0, seed=3)
        w.add_file("x1", shard / "x1.png", 0, seed=4)
    merged = tmp_path / "merged" / "train" / "images"
    assert (merged / "x0.png").stat().st_ino == (shard / "x0.png").stat().st_ino  # linked
    assert (merged / "x1.png").stat().st_ino != (shard / "x1.png").stat().st_ino  # copied
    for name in ("x0.png", "x1.png"):
        assert (merged / name).read_bytes() == (shard / name).read_bytes()
    assert read_dataset(tmp_path / "merged").records == read_dataset(tmp_path / "shard").records
    assert not list(merged.glob(".*.tmp"))


def test_writer_refuses_unsafe_ids_labels_and_second_writer(tmp_path):
    with DatasetWriter(tmp_path / "ds", ["a"]) as w:
        for bad in ["../evil", "a/b", "", ".hidden"]:
            with pytest.raises(DataError):
                w.add(bad, _img(0), 0)
        with pytest.raises(DataError, match="out of range"):
            w.add("ok", _img(0), 5)
        with pytest.raises(DataError, match="another genaug process"):
            with folder_lock(tmp_path / "ds" / "train"):
                pass
    assert not list((tmp_path).rglob("evil*"))


def test_reader_rejects_bad_metadata(tmp_path):
    folder = tmp_path / "ds" / "train"
    folder.mkdir(parents=True)
    _img(0).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "label": 0}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_dataset(tmp_path / "ds")
    (folder / "metadata.jsonl").write_text('{"file_name": "../../etc/passwd", "label": 0}\n')
    with pytest.raises(DataError, match="escapes"):
        read_dataset(tmp_path / "ds")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "cat"}\n')
    with pytest.raises(DataError, match="not an integer"):
        read_dataset(tmp_path / "ds")


def test_plain_imagefolder_and_flat_folder(tmp_path):
    for cls in ["dog", "cat"]:
        (tmp_path / "plain" / cls).mkdir(parents=True)
        _img(5).save(tmp_path / "plain" / cls / "1.png")
    ds = read_dataset(tmp_path / "plain")
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2
    (tmp_path / "flat").mkdir()
    _img(5).save(tmp_path / "flat" / "1.jpg")
    assert read_dataset(tmp_path / "flat").class_names == ["flat"]


def test_open_image_modes_and_errors(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("L", (4, 4), 7).save(tmp_path / "gray.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    for name in ["rgba.png", "gray.png", "g16.png", "cmyk.jpg"]:
        assert open_image(tmp_path / name).mode == "RGB"
    assert open_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ["zero.png", "text.png"]:
        with pytest.raises(DataError, match="cannot read image"):
            open_image(tmp_path / name)


def test_safe_child_and_pickle_refusal(tmp_path):
    assert safe_child(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()
    with pytest.raises(DataError):
        safe_child(tmp_path, "../x")
    import pickle

    (tmp_path / "lora.safetensors").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(ModelError, match="pickle"):
        read_safetensors(tmp_path / "lora.safetensors")


def test_adapter_and_report_round_trip(tmp_path):
    import torch

    from genaug.artefacts import read_adapter_config, read_report, write_adapter, write_report

    path = write_adapter(tmp_path / "adapters" / "x", "w.safetensors", {"a": torch.ones(2, 3)}, {"rank": 4},
                         metadata={"note": "hi"})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(2, 3)) and metadata == {"note": "hi"}
    assert read_adapter_config(tmp_path / "adapters" / "x") == {"rank": 4}
    write_report(tmp_path / "reports" / "r", {"accuracy": 0.5}, "# r\n")
    assert read_report(tmp_path / "reports" / "r") == {"accuracy": 0.5}
    assert (tmp_path / "reports" / "r" / "report.md").read_text() == "# r\n"
    with pytest.raises(DataError, match="report.json missing"):
        read_report(tmp_path)
