"""What every training stage needs: devices, seeds, schedules, EMA, checkpoints, step logs."""
