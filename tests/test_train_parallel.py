"""Memory options of the trainer in one process on CPU: activation checkpointing per decoder layer
(the family's blocks) and FSDP2 with CPU offload, each taking the same steps as the plain run.
Two processes with CPU offload: test_train_distributed.py."""

from __future__ import annotations

import socket

import pytest
import torch

from tapestry.train.config import config_from_data
from tapestry.train.loop import Trainer
from tapestry.train.parallel import Dist, init_distributed, shutdown
from test_train_data import tiny_config, write_shards

STEPS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("parallel-shards"))


def run_steps(config, run_dir, d: Dist):
    trainer = Trainer(config, run_dir, d, quiet=True)
    built = trainer.build(config.stages[0])
    records = [trainer.step(built, step, config.stages[0]) for step in range(STEPS)]
    return trainer, built, records


def saved_bytes(trainer, built) -> int:
    """Bytes autograd keeps for backward over one forward of a step's batch."""
    batch = trainer.packer.next_batch({s.name: s.weight for s in trainer.config.data.sources})
    inputs = [trainer.family.prepare(row, docs, trainer.layout, trainer.batch_codec, torch.Generator().manual_seed(0))
              for row, docs in zip(batch.rows, batch.documents)]
    totals = trainer.family.loss_counts(batch.rows, trainer.model_config)
    params = {id(p) for p in built.module.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if id(t) not in params and not (t._is_view() and id(t._base) in params):
            kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        built.module(inputs, totals, {name: 1.0 for name in totals})
    return sum(kept.values())


def test_activation_checkpointing_recomputes_each_layer_and_takes_the_same_steps(shards, tmp_path):
    from torch.distributed._composable.contract import _get_registry

    plain_trainer, plain, want = run_steps(config_from_data(tiny_config(shards)), tmp_path / "plain", Dist())
    config = config_from_data(tiny_config(shards, **{"parallel.activation_checkpointing": True}))
    trainer, built, got = run_steps(config, tmp_path / "ckpt", Dist())
    layers = trainer.family.blocks(built.model)
    assert layers and all("checkpoint" in (_get_registry(layer) or {}) for layer in layers)
    for a, b in zip(got, want):  # recomputation repeats the forward exactly: the same steps
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert saved_bytes(trainer, built) < 0.7 * saved_bytes(plain_trainer, plain)


@pytest.mark.slow
def test_fsdp2_cpu_offload_in_one_process_takes_the_plain_steps(shards, tmp_path, monkeypatch):
    with socket.socket() as s:  # a free port for the group of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    _, _, want = run_steps(config_from_data(tiny_config(shards)), tmp_path / "plain", Dist())
    config = config_from_data(tiny_config(shards, **{"parallel.mode": "fsdp", "parallel.cpu_offload": True}))
    d = init_distributed(config.parallel)
    try:
        trainer, built, got = run_steps(config, tmp_path / "offload", d)
        from torch.distributed.fsdp import CPUOffloadPolicy

        groups = [m._get_fsdp_state()._fsdp_param_group for m in [*trainer.family.blocks(built.model), built.module]]
        assert all(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups if g is not None)
        for a, b in zip(got, want):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])
    finally:
        shutdown(d)


def test_cpu_offload_needs_fsdp(shards):
    from tapestry.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="parallel.cpu_offload"):
        config_from_data(tiny_config(shards, **{"parallel.cpu_offload": True}))
