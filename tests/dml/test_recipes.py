"""recipes/*.toml, the paper's settings (issue #13, finding 11): each parses, and each runs one epoch end to
end on generated data laid out as its dataset (CUB-200-2011, CARS196, Stanford Online Products), with the
recipe's backbone, embedding dimension, loss and options, and only the size-dependent settings overridden
(data root, no weight file, 32 px, batch 8, one epoch, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest

from dml.config import parse_config
from dml.train import main
from tests.dml.tiny_runs import REPO, make_folder_dataset

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


def test_the_paper_settings_are_all_there():
    names = {path.stem for path in RECIPES}
    assert {f"{ds}_resnet50_{dim}" for ds in ("cub200", "cars196", "sop") for dim in (128, 512)} <= names


def _layout(dataset: str, root):
    """Generated images (8 classes × 4) in the dataset's own layout; returns the data root."""
    flat = make_folder_dataset(root / "flat", classes=8)
    classes = sorted(flat.iterdir())
    if dataset in ("cub200", "cars196"):
        for i, folder in enumerate(classes, 1):
            name = f"{i:03d}.Bird_{i}" if dataset == "cub200" else str(i)
            shutil.copytree(folder, root / dataset / "images" / name)
        return root / dataset
    sop = root / "sop"
    lines = {"train": [], "test": []}
    for i, folder in enumerate(classes, 1):
        which = "train" if i <= 4 else "test"
        for j, image in enumerate(sorted(folder.iterdir())):
            rel = f"bicycle_final/{i}_{j}.png"
            (sop / "bicycle_final").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, sop / rel)
            lines[which].append(f"{len(lines[which]) + 1} {i} 1 {rel}")
    for which, rows in lines.items():
        (sop / f"Ebay_{which}.txt").write_text("image_id class_id super_class_id path\n" + "\n".join(rows) + "\n")
    return sop


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_dry_runs(recipe, tmp_path):
    config = parse_config(["--config", str(recipe)])
    assert config.backbone == "resnet50" and config.embed_dim in (128, 512) and config.loss == "el_nivmf"
    assert str(config.embed_dim) in recipe.stem and config.dataset in recipe.stem
    data_root = _layout(config.dataset, tmp_path)
    out = tmp_path / "run"
    code = main(["--config", str(recipe), "--data-root", str(data_root), "--weights", "none", "--resolution", "32",
                 "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8", "--device", "cpu",
                 "--degradation-images", "4", "--output-dir", str(out)])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["loss_options"] == config.loss_options and saved["embed_dim"] == config.embed_dim
    assert json.loads((out / "final_metrics.json").read_text())["selected_epoch"] == 1
