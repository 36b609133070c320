"""Where a run's eps comes from: the earlier invocation's (a resume continues checkpoints taken at that eps), a
fixed eps the user chose not to assess, or a calibration on the first group along probe 0's start vector.

The calibration's HVP at the chosen eps is kept by its group as probe 0's first Lanczos step, so no HVP is
computed twice, and an ``auto`` eps is rounded to two significant digits so that every layout picks the same.
"""

from __future__ import annotations

from dataclasses import fields

from actors.records import Calibration, CalibrationTask, ProbeTask

from .config import RunConfig
from .recorder import Recorder


def known_calibration(config: RunConfig, recorder: Recorder) -> Calibration | None:
    """The calibration of the earlier invocation when this one resumes it, else None (a group calibrates)."""
    previous = recorder.previous.eps_calibration
    if recorder.info["resumed"] and previous:
        names = {f.name for f in fields(Calibration)}
        kept = {k: v for k, v in previous.items() if k in names}
        return Calibration(**{**kept, "hvp_count": 0, "grad_seconds": None, "first_matvec_kept": False,
                              "message": f"{previous['message']} (from the earlier run: its checkpoints use it)"})
    return None


def calibration_task(config: RunConfig, probe_zero: ProbeTask) -> CalibrationTask:
    """Auto eps, or a fixed one assessed (1 gradient and a few HVPs) or only timed (one gradient)."""
    fixed = None if config.hvp.eps == "auto" else float(config.hvp.eps)
    return CalibrationTask(probe=probe_zero, fixed_eps=fixed, assess=config.hvp.assess)
