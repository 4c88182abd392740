"""The shared training engine on a toy task: checkpoints, best model, history, exact resume."""

import csv

import numpy as np
import paddle
import pytest

from visrec.training.checkpoint import load_checkpoint, resolve_checkpoint
from visrec.training.engine import EngineConfig, Trainer
from visrec.training.optim import OptimizerConfig, build_optimizer, build_scheduler


class ToyData:
    """Epoch-aware shuffled batches of a fixed regression problem."""

    def __init__(self, n=64, batch=8, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 4)).astype("float32")
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], "float32"))[:, None]
        self.batch, self.epoch = batch, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // self.batch

    def __iter__(self):
        order = np.random.default_rng([7, self.epoch]).permutation(len(self.x))
        for i in range(len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            yield paddle.to_tensor(self.x[idx]), paddle.to_tensor(self.y[idx])


class ToyTask:
    def __init__(self, data):
        self.data = data
        self.evals = 0

    def train_step(self, model, batch):
        x, y = batch
        # dropout makes the step depend on Paddle's RNG, which resume must reproduce
        pred = model(paddle.nn.functional.dropout(x, 0.05, training=True))
        loss = paddle.nn.functional.mse_loss(pred, y)
        return loss, {"mse": float(loss)}

    def evaluate(self, model):
        self.evals += 1
        pred = model(paddle.to_tensor(self.data.x))
        mse = float(paddle.nn.functional.mse_loss(pred, paddle.to_tensor(self.data.y)))
        return {"neg_mse": -mse}


def make_trainer(out_dir, epochs, **engine_kw):
    paddle.seed(123)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 1))
    data = ToyData()
    opt_cfg = OptimizerConfig(name="momentum", lr=0.02, weight_decay=1e-4, warmup_epochs=1.0)
    sched = build_scheduler(opt_cfg, len(data), epochs)
    opt = build_optimizer(opt_cfg, model.parameters(), sched)
    cfg = EngineConfig(epochs=epochs, metric="neg_mse", seed=3, keep_last=2, **engine_kw)
    task = ToyTask(data)
    return Trainer(model, task, data, opt, sched, out_dir, cfg, epoch_aware=[data]), model, task


def weights(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_fit_writes_checkpoints_history_and_learns(tmp_path):
    trainer, model, task = make_trainer(tmp_path, epochs=4, eval_every=2)
    state = trainer.fit()
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best_model", "epoch_3", "epoch_4", "latest"]
    assert task.evals == 2  # epochs 2 and 4
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["val_neg_mse"] == "" and rows[1]["val_neg_mse"] != ""
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert state.best_epoch in (2, 4) and state.epoch == 4
    assert resolve_checkpoint(tmp_path / "checkpoints") == ckpt / "latest"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full, full_model, _ = make_trainer(tmp_path / "full", epochs=3)
    full.fit()

    killed, _, _ = make_trainer(tmp_path / "run", epochs=3, stop_after_epochs=1)
    assert killed.fit().epoch == 1
    resumed, resumed_model, _ = make_trainer(
        tmp_path / "run", epochs=3, resume=str(tmp_path / "run" / "checkpoints" / "latest"))
    state = resumed.fit()
    assert state.epoch == 3

    a, b = weights(full_model), weights(resumed_model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the LR schedule continued too
    full_rows = list(csv.DictReader((tmp_path / "full" / "history.csv").open()))
    assert [r["lr"] for r in rows] == [r["lr"] for r in full_rows]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = paddle.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope", model)


def test_empty_loader_is_an_error(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, epochs=1)
    trainer.loader = []
    with pytest.raises(RuntimeError, match="yielded no batch"):
        trainer.fit()


class WorseningTask(ToyTask):
    """Evaluation that gets worse with every call: training never beats the starting point."""

    def evaluate(self, model):
        self.evals += 1
        return {"neg_mse": -float(self.evals)}


def test_starting_weights_compete_for_best_model_when_asked(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, epochs=2, eval_before_training=True)
    trainer.task = WorseningTask(trainer.task.data)
    start = weights(model)
    state = trainer.fit()
    assert state.best_epoch == 0 and state.best_metric == -1.0  # the zero-shot model was kept
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    best = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 1))
    load_checkpoint(tmp_path / "checkpoints" / "best_model", best)
    assert all(np.array_equal(start[k], v.numpy()) for k, v in best.state_dict().items())


def test_training_that_beats_the_start_replaces_it(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, epochs=3, eval_before_training=True)
    state = trainer.fit()
    assert state.best_epoch > 0  # the toy regression learns
