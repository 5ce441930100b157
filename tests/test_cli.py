import subprocess
import sys

from oars_fast.cli import COMMANDS, main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_command_help_lists_fields():
    r = subprocess.run([sys.executable, "-m", "oars_fast.cli", "sft", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "optim.lr" in r.stdout and "sft.timestep_sampling" in r.stdout


def test_unbuilt_commands_fail_clearly(capsys):
    for name, cmd in COMMANDS.items():
        if cmd.runner is None:
            assert main([name]) == 2
            assert "not built yet" in capsys.readouterr().err


def test_config_error_exit_code(capsys):
    assert main(["data", "data.source=nowhere"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["data", "--print-config", "data.batch_size=16"]) == 0
    assert "batch_size: 16" in capsys.readouterr().out


def test_launcher_local_rank_is_accepted_before_and_after_the_command(capsys):
    # the deepspeed launcher passes --local_rank=N before the command; older launchers after it
    assert main(["--local_rank=1", "sft", "--print-config", "deepspeed.zero_stage=3"]) == 0
    assert "zero_stage: 3" in capsys.readouterr().out
    assert main(["rl", "--print-config", "--local_rank=0"]) == 0
    capsys.readouterr()
    assert main(["rl", "--print-config", "deepspeed.enabled=off"]) == 0
    assert "enabled: 'off'" in capsys.readouterr().out  # a bare YAML off (a boolean) means 'off'


def test_data_command_on_folder(image_dir, tmp_path, capsys):
    rc = main(["data", "data.source=hr", f"data.hr_dir={image_dir}", "data.crop_size=32", "data.batch_size=2",
               f"run.output_dir={tmp_path}", "run.name=d"])
    assert rc == 0
    assert (tmp_path / "d" / "samples" / "data_preview.png").is_file()
    assert (tmp_path / "d" / "config.yaml").is_file()
