"""Training: configs, data mixing and packing, condition dropout, stages, the loop, checkpoints,
distributed wrappers (parallel.py, kept apart from model code) and export (DESIGN §8).

    from tapestry.train.config import load_config
    from tapestry.train.loop import train
    train(load_config("configs/test-tiny.toml"), "runs/tiny")
"""
