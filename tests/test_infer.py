"""Inference: whole images and overlapping tiles, unreadable inputs skipped."""
import torch
from conftest import write_image

from oars_fast.cli import main
from oars_fast.data.images import load_image
from oars_fast.stages.infer import _ramp, _starts


def test_tiles_cover_and_ramps_blend():
    assert _starts(10, 4, 3) == [0, 3, 6]
    assert _starts(4, 8, 6) == [0]
    w = _ramp(8, 2, first=False, last=False)
    assert w[0] < w[1] < w[2] == 1 and torch.allclose(w, w.flip(0))
    # two overlapping ramps sum to 1 across the overlap
    assert torch.allclose(_ramp(8, 3, True, False)[-3:] + _ramp(8, 3, False, True)[:3], torch.ones(3))


def test_infer_whole_and_tiled_with_a_bad_file(tmp_path, tiny_base, capsys):
    lr_dir = tmp_path / "lr"
    write_image(lr_dir / "a.png", 20, 28)
    write_image(lr_dir / "b.jpg", 9, 13, seed=2)  # odd sides: padded and cropped back
    (lr_dir / "broken.png").write_bytes(b"not a png")
    common = [f"run.output_dir={tmp_path}", "run.device=cpu", f"model.pretrained={tiny_base}", "sampler.steps=3",
              f"infer.input={lr_dir}"]
    assert main(["infer", *common, "run.name=whole", f"infer.output={tmp_path / 'whole'}"]) == 0
    assert main(["infer", *common, "run.name=tiled", f"infer.output={tmp_path / 'tiled'}", "infer.tile=8",
                 "infer.tile_overlap=2", "infer.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "2 image(s) written" in out and "1 skipped" in out and "broken.png" in out
    for d in ("whole", "tiled"):
        a, b = load_image(tmp_path / d / "a.png"), load_image(tmp_path / d / "b.png")
        assert a.shape == (3, 80, 112) and b.shape == (3, 36, 52)
        assert torch.isfinite(a).all()


def test_infer_back_projection_projects_the_sampled_output(tmp_path, tiny_base):
    """infer.back_projection=k: the written image is the sampler's output back-projected k times onto its LR."""
    from oars_fast.models.consistency import back_project

    lr_dir = tmp_path / "lr"
    write_image(lr_dir / "a.png", 12, 16)
    common = [f"run.output_dir={tmp_path}", "run.device=cpu", f"model.pretrained={tiny_base}", "sampler.steps=2",
              f"infer.input={lr_dir}"]
    assert main(["infer", *common, "run.name=raw", f"infer.output={tmp_path / 'raw'}"]) == 0
    assert main(["infer", *common, "run.name=bp", f"infer.output={tmp_path / 'bp'}", "infer.back_projection=2"]) == 0
    files = (lr_dir / "a.png", tmp_path / "raw" / "a.png", tmp_path / "bp" / "a.png")
    lr, raw, bp = (load_image(p)[None] for p in files)
    # the raw file is 8-bit rounded, the projection ran on the float output: within two 8-bit levels
    assert (bp - back_project(raw, lr, 2)).abs().max() <= 2.5 / 255
    assert not torch.equal(bp, raw)
