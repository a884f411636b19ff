import importlib.util
import pathlib

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_trains_and_reports_margins(capsys):
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--steps", "60"])
    output = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in output.splitlines() if "loss" in line]
    assert losses[-1] < losses[0]
    assert "class margin" in output and "sample margin: mean" in output
