"""metrics.jsonl after restarts: readers and plots see each step once."""

from __future__ import annotations

from llama_dist.metrics.logger import MetricsLogger, plot_loss_curve, read_metrics


def logger(run_dir, start_step: int) -> MetricsLogger:
    return MetricsLogger(
        run_dir,
        enabled=True,
        total_steps=10,
        start_step=start_step,
        use_wandb=False,
        wandb_project="x",
        config={},
    )


def test_a_restart_supersedes_the_rows_after_its_checkpoint(tmp_path):
    first = logger(tmp_path, 0)
    first.log(0, {"loss": 9.0}, kind="valid")
    for step in range(1, 8):  # crashed after logging step 7; the last checkpoint was step 5
        first.log(step, {"loss": 10.0 - step})
    first.close()
    second = logger(tmp_path, 5)
    for step in range(6, 9):
        second.log(step, {"loss": 1.0 / step})
    second.close()
    records = read_metrics(tmp_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in train] == list(range(1, 9))  # each step once, in order
    assert dict(train)[6] == 1.0 / 6 and dict(train)[5] == 5.0
    assert [r["step"] for r in records if r["kind"] == "valid"] == [0]
    assert plot_loss_curve(tmp_path).is_file()


def test_a_restart_from_scratch_drops_everything_and_a_torn_line(tmp_path):
    first = logger(tmp_path, 0)
    first.log(0, {"loss": 9.0}, kind="valid")
    first.log(1, {"loss": 8.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "tr')  # cut short by a crash
    # A restart with no checkpoint starts at step 0 and logs step 0 again.
    second = logger(tmp_path, 0)
    second.log(0, {"loss": 7.0}, kind="valid")
    second.close()
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"], r["loss"]) for r in records] == [("valid", 0, 7.0)]
