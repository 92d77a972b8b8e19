"""A run's files: every path a user names, local or in a bucket (`paths`), the run directory's lock
(`lock`), orbax checkpoints (`checkpoint`), trackers (`tracking`) and a trained run put to use (`trained`)."""
