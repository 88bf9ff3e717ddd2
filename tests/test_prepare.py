"""`vqpix prepare` / `prepare_adni`: NIfTI volumes + a diagnosis CSV -> the slice layout.

The volumes are one synthetic phantom sampled on differently oriented voxel grids: a graded
ellipsoid "brain" with a bright marker in the left, anterior, superior part. Whatever the grid,
the marker must land on the same side of the prepared images.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keras_vqpix.data import adni, discover_splits, patient_and_slice
from keras_vqpix_cli.main import main
from keras_vqpix_cli.prepare import PLANES as CLI_PLANES

SHAPE = (40, 48, 40)
MARKER = np.array([-8.0, 8.0, 6.0])  # left, anterior, superior of the brain's centre (mm)


def phantom(world: np.ndarray) -> np.ndarray:
    """Intensity at RAS points `[..., 3]` in mm: brighter inside, marker at 300, 0 outside."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    r2 = (x / 15) ** 2 + (y / 19) ** 2 + (z / 15) ** 2
    brain = np.where(r2 <= 1, 120 - 60 * r2, 0.0)
    marker = ((world - MARKER) ** 2).sum(-1) <= 4.0**2
    return np.where(marker, 300.0, brain)


def rotation(degrees: float, axis: int) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


# Voxel axes -> world directions (columns), and the grid shape that covers the phantom.
# "oblique" stores posterior/inferior/right (PIR) axes, then tilts them by 25 and 15 degrees.
PIR = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
GRIDS = {
    "RAS": (np.eye(3), SHAPE),
    "LPS": (np.diag([-1.0, -1.0, 1.0]), SHAPE),
    "oblique": (rotation(25, 2) @ rotation(15, 0) @ PIR, (48, 40, 40)),
    "anisotropic": (np.diag([1.0, 2.0, 1.5]), (40, 24, 27)),
}


def sample_volume(
    orientation: str = "RAS", centre_voxel=None, shape=None
) -> tuple[np.ndarray, np.ndarray]:
    """The phantom on a grid; its centre sits at `centre_voxel` (default: the grid's middle)."""
    linear, default_shape = GRIDS[orientation]
    shape = shape or default_shape
    centre = (np.array(shape) - 1) / 2 if centre_voxel is None else np.asarray(centre_voxel)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ centre
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ linear.T + affine[:3, 3]
    return phantom(world).reshape(shape).astype(np.float32), affine


def save_volume(path: Path, orientation: str = "RAS", extra_dims: tuple[int, ...] = ()) -> Path:
    data, affine = sample_volume(orientation)
    if extra_dims:
        data = np.broadcast_to(data[..., None], data.shape + extra_dims).copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_labels(path: Path, rows, header=("Subject", "Group"), delimiter=",") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_cohort(root: Path, ad: int = 3, nc: int = 3, orientations=("RAS",)) -> tuple[Path, Path]:
    """`root/volumes/ADNI_<subject>_MR.nii.gz` and `root/labels.csv`, one volume per subject."""
    rows = []
    for index in range(ad + nc):
        subject = f"{100 + index:03d}_S_{index:04d}"
        save_volume(
            root / "volumes" / f"ADNI_{subject}_MR.nii.gz",
            orientations[index % len(orientations)],
        )
        rows.append((subject, "AD" if index < ad else "CN"))
    return root / "volumes", write_labels(root / "labels.csv", rows)


def prepare(*args: str):
    return CliRunner().invoke(main, ["prepare", *map(str, args)])


def marker_offset(images) -> tuple[float, float]:
    """(rows, columns) from the brain's centroid to the marker's, over a stack of slices."""
    stack = np.stack([np.asarray(image, np.float32) for image in images])
    marker = np.argwhere(stack > 200)[:, 1:].mean(0)
    brain = np.argwhere(stack > 5)[:, 1:].mean(0)
    return tuple(marker - brain)


def images_of(folder: Path, subject: str) -> list[np.ndarray]:
    paths = sorted(folder.glob(f"*/*/{subject}_*.jpeg"), key=lambda p: patient_and_slice(p)[1])
    return [np.asarray(Image.open(p)) for p in paths]


# Radiological convention: (rows, columns) direction of the left-anterior-superior marker.
# Negative rows = towards the top; positive columns = towards the image's right.
EXPECTED_SIDE = {"axial": (-1, 1), "coronal": (-1, 1), "sagittal": (-1, -1)}


# --------------------------------------------------------------------------------------------
# Orientation, slice choice, intensities, resizing


@pytest.mark.parametrize("plane", adni.PLANES)
def test_marker_lands_on_the_same_side_for_ras_lps_and_oblique_volumes(tmp_path, plane):
    rendered = {}
    for orientation in ("RAS", "LPS", "oblique"):
        path = save_volume(tmp_path / f"{orientation}.nii.gz", orientation)
        _, images = adni.render_volume(path, slices=20, plane=plane, size=(128, 120))
        rows, cols = marker_offset(images)
        expected_rows, expected_cols = EXPECTED_SIDE[plane]
        assert rows * expected_rows > 5, (orientation, rows, cols)
        assert cols * expected_cols > 5, (orientation, rows, cols)
        rendered[orientation] = np.stack(images)
    # LPS is the RAS grid with two axes reversed: after reorientation the slices are identical.
    np.testing.assert_array_equal(rendered["RAS"], rendered["LPS"])


def test_display_convention_of_a_ras_slab():
    slab = np.zeros((3, 4))  # axes: left->right (i), posterior->anterior (j)
    slab[0, 3] = 1  # the subject's far right, most anterior voxel
    image = adni.to_display(slab)
    assert image.shape == (4, 3)
    # Anterior at the top; the subject's right on the image's left (radiological).
    assert image[0, 2] == 1


def test_aspect_ratio_follows_voxel_spacing(tmp_path):
    def brain_box(orientation, plane):
        path = save_volume(tmp_path / f"{orientation}.nii.gz", orientation)
        _, images = adni.render_volume(path, slices=1, plane=plane, size=(200, 200))
        rows, cols = np.nonzero(images[0] > 5)
        return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1

    ratios = {}
    for plane in ("axial", "coronal"):
        height, width = brain_box("RAS", plane)
        ratios[plane] = height / width
        aniso_height, aniso_width = brain_box("anisotropic", plane)
        assert abs(aniso_height / aniso_width - ratios[plane]) < 0.06 * ratios[plane], plane
    # The brain is 38 mm front to back and 30 mm across and high: not stretched to the image.
    assert 1.15 < ratios["axial"] < 1.4
    assert 0.9 < ratios["coronal"] < 1.1


def test_window_is_centred_on_the_brain_not_on_the_array(tmp_path):
    data, affine = sample_volume("RAS", centre_voxel=(19.5, 23.5, 44), shape=(40, 48, 64))
    path = tmp_path / "offcentre.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    indices, _ = adni.render_volume(path, slices=10, plane="axial", size=(64, 60))
    assert abs(np.mean(indices) - 44) <= 0.5, indices  # the brain's centre, not 31.5


def test_centred_window_prefers_the_most_foreground_then_the_centre_of_mass():
    counts = np.array([0, 0, 5, 9, 9, 5, 0, 0, 0, 0])
    assert adni.centred_window(counts, 2) == 3
    assert adni.centred_window(counts, 4) == 2
    # A plateau longer than the window: the window centred on the centre of mass wins.
    assert adni.centred_window(np.array([0, 4, 4, 4, 4, 4, 0]), 3) == 2


def test_robust_scaling_ignores_a_hot_voxel(tmp_path):
    data, affine = sample_volume("RAS")
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "clean.nii")
    data[20, 24, 20] = 1e6
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "hot.nii")
    clean = adni.render_volume(tmp_path / "clean.nii", slices=4, plane="axial", size=(64, 60))
    hot = adni.render_volume(tmp_path / "hot.nii", slices=4, plane="axial", size=(64, 60))
    difference = np.abs(np.stack(clean[1]).astype(int) - np.stack(hot[1]).astype(int))
    brain = np.stack(clean[1]) > 5
    # Min-max scaling would squash the brain to 300/1e6 of the range, i.e. black.
    assert np.stack(hot[1])[brain].mean() > 20
    assert np.median(difference[brain]) <= 2


def test_foreground_falls_back_to_otsu_without_a_black_background():
    data, _ = sample_volume("RAS")
    noisy = data + 10 + np.random.default_rng(0).normal(0, 1, data.shape).astype(np.float32)
    mask = adni.foreground_mask(noisy)
    assert abs(mask.sum() - (data > 0).sum()) < 0.05 * (data > 0).sum()


def test_cli_planes_match_the_library():
    assert tuple(CLI_PLANES) == adni.PLANES


# --------------------------------------------------------------------------------------------
# Labels


def test_labels_accept_adni_spellings_and_report_unusable_subjects(tmp_path):
    rows = [
        ("002_S_0001", "AD"),
        ("002_S_0002", "CN"),
        ("002_S_0003", "EMCI"),
        ("002_S_0004", "Dementia"),
        ("002_S_0005", "SMC"),
        ("002_S_0006", "CN"),
        ("002_S_0006", "MCI"),
        ("002_S_0007", ""),
        ("002_S_0002", "CN"),
    ]
    table = adni.read_labels(write_labels(tmp_path / "a.csv", rows, ("PTID", "dx_bl"), ";"))
    assert table.classes == {
        "002_S_0001": "AD",
        "002_S_0002": "NC",
        "002_S_0003": "MCI",
        "002_S_0004": "AD",
    }
    assert "unknown diagnosis 'SMC'" in table.unusable["002_S_0005"]
    assert "conflicting" in table.unusable["002_S_0006"]
    assert table.unusable["002_S_0007"] == "blank diagnosis"
    assert table.diagnoses["002_S_0003"] == "EMCI"


@pytest.mark.parametrize(
    "header", [("Subject ID", "Research Group"), ("subject", "DIAGNOSIS"), ("PTID", "DX")]
)
def test_label_columns_are_found_case_insensitively(tmp_path, header):
    table = adni.read_labels(write_labels(tmp_path / "l.csv", [("002_S_0001", "AD")], header))
    assert table.classes == {"002_S_0001": "AD"}


def test_missing_label_columns_name_the_file_and_the_option(tmp_path):
    path = write_labels(tmp_path / "l.csv", [("002_S_0001", "AD")], ("RID", "Group"))
    with pytest.raises(ValueError, match=r"l\.csv has no subject column.*--subject-column"):
        adni.read_labels(path)
    table = adni.read_labels(path, subject_column="rid")
    assert table.classes == {"002_S_0001": "AD"}


def test_subject_id_comes_from_the_file_name_or_the_nearest_folder():
    assert adni.subject_from_path("ADNI_941_S_1311_MR_MPRAGE_I1.nii.gz") == "941_S_1311"
    assert adni.subject_from_path("ADNI/002_S_0295/MPRAGE/2006-04-18/I45/brain.nii") == "002_S_0295"
    assert adni.subject_from_path("scans/patient7.nii") is None


# --------------------------------------------------------------------------------------------
# A whole cohort through the CLI: mixed orientations, MCI, several visits


COHORT_AD = [f"011_S_{i:04d}" for i in range(5)]
COHORT_NC = [f"022_S_{i:04d}" for i in range(5)]
COHORT_MCI = ["033_S_0001", "033_S_0002"]
TWO_VISITS = COHORT_AD[0]
COHORT_SLICES = 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """ADNI-like download: `ADNI/<subject>/MPRAGE/<date>/<image>/ADNI_<subject>_...nii.gz`."""
    root = tmp_path_factory.mktemp("download")
    orientations = ("RAS", "LPS", "oblique")
    subjects = COHORT_AD + COHORT_NC + COHORT_MCI
    for index, subject in enumerate(subjects):
        visits = ("2006-04-18", "2007-05-02") if subject == TWO_VISITS else ("2006-04-18",)
        for visit, date in enumerate(visits):
            name = f"ADNI_{subject}_MR_MPRAGE_I{index}{visit}.nii.gz"
            # One file keeps a singleton 4th dimension, as some converters write.
            extra = (1,) if index == 3 else ()
            save_volume(
                root / "ADNI" / subject / "MPRAGE" / date / f"I{index}{visit}" / name,
                orientations[(index + visit) % 3],
                extra,
            )
    groups = ["AD"] * len(COHORT_AD) + ["CN"] * len(COHORT_NC) + ["EMCI", "LMCI"]
    # The ADNI collection CSV has one row per image; its first column is the image id.
    rows = [(f"I{i}", s, g) for i, (s, g) in enumerate(zip(subjects, groups, strict=True))]
    labels = write_labels(root / "labels.csv", rows, ("Image Data ID", "Subject", "Group"))
    return root / "ADNI", labels


@pytest.fixture(scope="module")
def prepared(cohort, tmp_path_factory):
    volumes, labels = cohort
    out = tmp_path_factory.mktemp("prepared") / "adni"
    result = prepare(
        "--volumes",
        volumes,
        "--labels",
        labels,
        "--out",
        out,
        "--slices",
        COHORT_SLICES,
        "--test-fraction",
        0.4,
        "--seed",
        3,
    )
    return out, result


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_prepare_writes_the_layout_and_a_summary(prepared):
    out, result = prepared
    assert result.exit_code == 0, result.output
    for split in ("train", "test"):
        for name in ("AD", "NC"):
            files = list((out / split / name).iterdir())
            assert files and all(f.suffix == ".jpeg" for f in files)
    image = Image.open(next((out / "train" / "AD").iterdir()))
    assert image.mode == "L" and image.size == (256, 240)
    volumes = len(COHORT_AD) + len(COHORT_NC) + 1  # one subject has two visits
    expected = f"Wrote {volumes * COHORT_SLICES} axial slices of {volumes} volumes from 10 subjects"
    assert expected in result.output
    assert "Skipped MCI subjects: 2 (033_S_0001, 033_S_0002)" in result.output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_prepared_slices_have_the_marker_on_the_same_side(prepared):
    out, _ = prepared
    for subject in COHORT_AD[1:] + COHORT_NC:  # RAS, LPS and oblique grids, one visit each
        rows, cols = marker_offset(images_of(out, subject))
        assert rows < -5 and cols > 5, (subject, rows, cols)


def test_split_is_by_subject_stratified_and_matches_the_manifest(prepared):
    out, _ = prepared
    manifest = read_manifest(out)
    split_of = {}
    for row in manifest:
        assert split_of.setdefault(row["subject"], row["split"]) == row["split"]
        assert (out / row["first_file"]).is_file()
    for subjects in (COHORT_AD, COHORT_NC):
        test = [s for s in subjects if split_of[s] == "test"]
        assert len(test) == round(0.4 * len(subjects))
    for path in out.glob("*/*/*.jpeg"):
        subject, _ = patient_and_slice(path.name)
        assert path.parts[-3] == split_of[subject]
    assert not any(s in split_of for s in COHORT_MCI)


def test_visits_of_a_subject_stay_together_with_unique_names(prepared):
    out, _ = prepared
    rows = [r for r in read_manifest(out) if r["subject"] == TWO_VISITS]
    assert [r["visit"] for r in rows] == ["0", "1"]
    files = sorted(out.glob(f"*/*/{TWO_VISITS}_*.jpeg"))
    assert len(files) == 2 * COHORT_SLICES and len({f.parent for f in files}) == 1
    numbers = sorted(patient_and_slice(f.name)[1] for f in files)
    first = int(rows[0]["first_slice"])
    assert numbers[:COHORT_SLICES] == list(range(first, first + COHORT_SLICES))
    second = int(rows[1]["first_slice"])
    assert numbers[COHORT_SLICES:] == list(range(1000 + second, 1000 + second + COHORT_SLICES))
    assert {patient_and_slice(f.name)[0] for f in files} == {TWO_VISITS}


def test_split_is_deterministic_for_a_seed(cohort, prepared, tmp_path):
    volumes, labels = cohort
    out, _ = prepared

    def splits(folder):
        return {(r["subject"], r["split"]) for r in read_manifest(folder)}

    again = tmp_path / "again"
    args = ["--volumes", volumes, "--labels", labels, "--slices", 1, "--test-fraction", 0.4]
    result = prepare(*args, "--seed", 3, "--out", again)
    assert result.exit_code == 0, result.output
    assert splits(again) == splits(out)
    others = []
    for seed in (4, 5, 6):
        result = prepare(*args, "--seed", seed, "--out", tmp_path / f"s{seed}")
        assert result.exit_code == 0, result.output
        others.append(splits(tmp_path / f"s{seed}"))
    assert any(other != splits(out) for other in others)


def test_include_mci_labels_mci_subjects_ad(cohort, tmp_path):
    volumes, labels = cohort
    out = tmp_path / "mci"
    result = prepare(
        "--volumes", volumes, "--labels", labels, "--out", out, "--slices", 2, "--include-mci"
    )
    assert result.exit_code == 0, result.output
    assert "MCI subjects labelled AD: 2" in result.output
    rows = {r["subject"]: r for r in read_manifest(out)}
    assert rows["033_S_0001"]["label"] == "AD" and rows["033_S_0001"]["diagnosis"] == "EMCI"
    assert list(out.glob("*/AD/033_S_0002_*.jpeg"))


def test_prepared_output_feeds_discover_splits_and_make_dataset(prepared):
    out, _ = prepared
    splits = discover_splits(out, 0.2, seed=0)
    assert splits.summary()["test"]["patients"] == 4
    assert not {r.patient for r in splits.train} & {r.patient for r in splits.test}
    from keras_vqpix.data import make_dataset

    images, labels = next(iter(make_dataset(splits.train, 32, 8)))
    assert tuple(images.shape) == (8, 32, 32, 1) and labels.shape == (8,)
    assert float(images.numpy().min()) >= 0.0 and float(images.numpy().max()) <= 1.0


@pytest.mark.large
def test_vqpix_train_runs_on_prepared_data(prepared, tmp_path):
    out, _ = prepared
    result = CliRunner().invoke(
        main,
        ["train", "--config", "quick", "--stage", "vqvae", "--epochs", "1"]
        + ["--data", str(out), "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "vqvae.keras").is_file()


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_volumes_and_unmatched_labels_are_skipped_and_counted(tmp_path):
    volumes, labels = make_cohort(tmp_path, orientations=("RAS", "LPS"))
    save_volume(volumes / "ADNI_200_S_0001_series.nii.gz", "RAS", (3,))
    (volumes / "ADNI_200_S_0002_broken.nii.gz").write_bytes(b"not a nifti volume at all")
    save_volume(volumes / "ADNI_200_S_0003_nolabel.nii.gz")
    blank = np.full(SHAPE, 7.0, np.float32)
    nib.save(nib.Nifti1Image(blank, np.eye(4)), volumes / "ADNI_200_S_0004_blank.nii")
    data, affine = sample_volume("RAS")
    nib.save(nib.Nifti1Image(data[:, :, 20:21], affine), volumes / "ADNI_200_S_0005_thin.nii")
    save_volume(volumes / "no_subject_id.nii")
    with open(labels, "a") as handle:
        handle.write("200_S_0001,AD\n200_S_0002,CN\n200_S_0004,CN\n200_S_0005,AD\n300_S_0001,AD\n")
    out = tmp_path / "out"
    result = prepare("--volumes", volumes, "--labels", labels, "--out", out, "--slices", 2)
    assert result.exit_code == 0, result.output
    assert "ADNI_200_S_0001_series.nii.gz: is 4-D (shape 40x48x40x3)" in result.output
    assert "ADNI_200_S_0002_broken.nii.gz: cannot be read as NIfTI" in result.output
    assert "ADNI_200_S_0003_nolabel.nii.gz: subject 200_S_0003 has no label" in result.output
    assert "no_subject_id.nii: no ADNI subject id" in result.output
    assert "ADNI_200_S_0004_blank.nii: has no foreground" in result.output
    assert (
        "ADNI_200_S_0005_thin.nii: has only 1 axial slice(s), fewer than --slices 2"
        in result.output
    )
    assert "Unreadable or unusable volumes: 4" in result.output
    assert "Subjects without an AD/NC/MCI label: 1 (200_S_0003)" in result.output
    assert "Volumes without an ADNI subject id: 1 (no_subject_id.nii)" in result.output
    assert "Labels without a volume: 1 (300_S_0001)" in result.output
    assert {r["subject"] for r in read_manifest(out)} == {
        f"{100 + i:03d}_S_{i:04d}" for i in range(6)
    }


def test_path_column_ties_rows_to_volumes_without_subject_ids(tmp_path):
    volumes = tmp_path / "volumes"
    rows = []
    for index in range(6):
        save_volume(volumes / f"scan{index}.nii.gz")
        rows.append((f"P{index}", "AD" if index % 2 else "CN", f"scan{index}.nii.gz"))
    labels = write_labels(tmp_path / "l.csv", rows, ("Subject", "Group", "Path"))
    out = tmp_path / "out"
    result = prepare("--volumes", volumes, "--labels", labels, "--out", out, "--slices", 2)
    assert result.exit_code == 0, result.output
    assert {patient_and_slice(p.name)[0] for p in out.glob("*/*/*.jpeg")} == {
        f"P{i}" for i in range(6)
    }


def test_empty_volume_folder_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    labels = write_labels(tmp_path / "l.csv", [("002_S_0001", "AD")])
    result = prepare("--volumes", tmp_path / "empty", "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "holds no .nii or .nii.gz volume" in result.output
    assert not (tmp_path / "o").exists()


def test_csv_without_the_needed_columns_exits_2(tmp_path):
    volumes, _ = make_cohort(tmp_path, 1, 1)
    labels = write_labels(tmp_path / "bad.csv", [("002_S_0001", "AD")], ("Name", "Group"))
    result = prepare("--volumes", volumes, "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "bad.csv has no subject column" in result.output
    assert "--subject-column" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_no_usable_volume_exits_2_and_writes_nothing(tmp_path):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    (volumes / "ADNI_002_S_0001.nii").write_bytes(b"\0" * 10)
    labels = write_labels(tmp_path / "l.csv", [("002_S_0001", "AD")])
    result = prepare("--volumes", volumes, "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "none of the 1 volumes" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "volumes"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    volumes, labels = make_cohort(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--volumes", volumes, "--labels", labels, "--out", out, "--slices", 2]
    result = prepare(*args)
    assert result.exit_code == 2, result.output
    assert "exists and is not empty" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = prepare(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").is_file()


def test_output_holding_the_input_is_refused(tmp_path):
    volumes, labels = make_cohort(tmp_path)
    result = prepare("--volumes", volumes, "--labels", labels, "--out", tmp_path, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "holds the input" in result.output
    assert labels.is_file()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--size", "256", "--size"),
        ("--size", "0x10", "--size"),
        ("--slices", "0", "--slices"),
        ("--test-fraction", "1", "--test-fraction"),
        ("--plane", "oblique", "--plane"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path, option, value, message):
    volumes, labels = make_cohort(tmp_path, 1, 1)
    result = prepare(
        "--volumes", volumes, "--labels", labels, "--out", tmp_path / "o", option, value
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_custom_size_and_plane(tmp_path):
    volumes, labels = make_cohort(tmp_path)
    out = tmp_path / "out"
    result = prepare(
        "--volumes",
        volumes,
        "--labels",
        labels,
        "--out",
        out,
        "--slices",
        3,
        "--size",
        "64x48",
        "--plane",
        "coronal",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "[1/" not in result.output
    assert {Image.open(p).size for p in out.glob("*/*/*.jpeg")} == {(64, 48)}
    assert {r["plane"] for r in read_manifest(out)} == {"coronal"}


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    volumes, labels = make_cohort(tmp_path)
    written = []
    real_save = adni.save_slice

    def failing_save(path, image):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(path)
        real_save(path, image)

    monkeypatch.setattr(adni, "save_slice", failing_save)
    out = tmp_path / "out"
    result = prepare("--volumes", volumes, "--labels", labels, "--out", out, "--slices", 2)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, OSError)
    assert len(written) == 5
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "volumes"]


def test_only_mci_subjects_exits_2_with_the_counts(tmp_path):
    volumes = tmp_path / "volumes"
    save_volume(volumes / "ADNI_002_S_0001.nii.gz")
    labels = write_labels(tmp_path / "l.csv", [("002_S_0001", "LMCI")])
    result = prepare("--volumes", volumes, "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "no volume under" in result.output and "1 MCI subjects skipped" in result.output
    assert not (tmp_path / "o").exists()


def test_library_validates_its_arguments(tmp_path):
    volumes, labels = make_cohort(tmp_path, 1, 1)
    for bad, message in (
        ({"slices": 0}, "Received: slices=0"),
        ({"plane": "oblique"}, "Received: plane='oblique'"),
        ({"test_fraction": 0.0}, "Received: test_fraction=0.0"),
        ({"size": (256,)}, "Received: size=(256,)"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            adni.prepare_adni(volumes, labels, tmp_path / "o", **bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adni.prepare_adni(tmp_path / "nope", labels, tmp_path / "o")
