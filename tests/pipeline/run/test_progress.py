"""The progress count over HVP steps: a probe resumed after a lost group does not count its redone steps twice."""

from pipeline.run.progress import Progress


def test_redone_steps_after_a_lost_group_are_not_counted_twice(capsys):
    progress = Progress(12, bar=False)
    for step in range(1, 6):  # the group is lost after step 5; its last checkpoint was step 2
        progress.update(probe_id=0, step=step, steps=6, hvp_seconds=0.1)
    for step in range(3, 7):
        progress.update(probe_id=0, step=step, steps=6, hvp_seconds=0.1)
    for step in range(4, 7):  # probe 1 resumes from a previous run's checkpoint at step 3
        progress.update(probe_id=1, step=step, steps=6, hvp_seconds=0.1)
    progress.task_done("block probe 0")
    assert progress.done == 6 + 3 + 1
    lines = capsys.readouterr().err.splitlines()
    assert any("6/12 HVP steps | probe 0 step 6/6" in line for line in lines)
    assert not any(f"{n}/12" in line for n in range(11, 20) for line in lines)
