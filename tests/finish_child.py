"""``hessian-spectrum run CONFIG`` in a child process whose end is staged, for tests/pipeline/run/test_finish.py.

``--race``: when the probes end, a replacement group that can never be placed is pending (as after a lost
group whose replacement found no room) and its placement reference sits in unreachable garbage, as a lost
group's errors leave its references (their tracebacks hold them). Ray's shutdown is held in its window (the
core worker torn down, Ray's handle to it not yet dropped) while the run's finish, if it runs beside the
shutdown, collects that garbage. A release inside the window ends the process: exit 1, "The core worker has
already been shutdown".

``--pause SECONDS MARKER``: the finish waits SECONDS before its plots, then creates MARKER and waits for a
signal (at most 5 minutes). The exit status is the CLI's."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time


def stage_race() -> None:
    import ray._private.worker as ray_worker

    from actors.group import WorkerGroup
    import pipeline.run.recorder as recorder
    import pipeline.run.scheduler as scheduler

    in_window, collected = threading.Event(), threading.Event()

    def get(self):
        try:
            return self.__dict__["_held_core_worker"]
        except KeyError:
            raise AttributeError("core_worker") from None

    def put(self, value):
        self.__dict__["_held_core_worker"] = value

    def drop(self):  # ray.shutdown: `del global_worker.core_worker`, right after the core worker's own shutdown
        in_window.set()
        if threading.current_thread() is not threading.main_thread():  # the driver's thread may run beside it
            collected.wait(60)
        del self.__dict__["_held_core_worker"]

    ray_worker.Worker.core_worker = property(get, put, drop)
    run = scheduler.Scheduler.run

    def run_then_leave_a_pending_replacement(self):
        run(self)
        group = WorkerGroup(index=len(self.slots), num_workers=1, use_gpu=False, resources={"absent": 1})
        self.slots.append(scheduler.Slot(index=group.index, group=group, refs=[group.placed]))
        garbage = {"refs": [group.placed]}
        garbage["cycle"] = garbage
        gc.disable()  # the cycle waits, as one in an old generation does, for a collection in the finish

    finish = recorder.Recorder.finish

    def finish_collecting_garbage(self):
        in_window.wait(60)  # a finish beside ray.shutdown meets its window; one after it finds it long passed
        gc.collect()
        collected.set()
        gc.enable()
        finish(self)

    scheduler.Scheduler.run = run_then_leave_a_pending_replacement
    recorder.Recorder.finish = finish_collecting_garbage


def stage_pause(seconds: float, marker: str) -> None:
    import pipeline.run.recorder as recorder

    draw = recorder.draw_plots
    paused = []

    def draw_after_a_pause(run_dir):
        if not paused:  # the interrupted run draws its plots again: that one is not held
            paused.append(True)
            time.sleep(seconds)
            with open(marker, "w"):
                pass
            time.sleep(300)
        return draw(run_dir)

    recorder.draw_plots = draw_after_a_pause


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--race", action="store_true")
    parser.add_argument("--pause", nargs=2, metavar=("SECONDS", "MARKER"))
    args = parser.parse_args()
    if args.race:
        stage_race()
    if args.pause:
        stage_pause(float(args.pause[0]), args.pause[1])
    from pipeline.cli import main as cli

    return cli(["run", args.config])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the console script ends (pipeline.cli.entry)
