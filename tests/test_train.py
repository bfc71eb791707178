"""The trainer: toy runs on tiny generated models and data, plus one smoke run per method on MiniLM."""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import torch
from torch import nn

from experiments.data.encoding import EncodedSplit, EncodedSplits
from experiments.records import EVAL_COLUMNS, TEST_COLUMNS, TIMING_COLUMNS, TRAIN_COLUMNS, macro_f1
from experiments.training.callbacks import Callback, TrainState
from experiments.training.config import TrainConfig
from experiments.training.loop import lr_factor, main, train

VOCAB, LENGTH, MARKER = 12, 8, 2


class BagClassifier(nn.Module):
    """Masked mean of token embeddings (with dropout) -> linear head; (n, T) ids -> (n, 2) logits."""

    def __init__(self, seed: int = 0, num_labels: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 8)
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Linear(8, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.drop(self.embed(input_ids)) * mask).sum(1) / mask.sum(1)
        return self.classifier(pooled)


def toy_split(n: int, seed: int) -> EncodedSplit:
    """Label 1 iff the marker token occurs; tokens 3..11, lengths 2..8, right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
    labels = torch.arange(n) % 2
    where = (torch.rand(n, generator=g) * lengths).long()
    ids[labels == 1, where[labels == 1]] = MARKER
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    return EncodedSplit(ids * mask, mask, labels)


def toy_data(n_train: int = 96, seed: int = 0) -> EncodedSplits:
    return EncodedSplits(toy_split(n_train, seed), toy_split(48, seed + 1), toy_split(48, seed + 2), 2,
                         f"toy-{n_train}-{seed}")


def toy_config(**changes) -> TrainConfig:
    base = dict(method="full", lr=0.05, schedule="constant", steps=12, batch_size=8, eval_every=3,
                checkpoint_every=4, clip_norm=1.0, seed=0, target_accuracy=0.9)
    return TrainConfig(**{**base, **changes})


def comparable(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.drop(columns=[c for c in TIMING_COLUMNS if c in rows]).reset_index(drop=True)


class Probe(Callback):
    """Logs a running count each step (state checkpointed); can interrupt after a given step."""

    def __init__(self, interrupt_after: int | None = None):
        self.count, self.interrupt_after, self.starts = 0, interrupt_after, []

    def on_start(self, state: TrainState) -> None:
        self.starts.append(state.step)

    def on_batch_end(self, state, batch, loss) -> None:
        self.count += int(batch["labels"].sum())
        state.log("probe", positives_seen=self.count, weight_norm=state.model.classifier.weight.norm())
        if state.step == self.interrupt_after:
            raise KeyboardInterrupt

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state) -> None:
        self.count = state["count"]


# ------------------------------------------------------------------------------------------------
# metrics and schedule
# ------------------------------------------------------------------------------------------------
def test_macro_f1_hand_example():
    labels, preds = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 0 -> 0
    assert macro_f1(preds, labels, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-12)
    assert macro_f1(preds, labels, 4) == pytest.approx((0.5 + 0.8) / 4, abs=1e-12)  # absent class: 0
    assert macro_f1(labels, labels, 3) == 1.0


def test_lr_schedules():
    cfg = toy_config(steps=10, warmup_steps=4, schedule="linear")
    assert [lr_factor(cfg, s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(cfg, 4) == 1.0 and lr_factor(cfg, 9) == pytest.approx(1 / 6)
    cos = toy_config(steps=10, warmup_steps=0, schedule="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5)


def test_recorded_lr_follows_schedule_with_sgd(tmp_path):
    cfg = toy_config(optimizer="sgd", schedule="cosine", warmup_steps=3, steps=9, lr=0.2, clip_norm=None,
                     eval_examples=20)
    result = train(cfg, tmp_path, model=BagClassifier(), data=toy_data(), progress=False)
    assert (result.rows[result.rows.kind == "eval"].examples == 20).all()
    lrs = result.rows[result.rows.kind == "train"].lr.tolist()
    assert lrs == pytest.approx([0.2 * lr_factor(cfg, s) for s in range(9)], rel=1e-12)
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.15]) and lrs[3] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------
# training, records, provenance
# ------------------------------------------------------------------------------------------------
def test_learns_toy_task_and_records_everything(tmp_path):
    cfg = toy_config(steps=60, eval_every=20, lr=0.1)
    result = train(cfg, tmp_path, model=BagClassifier(), data=toy_data(), progress=False)
    assert result.status == "finished"
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    pd.testing.assert_frame_equal(rows, result.rows)
    train_rows, evals = rows[rows.kind == "train"], rows[rows.kind == "eval"]
    assert train_rows.step.tolist() == list(range(1, 61))
    assert evals.step.tolist() == [0, 20, 40, 60]
    assert train_rows.loss.iloc[-10:].mean() < 0.5 * train_rows.loss.iloc[:10].mean()
    assert evals.accuracy.iloc[-1] > 0.9 > evals.accuracy.iloc[0]
    for kind, columns in (("train", TRAIN_COLUMNS), ("eval", EVAL_COLUMNS), ("test", TEST_COLUMNS)):
        part = rows[rows.kind == kind]
        assert not part[list(columns)].isna().any().any(), kind
    assert (train_rows.peak_memory_mb > 0).all() and (train_rows.tokens_per_s > 0).all()
    assert len(rows[rows.kind == "test"]) == 1
    assert result.steps_to_target == int(evals[evals.accuracy >= 0.9].step.iloc[0])

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "finished" and info["config_hash"] == cfg.config_hash()
    assert TrainConfig.from_dict(info["config"]) == cfg
    assert info["trainable_parameters"] == sum(p.numel() for p in BagClassifier().parameters())
    for key in ("git_commit", "git_dirty", "device_name", "started", "ended", "seed"):
        assert key in info
    assert {"torch", "transformers", "peft", "numpy", "pandas"} <= set(info["versions"])
    assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / "best.safetensors").exists()


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg, data = toy_config(), toy_data()
    straight = train(cfg, tmp_path / "a", model=BagClassifier(), data=data, callbacks=[Probe()],
                     progress=False)
    with pytest.raises(KeyboardInterrupt):  # after step 7; the last checkpoint is at step 4
        train(cfg, tmp_path / "b", model=BagClassifier(), data=data, callbacks=[Probe(interrupt_after=7)],
              progress=False)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "interrupted"
    probe = Probe()
    resumed = train(cfg, tmp_path / "b", model=BagClassifier(seed=99), data=data, callbacks=[probe],
                    progress=False)
    assert probe.starts == [4]
    own = resumed.rows[resumed.rows.kind.isin(["train", "eval", "test", "probe"])]
    assert not own.duplicated(["step", "kind"]).any()
    pd.testing.assert_frame_equal(comparable(resumed.rows), comparable(straight.rows), check_exact=True)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["resumed_at_steps"] == [4]


class KillAfter(Probe):
    """A Probe that copies the run folder during step ``at``: what a SIGKILL then leaves behind."""

    def __init__(self, at: int, copy_to):
        super().__init__()
        self.at, self.copy_to = at, copy_to

    def on_batch_end(self, state, batch, loss) -> None:
        super().on_batch_end(state, batch, loss)
        if state.step == self.at:
            shutil.copytree(state.out_dir, self.copy_to)


def test_kill_right_after_a_checkpoint_resumes_to_the_same_rows_and_weights(tmp_path):
    cfg, data = toy_config(), toy_data()  # checkpoints at steps 4 and 8
    killer = KillAfter(9, copy_to=tmp_path / "b")  # the straight run leaves a killed copy of itself
    straight = train(cfg, tmp_path / "a", model=BagClassifier(), data=data, callbacks=[killer],
                     progress=False)
    left = json.loads((tmp_path / "b" / "run.json").read_text())
    assert left["status"] == "running" and (tmp_path / "b" / "checkpoint.pt").exists()
    probe = Probe()
    resumed = train(cfg, tmp_path / "b", model=BagClassifier(seed=99), data=data, callbacks=[probe],
                    progress=False)
    assert probe.starts == [8]
    pd.testing.assert_frame_equal(comparable(resumed.rows), comparable(straight.rows), check_exact=True)
    for (name, weight), (other, expected) in zip(resumed.model.state_dict().items(),
                                                 straight.model.state_dict().items(), strict=True):
        assert name == other and torch.equal(weight, expected), name
    best = [(tmp_path / run / "best.safetensors").read_bytes() for run in ("a", "b")]
    assert best[0] == best[1]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["resumed_at_steps"] == [8]


def test_finished_run_is_returned_not_recomputed(tmp_path):
    cfg, data = toy_config(steps=4), toy_data()
    first = train(cfg, tmp_path, model=BagClassifier(), data=data, progress=False)
    probe = Probe()
    again = train(cfg, tmp_path, model=BagClassifier(), data=data, callbacks=[probe], progress=False)
    assert probe.starts == [] and again.model is None
    pd.testing.assert_frame_equal(again.rows, first.rows)
    assert (again.test, again.best_step) == (first.test, first.best_step)


def test_resume_with_another_config_is_refused(tmp_path):
    data = toy_data()
    with pytest.raises(KeyboardInterrupt):
        train(toy_config(), tmp_path, model=BagClassifier(), data=data, callbacks=[Probe(interrupt_after=5)],
              progress=False)
    with pytest.raises(ValueError, match=r"another config.*another --out folder or delete"):
        train(toy_config(lr=0.01), tmp_path, model=BagClassifier(), data=data, progress=False)
    with pytest.raises(ValueError, match="other data"):
        train(toy_config(), tmp_path, model=BagClassifier(), data=toy_data(seed=5), progress=False)


def test_test_split_uses_best_validation_checkpoint(tmp_path):
    """Sabotage the head after the last step: the last evaluation is bad, the test must not be."""

    class Sabotage(Callback):
        def __init__(self):
            self.snapshots = {}

        def on_batch_end(self, state, batch, loss):
            if state.step == state.config.steps:
                with torch.no_grad():
                    state.model.classifier.weight.neg_()
                    state.model.classifier.bias.neg_()

        def on_evaluate(self, state, metrics):
            self.snapshots[state.step] = copy.deepcopy(state.model.state_dict())

    sabotage, data = Sabotage(), toy_data()
    cfg = toy_config(steps=40, eval_every=10, lr=0.1)
    result = train(cfg, tmp_path, model=BagClassifier(), data=data, callbacks=[sabotage], progress=False)
    evals = result.rows[result.rows.kind == "eval"].set_index("step")
    assert result.best_step != 40 and evals.accuracy[40] < 0.5 < evals.accuracy[result.best_step]
    assert result.best_step == evals.accuracy.idxmax()
    test_row = result.rows[result.rows.kind == "test"].iloc[0]
    assert test_row.step == result.best_step
    reference = BagClassifier().eval()
    reference.load_state_dict(sabotage.snapshots[result.best_step])
    with torch.no_grad():
        predicted = reference(data.test.input_ids, data.test.attention_mask).argmax(-1)
    expected = float((predicted == data.test.labels).double().mean())
    assert test_row.accuracy == pytest.approx(expected, abs=1e-12)


def test_nan_loss_stops_and_keeps_rows(tmp_path):
    class Poison(Callback):
        def on_batch_end(self, state, batch, loss):
            if state.step == 5:
                with torch.no_grad():
                    state.model.embed.weight.fill_(float("nan"))

    result = train(toy_config(), tmp_path, model=BagClassifier(), data=toy_data(), callbacks=[Poison()],
                   progress=False)
    assert result.status == "stopped_nan" and "step 6" in result.message and "lr" in result.message
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert rows[rows.kind == "train"].step.tolist() == [1, 2, 3, 4, 5]
    assert rows[rows.kind == "nan"].step.tolist() == [6] and "test" not in set(rows.kind)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "stopped_nan"


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"lr": 0.0}, "lr must be a positive"),
    ({"lr": -1e-3}, "lr must be a positive"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"method": "adapterdrop"}, "unknown method 'adapterdrop'; choose one of: full, propulsion"),
    ({"model": "gpt5"}, "unknown model 'gpt5'; choose one of: minilm"),
    ({"dataset": "sst2"}, "unknown dataset 'sst2'; choose one of: rotten_tomatoes"),
    ({"mixed_precision": "bf16"}, "needs CUDA"),
    ({"method_options": (("preset", "paper"),), "method": "propulsion"}, "unknown propulsion preset"),
], ids=["lr0", "lr-neg", "steps0", "steps-neg", "batch0", "method", "model", "dataset", "bf16-cpu", "preset"])
def test_bad_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        toy_config(**changes)


def test_labels_outside_the_head_are_refused(tmp_path):
    data = toy_data()
    bad = EncodedSplit(data.validation.input_ids, data.validation.attention_mask, data.validation.labels * 2)
    wrong = EncodedSplits(data.train, bad, data.test, 3, "x")
    with pytest.raises(ValueError, match=r"validation labels span \[0, 2\] but the model's head has 2 out"):
        train(toy_config(), tmp_path, model=BagClassifier(), data=wrong, progress=False)


def test_batch_larger_than_training_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size 200 is larger than the training split"):
        train(toy_config(batch_size=200), tmp_path, model=BagClassifier(), data=toy_data(), progress=False)


def test_config_round_trip_and_cli_errors(capsys):
    cfg = TrainConfig(method="propulsion", method_options={"degree": 15, "target_modules": ["query"]})
    assert cfg.method_options == (("degree", 15), ("target_modules", ("query",)))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.config_hash() != TrainConfig(method="propulsion", method_options={"degree": 5}).config_hash()
    assert cfg.prepare_options() == {"degree": 15, "target_modules": ["query"]}
    assert main(["--out", "/nonexistent/x", "--lr", "0"]) == 2
    assert "lr must be a positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# smoke runs on the real MiniLM (a tiny Rotten Tomatoes slice)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_slice(tmp_path_factory):
    """(base model, encoded splits) through the data helpers, caches in a temporary folder."""
    import os

    from experiments.data.datasets import load_dataset
    from experiments.data.encoding import encode_splits
    from experiments.data.models import load_model, load_tokenizer

    cache = tmp_path_factory.mktemp("cache")
    splits = load_dataset("rotten_tomatoes", seed=0, max_examples=60, split_dir=cache / "splits")
    data = encode_splits(splits, load_tokenizer("minilm"), max_length=16, cache_dir=cache / "tokens")
    old = os.environ.get("PROPULSION_NTK_CACHE")
    os.environ["PROPULSION_NTK_CACHE"] = str(cache)
    yield load_model("minilm", 2, seed=0), data
    if old is None:
        os.environ.pop("PROPULSION_NTK_CACHE")
    else:
        os.environ["PROPULSION_NTK_CACHE"] = old


SMOKE = [("full", {}, 5e-5), ("propulsion", {"degree": 5}, 1e-2),
         ("propulsion", {"preset": "reference"}, 1e-2), ("lora", {}, 5e-4), ("ia3", {}, 1e-2),
         ("bitfit", {}, 1e-3), ("head", {}, 1e-3)]


def test_smoke_list_covers_every_method():
    from experiments.training.methods import METHODS

    assert {m for m, _, _ in SMOKE} == set(METHODS)


@pytest.mark.realmodel
@pytest.mark.parametrize("method, options, lr", SMOKE,
                         ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o, _ in SMOKE])
def test_smoke_every_method_on_minilm(tmp_path, minilm_slice, method, options, lr):
    base, data = minilm_slice

    class Watch(Callback):
        def on_start(self, state):
            self.before = {n: p.detach().clone() for n, p in state.model.named_parameters()}

        def on_batch_end(self, state, batch, loss):
            if state.step == state.config.steps:
                after = dict(state.model.named_parameters())
                self.changed = {n for n, p in after.items() if not torch.equal(p, self.before[n])}
                self.trainable = {n for n, p in after.items() if p.requires_grad}

    watch = Watch()
    cfg = TrainConfig(method=method, method_options=options, lr=lr, steps=3, batch_size=4, max_length=16,
                      eval_every=3, eval_batch_size=16, max_examples=60, checkpoint_every=None,
                      save_best=False)
    by_name = method == "propulsion" and "degree" in options  # one run loads model and data by name
    result = train(cfg, tmp_path, model=None if by_name else copy.deepcopy(base),
                   data=None if by_name else data, callbacks=[watch], progress=False)
    assert result.status == "finished", result.message
    assert watch.changed and watch.changed <= watch.trainable  # frozen weights never move
    rows = result.rows
    assert rows[rows.kind == "train"].step.tolist() == [1, 2, 3]
    assert not rows[rows.kind == "train"][list(TRAIN_COLUMNS)].isna().any().any()
    assert rows[rows.kind == "test"].examples.iloc[0] == len(data.test)
    assert result.model is not None
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert 0 < result.trainable_parameters == trainable


def test_dropout_option_sets_every_dropout(tmp_path):
    result = train(toy_config(steps=2, dropout=0.0), tmp_path / "run", model=BagClassifier(), data=toy_data(),
                   progress=False)
    assert result.model is not None and result.model.drop.p == 0.0
    with pytest.raises(ValueError, match="dropout must be None or in"):
        toy_config(dropout=1.0)
