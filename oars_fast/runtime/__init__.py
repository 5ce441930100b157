"""What every training stage needs below the stages themselves:

* :mod:`.device`: the device, autocast, peak memory;
* :mod:`.distributed`: ranks, the process group and the few collectives;
* :mod:`.seeding`: per-sample seeds and the global RNG streams;
* :mod:`.optim`: AdamW, the learning-rate schedule, EMA;
* :mod:`.engine`: the optimizer side (plain PyTorch or DeepSpeed ZeRO) and its checkpoint part;
* :mod:`.checkpoint`: crash-safe checkpoint folders, loaded without unpickling code;
* :mod:`.run`: the opening of a training stage; :mod:`.logger`: step logs; :mod:`.faults`: crash tests.
"""
