"""The ``legokit`` command's argument handling (errors come before any work)."""

from legokit.cli import main


def test_resume_of_a_directory_without_a_run_is_an_error(tmp_path, capsys):
    assert main(["run", "--config", "quick", "--out", str(tmp_path / "nothing-here"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no run (no config.yaml)" in err and "drop --resume" in err
    assert not (tmp_path / "nothing-here").exists()  # nothing was started


def test_eval_rejects_an_unknown_scoring_before_loading_a_model(tmp_path, capsys):
    assert main(["eval", "--scoring", "letters", "--out", str(tmp_path / "z")]) == 2
    assert "eval.scoring='letters' is unknown" in capsys.readouterr().err
