"""Model packages (`autounet package`, `predict -m FILE.zip`) and `autounet info`.

One tiny workspace (2d and 3d_fullres, folds 0 and 1, selected) is trained per module; every bad
package is crafted from its good package with ``zipfile``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet import __version__, api
from autounet.cli import main
from autounet.data.image_io import read_image
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.inference.predictor import Predictor
from autounet.packaging import open as package_open
from autounet.packaging import open_package
from autounet.packaging.create import _stages_to_package
from autounet.pipeline.run import RunOptions, run_pipeline
from autounet.planning.plans import load_plans
from autounet.selection_document import Winner, load_selection
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.loaders import read_json
from autounet.utils.temporary import PREFIX, STALE_AFTER_S, _host_token, remove_stale_temporaries, temporary_prefix
from autounet.workspace import Workspace, checkpoint_path, package_cache_dir, package_complete_marker

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1)
EXACT = ["--engine", "torch", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread) -> dict:
    root = tmp_path_factory.mktemp("packages")
    raw = make_synthetic_dataset(
        root / "raw" / "tiny", SyntheticSpec(cases=8, test_cases=2, shape=(16, 20, 18), classes=3, seed=3)
    )
    result = run_pipeline(
        raw, Workspace.at(root / "W", "tiny"), RunOptions(configurations=["2d", "3d_fullres"], folds=[0, 1], **TINY)
    )
    package = root / "model.zip"
    api.package(result.workspace.root, package, description="tiny test model", license="CC0-1.0")
    return {"raw": raw, "ws": result.workspace, "package": package, "root": root}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test unpacks into its own cache."""
    monkeypatch.setenv("AUTOUNET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def nothing_in(cache: Path) -> bool:
    return not cache.exists() or not any(cache.rglob("*"))


def test_a_package_predicts_byte_identical_segmentations_without_its_workspace(trained, tmp_path, cache, monkeypatch):
    ws, raw = trained["ws"], trained["raw"]
    # a package made from a copy of the workspace, which is then deleted: nothing of it is left to read
    copy = tmp_path / "W" / "tiny"
    shutil.copytree(ws.root, copy)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert main(["package", str(copy), "-o", str(fresh / "model.zip")]) == 0
    shutil.rmtree(tmp_path / "W")
    inputs = raw / "imagesTs"
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "ws_out"), "-m", str(ws.root), *EXACT]) == 0
    monkeypatch.chdir(fresh)
    assert main(["predict", "-i", str(inputs), "-o", "out", "-m", "model.zip", *EXACT]) == 0
    expected = sorted(p.name for p in (tmp_path / "ws_out").glob("*.nii.gz"))
    assert expected and expected == sorted(p.name for p in (fresh / "out").glob("*.nii.gz"))
    for name in expected:
        assert (fresh / "out" / name).read_bytes() == (tmp_path / "ws_out" / name).read_bytes()
    digest = hashlib.sha256((fresh / "model.zip").read_bytes()).hexdigest()
    entry = cache / "packages" / digest
    assert package_complete_marker(entry).read_text().strip() == digest
    assert (entry / "tiny" / "selection.json").is_file()


def test_predictor_takes_a_package_and_a_second_open_reuses_the_unpacked_copy(trained, monkeypatch):
    package = trained["package"]
    predictor = Predictor(package, device="cpu", tta=False, engine="torch", precision="fp32", quiet=True)
    selection = load_selection(trained["ws"].selection_json)
    assert [m.configuration for m in predictor.members] == selection.winner.members
    assert predictor.postprocessing == selection.chosen_postprocessing()
    first = open_package(package)

    def unpack_again(*args):
        raise AssertionError("the package was unpacked twice")

    monkeypatch.setattr(package_open, "_unpack", unpack_again)
    assert open_package(package) == first
    assert first.parent.parent == package_cache_dir()


def test_packaged_checkpoints_hold_the_weights_without_training_state(trained, tmp_path):
    root = open_package(trained["package"])
    packaged = sorted(root.glob("results/*/fold_*/*.pt"))
    assert [p.relative_to(root).as_posix() for p in packaged] == [
        f"results/{c}/fold_{f}/checkpoint_final.pt" for c in ("2d", "3d_fullres") for f in (0, 1)
    ]
    for path in packaged:
        source = trained["ws"].root / path.relative_to(root)
        original, stripped = load_checkpoint(source), load_checkpoint(path)
        assert original["training"]["optimizer"] is not None
        for key in ("optimizer", "scaler", "schedule", "rng"):
            assert stripped["training"][key] is None
        assert stripped["network_spec"] == original["network_spec"] and stripped["plan"] == original["plan"]
        for name, tensor in original["state_dict"].items():
            assert torch.equal(stripped["state_dict"][name], tensor)
        assert path.stat().st_size < source.stat().st_size / 2


def test_the_manifest_names_versions_description_license_and_every_files_checksum(trained):
    with zipfile.ZipFile(trained["package"]) as archive:
        manifest = json.loads(archive.read("tiny/manifest.json"))
        names = {n for n in archive.namelist() if not n.endswith("/")}
        assert names == {f"tiny/{n}" for n in manifest["files"]} | {"tiny/manifest.json"}
        for name, entry in manifest["files"].items():
            data = archive.read(f"tiny/{name}")
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        dataset = json.loads(archive.read("tiny/dataset.json"))
    assert manifest["format"] == "autounet-model-package" and manifest["format_version"] == 2
    assert manifest["autounet_version"] == __version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["description"] == "tiny test model" and manifest["license"] == "CC0-1.0"
    assert manifest["created"].endswith("+00:00")
    for document in ("plans.json", "selection.json", "dataset.json", "fingerprint.json"):
        assert document in manifest["files"]
    assert manifest["workspace_model"]["folds"] == [0, 1]
    assert "raw_path" not in dataset and "training" not in dataset and dataset["labels"]["2"] == "class_2"


def test_a_package_of_other_configurations_runs_them_without_the_selected_postprocessing(trained, tmp_path):
    package = tmp_path / "3d.zip"
    created = api.package(trained["ws"].root, package, configurations=["3d_fullres"], folds=[1])
    assert created.configurations == ["3d_fullres"] and created.folds == [1] and created.selection_changed
    assert not created.postprocessing and created.checkpoints == 1
    selection = load_selection(open_package(package) / "selection.json")
    assert selection.winner == Winner(name="3d_fullres", members=["3d_fullres"], folds=[1])
    assert selection.postprocessing is None
    assert selection.predict_command.endswith("-m 3d.zip")

    from_package = Predictor(package, device="cpu", tta=False, engine="torch", precision="fp32", quiet=True)
    assert from_package.postprocessing is None and len(from_package.stage.networks) == 1
    direct = Predictor(
        trained["ws"].results_dir("3d_fullres"),
        folds=[1],
        device="cpu",
        tta=False,
        engine="torch",
        precision="fp32",
        quiet=True,
    )
    image, geometry = read_image(sorted((trained["raw"] / "imagesTs").glob("*.nii.gz"))[:1])
    np.testing.assert_array_equal(
        from_package.predict_array(image, geometry).segmentation, direct.predict_array(image, geometry).segmentation
    )
    # the same configurations as the selection keep its post-processing
    same = api.package(trained["ws"].root, tmp_path / "same.zip", configurations=["3d_fullres", "2d"])
    assert same.postprocessing and not same.selection_changed


def test_a_cascade_stage_brings_every_fold_of_its_first_stage(trained):
    ws = trained["ws"]
    plans = load_plans(ws.plans_json)
    plans.configurations["3d_fullres"].previous_stage = "2d"  # as if 3d_fullres were a cascade's second stage
    stages = _stages_to_package(ws, plans, Winner("3d_fullres", ["3d_fullres"], [1]))
    assert stages == {"3d_fullres": ["1"], "2d": ["0", "1"]}


def test_packaging_refuses_a_workspace_without_selection_an_existing_file_and_unknown_configurations(
    trained, tmp_path, capsys
):
    copy = tmp_path / "W" / "tiny"
    shutil.copytree(trained["ws"].root, copy)
    os.remove(copy / "selection.json")
    with pytest.raises(AutounetError, match="run `autounet select tiny"):
        api.package(copy, tmp_path / "a.zip")
    existing = tmp_path / "taken.zip"
    existing.write_bytes(b"not mine")
    assert main(["package", str(trained["ws"].root), "-o", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"not mine"
    with pytest.raises(AutounetError, match="'3d_lowres' is not planned"):
        api.package(trained["ws"].root, tmp_path / "b.zip", configurations=["3d_lowres"])
    with pytest.raises(AutounetError, match="fold_4: not found"):
        api.package(trained["ws"].root, tmp_path / "c.zip", folds=[4])
    with pytest.raises(AutounetError, match=r"\.zip file"):
        api.package(trained["ws"].root, tmp_path / "d.tar")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["taken.zip"]


# ---------------------------------------------------------------------------------------------
# Crafted bad packages: each is refused with nothing unpacked
# ---------------------------------------------------------------------------------------------


def _entries(package: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(package) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def craft(
    package: Path,
    out: Path,
    *,
    drop: tuple[str, ...] = (),
    replace: dict[str, bytes] | None = None,
    add: dict[str, bytes] | None = None,
    listed: bool = False,
    manifest_edit=None,
    attributes: dict[str, int] | None = None,
) -> Path:
    """A copy of ``package`` with entries dropped, replaced or added (names relative to ``tiny/``
    unless they start with ``/`` or hold ``..``). ``listed``: the manifest lists the replaced and
    added files with their true checksums (so that only the defect meant is left)."""
    replace, add, attributes = replace or {}, add or {}, attributes or {}
    manifest = json.loads(dict((i.filename, d) for i, d in _entries(package))["tiny/manifest.json"])
    originals = {i.filename.removeprefix("tiny/"): d for i, d in _entries(package)}
    replace = {k: v(originals[k]) if callable(v) else v for k, v in replace.items()}
    if listed:
        for name, data in {**replace, **add}.items():
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if manifest_edit is not None:
        manifest_edit(manifest)
    with zipfile.ZipFile(out, "w") as archive:
        for info, data in _entries(package):
            name = info.filename.removeprefix("tiny/")
            if name in drop:
                continue
            if name == "manifest.json":
                data = json.dumps(manifest).encode()
            new = replace.get(name, data)
            archive.writestr(info, new(data) if callable(new) else new)
        for name, data in add.items():
            full = name if name.startswith("/") or ".." in name else f"tiny/{name}"
            info = zipfile.ZipInfo(full)
            info.external_attr = attributes.get(name, 0o100644) << 16
            archive.writestr(info, data)
    return out


def _pickled_code() -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": "autounet-checkpoint", "version": 1, "call": os.getcwd}, buffer)
    return buffer.getvalue()


def _set(path: list[str], value):
    def edit(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


PLANS = "plans.json"
BAD_PACKAGES = {
    "changed_file": (dict(replace={PLANS: b'{"changed": true}'}), "checksum mismatch: tiny/plans.json"),
    "changed_bytes": (
        dict(replace={PLANS: lambda data: data.replace(b'"tiny"', b'"tinz"', 1)}),
        "checksum mismatch: tiny/plans.json differs from the manifest",
    ),
    "missing_file": (dict(drop=("fingerprint.json",)), "fingerprint.json listed in the manifest but missing"),
    "extra_file": (dict(add={"results/2d/notes.json": b"{}"}), "results/2d/notes.json in the package but not"),
    "parent_path": (dict(add={"tiny/../escape.json": b"{}"}), "would leave the package's folder"),
    "absolute_path": (dict(add={"/etc/escape.json": b"{}"}), "absolute or unsafe path"),
    "symlink": (
        dict(add={"link.json": b"/etc/passwd"}, attributes={"link.json": stat.S_IFLNK | 0o777}),
        "is a symbolic link",
    ),
    "fifo": (
        dict(add={"pipe.json": b""}, attributes={"pipe.json": stat.S_IFIFO | 0o644}),
        "not a regular file or folder",
    ),
    "format_version": (dict(manifest_edit=_set(["format_version"], 3)), "package format version 3 is not supported"),
    "no_manifest": (dict(drop=("manifest.json",)), "no tiny/manifest.json"),
    "manifest_field_missing": (dict(manifest_edit=_set(["license"], KeyError)), "missing field 'license'"),
    "manifest_field_mistyped": (
        dict(manifest_edit=_set(["files", PLANS, "size"], "big")),
        "files.plans.json.size: expected an integer",
    ),
    "pickle_file": (dict(add={"model.pkl": b"\x80\x04K\x01."}, listed=True), "not a kind of file a package may hold"),
    "code_in_checkpoint": (
        dict(replace={"results/2d/fold_0/checkpoint_final.pt": _pickled_code()}, listed=True),
        "Python objects other than tensors",
    ),
    "checkpoint_not_a_checkpoint": (
        dict(replace={"results/2d/fold_0/checkpoint_final.pt": b"not a torch file"}, listed=True),
        "results/2d/fold_0/checkpoint_final.pt",
    ),
    "png_not_a_png": (
        dict(add={"report/training_curves.png": b"<svg/>"}, listed=True),
        "not a PNG picture",
    ),
    "malformed_selection": (
        dict(replace={"selection.json": b'{"schema_version": 1}'}, listed=True),
        "missing field",
    ),
}


@pytest.mark.parametrize("defect", sorted(BAD_PACKAGES))
def test_a_crafted_bad_package_is_refused_with_nothing_unpacked(trained, tmp_path, cache, defect):
    changes, message = BAD_PACKAGES[defect]
    bad = craft(trained["package"], tmp_path / f"{defect}.zip", **changes)
    with pytest.raises(AutounetError) as refused:
        open_package(bad)
    assert str(bad) in str(refused.value) and message in str(refused.value)
    assert nothing_in(cache)


def test_a_non_zip_or_truncated_file_is_refused_naming_it(trained, tmp_path, cache):
    text = tmp_path / "model.zip"
    text.write_text("a text file")
    truncated = tmp_path / "truncated.zip"
    data = trained["package"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (text, truncated):
        with pytest.raises(AutounetError, match=re.escape(f"{path}: not a model package: not a zip archive")):
            open_package(path)
    with pytest.raises(AutounetError, match="model package not found"):
        open_package(tmp_path / "missing.zip")
    assert nothing_in(cache)


def test_bad_packages_exit_2_through_the_cli_and_leave_no_output(trained, tmp_path, cache, capsys):
    bad = craft(trained["package"], tmp_path / "bad.zip", replace={PLANS: b"{}"})
    out = tmp_path / "out"
    code = main(["predict", "-i", str(trained["raw"] / "imagesTs"), "-o", str(out), "-m", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}: checksum mismatch" in err
    assert main(["info", str(bad)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not out.exists() and nothing_in(cache)


def test_an_interrupted_unpack_leaves_nothing_and_the_next_open_unpacks(trained, cache, monkeypatch):
    package = trained["package"]
    stale = package_cache_dir() / f"{PREFIX}{_host_token()}-{2**22 + 12345}.abc.0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "partial.pt").write_bytes(b"half")

    def killed(*args):
        raise KeyboardInterrupt

    original = package_open._check_content
    monkeypatch.setattr(package_open, "_check_content", killed)
    with pytest.raises(KeyboardInterrupt):
        open_package(package)
    assert sorted(p.name for p in package_cache_dir().iterdir()) == []  # its own temporary and the stale one gone
    monkeypatch.setattr(package_open, "_check_content", original)
    root = open_package(package)
    assert (root / "plans.json").is_file()


def test_a_concurrent_unpack_of_the_same_package_uses_the_first_copy(trained):
    package = trained["package"]
    root = open_package(package)
    digest = package_open.package_sha256(package)
    # a second process that verified the package before the first renamed its copy into place
    with open(package, "rb") as fh:
        listing = package_open._list_package(fh, package)
    again = package_open._unpack(package, package, listing, digest, None)
    assert again == root
    assert [p.name for p in package_cache_dir().iterdir()] == [digest]


def test_a_changed_unpacked_copy_is_not_used_but_rebuilt_from_the_package(trained):
    root = open_package(trained["package"])
    final = checkpoint_path(root / "results" / "2d" / "fold_0", "final")
    original = final.read_bytes()
    final.unlink()
    assert open_package(trained["package"]) == root
    assert final.read_bytes() == original


def test_info_describes_a_workspace_and_a_package(trained, capsys):
    ws, package = trained["ws"], trained["package"]
    of_workspace, of_package = api.info(ws.root), api.info(package)
    selection = load_selection(ws.selection_json)
    for info in (of_workspace, of_package):
        assert info.dataset == "tiny" and info.labels == {"0": "background", "1": "class_1", "2": "class_2"}
        assert info.channels == ["T1"] and info.normalization == ["zscore"]
        assert info.model == selection.winner.name and info.folds == [0, 1]
        assert [c.name for c in info.configurations] == selection.winner.members
        assert all(c.checkpoints == ["final"] for c in info.configurations)
        assert info.training_cases == 8 and info.cv_cases == selection.n_cases
        assert info.cv_dice == selection.ranking[0].foreground_dice
        assert info.cv_dice_postprocessed == selection.postprocessing.dice_after
        assert info.postprocessing == selection.chosen_postprocessing().describe()
    assert of_workspace.package is None
    details = of_package.package
    assert details.license == "CC0-1.0" and details.description == "tiny test model" and details.format_version == 2
    assert details.torch_version == torch.__version__ and details.sha256 == package_open.package_sha256(package)
    assert main(["info", str(package)]) == 0
    printed = capsys.readouterr().out
    assert "license: CC0-1.0" in printed and "labels: 0 background, 1 class_1, 2 class_2" in printed
    assert f"mean foreground Dice {selection.ranking[0].foreground_dice:.4f}" in printed
    assert main(["info", str(ws.root)]) == 0
    assert "workspace" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Files from strangers (issue 21): old torch, one read, caps, the cache, contents, temporaries
# ---------------------------------------------------------------------------------------------


def test_packages_and_checkpoints_are_refused_on_a_torch_whose_safe_loader_is_unsafe(trained, monkeypatch, cache):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    with pytest.raises(AutounetError, match=r"torch 2\.9\.1\+cpu cannot load model files safely.*torch>=2\.10"):
        open_package(trained["package"])
    final = checkpoint_path(trained["ws"].fold_dir("2d", 0), "final")
    with pytest.raises(AutounetError, match=re.escape(f"{final}: refused: torch 2.9.1+cpu")):
        load_checkpoint(final)
    assert nothing_in(cache)


def test_a_package_swapped_while_it_is_opened_is_keyed_by_what_was_unpacked(trained, tmp_path, monkeypatch):
    genuine = trained["package"].read_bytes()
    other = craft(trained["package"], tmp_path / "b.zip", manifest_edit=_set(["description"], "package B"))
    target = tmp_path / "model.zip"
    target.write_bytes(genuine)
    hash_stream = package_open.sha256_of_stream
    swapped = []

    def hash_then_swap(stream, *args):
        result = hash_stream(stream, *args)
        if not swapped:  # the package is replaced right after its first hash
            swapped.append(True)
            os.replace(other, target)
        return result

    monkeypatch.setattr(package_open, "sha256_of_stream", hash_then_swap)
    root = open_package(target)
    monkeypatch.setattr(package_open, "sha256_of_stream", hash_stream)
    assert root.parent.name == hashlib.sha256(target.read_bytes()).hexdigest()  # the key is what was unpacked
    assert json.loads((root / "manifest.json").read_bytes())["description"] == "package B"
    # the genuine package opens as itself, never as B
    target.write_bytes(genuine)
    again = open_package(target)
    assert again.parent.name == hashlib.sha256(genuine).hexdigest()
    assert json.loads((again / "manifest.json").read_bytes())["description"] == "tiny test model"


def _zip_with(package: Path, out: Path, extra: dict[str, bytes], compress: bool = True) -> Path:
    """``package`` with ``extra`` files added (listed in the manifest with their true checksums)."""
    entries = _entries(package)
    manifest = json.loads(dict((i.filename, d) for i, d in entries)["tiny/manifest.json"])
    for name, data in extra.items():
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with zipfile.ZipFile(out, "w") as archive:
        for info, data in entries:
            archive.writestr(info, json.dumps(manifest).encode() if info.filename.endswith("manifest.json") else data)
        for name, data in extra.items():
            info = zipfile.ZipInfo(f"tiny/{name}")
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            archive.writestr(info, data)
    return out


def test_zip_bombs_are_refused_before_anything_is_written(trained, tmp_path, cache, monkeypatch, capsys):
    # 10 MB of one byte deflates to 10 kB: refused by its compression ratio, nothing unpacked
    bomb = _zip_with(trained["package"], tmp_path / "bomb.zip", {"notes.json": b" " * (10 << 20)})
    assert bomb.stat().st_size - trained["package"].stat().st_size < 100_000
    assert main(["info", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert f"{bomb}: refused: entry 'tiny/notes.json' is compressed" in err and "zip bomb" in err
    assert nothing_in(cache)
    # declared sizes over the caps of their kind
    monkeypatch.setitem(package_open.MEMBER_LIMITS, ".json", 1000)
    with pytest.raises(
        AutounetError, match=r"refused: entry 'tiny/\w+\.json' declares \d+ bytes, over the cap of 1000"
    ):
        open_package(trained["package"])
    assert nothing_in(cache)


def test_overlapping_zip_entries_are_refused(trained, tmp_path, cache):
    base = _zip_with(trained["package"], tmp_path / "two.zip", {"a.md": b"a" * 100, "b.md": b"b" * 100}, False)
    data = bytearray(base.read_bytes())
    with zipfile.ZipFile(base) as archive:
        a = archive.getinfo("tiny/a.md").header_offset
    # the last central directory entry (b.md) points at a.md's local header: one stored range, two files
    directory = data.rfind(b"PK\x01\x02")
    data[directory + 42 : directory + 46] = a.to_bytes(4, "little")
    overlapping = tmp_path / "overlap.zip"
    overlapping.write_bytes(bytes(data))
    with pytest.raises(AutounetError, match=re.escape(f"{overlapping}: refused: entries") + ".*overlap"):
        open_package(overlapping)
    assert nothing_in(cache)


def test_a_same_size_edit_of_the_cache_is_found_and_rebuilt_from_the_package(trained):
    root = open_package(trained["package"])
    final = checkpoint_path(root / "results" / "3d_fullres" / "fold_1", "final")
    original = final.read_bytes()
    edited = bytearray(original)
    edited[-100] ^= 0xFF  # same size, another weight
    final.write_bytes(bytes(edited))
    assert open_package(trained["package"]) == root
    assert final.read_bytes() == original


def test_symbolic_links_in_the_cache_are_never_followed(trained, tmp_path):
    package = trained["package"]
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    # someone who can write to the cache plants the entry as a link to a poisoned copy
    genuine = open_package(package).parent
    poisoned = tmp_path / "poisoned"
    shutil.copytree(genuine, poisoned)
    final = checkpoint_path(poisoned / "tiny" / "results" / "2d" / "fold_0", "final")
    data = bytearray(final.read_bytes())
    data[-100] ^= 0xFF
    final.write_bytes(bytes(data))
    shutil.rmtree(genuine)
    genuine.symlink_to(poisoned, target_is_directory=True)
    root = open_package(package)
    entry = package_cache_dir() / digest
    assert root == entry / "tiny" and not entry.is_symlink()
    assert (
        hashlib.sha256(checkpoint_path(root / "results" / "2d" / "fold_0", "final").read_bytes()).hexdigest()
        == (
            json.loads((root / "manifest.json").read_bytes())["files"]["results/2d/fold_0/checkpoint_final.pt"][
                "sha256"
            ]
        )
    )
    assert poisoned.is_dir()  # the link was removed, not what it pointed to
    # a link inside the entry (to a file of the same content) is not used either
    plans = root / "plans.json"
    outside = tmp_path / "plans.json"
    outside.write_bytes(plans.read_bytes())
    plans.unlink()
    plans.symlink_to(outside)
    assert open_package(package) == root and not plans.is_symlink()


def test_cache_entries_are_readable_by_other_users_and_one_that_cannot_be_replaced_is_named(trained, monkeypatch):
    old = os.umask(0o022)
    try:
        root = open_package(trained["package"])
    finally:
        os.umask(old)
    for path in (root.parent, root, root / "plans.json", root / "results" / "2d" / "fold_0"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
    (root / "plans.json").write_bytes(b"{}")
    rename = os.rename

    def not_allowed(source, target):
        if Path(source) == root.parent:
            raise PermissionError(1, "Operation not permitted", str(source))
        return rename(source, target)

    monkeypatch.setattr(package_open.os, "rename", not_allowed)
    with pytest.raises(AutounetError, match=r"tiny/plans\.json differs from the package.*another user of this cache"):
        open_package(trained["package"])


def test_a_cascade_package_with_fewer_folds_carries_every_first_stage_fold(trained, tmp_path):
    ws = trained["ws"]
    plans = load_plans(ws.plans_json)
    # 2d as the first stage of 3d_fullres, and both members of the model (as 3d_lowres + 3d_cascade_fullres)
    plans.configurations["3d_fullres"].previous_stage = "2d"
    stages = _stages_to_package(ws, plans, Winner("2d+3d_fullres", ["2d", "3d_fullres"], [1]))
    assert stages == {"2d": ["0", "1"], "3d_fullres": ["1"]}
    copy = tmp_path / "W" / "tiny"
    shutil.copytree(ws.root, copy)
    document = json.loads((copy / "plans.json").read_text())
    document["configurations"]["3d_fullres"]["previous_stage"] = "2d"
    (copy / "plans.json").write_text(json.dumps(document))
    created = api.package(copy, tmp_path / "cascade.zip", configurations=["2d", "3d_fullres"], folds=[1])
    assert created.checkpoints == 3
    root = open_package(tmp_path / "cascade.zip")
    # what `predict` loads for the first stage (every fold present) is what the workspace holds
    assert sorted(p.name for p in (root / "results" / "2d").iterdir()) == ["fold_0", "fold_1"]


def test_a_package_carries_no_training_data_unless_asked(trained, tmp_path, capsys):
    with zipfile.ZipFile(trained["package"]) as archive:
        names = set(archive.namelist())
        fingerprint = json.loads(archive.read("tiny/fingerprint.json"))
        dataset = json.loads(archive.read("tiny/dataset.json"))
    assert not any(n.endswith((".png", ".md")) for n in names)
    assert "cases" not in fingerprint and fingerprint["num_cases"] == 8
    assert "training" not in dataset and "test" not in dataset
    with_report = tmp_path / "report.zip"
    assert main(["package", str(trained["ws"].root), "-o", str(with_report), "--with-report"]) == 0
    with zipfile.ZipFile(with_report) as archive:
        names = set(archive.namelist())
    assert "tiny/report.md" in names and any(n.startswith("tiny/report/") and n.endswith(".png") for n in names)
    capsys.readouterr()
    assert main(["info", str(trained["package"])]) == 0
    out = capsys.readouterr().out
    assert "fingerprint.json (dataset summary, no per-case data)" in out and "no report" in out
    assert main(["info", str(with_report)]) == 0
    assert "report.md and" in capsys.readouterr().out


def test_deeply_nested_json_is_one_error_naming_the_file(trained, tmp_path, cache, capsys):
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(AutounetError, match=re.escape(f"{tmp_path / 'deep.json'}: refused: JSON nested too deeply")):
        (tmp_path / "deep.json").write_bytes(deep)
        read_json(tmp_path / "deep.json")
    bad = craft(trained["package"], tmp_path / "deep.zip", replace={"manifest.json": deep})
    assert main(["info", str(bad)]) == 2
    assert f"{bad}: tiny/manifest.json: refused: JSON nested too deeply" in capsys.readouterr().err
    copy = tmp_path / "W" / "tiny"
    shutil.copytree(trained["ws"].root, copy)
    (copy / "selection.json").write_bytes(deep)
    assert main(["info", str(copy)]) == 2
    assert f"{copy / 'selection.json'}: refused: JSON nested too deeply" in capsys.readouterr().err
    assert nothing_in(cache)


def _checkpoint_without(package: Path, name: str, edit) -> bytes:
    with zipfile.ZipFile(package) as archive:
        content = torch.load(io.BytesIO(archive.read(f"tiny/{name}")), weights_only=True)
    edit(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("network_spec"), "'network_spec' is missing"),
        (lambda c: c.pop("state_dict"), "'state_dict' is missing"),
        (lambda c: c.update(state_dict={"w": 1}), "'state_dict' must map names to tensors"),
        (lambda c: c.update(labels=[1, 2]), "'labels' is a list"),
        (lambda c: c["state_dict"].popitem(), "the weights do not fit the stored network"),
        (lambda c: next(iter(c["state_dict"].values())).fill_(float("nan")), "the weights hold NaN or infinite values"),
    ],
)
def test_a_checkpoint_without_what_predict_reads_is_refused_when_the_package_is_verified(
    trained, tmp_path, cache, edit, message
):
    name = "results/2d/fold_0/checkpoint_final.pt"
    data = _checkpoint_without(trained["package"], name, edit)
    bad = craft(trained["package"], tmp_path / "bad.zip", replace={name: data}, listed=True)
    with pytest.raises(AutounetError, match=re.escape(f"{bad}: refused: tiny/{name}: ") + ".*" + re.escape(message)):
        open_package(bad)
    assert nothing_in(cache)


def test_info_labels_the_workspaces_scores_for_a_package_of_fewer_folds(trained, tmp_path, capsys):
    subset = tmp_path / "fold1.zip"
    api.package(trained["ws"].root, subset, folds=[1])
    info = api.info(subset)
    assert info.folds == [1] and info.cv_of and "workspace's model" in info.cv_of
    assert main(["info", str(subset)]) == 0
    out = capsys.readouterr().out
    assert "(these scores are of the workspace's model" in out and "folds 0, 1; this package runs" in out
    assert api.info(trained["package"]).cv_of is None


def test_a_killed_package_write_is_removed_by_the_next_one(trained, tmp_path):
    out = tmp_path / "model.zip"
    left = tmp_path / f"{temporary_prefix().rsplit('-', 1)[0]}-{_dead_pid()}.x1y2.model.zip"
    left.write_bytes(b"half a package")
    mine = tmp_path / "notes.model.zip"  # not a temporary: left alone
    mine.write_bytes(b"mine")
    assert main(["package", str(trained["ws"].root), "-o", str(out)]) == 0
    assert not left.exists() and mine.read_bytes() == b"mine" and zipfile.is_zipfile(out)


def test_temporaries_are_judged_by_owner_boot_namespace_and_age(tmp_path):
    host = temporary_prefix().rsplit("-", 1)[0]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"{host}-{sleeper.pid}.aa.x.json"
        live.write_bytes(b"live")
        reused = tmp_path / f"{host}-{sleeper.pid}.bb.y.json"  # written before that process began
        reused.write_bytes(b"old")
        hour_ago = time.time() - 3600
        os.utime(reused, (hour_ago, hour_ago))
        other_recent = tmp_path / f"{PREFIX}00000000-{sleeper.pid}.cc.z.json"  # another machine or container
        other_recent.write_bytes(b"theirs")
        other_old = tmp_path / f"{PREFIX}00000000-1.dd.w.json"
        other_old.write_bytes(b"abandoned")
        days_ago = time.time() - 2 * STALE_AFTER_S
        os.utime(other_old, (days_ago, days_ago))
        assert sorted(remove_stale_temporaries(tmp_path)) == sorted([reused, other_old])
        assert live.exists() and other_recent.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(tmp_path) == [live]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
