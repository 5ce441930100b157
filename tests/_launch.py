"""Run `oars-fast` in subprocesses: one plain process or N through torchrun (gloo on the CPU)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TIMEOUT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def launch(nproc: int, args: list[str], env_extra: dict | None = None, check: bool = True,
           launcher: str = "torchrun"):
    """`oars-fast <args>` on `nproc` processes (torchrun or the deepspeed launcher) or one plain process."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "oars_fast.cli", *args]
    elif launcher == "deepspeed":  # as users launch: deepspeed --num_gpus N --module oars_fast.cli ...
        cmd = [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={nproc}", f"--master_port={_port()}",
               "--module", "oars_fast.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_port()}", "-m", "oars_fast.cli", *args]
    env = _env()
    env.update(env_extra or {})
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def losses(run_dir: Path, stage: str, key: str = "loss") -> dict[int, float]:
    """step -> value from the stage's jsonl log (the last entry of a step wins: a resumed run's)."""
    out = {}
    for line in (run_dir / "logs" / f"{stage}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out
