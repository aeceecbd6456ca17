"""Runs never collide, resume is honest, nothing is lost, files are verified, configs are strict,
divergence is explained: the in-process half (the real-signal half is tests/cli/test_signals.py).

Every training here is a tiny model on the digits with one torch thread, so the whole module
stays fast on a busy machine.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest
import torch

from pyro_vae.cli.main import main
from pyro_vae.data import Dataset
from pyro_vae.evaluation.report import run_notes
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_vae.train.config import RESUMABLE, TrainConfig, load_toml
from pyro_vae.train.integrity import DataChangedError, check_data_fingerprint, data_fingerprint, state_digest
from pyro_vae.train.memory import TooLarge
from pyro_vae.train.rundir import RunLock, create_unique_run_dir, is_locked, run_status, write_atomic
from pyro_vae.train.trainer import Trainer, TrainingDiverged, train

TINY = dict(latent_dim=2, hidden=[8], batch_size=256, progress=False, patience=0)
FLAGS = ["--latent-dim", "2", "--hidden", "8", "--batch-size", "256", "--no-progress", "--patience", "0"]


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    torch.set_num_threads(1)  # several test processes share the machine: no thread contention


def _params(run_dir, name="checkpoint.pt"):
    return load_checkpoint(run_dir / name)["program"]["params"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"pyro-vae {argv[0]}: error: ")
    return err


# -- 1. run directories ------------------------------------------------------------------------------

def test_default_run_dirs_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # every name in the same second
    dirs = {create_unique_run_dir(tmp_path / "runs", "digits-trace") for _ in range(50)}
    assert len(dirs) == 50 and all(d.is_dir() for d in dirs)


def test_default_run_dir_names_are_one_folder_whatever_the_data_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert create_unique_run_dir(tmp_path, "my data/set.v2-trace").name.startswith("my-data-set.v2-trace-")
    assert create_unique_run_dir(tmp_path, "../..").parent == tmp_path
    # an unknown data name with a slash is named as unknown, not as a folder that cannot be made
    err = _error(["train", *FLAGS, "--data", "some/where.csv"], capsys)
    assert "unknown data set 'some/where.csv'" in err


def test_files_of_a_run_are_as_readable_as_any_new_file(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "status.json", "{}")
        save_checkpoint({"program": {"params": {}}, "config": {}, "input_dim": 1}, tmp_path / "checkpoint.pt")
        os.umask(0o077)
        write_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "checkpoint.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_a_run_dir_is_locked_while_written_and_released_after(tmp_path, digits):
    cfg = TrainConfig.from_flat(dict(epochs=1, run_dir=str(tmp_path / "r"), **TINY))
    trainer = Trainer(cfg, dataset=digits)
    assert is_locked(tmp_path / "r")
    trainer.fit()
    assert not is_locked(tmp_path / "r")  # released when fit returns


def test_a_run_dir_that_is_a_file_or_foreign_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in _error(["train", *FLAGS, "--run-dir", str(tmp_path / "file")], capsys)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    assert "holds no pyro-vae run" in _error(["train", *FLAGS, "--run-dir", str(tmp_path / "docs")], capsys)
    assert "Not a directory" in _error(["train", *FLAGS, "--run-dir", str(tmp_path / "file" / "sub")], capsys)


# -- 2. resume is honest -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("flags,name", [
    (["--beta", "0.5"], "beta (checkpoint 1.0, now 0.5)"),
    (["--latent-dim", "3"], "latent_dim (checkpoint 2, now 3)"),
    (["--seed", "1"], "seed (checkpoint 0, now 1)"),
    (["--batch-size", "128"], "batch_size (checkpoint 256, now 128)"),
    (["--objective", "iwae"], "objective (checkpoint 'trace', now 'iwae')"),
    (["--warmup-epochs", "1"], "warmup_epochs"),
    (["--particles", "3"], "particles (checkpoint None, now 3)"),
    (["--prior", "mixture"], "prior"),
    (["--data", "mnist"], "data (checkpoint 'digits', now 'mnist')"),
])
def test_resume_refuses_options_that_change_the_program_objective_or_batches_by_name(
        one_epoch_run, tmp_path, capsys, flags, name):
    run = _copy(one_epoch_run, tmp_path)
    err = _error(["train", "--resume", str(run), "--epochs", "2", *flags], capsys)
    assert f"cannot resume with a different {name}" in err and "may change" in err


def test_resume_with_a_new_lr_really_steps_with_it_and_records_it(tmp_path, digits):
    """Resuming with lr=b after an epoch at lr=a equals one run whose optimizer is switched to b
    at the same step: the new rate is what the optimizer uses, not only what config.json says."""
    cfg = TrainConfig.from_flat(dict(epochs=2, lr=1e-3, **TINY))
    train(cfg.replace(epochs=1, run_dir=str(tmp_path / "split")), dataset=digits)
    train(cfg.replace(lr=2e-2, run_dir=str(tmp_path / "split")), dataset=digits, resume=True)

    trainer = Trainer(cfg.replace(run_dir=str(tmp_path / "switched")), dataset=digits)
    original = trainer.program.set_progress

    def switch_lr_after_one_epoch(step, steps_per_epoch):
        if step == steps_per_epoch:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 2e-2
        original(step, steps_per_epoch)

    trainer.program.set_progress = switch_lr_after_one_epoch
    trainer.fit()
    assert _same(_params(tmp_path / "split"), _params(tmp_path / "switched"))
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == 2e-2 and state["config"]["lr"] == 2e-2
    assert json.loads((tmp_path / "split" / "config.json").read_text())["lr"] == 2e-2


def test_resume_applies_a_config_file_like_flags_and_refuses_another_run_dir(one_epoch_run, tmp_path, capsys):
    run = _copy(one_epoch_run, tmp_path)
    toml = tmp_path / "more.toml"
    toml.write_text("epochs = 2\npatience = 3\n")
    assert main(["train", "--resume", str(run), "--config", str(toml), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["epochs"], saved["patience"]) == (2, 3)  # the recorded config is what ran
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    toml.write_text("epochs = 3\nhidden = [9]\n")
    assert "different hidden (checkpoint [8], now [9])" in _error(
        ["train", "--resume", str(run), "--config", str(toml)], capsys)
    assert "differs from --resume" in _error(
        ["train", "--resume", str(run), "--run-dir", str(tmp_path / "elsewhere"), "--epochs", "3"], capsys)


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(one_epoch_run, tmp_path, capsys):
    run = _copy(one_epoch_run, tmp_path)
    before = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "config.json").read_text() == before  # nothing ran, so nothing is recorded


def test_resumable_options_are_the_documented_ones():
    assert set(RESUMABLE) == {"epochs", "max_steps", "patience", "lr", "device", "progress", "checkpoint_every",
                              "checkpoint_every_steps", "run_dir", "data_dir"}


# -- 2b. a step limit: training in pieces ---------------------------------------------------------------

def test_training_to_max_steps_in_pieces_equals_one_straight_run(tmp_path, digits):
    """Paused at step 7 (mid-epoch), resumed to step 16 (mid-epoch), then to the end: bit for bit the
    parameters and validation rows of one straight run; each pause is a paused run, not an interrupted one."""
    cfg = TrainConfig.from_flat(dict(epochs=3, **{**TINY, "batch_size": 128}))  # 11 steps an epoch
    train(cfg.replace(run_dir=str(tmp_path / "straight")), dataset=digits)
    split = tmp_path / "split"
    first = train(cfg.replace(run_dir=str(split), max_steps=7), dataset=digits)
    assert first.reached_max_steps and not first.interrupted and first.signal is None
    assert first.position == (0, 7, 7) and first.history == []
    status = run_status(split)
    assert (status["state"], status["step"], status["max_steps"]) == ("paused", 7, 7)
    assert run_notes(split) == ["incomplete: paused at step 7 (--max-steps), epoch 0/3"]
    state = load_checkpoint(split / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 7, 7)
    second = train(cfg.replace(run_dir=str(split), max_steps=16), dataset=digits, resume=True)
    assert second.reached_max_steps and second.position == (1, 5, 16) and [r["epoch"] for r in second.history] == [1]
    last = train(cfg.replace(run_dir=str(split), max_steps=0), dataset=digits, resume=True)
    assert not last.reached_max_steps and last.position == (3, 0, 33) and run_status(split)["state"] == "finished"
    assert _same(_params(tmp_path / "straight"), _params(split))
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["valid_elbo"]) for r in rows] == [(r["epoch"], r["step"], r["valid_elbo"])
                                                                         for r in straight]


def test_a_step_limit_on_an_epochs_last_batch_finishes_that_epoch_first(tmp_path, digits):
    run = tmp_path / "r"
    result = train(TrainConfig.from_flat(dict(epochs=3, max_steps=11, run_dir=str(run),
                                              **{**TINY, "batch_size": 128})), dataset=digits)
    assert result.reached_max_steps and result.position == (1, 0, 11)
    assert [r["epoch"] for r in result.history] == [1] and result.history[0]["step"] == 11
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and (run / "best.pt").is_file()
    assert run_status(run)["state"] == "paused"
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 11)


def test_a_limit_at_the_last_epochs_end_is_a_finished_run(tmp_path, digits):
    result = train(TrainConfig.from_flat(dict(epochs=1, max_steps=11, run_dir=str(tmp_path / "r"),
                                              **{**TINY, "batch_size": 128})), dataset=digits)
    assert not result.reached_max_steps and run_status(tmp_path / "r")["state"] == "finished"


def test_the_command_pauses_at_max_steps_and_a_resume_with_nothing_left_says_which_flag(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *FLAGS, "--batch-size", "128", "--epochs", "2", "--max-steps", "5",
                 "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "paused at --max-steps 5" in out and f"--resume {run}" in out
    before = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"nothing to do: the run in {run} has already taken 5 steps, --max-steps is 5; pass --max-steps with "
            "more than 5, or --max-steps 0 for no limit") in out
    assert (run / "config.json").read_text() == before
    assert main(["train", "--resume", str(run), "--no-progress", "--max-steps", "0"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 22


# -- 3. nothing lost: mid-epoch checkpoints, metrics and temporary files -------------------------------

def test_mid_epoch_checkpoints_resume_bit_for_bit(tmp_path, digits):
    """A checkpoint written every 2 steps inside an epoch resumes to the same parameters as a
    straight run (a kill then loses at most 2 steps)."""
    cfg = TrainConfig.from_flat(dict(epochs=2, **{**TINY, "batch_size": 128}))
    train(cfg.replace(run_dir=str(tmp_path / "straight")), dataset=digits)
    trainer = Trainer(cfg.replace(run_dir=str(tmp_path / "split"), checkpoint_every_steps=2), dataset=digits)
    original = trainer.program.set_progress

    def crash_at_step_15(step, steps_per_epoch):
        if step == 15:
            raise RuntimeError("simulated crash")
        original(step, steps_per_epoch)

    trainer.program.set_progress = crash_at_step_15
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 3, 14)  # 11 steps per epoch: the last even step
    train(cfg.replace(run_dir=str(tmp_path / "split")), dataset=digits, resume=True)
    assert _same(_params(tmp_path / "straight"), _params(tmp_path / "split"))


def test_resume_truncates_metrics_to_the_checkpoint_and_removes_temporary_files(one_epoch_run, tmp_path):
    run = _copy(one_epoch_run, tmp_path)
    metrics = run / "metrics.jsonl"
    row = metrics.read_text().splitlines()[0]
    later = json.dumps({**json.loads(row), "epoch": 2})  # written after the checkpoint, before a kill
    metrics.write_text(f"{row}\n{row}\n{later}\n" + '{"epoch": 3, "train_lo')  # duplicate, too new, torn
    (run / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run / ".samples-1234.tmp.png").write_bytes(b"half a picture")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == json.loads(row)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp.png"))
    assert run_status(run)["state"] == "finished"


def test_lines_that_are_not_metrics_rows_are_dropped_on_resume_and_left_out_of_the_curves(one_epoch_run, tmp_path,
                                                                                           capsys):
    run = _copy(one_epoch_run, tmp_path)
    metrics = run / "metrics.jsonl"
    row = metrics.read_text().splitlines()[0]
    junk = ['garbage', '{"epoch": "x"}', '{"epoch": 1, "valid_elbo": "nan"}', '[1, 2]', '\x00\x01', '{"epoch": 2, "tr']
    metrics.write_text("\n".join([row, *junk]) + "\n")
    assert main(["evaluate", str(run), "--particles", "4", "--num-points", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "6 line(s) are not rows of metrics" in err and (run / "training_curves.png").is_file()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == json.loads(row)  # the real row, not the edited one


def test_a_run_dir_that_is_a_link_to_nothing_is_named(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    err = _error(["train", *FLAGS, "--epochs", "1", "--run-dir", str(tmp_path / "link")], capsys)
    assert f"is a symbolic link to {tmp_path / 'gone'}, which does not exist" in err


def test_a_fresh_run_in_a_directory_left_without_checkpoint_starts_clean_metrics(tmp_path, digits):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n')  # killed before its first checkpoint
    train(TrainConfig.from_flat(dict(epochs=1, run_dir=str(run), **TINY)), dataset=digits)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


# -- 4. integrity ---------------------------------------------------------------------------------------

def _flip_one_bit_of_a_weight(path):
    state = load_checkpoint(path)
    weight = next(iter(state["program"]["params"].values()))
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(weight.numpy().tobytes()[:16])
    assert at > 0
    raw[at + 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_weight_is_refused_by_name(one_epoch_run, tmp_path, capsys):
    run = _copy(one_epoch_run, tmp_path)
    _flip_one_bit_of_a_weight(run / "best.pt")
    for argv in (["evaluate", str(run), "--particles", "5", "--no-plots"], ["sample", str(run)]):
        err = _error(argv, capsys)
        assert f"{run / 'best.pt'} is corrupt" in err and "checksum" in err
    _flip_one_bit_of_a_weight(run / "checkpoint.pt")
    assert "checkpoint.pt is corrupt" in _error(["train", "--resume", str(run), "--epochs", "2"], capsys)


@pytest.mark.parametrize("damage,said", [("folder", "is a directory, not a checkpoint file"),
                                         ("link", "is a symbolic link to")])
def test_a_best_checkpoint_damaged_into_no_file_is_named_not_passed_over(one_epoch_run, tmp_path, capsys, damage,
                                                                           said):
    import shutil

    from pyro_vae.train.runs import load_run

    run = _copy(one_epoch_run, tmp_path)
    (run / "best.pt").unlink()
    if damage == "folder":
        (run / "best.pt").mkdir()
    else:
        (run / "best.pt").symlink_to(tmp_path / "gone.pt")
    for argv in (["evaluate", str(run), "--particles", "5", "--no-plots"], ["sample", str(run)]):
        assert f"{run / 'best.pt'} {said}" in _error(argv, capsys)
    assert load_run(run, which="last").checkpoint_path == run / "checkpoint.pt"  # asked for: still there
    if damage == "folder":
        shutil.rmtree(run / "best.pt")
    else:
        (run / "best.pt").unlink()
    assert load_run(run).checkpoint_path == run / "checkpoint.pt"  # no best.pt at all: the last one, as before


@pytest.mark.parametrize("change,entry", [
    ({"input_dim": "abc"}, "input_dim"),
    ({"input_dim": 0}, "input_dim"),
    ({"image_shape": [3, 3]}, "image_shape"),
    ({"num_classes": -1}, "num_classes"),
    ({"config": "nonsense"}, "config"),
    ({"program": {"params": {"w": [1.0]}}}, "program"),
    ({"epoch": "x"}, "epoch"),
    ({"built_in": 1}, "built_in"),
])
def test_a_checkpoint_with_entries_of_the_wrong_kind_is_refused_by_entry(one_epoch_run, tmp_path, capsys, change,
                                                                          entry):
    run = _copy(one_epoch_run, tmp_path)
    state = load_checkpoint(run / "best.pt")
    save_checkpoint({**state, **change}, run / "best.pt")  # a valid checksum over entries of the wrong kind
    err = _error(["sample", str(run), "--num", "2"], capsys)
    assert f"{run / 'best.pt'} has an invalid {entry!r} entry" in err


def test_resuming_a_file_says_it_is_a_file(one_epoch_run, capsys):
    err = _error(["train", "--resume", str(one_epoch_run / "config.json")], capsys)
    assert "it is a file, not a run directory" in err


def test_checksums_cover_every_value_and_survive_a_round_trip(tmp_path):
    state = {"program": {"params": {"w": torch.arange(6.0).reshape(2, 3)}}, "config": {"lr": 0.1},
             "input_dim": 3, "epoch": 1, "opt": {0: {"step": torch.tensor(3.0)}}}
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["checksum"]["digest"] == state_digest(state)
    for change in ({"epoch": 2}, {"config": {"lr": 0.2}}, {"opt": {0: {"step": torch.tensor(4.0)}}}):
        assert state_digest({**state, **change}) != state_digest(state)


def _array_run(tmp_path, capsys, seed=0):
    import numpy as np

    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(seed).random((120, 6)).astype(np.float32))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), *FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    return data, run


def test_data_changed_under_the_same_path_is_refused_or_allowed_with_a_warning(tmp_path, capsys):
    import numpy as np

    data, run = _array_run(tmp_path, capsys)
    state = load_checkpoint(run / "best.pt")
    np.save(data, np.random.default_rng(1).random((120, 6)).astype(np.float32))
    for argv in (["evaluate", str(run), "--particles", "5", "--no-plots", "--no-progress"], ["sample", str(run)]):
        err = _error(argv, capsys)
        assert "differs from the data" in err and "--allow-changed-data" in err
        assert main([*argv, "--allow-changed-data"]) == 0
        assert "warning: the data" in capsys.readouterr().err
    assert "differs from the data" in _error(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert set(state["data_fingerprint"]) == {"train", "valid", "test", "algorithm"}


def test_fingerprints_tell_splits_and_labels_apart(digits):
    same = Dataset(name="x", train=digits.train.clone(), valid=digits.valid, test=digits.test,
                   train_labels=digits.train_labels, valid_labels=digits.valid_labels,
                   test_labels=digits.test_labels, image_shape=digits.image_shape, binary=digits.binary,
                   dynamic_binarization=False, num_classes=10)
    assert data_fingerprint(same) == data_fingerprint(digits)
    same.train_labels = digits.train_labels.flip(0)
    assert data_fingerprint(same)["train"] != data_fingerprint(digits)["train"]


def test_one_changed_value_changes_the_fingerprint_whichever_algorithm_recorded_it(digits):
    changed = Dataset(name="x", train=digits.train.clone(), valid=digits.valid, test=digits.test,
                      train_labels=digits.train_labels, valid_labels=digits.valid_labels,
                      test_labels=digits.test_labels, image_shape=digits.image_shape, binary=False,
                      dynamic_binarization=False, num_classes=10)
    changed.train[7, 3] = torch.nextafter(changed.train[7, 3], torch.tensor(2.0))  # one ulp
    for algorithm in ("xxh3_64", "crc32", "sha256"):  # crc32, sha256: what older runs recorded
        saved = data_fingerprint(digits, algorithm)
        assert saved["algorithm"] == algorithm
        check_data_fingerprint(saved, digits, "the run")  # the same data passes
        with pytest.raises(DataChangedError, match="changed split\\(s\\): train"):
            check_data_fingerprint(saved, changed, "the run")


# -- 5. strict configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("toml,message", [
    ('conditional = "false"', "conditional must be true or false, got 'false' (str)"),
    ('lr = "fast"', "lr must be a number, got 'fast' (str)"),
    ("lr = nan", "lr must be a finite number, got nan"),
    ("beta = inf", "beta must be a finite number, got inf"),
    ("sigma_x = -inf", "sigma_x must be a finite number, got -inf"),
    ("temperature = nan", "temperature must be a finite number"),
    ("epochs = 2.5", "epochs must be an integer, got 2.5 (float)"),
    ("epochs = true", "epochs must be an integer, got True (bool)"),
    ("progress = 1", "progress must be true or false, got 1 (int)"),
    ('hidden = "12"', "hidden must be a list, got '12' (str)"),
    ("hidden = [8, true]", "hidden[1] must be an integer, got True (bool)"),
    ("hidden = [0]", "hidden sizes must be a list of positive integers"),
    ("data = 5", "data must be a string, got 5 (int)"),
    ('device = "gpu"', "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    ('device = "cuda:x"', "got 'cuda:x'"),
    ("seed = -1", "seed must be an integer in [0, 4294967295], got -1"),
    ("checkpoint_every = -5", "checkpoint_every must be >= 0, got -5.0"),
    ("max_steps = -1", "max_steps must be >= 0 (0: no limit), got -1"),
    ("max_steps = 2.5", "max_steps must be an integer, got 2.5 (float)"),
    ('max_steps = "10"', "max_steps must be an integer, got '10' (str)"),
    ("latent-dim = 3\nlatent_dim = 4", "sets latent_dim twice: as 'latent-dim' and as 'latent_dim'"),
    ("epochs = 3\n[train]\nepochs = 4", "sets epochs twice: as 'epochs' and as 'epochs' in [train]"),
    ("[optimizer]\nlr = 0.1", "has a table [optimizer]"),
    ("[model]\nlr = 0.1", "[model] has no option 'lr'"),
    ("latent_size = 3", "unknown config key(s) latent_size"),
    ("lr = ", "is not valid TOML"),
])
def test_bad_config_values_are_refused_by_name(tmp_path, capsys, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    err = _error(["train", "--config", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert message in err
    assert not (tmp_path / "r").exists()  # refused before anything was created


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "argument --lr: expected a positive finite number, got nan"),
    (["--lr", "inf"], "argument --lr: expected a positive finite number, got inf"),
    (["--beta", "nan"], "argument --beta: expected a finite number, got nan"),
    (["--alpha", "inf"], "argument --alpha: expected a finite number, got inf"),
    (["--sigma-x", "nan"], "argument --sigma-x"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: expected a finite number >= 0, got -1"),
    (["--checkpoint-every", "inf"], "argument --checkpoint-every: expected a finite number"),
    (["--device", "tpu"], "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["--seed", str(2**64)], "argument --seed: expected a seed in [0, 4294967295]"),
    (["--patience", "-1"], "argument --patience: expected an integer >= 0, got -1"),
    (["--max-steps", "-1"], "argument --max-steps: expected an integer >= 0, got -1"),
    (["--max-steps", "1.5"], "argument --max-steps: expected an integer >= 0, got '1.5'"),
])
def test_bad_flags_are_refused_by_name(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_toml_model_table_and_dashes_are_read(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[model]\nlatent-dim = 2\nhidden = [8]\n[train]\nepochs = 1\n')
    assert load_toml(path) == {"latent_dim": 2, "hidden": [8], "epochs": 1}
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark, as some editors write
    assert load_toml(path) == {"latent_dim": 2, "hidden": [8], "epochs": 1}


@pytest.mark.parametrize("toml,message", [
    ("hidden = [16, 'a']", "hidden[1] must be an integer, got 'a' (str)"),
    ("progress = 'false'", "progress must be true or false, got 'false' (str)"),
    ("epochs = 1.0", "epochs must be an integer, got 1.0 (float)"),
    ("particles = true", "particles must be an integer, got True (bool)"),
    ("model = 3", "model must be a table [model] of options, got 3 (int)"),
    ("[[train]]\nepochs = 1", "train must be a table [train] of options"),
    ("[[runs]]\nepochs = 1", "has an array of tables [[runs]]"),
    ("latent_size = 3", "unknown config key(s) latent_size"),
])
def test_a_bad_value_in_a_config_file_is_refused_by_the_file_even_where_a_flag_overrides_it(tmp_path, capsys,
                                                                                          toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    flags = ["--hidden", "8", "--no-progress", "--epochs", "1", "--particles", "2"]
    err = _error(["train", "--config", str(path), *flags, "--run-dir", str(tmp_path / "r")], capsys)
    assert f"config file {path}" in err and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("toml,message", [
    ("epochs = 0", "epochs must be a positive integer, got 0"),
    ("seed = 99999999999999999999", "seed must be an integer in [0, 4294967295], got 99999999999999999999"),
    ("particles = -2", "particles must be a positive integer, got -2"),
    ('device = "gpu"', "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    ("patience = -1", "patience must be >= 0"),
    ("max_steps = -4", "max_steps must be >= 0 (0: no limit), got -4"),
])
def test_a_value_out_of_range_in_a_config_file_is_refused_even_where_a_flag_overrides_it(tmp_path, capsys, toml,
                                                                                         message):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    name = toml.split(" =")[0]
    flag = {"epochs": "1", "seed": "1", "particles": "2", "device": "cpu", "patience": "0", "max_steps": "0"}[name]
    option = "--" + name.replace("_", "-")
    err = _error(["train", "--config", str(path), *FLAGS, "--epochs", "1", option, flag, "--run-dir",
                  str(tmp_path / "r")], capsys)
    assert f"config file {path}: {message}" in err and f"{option} on the command line overrides it" in err
    assert not (tmp_path / "r").exists()


def test_a_config_file_value_a_flag_overrides_with_a_good_one_runs_with_the_flag(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("epochs = 3\nlr = 0.01\n")
    run = tmp_path / "r"
    assert main(["train", "--config", str(path), *FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["epochs"], recorded["lr"]) == (1, 0.01)


def test_configs_from_python_are_checked_like_files():
    for make, message in ((lambda: TrainConfig(model={"latent_dim": 3}), "model must be a ModelConfig"),
                          (lambda: TrainConfig(objective="elbo"), "unknown objective 'elbo'; expected one of trace"),
                          (lambda: TrainConfig.from_dict("nonsense"), "a config must be a table of options, got "
                                                                      "'nonsense' (str)"),
                          (lambda: TrainConfig.from_dict(None), "a config must be a table of options, got None")):
        with pytest.raises(ValueError, match=re.escape(message)):
            make().validate()


@pytest.mark.parametrize("flags,message", [
    (["--objective", "iwae", "--particles", "100000000"], "one training step of particles 100000000 x batch_size"),
    (["--hidden", "1000000000"], "the model, mostly its encoder"),
    (["--prior", "vamp", "--pseudo-inputs", "10000000000"], "mostly its pseudo_inputs 10000000000 x 64 features"),
])
def test_requests_that_cannot_fit_in_memory_are_refused_before_allocating(tmp_path, capsys, flags, message):
    err = _error(["train", *flags, "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "r")], capsys)
    assert message in err and "of memory, more than the" in err


def test_a_conditional_model_refuses_a_label_of_a_billion(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).random((60, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.r_[np.zeros(59, dtype=np.int64), [10**9]])
    err = _error(["train", "--data", str(tmp_path / "d.npz"), "--conditional", *FLAGS, "--run-dir",
                  str(tmp_path / "r")], capsys)
    assert "labels up to 1000000000" in err and "at most 10000 classes" in err
    with pytest.raises(TooLarge):
        from pyro_vae.train.memory import check_num_classes
        check_num_classes(10**9 + 1, "data")


# -- 6. divergence messages -------------------------------------------------------------------------------

def test_a_nan_at_the_first_step_blames_the_model_or_data_not_the_lr_and_no_checkpoint(tmp_path, digits):
    trainer = Trainer(TrainConfig.from_flat(dict(epochs=1, run_dir=str(tmp_path), **TINY)), dataset=digits)
    trainer.loss_fn = lambda *args: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    text = str(e.value)
    assert "loss became nan at step 1" in text and "learning rate is not the cause" in text
    assert "No checkpoint was written" in text and "--lr" not in text
    assert run_status(tmp_path)["state"] == "diverged"


def test_a_later_divergence_names_the_checkpoint_that_exists_and_a_large_lr(tmp_path, digits):
    trainer = Trainer(TrainConfig.from_flat(dict(epochs=2, lr=0.5, run_dir=str(tmp_path), **TINY)), dataset=digits)
    honest, calls = trainer.loss_fn, {"n": 0}

    def nan_in_epoch_two(*args):
        calls["n"] += 1
        loss = honest(*args)
        return loss * float("nan") if calls["n"] > trainer.steps_per_epoch else loss

    trainer.loss_fn = nan_in_epoch_two
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    text = str(e.value)
    assert f"checkpoint (the end of epoch 1) is kept in {tmp_path / 'checkpoint.pt'}" in text
    assert "lr = 0.5, which is large for Adam" in text


def test_data_far_outside_the_networks_range_is_named(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "huge.npy", (np.random.default_rng(0).random((60, 6)) * 1e30).astype(np.float32))
    err = _error(["train", "--data", str(tmp_path / "huge.npy"), "--decoder", "gaussian", *FLAGS, "--epochs", "1",
                  "--run-dir", str(tmp_path / "r")], capsys)
    assert "training data reach |x| = 9" in err and "standardize or rescale" in err
    assert "Trace Shapes" not in err and len(err.strip().splitlines()) == 1


def test_programs_of_python_objects_are_resumed_from_python_only(tmp_path, digits, capsys):
    import user_programs

    train(TrainConfig.from_flat(dict(epochs=1, run_dir=str(tmp_path / "r"), progress=False)),
          program=user_programs.param_program(), dataset=digits)
    assert "resume it from Python with the same pair" in _error(["train", "--resume", str(tmp_path / "r"),
                                                                  "--epochs", "2"], capsys)


def test_a_second_lock_holder_in_another_process_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pyro_vae.train.rundir import RunLock\n"
                               f"RunLock({str(tmp_path / 'r')!r}).acquire()\nprint('locked', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _error(["train", *FLAGS, "--run-dir", str(tmp_path / "r")], capsys)
        assert f"in use by another pyro-vae process (pid {holder.pid}" in err
        with pytest.raises(ValueError, match="in use"):
            RunLock(tmp_path / "r").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked(tmp_path / "r")  # the OS released it with the process
    with pytest.raises(CheckpointError, match="cannot resume"):
        Trainer(TrainConfig.from_flat(dict(run_dir=str(tmp_path / "r"), **TINY)), resume=True)


def test_a_second_trainer_of_a_run_dir_in_the_same_process_is_refused(tmp_path, digits):
    config = TrainConfig.from_flat(dict(epochs=1, run_dir=str(tmp_path / "r"), **TINY))
    first = Trainer(config, dataset=digits, keep_lock=True)
    try:
        with pytest.raises(ValueError, match=r"in use by this process \(training\)"):
            Trainer(config, dataset=digits)
        with pytest.raises(ValueError, match="in use by this process"):
            RunLock(tmp_path / "r").acquire()
        with RunLock(tmp_path / "r", "sampling"):  # a reader beside the holder (its pictures) still nests
            assert is_locked(tmp_path / "r")
        first.fit()
    finally:
        first.close()
    assert not is_locked(tmp_path / "r")
    train(config.replace(epochs=2), dataset=digits, resume=True)  # released: the next writer gets it


def test_sigterm_in_process_saves_and_a_second_one_aborts_keeping_the_last_checkpoint(tmp_path, digits):
    import os
    import signal

    from pyro_vae.train.trainer import Stopped

    cfg = TrainConfig.from_flat(dict(epochs=2, checkpoint_every_steps=3, **{**TINY, "batch_size": 128}))
    trainer = Trainer(cfg.replace(run_dir=str(tmp_path / "once")), dataset=digits)
    original = trainer.program.set_progress

    def term_at(step_, times=1):
        def hook(step, steps_per_epoch):
            if step == step_:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
            original(step, steps_per_epoch)
        return hook

    trainer.program.set_progress = term_at(5)
    result = trainer.fit()
    assert result.interrupted and result.signal == signal.SIGTERM and result.position == (0, 6, 6)
    assert run_status(tmp_path / "once")["signal"] == "SIGTERM"

    trainer = Trainer(cfg.replace(run_dir=str(tmp_path / "twice")), dataset=digits)
    original = trainer.program.set_progress
    trainer.program.set_progress = term_at(4, times=2)  # the second arrives before the first could save
    with pytest.raises(Stopped):
        trainer.fit()
    state = load_checkpoint(tmp_path / "twice" / "checkpoint.pt")
    assert state["step"] == 3 and not list((tmp_path / "twice").glob("*.tmp"))
    assert run_status(tmp_path / "twice")["state"] == "aborted"


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path, monkeypatch):
    from pyro_vae.train.checkpoint import CheckpointWriteError

    state = {"program": {"params": {"w": torch.zeros(2)}}, "config": {}, "input_dim": 2}
    save_checkpoint(state, tmp_path / "c.pt")

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="could not write the checkpoint"):
        save_checkpoint({**state, "input_dim": 3}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt")["input_dim"] == 2 and not list(tmp_path.glob("*.tmp"))


def test_an_atomic_write_in_the_way_of_a_folder_names_the_file(tmp_path):
    (tmp_path / "status.json").mkdir()
    with pytest.raises(OSError) as e:
        write_atomic(tmp_path / "status.json", "{}")
    assert e.value.filename == str(tmp_path / "status.json") and "in the way" in e.value.strerror
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left


def test_best_pt_is_the_best_epochs_checkpoint_and_keeps_it_when_the_checkpoint_moves_on(tmp_path, digits):
    run = tmp_path / "r"
    train(TrainConfig.from_flat(dict(epochs=1, run_dir=str(run), **TINY)), dataset=digits)
    assert (run / "best.pt").read_bytes() == (run / "checkpoint.pt").read_bytes()  # epoch 1 is the best so far
    first_best = (run / "best.pt").read_bytes()
    (run / "next.tmp").write_bytes(b"a later checkpoint")
    os.replace(run / "next.tmp", run / "checkpoint.pt")  # how every checkpoint is put in place ...
    assert (run / "best.pt").read_bytes() == first_best  # ... so best.pt keeps the best epoch's content
    load_checkpoint(run / "best.pt")  # whole, its checksum verified


def test_best_pt_is_a_copy_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    from pyro_vae.train import rundir

    source = tmp_path / "checkpoint.pt"
    source.write_bytes(b"weights")

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(rundir.os, "link", no_links)
    rundir.share_file(source, tmp_path / "best.pt")
    source.write_bytes(b"changed in place")
    assert (tmp_path / "best.pt").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
