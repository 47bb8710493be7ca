import json
import subprocess
import sys

from click.testing import CliRunner

from turbotrt.cli import main


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("inspect", "presets", "random-checkpoint"):
        assert cmd in r.output


def test_presets_json_is_generated_from_configs():
    from turbotrt.core.configs import PRESETS

    r = CliRunner().invoke(main, ["presets", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output) == {n: json.loads(json.dumps(c.to_dict())) for n, c in PRESETS.items()}


def test_random_checkpoint_then_inspect(tmp_path):
    path = tmp_path / "tiny.safetensors"
    runner = CliRunner()
    r = runner.invoke(main, ["random-checkpoint", str(path), "--preset", "wan-tiny", "--quant"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "wan-tiny" in r.output and "w8a8" in r.output and "loads         yes" in r.output


def test_inspect_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code != 0 and "could not be read" in r.output


def test_unknown_preset_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["random-checkpoint", str(tmp_path / "x.pth"), "--preset", "nope"])
    assert r.exit_code == 2 and "is not one of" in r.output and "wan-tiny" in r.output


def test_console_script_help_runs():
    r = subprocess.run([sys.executable, "-m", "turbotrt.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "TurboDiffusion" in r.stdout


def test_generate_tiny_video(tmp_path):
    from turbotrt.core.video import read_mp4

    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--out", str(out), "--steps", "1", "--frames", "5"])
    assert r.exit_code == 0, r.output
    assert read_mp4(out).shape == (5, 64, 128, 3)
    r = CliRunner().invoke(main, ["generate", "--preset", "wan2.1-t2v-1.3b", "--out", str(out)])
    assert r.exit_code == 2 and "tiny" in r.output
