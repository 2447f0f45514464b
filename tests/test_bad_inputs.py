"""The bad-input corpus: what users feed genaug from scraped folders and hand-edited files.

Every case is either handled correctly (and the test checks the result) or refused with exactly
one line on stderr, a non-zero exit, and nothing half-written (no output folder, or one whose
manifest and metadata are consistent). Cases run in-process through ``genaug.cli.main`` so the
corpus stays fast; the inputs are built here from code, so the corpus is reviewable as text.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from genaug.artefacts import MAX_IMAGE_PIXELS, open_image, read_dataset, read_metadata_lines
from genaug.cli import main

# --------------------------------------------------------------------------- helpers


def picture(colour=(200, 40, 40), size=24, mode="RGB") -> Image.Image:
    im = Image.new("RGB", (size, size), (250, 250, 250))
    ImageDraw.Draw(im).ellipse([4, 4, size - 5, size - 5], fill=colour)
    return im.convert(mode) if mode != "RGB" else im


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def imagefolder(root: Path, per_class: int = 3) -> Path:
    """A clean two-class imagefolder (``a/``, ``b/``)."""
    for c, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(colour).save(root / c / f"{i}.png")
    return root


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_refused(code: int, err: str, *words: str, output: Path | None = None) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code != 0, f"expected a refusal, got exit 0 (stderr: {err!r})"
    assert len(lines) == 1, f"expected one line of error, got {lines}"
    assert ": error:" in lines[0] and "internal error" not in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    if output is not None:
        assert_not_half_written(output)


def assert_not_half_written(output: Path) -> None:
    """Either nothing, or a folder whose every metadata line points at a complete, decodable file."""
    if not output.exists():
        return
    assert not list(output.rglob("*.tmp")), "a temporary file was left behind"
    for meta in output.rglob("metadata.jsonl"):
        for row in read_metadata_lines(meta, tolerate_partial_tail=False):
            open_image(meta.parent / row["file_name"])
    for manifest in output.rglob("genaug.json"):
        json.loads(manifest.read_text())
    for weights in output.rglob("*.safetensors"):
        from safetensors.torch import load_file

        load_file(str(weights))


def classifier_argv(real: Path, test: Path, out: Path, *extra: str) -> list[str]:
    return ["train-classifier", "--real-data", str(real), "--test-data", str(test), "--output", str(out),
            "--epochs", "1", "--min-steps", "2", "--batch-size", "4", "--image-size", "16", "--device", "cpu",
            "--no-progress", "--checkpoint-every", "0", *extra]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return imagefolder(tmp_path_factory.mktemp("clean"))


# --------------------------------------------------------------------------- broken image files
BROKEN = {
    "truncated_png": lambda: png_bytes(picture())[:120],
    "truncated_jpeg": lambda: jpeg_bytes(picture(size=64))[:400],
    "corrupt_bytes": lambda: bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)),
    "png_header_then_garbage": lambda: png_bytes(picture())[:16] + b"\x00" * 500,
    "zero_bytes": lambda: b"",
    "text_with_image_extension": lambda: b"<html><body>404 not found</body></html>\n",
    "zip_with_image_extension": lambda: _zip_bytes(),
}


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "not an image")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_image_is_refused_naming_the_file(case, clean, tmp_path, capsys):
    real = imagefolder(tmp_path / "real")
    bad = real / "a" / f"{case}.png"
    bad.write_bytes(BROKEN[case]())
    code, err = run(classifier_argv(real, clean, tmp_path / "out"), capsys)
    assert_refused(code, err, "cannot read image", bad.name, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_decompression_bomb_is_refused_before_decoding(clean, tmp_path, capsys):
    real = imagefolder(tmp_path / "real")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 2  # a 1-bit PNG of ~64 MP compresses to a few kB
    Image.new("1", (side, side)).save(real / "a" / "bomb.png")
    assert (real / "a" / "bomb.png").stat().st_size < 200_000
    code, err = run(classifier_argv(real, clean, tmp_path / "out"), capsys)
    assert_refused(code, err, "pixel limit", "bomb.png", output=tmp_path / "out")


# --------------------------------------------------------------------------- unusual but valid images
def _exif_rotated_jpeg() -> bytes:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    ImageDraw.Draw(im).rectangle([0, 0, 9, 19], fill=(0, 0, 255))  # blue on the left before rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return jpeg_bytes(im, exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    arr = np.full((24, 24), 65535, dtype=np.uint16)
    arr[:12] = 32768
    return png_bytes(Image.fromarray(arr))  # mode I;16


def _palette_with_transparency() -> bytes:
    im = picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    im.info["transparency"] = 0
    return png_bytes(im, transparency=0)


def _rgba() -> bytes:
    im = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # fully transparent -> white after compositing
    ImageDraw.Draw(im).rectangle([0, 0, 11, 23], fill=(0, 200, 0, 255))
    return png_bytes(im)


VALID = {
    # name: (bytes, extension, check on the decoded RGB image)
    "cmyk_jpeg": (lambda: jpeg_bytes(picture(mode="CMYK")), ".jpg",
                  lambda im: np.asarray(im)[12, 12].tolist() == pytest.approx([200, 40, 40], abs=30)),
    "grayscale_png": (lambda: png_bytes(picture(mode="L")), ".png",
                      lambda im: len(set(np.asarray(im)[12, 12].tolist())) == 1),
    "rgba_png": (_rgba, ".png", lambda im: np.asarray(im)[5, 20].tolist() == [255, 255, 255]
                 and np.asarray(im)[5, 5].tolist() == [0, 200, 0]),
    "sixteen_bit_png": (_sixteen_bit, ".png", lambda im: np.asarray(im)[20, 0, 0] == 255
                        and 120 <= np.asarray(im)[0, 0, 0] <= 135),
    "palette_png": (_palette_with_transparency, ".png", lambda im: im.mode == "RGB"),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, ".jpg",
                          lambda im: im.size == (20, 40) and np.asarray(im)[2, 10, 2] > 200),
    "one_by_one_png": (lambda: png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))), ".png",
                       lambda im: im.size == (1, 1)),
    "webp": (lambda: _webp(), ".webp", lambda im: im.size == (24, 24)),
    "uppercase_extension": (lambda: png_bytes(picture()), ".PNG", lambda im: im.size == (24, 24)),
}


def _webp() -> bytes:
    buf = io.BytesIO()
    picture().save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(VALID))
def test_unusual_valid_image_is_read_correctly_and_trains(case, clean, tmp_path, capsys):
    make, ext, check = VALID[case]
    real = imagefolder(tmp_path / "real")
    path = real / "a" / f"{case}{ext}"
    path.write_bytes(make())
    image = open_image(path)
    assert image.mode == "RGB" and check(image), case
    code, err = run(classifier_argv(real, clean, tmp_path / "out"), capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    assert final["train_images"]["real"] == 7  # the unusual image counted with the six clean ones


# --------------------------------------------------------------------------- folders and class names
def test_empty_class_folder_is_refused(clean, tmp_path, capsys):
    real = imagefolder(tmp_path / "real")
    (real / "c-empty").mkdir()
    code, err = run(classifier_argv(real, clean, tmp_path / "out"), capsys)
    assert_refused(code, err, "c-empty", "no images", output=tmp_path / "out")


def test_missing_dataset_folder_is_refused(clean, tmp_path, capsys):
    code, err = run(classifier_argv(tmp_path / "nowhere", clean, tmp_path / "out"), capsys)
    assert_refused(code, err, "not found", output=tmp_path / "out")


def test_symlinks_out_of_the_dataset_are_not_followed(clean, tmp_path, capsys):
    real = imagefolder(tmp_path / "real")
    secret = tmp_path / "outside.png"
    picture((0, 255, 0)).save(secret)
    (real / "a" / "link.png").symlink_to(secret)
    assert len(read_dataset(real)) == 6  # the link is not an image of the dataset


HOSTILE_NAMES = {
    "dot_dot_slash": "../../escaped",
    "slash": "cats/dogs",
    "unicode": "chat noir · 黒猫 🐈",
    "spaces": "  golden   retriever ",
    "three_hundred_chars": "x" * 300,
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, kit):
    """One genaug dataset whose class names are hostile; synthesized, retrieved and trained on."""
    from genaug.artefacts import DatasetWriter

    root = tmp_path_factory.mktemp("hostile")
    names = list(HOSTILE_NAMES.values())
    with DatasetWriter(root / "real", names, split="train") as writer:
        for label in range(len(names)):
            for j in range(2):
                writer.add(f"r{label}-{j}", picture((40 * label, 100, 200 - 30 * label)), label)
    with DatasetWriter(root / "real", names, split="test") as writer:
        for label in range(len(names)):
            writer.add(f"t{label}", picture((40 * label, 100, 200 - 30 * label)), label)
    synth = root / "synth"
    assert main(["synth", "--model", str(kit("sd15")), "--real-data", str(root / "real"), "--output", str(synth),
                 "--images-per-class", "1", "--num-inference-steps", "2", "--device", "cpu"]) == 0
    out = root / "cls"
    assert main(["train-classifier", "--real-data", str(root / "real"), "--extra-data", str(synth), "--output",
                 str(out), "--epochs", "1", "--min-steps", "2", "--batch-size", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    return {"root": root, "synth": synth, "classifier": out, "names": names}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_class_name_stays_data_not_a_path(case, hostile):
    name, root = HOSTILE_NAMES[case], hostile["root"]
    for base in (root, root.parent, root.parent.parent):  # where "../../escaped" could have landed
        assert not (base / "escaped").exists() and not (base / "cats").exists()
    assert not [p for p in root.rglob("*") if p.name in ("escaped", "cats", "dogs")]
    synth = read_dataset(hostile["synth"])
    assert synth.class_names == hostile["names"]
    rows = [r for r in synth.records if r["class_name"] == name]
    assert len(rows) == 1 and name.strip() in rows[0]["prompt"]
    path = synth.image_path(synth.records.index(rows[0]))
    assert path.is_relative_to(hostile["synth"].resolve()) and len(path.name) < 100
    final = json.loads((hostile["classifier"] / "final.json").read_text())
    assert name in final["per_class"]


# --------------------------------------------------------------------------- metadata.jsonl
def _dataset_with_metadata(root: Path, lines: list[str | bytes]) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(2):
        picture().save(root / "images" / f"{i}.png")
    body = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    (root / "metadata.jsonl").write_bytes(body)
    return root


GOOD_LINE = '{"file_name": "images/0.png", "label": 0}'
METADATA = {
    "invalid_json_line": ([GOOD_LINE, '{"file_name": "images/1.png", "label": 0', GOOD_LINE], "line 2"),
    "array_not_object": ([GOOD_LINE, "[1, 2]"], "line 2"),
    "missing_label": ([GOOD_LINE, '{"file_name": "images/1.png"}'], "lacks"),
    "label_is_a_string": ([GOOD_LINE, '{"file_name": "images/1.png", "label": "cat"}'], "not an integer"),
    "negative_label": ([GOOD_LINE, '{"file_name": "images/1.png", "label": -1}'], "out of range"),
    "file_name_escapes_with_dot_dot": ([GOOD_LINE, '{"file_name": "../../../etc/passwd", "label": 0}'], "escapes"),
    "absolute_file_name": ([GOOD_LINE, '{"file_name": "/etc/hostname", "label": 0}'], "escapes"),
    "file_listed_but_missing": ([GOOD_LINE, '{"file_name": "images/gone.png", "label": 0}'], "gone.png"),
    "not_utf8": ([GOOD_LINE, b'{"file_name": "images/1.png", "label": 0, "x": "\xff\xfe"}'], "line 2"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_malformed_metadata_is_refused_with_its_line(case, clean, tmp_path, capsys):
    lines, words = METADATA[case]
    real = _dataset_with_metadata(tmp_path / "real", lines)
    code, err = run(classifier_argv(real, clean, tmp_path / "out"), capsys)
    assert_refused(code, err, words, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- configs
CONFIGS = {
    "unknown_key": ("epochs: 1\nlerning_rate: 0.1\n", "unknown key 'lerning_rate'"),
    "wrong_type": ("epochs: three\n", "'three' is not int"),
    "negative_count": ("epochs: -5\n", "epochs must be at least 1"),
    "nan_learning_rate": ("learning_rate: .nan\n", "learning_rate"),
    "list_not_mapping": ("- epochs\n- 3\n", "mapping"),
    "yaml_syntax_error": ("epochs: [1, 2\n", "cannot parse"),
    "python_object_tag": ("epochs: !!python/object/apply:os.system ['touch pwned']\n", "cannot parse"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_is_refused_with_exit_2(case, clean, tmp_path, capsys, monkeypatch):
    text, words = CONFIGS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    argv = ["train-classifier", "--config", str(tmp_path / "bad.yaml"), "--real-data", str(clean), "--test-data",
            str(clean), "--output", str(tmp_path / "out")]  # flags would override the file's keys
    code, err = run(argv, capsys)
    assert_refused(code, err, words, output=tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_negative_image_budget_is_refused(kit, tmp_path, capsys):
    code, err = run(["synth", "--model", str(kit("sd15")), "--class-names", "a", "--images-per-class", "-3",
                     "--output", str(tmp_path / "out")], capsys)
    assert_refused(code, err, "images_per_class", output=tmp_path / "out")
    assert code == 2


def test_compile_without_a_compiler_is_refused_before_writing(kit, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers-here"))
    monkeypatch.delenv("CXX", raising=False)
    code, err = run(["synth", "--model", str(kit("sd15")), "--class-names", "a", "--images-per-class", "2",
                     "--num-inference-steps", "1", "--device", "cpu", "--compile", "--output", str(tmp_path / "out")],
                    capsys)
    assert_refused(code, err, "C++ compiler", "--compile")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapters(tmp_path_factory, kit) -> dict[str, Path]:
    from genaug.personalize.lora import LoraTrainConfig, train_lora
    from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion

    root = tmp_path_factory.mktemp("adapters")
    data = root / "concept"
    data.mkdir()
    for i in range(2):
        picture((200, 30 + 40 * i, 30)).save(data / f"{i}.png")
    lora = train_lora(LoraTrainConfig(model=str(kit("sd15")), instance_data=str(data), output=str(root / "lora"),
                                      max_train_steps=2, train_batch_size=2, device="cpu")).output
    ti = train_textual_inversion(TextualInversionConfig(model=str(kit("sd15")), instance_data=str(data),
                                                        output=str(root / "ti"), max_train_steps=2,
                                                        placeholder_token="<c>", initializer_token="object",
                                                        device="cpu")).output
    return {"lora": Path(lora), "ti": Path(ti), "root": root}


def _synth_with_adapter(kit, arch: str, adapter: Path, out: Path) -> list[str]:
    return ["synth", "--model", str(kit(arch)), "--class-names", "a", "--images-per-class", "1",
            "--num-inference-steps", "2", "--device", "cpu", "--adapters", str(adapter), "--output", str(out)]


def _copy(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


def test_adapters_load_and_generate(kit, adapters, tmp_path, capsys):
    for kind in ("lora", "ti"):
        code, err = run(_synth_with_adapter(kit, "sd15", adapters[kind], tmp_path / kind), capsys)
        assert code == 0, err
        assert len(read_dataset(tmp_path / kind)) == 1


@pytest.mark.parametrize("kind", ["lora", "ti"])
def test_adapter_for_another_base_model_is_refused(kind, kit, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(_synth_with_adapter(kit, "sdxl", adapters[kind], out), capsys)
    assert_refused(code, err, "does not fit", output=out)
    assert not out.exists()


def test_lora_with_mismatched_rank_is_refused(kit, adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy(adapters["lora"], tmp_path / "lora")
    weights = folder / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith(("lora.up.weight", "lora_B.weight")))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)  # rank 4 up, rank 8 down
    save_file(tensors, str(weights))
    code, err = run(_synth_with_adapter(kit, "sd15", folder, tmp_path / "out"), capsys)
    assert_refused(code, err, "rank", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("PWNED-by-pickle"),))


@pytest.mark.parametrize("kind", ["lora", "ti"])
def test_adapter_that_is_really_a_pickle_is_never_unpickled(kind, kit, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _copy(adapters[kind], tmp_path / kind)
    name = "pytorch_lora_weights.safetensors" if kind == "lora" else "learned_embeds.safetensors"
    (folder / name).write_bytes(pickle.dumps({"x": _Boom()}, protocol=2))
    code, err = run(_synth_with_adapter(kit, "sd15", folder, tmp_path / "out"), capsys)
    assert_refused(code, err, "pickle", output=tmp_path / "out")
    assert not (tmp_path / "PWNED-by-pickle").exists()


def test_bin_adapter_needs_opt_in_and_then_loads_weights_only(kit, adapters, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    folder = _copy(adapters["lora"], tmp_path / "lora")
    weights = folder / "pytorch_lora_weights.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_lora_weights.bin")
    weights.unlink()
    code, err = run(_synth_with_adapter(kit, "sd15", folder, tmp_path / "refused"), capsys)
    assert_refused(code, err, "--allow-pickle", output=tmp_path / "refused")
    code, err = run(["--allow-pickle", *_synth_with_adapter(kit, "sd15", folder, tmp_path / "ok")], capsys)
    assert code == 0, err
    # weights_only=True: a pickle that would run code is still refused even with the opt-in
    torch.save({"x": _Boom()}, folder / "pytorch_lora_weights.bin")
    code, err = run(["--allow-pickle", *_synth_with_adapter(kit, "sd15", folder, tmp_path / "evil")], capsys)
    assert_refused(code, err, "weights_only", output=tmp_path / "evil")
    assert not (tmp_path / "PWNED-by-pickle").exists()


def test_safetensors_metadata_is_untrusted_data(kit, adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy(adapters["lora"], tmp_path / "lora")
    weights = folder / "pytorch_lora_weights.safetensors"
    hostile = {"format": "pt", "base_model": "../../../../etc", "__import__": "os.system('touch pwned')",
               "huge": "x" * 100_000}
    save_file(load_file(str(weights)), str(weights), metadata=hostile)
    code, err = run(_synth_with_adapter(kit, "sd15", folder, tmp_path / "out"), capsys)
    assert code == 0, err
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# --------------------------------------------------------------------------- training that diverges
def test_nan_loss_in_lora_training_stops_cleanly(kit, adapters, tmp_path, capsys):
    out = tmp_path / "lora"
    code, err = run(["train-lora", "--model", str(kit("sd15")), "--instance-data", str(adapters["root"] / "concept"),
                     "--output", str(out), "--max-train-steps", "6", "--train-batch-size", "2", "--learning-rate",
                     "1e30", "--device", "cpu"], capsys)
    assert_refused(code, err, "loss became", "learning rate", output=out)
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_nan_loss_in_classifier_training_stops_cleanly(clean, tmp_path, capsys):
    out = tmp_path / "cls"
    code, err = run(classifier_argv(clean, clean, out, "--learning-rate", "1e30", "--min-steps", "8"), capsys)
    assert_refused(code, err, "loss became", "learning rate", output=out)
    assert not (out / "model.safetensors").exists() and not (out / "final.json").exists()


# --------------------------------------------------------------------------- names that become file names
def test_recipe_stage_name_cannot_escape_the_run_folder(tmp_path, capsys):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("stages:\n  - name: ../../escaped\n    command: world\n    config: {output: '{output}/w'}\n")
    code, err = run(["run", str(recipe), "--output", str(tmp_path / "out")], capsys)
    assert_refused(code, err, "not a plain name", output=tmp_path / "out")
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path / "out").exists()


def test_report_dataset_name_is_a_label_not_a_path(clean, tmp_path, capsys):
    out = tmp_path / "reports" / "r"
    code, err = run(["report", "--datasets", f"../../escaped={clean}", "--real-test", str(clean), "--oracle", "none",
                     "--samples-per-class", "1", "--output", str(out)], capsys)
    assert code == 0, err
    assert (out / "samples-escaped.png").is_file()
    assert not list(tmp_path.glob("**/samples-escaped.png"))[1:] and not (tmp_path / "samples-escaped.png").exists()
    assert "../../escaped" in (out / "report.md").read_text()


def test_the_source_has_no_unsafe_loading_or_shell():
    """A lint over genaug itself: no unpickling, no unsafe YAML, no shell, no eval of data."""
    import re

    root = Path(__file__).resolve().parent.parent / "genaug"
    forbidden = {r"\bpickle\.loads?\(": "unpickling", r"allow_pickle\s*=\s*True": "numpy pickles",
                 r"shell\s*=\s*True": "a shell", r"\bos\.system\(": "a shell", r"(?<![.\w])eval\(": "eval",
                 r"(?<![.\w])exec\(": "exec", r"yaml\.load\(": "unsafe YAML", r"trust_remote_code\s*=\s*True": "remote code"}
    found = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            found += [f"{path.name}:{number}: {why}" for pattern, why in forbidden.items() if re.search(pattern, code)]
            if "torch.load(" in code and "weights_only=True" not in code:
                found.append(f"{path.name}:{number}: torch.load without weights_only=True")
    assert not found, found
    assert "weights_only=True" in (root / "artefacts.py").read_text()  # the one opt-in path exists


# --------------------------------------------------------------------------- scraped retrieval pools
@pytest.mark.parametrize("skip", [True, False])
def test_unreadable_pool_images_are_skipped_or_refused(skip, kit, tmp_path, capsys):
    pool = imagefolder(tmp_path / "pool", per_class=6)
    (pool / "a" / "broken.png").write_bytes(BROKEN["truncated_png"]())
    (pool / "b" / "empty.png").write_bytes(b"")
    index = tmp_path / "index"
    argv = ["index", "--pool", str(pool), "--output", str(index), "--model", str(kit("clip")), "--shard-size", "4",
            "--batch-size", "4", "--device", "cpu", "--skip-unreadable" if skip else "--no-skip-unreadable"]
    code, err = run(argv, capsys)
    if not skip:
        assert_refused(code, err, "cannot read image", output=index)
        assert not (index / "index.json").exists()
        return
    assert code == 0, err
    info = json.loads((index / "index.json").read_text())
    names = [Path(r["file_name"]).name for r in read_dataset(pool).records]
    assert sorted(names[r] for r in info["unreadable_rows"]) == ["broken.png", "empty.png"]
    out = tmp_path / "retrieved"
    code, err = run(["retrieve", "--index", str(index), "--class-names", "a,b", "--images-per-class", "6",
                     "--query", "text", "--output", str(out)], capsys)
    assert code == 0, err
    got = read_dataset(out)
    assert len(got) == 12 and not {r["pool_row"] for r in got.records} & set(info["unreadable_rows"])


def test_file_names_with_spaces_and_unicode_flow_through_synthesis_and_filtering(kit, tmp_path, capsys):
    real = tmp_path / "real"
    for c, names in (("a", ["IMG 0001 (copy).png", "été.png"]), ("b", ["x.png", "d'oh!.png"])):
        (real / c).mkdir(parents=True)
        for n in names:
            picture().save(real / c / n)
    ids = [r["id"] for r in read_dataset(real).records]
    assert len(set(ids)) == 4 and "1-x" in ids  # safe names keep their id
    out = tmp_path / "syn"
    code, err = run(["synth", "--model", str(kit("sd15")), "--method", "img2img", "--real-data", str(real),
                     "--per-real", "1", "--num-inference-steps", "2", "--device", "cpu", "--output", str(out)], capsys)
    assert code == 0, err
    assert sorted(r["source"] for r in read_dataset(out).records) == sorted(ids)
    code, err = run(["filter", "--input", str(real), "--output", str(tmp_path / "kept"), "--clip-model",
                     str(kit("clip")), "--device", "cpu"], capsys)
    assert code == 0, err
    assert len(read_dataset(tmp_path / "kept")) == 4
