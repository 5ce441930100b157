"""`oars-fast eval-pairs` on a known-severity ladder laid out as SRIQA-Bench-style groups."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_annotate import SEVERITIES, _degrade

from oars_fast.cli import main
from oars_fast.data.images import save_image
from oars_fast.stages.eval_pairs import prefs_matrix


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    from oars_fast.data.demo import demo_photos

    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(1)
    for name, img in list(sorted(demo_photos().items()))[:4]:
        h, w = img.shape[:2]
        hr = torch.from_numpy(np.ascontiguousarray(img[(h - 96) // 2:(h + 96) // 2, (w - 96) // 2:(w + 96) // 2]))
        hr = hr.permute(2, 0, 1).float() / 255
        save_image(hr, root / name / "gt.png")
        save_image(F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1),
                   root / name / "lr.png")
        for i, sev in enumerate(SEVERITIES):
            save_image(_degrade(hr, sev, g), root / name / "sr" / f"sev{i}.png")
        (root / name / "prefs.json").write_text(json.dumps({"ranking": [f"sev{i}" for i in range(len(SEVERITIES))]}))
    return root


@pytest.mark.parametrize("scorer,at_least", [("ssim", 0.99), ("classical_nr", 0.8)])
def test_pairwise_accuracy_of_scorers_on_the_ladder(pairs_root, tmp_path, scorer, at_least, capsys):
    assert main(["eval-pairs", f"pairs.root={pairs_root}", f"pairs.scorer={scorer}", f"run.output_dir={tmp_path}",
                 "run.name=p", "run.device=cpu"]) == 0
    out = json.loads((tmp_path / "p" / "pairs.json").read_text())
    assert out["pairs"] == 4 * 15 and len(out["groups"]) == 4
    assert out["accuracy"] >= at_least, out["accuracy"]
    assert "accuracy" in capsys.readouterr().out


def test_preference_formats_agree():
    names = ["a", "b", "c"]
    by_rank = prefs_matrix({"ranking": ["b", "a", "c"]}, names, "x")
    by_score = prefs_matrix({"scores": {"a": 2, "b": 3, "c": 1}}, names, "x")
    by_matrix = prefs_matrix({"names": ["b", "a", "c"], "prefs": [[0.5, 1, 1], [0, 0.5, 1], [0, 0, 0.5]]}, names, "x")
    assert np.array_equal(by_rank, by_score) and np.array_equal(by_rank, by_matrix)
    assert by_rank[1, 0] == 1 and by_rank[0, 2] == 1 and by_rank[2, 1] == 0
