"""DPTrainer's refusals: losses that count other examples, packed rows, bad arguments, incomplete or foreign
checkpoints, a noise state that could be pushed to the Hub, and the causal-LM shift under torch.compile."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_trainer import ReleasedGradients, T, VOCAB, Counting, gpt2, trainer, training_args
from transformers import DataCollatorWithFlattening, Trainer

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit_transformers import DPTrainer, PrivacyArguments
from dpkit_transformers._checkpoints import save_atomic
from dpkit_transformers.trainer import PRIVACY_STATE, _causal_lm

PRIVACY = PrivacyArguments(max_grad_norm=0.5, noise_multiplier=1.0, noise_seed=3)


class ModelsOwnLoss(DPTrainer):
    """The model's ``labels=`` loss: token losses summed over the batch / labelled tokens in the whole batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class HuggingFacesLoss(DPTrainer):
    """Trainer's own compute_loss, the form that divides by ``num_items_in_batch``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


class LoggingLoss(DPTrainer):
    """A subclass that keeps DPTrainer's per-example loss: accepted."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen = getattr(self, "seen", 0) + 1
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class VariedLengths(Counting):
    """Examples of 5 to 8 tokens (the rest padding, ignored): a batch-wide denominator differs from each own."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item, real = super().__getitem__(i), torch.arange(T) < T - i % 4
        return {**item, "attention_mask": real.long(), "labels": torch.where(real, item["labels"], -100)}


@pytest.mark.parametrize("cls", [ModelsOwnLoss, HuggingFacesLoss])
def test_a_loss_normalised_over_the_batch_is_refused(tmp_path, cls):
    run = cls(model=gpt2(), args=training_args(tmp_path, max_steps=1), train_dataset=VariedLengths(32),
              privacy=PRIVACY)
    # Refused by the core's batch trace (the mean over labelled tokens) or by DPTrainer's check of the loss.
    with pytest.raises(PrivacyUsageError, match=f"{cls.__name__}.compute_loss returned a Tensor|divides by the number"):
        run.train()
    assert run.private.steps == 0


def test_a_subclass_that_keeps_the_per_example_loss_trains(tmp_path):
    run = LoggingLoss(model=gpt2(), args=training_args(tmp_path, max_steps=2), train_dataset=Counting(32),
                      privacy=PRIVACY)
    run.train()
    assert run.private.steps == 2 and run.seen == 4  # two micro-batches a step


class Lists(torch.utils.data.Dataset):
    """Token lists, the form DataCollatorWithFlattening takes."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = [(i * 7 + t) % VOCAB for t in range(T)]
        return {"input_ids": ids, "labels": ids}


def test_a_collator_that_packs_examples_into_one_row_is_refused(tmp_path):
    # Flattening packs the sampled examples into one [1, n·T] row; keep n·T within the model's positions.
    run = DPTrainer(model=gpt2(), args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=8,
                                                     gradient_accumulation_steps=1, remove_unused_columns=False),
                    train_dataset=Lists(), data_collator=DataCollatorWithFlattening(), privacy=PRIVACY)
    with pytest.raises(PrivacyUsageError, match=r"WithFlattening\) turned \d+ sampled examples into 1 rows"):
        run.train()
    assert run.private.steps == 0


@pytest.mark.parametrize("privacy", [None, {"noise_multiplier": 1.0}])
def test_privacy_must_be_privacy_arguments(tmp_path, privacy):
    with pytest.raises(PrivacyUsageError, match=r"DPTrainer\(privacy=...\) takes a dpkit_transformers.Privacy"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=Counting(8), privacy=privacy)


@pytest.mark.parametrize("max_steps", [-1, 4])
def test_an_iterable_dataset_is_refused(tmp_path, max_steps):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from Counting(8)

    with pytest.raises(PrivacyUsageError, match=r"train_dataset=...\) got a Stream without len\(\)"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path, max_steps=max_steps), train_dataset=Stream(),
                  privacy=PRIVACY)


def test_a_dataset_of_k_rows_per_example_is_refused(tmp_path):
    data = dpkit.Multiplicity(torch.utils.data.TensorDataset(torch.arange(8)), lambda x: x, K=2)
    with pytest.raises(PrivacyUsageError, match="dpkit.Multiplicity, whose items are K rows"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=data, privacy=PRIVACY)


@pytest.mark.parametrize("name", ["gradient_accumulation_steps", "per_device_train_batch_size"])
def test_batch_arguments_below_one_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=rf"TrainingArguments\({name}=0\)"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path, **{name: 0}), train_dataset=Counting(8),
                  privacy=PRIVACY)


def saved_run(tmp_path, **privacy) -> str:
    """Four steps with a checkpoint every two; the output folder."""
    out = tmp_path / "run"
    privacy = PrivacyArguments(**{**vars(PRIVACY), **privacy})
    trainer(out, privacy=privacy, max_steps=4, save_strategy="steps", save_steps=2).train()
    return str(out)


def test_an_empty_or_partial_last_checkpoint_is_refused(tmp_path):
    out = saved_run(tmp_path)
    os.makedirs(os.path.join(out, "checkpoint-6"))  # what a save killed right after mkdir leaves
    with pytest.raises(PrivacyUsageError, match="checkpoint-6 is empty: it is incomplete"):
        trainer(out, max_steps=8).train(resume_from_checkpoint=True)
    shutil.rmtree(os.path.join(out, "checkpoint-6"))

    os.remove(os.path.join(out, "checkpoint-4", "trainer_state.json"))  # killed before Trainer's last file
    with pytest.raises(PrivacyUsageError, match="has no trainer_state.json, which Trainer writes last"):
        trainer(out, max_steps=8).train(resume_from_checkpoint=True)


def test_a_privacy_state_from_another_checkpoint_is_refused(tmp_path):
    out = saved_run(tmp_path)
    shutil.copy(os.path.join(out, "checkpoint-2", PRIVACY_STATE), os.path.join(out, "checkpoint-4", PRIVACY_STATE))
    with pytest.raises(PrivacyUsageError, match="counted 2 steps, and the checkpoint is at step 4"):
        trainer(tmp_path / "b", max_steps=8).train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))


def test_the_privacy_state_is_written_atomically(tmp_path):
    path = str(tmp_path / PRIVACY_STATE)
    save_atomic({"steps": 1}, path)
    with pytest.raises(Exception):  # a save that fails half way (here: an object torch cannot pickle)
        save_atomic({"steps": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"steps": 1}
    assert os.listdir(tmp_path) == [PRIVACY_STATE]  # no temporary file left behind


def test_a_state_dir_keeps_the_noise_state_out_of_the_checkpoints(tmp_path):
    private = tmp_path / "private"
    out = saved_run(tmp_path, state_dir=str(private))
    assert not any(PRIVACY_STATE in files for _, _, files in os.walk(out))
    assert (private / "checkpoint-2" / PRIVACY_STATE).is_file()

    privacy = PrivacyArguments(**{**vars(PRIVACY), "state_dir": str(private)})
    resumed = trainer(tmp_path / "b", privacy=privacy, max_steps=4)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    assert resumed.private.steps == 4
    with pytest.raises(PrivacyUsageError, match="holds no dpkit privacy state"):  # the state is not in there
        trainer(tmp_path / "c", max_steps=4).train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))


@pytest.mark.parametrize("state_dir", [None, "inside"])
def test_a_push_to_the_hub_that_could_carry_the_noise_state_is_refused(tmp_path, state_dir):
    privacy = PrivacyArguments(**{**vars(PRIVACY), "state_dir": state_dir and str(tmp_path / state_dir)})
    with pytest.raises(PrivacyUsageError, match="state_dir"):  # before Trainer creates a Hub repository
        DPTrainer(model=gpt2(), args=training_args(tmp_path, push_to_hub=True, hub_strategy="checkpoint"),
                  train_dataset=Counting(8), privacy=privacy)


def test_the_causal_lm_shift_survives_torch_compile(tmp_path):
    model = gpt2()
    assert _causal_lm(model) and _causal_lm(torch.compile(model))

    runs = []
    # The eager backend: dynamo's wrapper and tracing, without inductor's cost (naming a backend turns
    # torch_compile on, so the plain run names none).
    for compiled in ({}, {"torch_compile": True, "torch_compile_backend": "eager"}):
        run, released = trainer(tmp_path / str(bool(compiled)), max_steps=1, **compiled), ReleasedGradients()
        run.add_callback(released)
        run.train()
        assert isinstance(run.model_wrapped, type(torch.compile(model))) == bool(compiled)
        runs.append(released.steps[0])
    for plain, compiled in zip(*runs):
        torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-7)
