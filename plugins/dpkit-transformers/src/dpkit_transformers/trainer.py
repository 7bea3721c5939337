"""A Hugging Face ``Trainer`` that trains with DP-SGD through dpkit, keeping Trainer's own loop and features.

``DPTrainer`` changes four things and leaves the rest (callbacks, logging, evaluation, schedulers, saving) to
``Trainer``:

* **Batches.** Training batches are Poisson-sampled by a ``dpkit.DPDataLoader`` with expected logical batch size
  ``per_device_train_batch_size * gradient_accumulation_steps``. Each logical batch is cut into
  ``gradient_accumulation_steps`` micro-batches, declared to dpkit as pieces of that one batch
  (``private.micro_batches()``): gradient accumulation never adds up several sampled batches.
* **Loss.** One loss per example (``private.criterion``: per-token cross-entropy averaged over each example's
  labelled tokens, shifted for causal language models), never the model's batch-averaged ``labels=`` loss.
* **Privacy.** ``dpkit.make_private`` runs on Trainer's own optimizer when Trainer creates it; with
  ``target_epsilon`` the noise is calibrated to Trainer's number of steps (``max_steps``, or
  ``num_train_epochs`` epochs). ``epsilon`` is logged with the other metrics.
* **Checkpoints** hold dpkit's state (ledger, noise and sampler generators) beside the optimizer's, and resuming
  restores it: a checkpoint without it is refused, since the privacy count would restart at zero.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import dpkit
from dpkit import DPDataLoader, PrivateTraining
from dpkit.criterion import DPLoss
from dpkit.errors import PrivacyUsageError

PRIVACY_STATE = "dpkit_privacy.pt"  # in each checkpoint folder, beside Trainer's optimizer.pt
IGNORE_INDEX = -100  # Hugging Face's label for tokens without a loss (padding, prompts)


@dataclasses.dataclass
class PrivacyArguments:
    """dpkit's settings for :class:`DPTrainer`; Trainer's own stay in ``TrainingArguments``.

    Give ``noise_multiplier``, or ``target_epsilon`` to calibrate it to the run's steps. ``target_delta`` is the δ
    of that target and of the logged ``epsilon``; keep it below 1/N.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    grad_sample_mode: str = "auto"
    clipping: str = "flat"
    accountant: str = "prv"
    noise_seed: int | None = None
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give PrivacyArguments exactly one of noise_multiplier= and target_epsilon=")


class PoissonMicroBatches:
    """Trainer's training "dataloader": each Poisson batch of ``loader`` as ``pieces`` micro-batches.

    The pieces of one batch are yielded inside ``private.micro_batches()``, so dpkit admits their backward passes
    into one step; Trainer draws exactly ``pieces`` of them per optimizer step. A piece left empty (a batch with
    fewer examples than pieces) becomes one all-zero row whose labels are all ``-100``: the model runs on it (many
    Hugging Face models cannot run on zero rows) and its loss, hence its gradient, is exactly zero.
    """

    def __init__(self, loader: DPDataLoader, pieces: int):
        self.loader, self.pieces = loader, pieces
        self.private: PrivateTraining | None = None  # set once make_private ran

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader) * self.pieces

    def __iter__(self) -> Iterator[Any]:
        if self.private is None:
            raise RuntimeError("PoissonMicroBatches needs the PrivateTraining (DPTrainer sets it in create_optimizer)")
        for batch in self.loader:
            with self.private.micro_batches():
                yield from (_padding_row(p) if _rows(p) == 0 else p for p in split(batch, self.pieces))


def split(batch: Any, pieces: int) -> list[Any]:
    """``batch`` (a pytree of tensors with examples along dim 0) cut into ``pieces`` nearly equal parts."""
    leaves, spec = pytree.tree_flatten(batch)
    parts = [t.tensor_split(pieces) if isinstance(t, Tensor) else [t] * pieces for t in leaves]
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(pieces)]


def _rows(batch: Any) -> int:
    return next((t.shape[0] for t in pytree.tree_leaves(batch) if isinstance(t, Tensor)), 0)


def _padding_row(batch: dict[str, Any]) -> dict[str, Any]:
    """One row shaped like ``batch``'s: zeros, an attention mask of ones, every label ignored."""
    fill = {"labels": IGNORE_INDEX, "attention_mask": 1}
    return {k: torch.full((1, *v.shape[1:]), fill.get(k, 0), dtype=v.dtype) if isinstance(v, Tensor) else v
            for k, v in batch.items()}


class DPTrainer(Trainer):
    """``Trainer`` with DP-SGD: Poisson batches, per-example clipping and noise, ε in the logs and checkpoints.

    ``DPTrainer(model=..., args=TrainingArguments(...), train_dataset=..., privacy=PrivacyArguments(...))``;
    ``criterion`` (default ``nn.CrossEntropyLoss``, with ``args.label_smoothing_factor``) gives each example's
    loss from the logits and labels. ``private`` is the dpkit controller once training started.
    """

    def __init__(self, *args: Any, privacy: PrivacyArguments, criterion: nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not hasattr(self, "loss_is_scaled_for_ga"):
            raise ImportError("DPTrainer needs a transformers Trainer with `loss_is_scaled_for_ga`; upgrade transformers")
        if self.compute_loss_func is not None:
            raise ValueError("DPTrainer computes one loss per example itself; give criterion= instead of "
                             "compute_loss_func= (a batch-level loss cannot be clipped per example)")
        if self.args.world_size > 1:
            raise PrivacyUsageError("DPTrainer runs in one process; distributed DP training is not supported yet")
        self.privacy = privacy
        self.criterion = criterion or nn.CrossEntropyLoss(label_smoothing=self.args.label_smoothing_factor)
        self.private: PrivateTraining | None = None
        self._micro_batches: PoissonMicroBatches | None = None
        # dpkit clips each example; Trainer's clip of the summed gradient would act on gradients dpkit has not
        # written yet. The loss of each micro-batch is a mean over its rows, as dpkit expects: Trainer must not
        # divide it by the accumulation steps. Skipping ahead in a resumed epoch would draw and waste Poisson
        # batches: the restored sampler state continues the stream instead.
        self.args.max_grad_norm = 0.0
        self.args.ignore_data_skip = True
        self.loss_is_scaled_for_ga = True

    # -- data ---------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> PoissonMicroBatches:
        """Poisson batches of expected size ``per_device_train_batch_size * gradient_accumulation_steps``, each
        cut into ``gradient_accumulation_steps`` micro-batches."""
        if self._micro_batches is not None:
            return self._micro_batches
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self._get_collator_with_removed_columns(self.data_collator, "training")
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):  # a datasets.Dataset
            dataset, collator = self._remove_unused_columns(dataset, description="training"), self.data_collator
        G = self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = None if self.privacy.secure_mode else torch.Generator().manual_seed(seed)
        loader = DPDataLoader(dataset, min(1.0, self._train_batch_size * G / len(dataset)), collate_fn=collator,
                              generator=generator, secure_mode=self.privacy.secure_mode,
                              num_workers=self.args.dataloader_num_workers,
                              pin_memory=self.args.dataloader_pin_memory)
        self._micro_batches = PoissonMicroBatches(loader, G)
        return self._micro_batches

    # -- privacy ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, made private by dpkit (once; a later ``train()`` keeps the same controller)."""
        optimizer = super().create_optimizer(model)
        if self.private is None:
            self.private = self._make_private(optimizer)
        return optimizer

    def _make_private(self, optimizer: torch.optim.Optimizer) -> PrivateTraining:
        micro = self.get_train_dataloader()
        p = self.privacy
        common = dict(module=self.model, optimizer=optimizer, data_loader=micro.loader, max_grad_norm=p.max_grad_norm,
                      grad_sample_mode=p.grad_sample_mode, clipping=p.clipping, accountant=p.accountant,
                      noise_seed=p.noise_seed, secure_mode=p.secure_mode, criterion=self.criterion)
        if p.target_epsilon is None:
            private = dpkit.make_private(noise_multiplier=p.noise_multiplier, **common)
        else:
            steps = self.args.max_steps if self.args.max_steps > 0 else math.ceil(
                self.args.num_train_epochs * len(micro.loader))
            private = dpkit.make_private_with_epsilon(target_epsilon=p.target_epsilon, target_delta=p.target_delta,
                                                      steps=steps, **common)
        micro.private = private
        return private

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | DPLoss | tuple:
        """The mean of one loss per example (a ``DPLoss`` in training, which dpkit clips per example)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self._causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
        if logits.dim() == 3:
            logits = logits.transpose(1, 2)  # [N, classes, positions], as CrossEntropyLoss expects
        training = model.training and torch.is_grad_enabled() and self.private is not None
        if training:
            loss = self.private.criterion(logits, labels)
        else:
            loss = self.private.criterion.per_example(logits, labels).mean() if self.private is not None else \
                nn.CrossEntropyLoss()(logits, labels)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Trainer's step on one micro-batch; the loss it reports is divided by the micro-batches per batch."""
        return super().training_step(model, inputs, num_items_in_batch) / self.current_gradient_accumulation_steps

    def _causal_lm(self, model: nn.Module) -> bool:
        inner = self.accelerator.unwrap_model(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a peft model
        return inner._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log, with the ε spent so far (at ``privacy.target_delta``) beside the loss.

        Trainer's ``grad_norm`` is left out: it is measured before dpkit writes the step's gradient.
        """
        if self.private is not None and "loss" in logs:
            logs = {k: v for k, v in logs.items() if k != "grad_norm"}
            logs["epsilon"] = self.private.epsilon(self.privacy.target_delta)
        super().log(logs, *args, **kwargs)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.private is not None and self.args.should_save:
            torch.save(self.private.state_dict(), os.path.join(output_dir, PRIVACY_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.private is None:
            return
        path = os.path.join(checkpoint, PRIVACY_STATE)
        if not os.path.isfile(path):
            raise PrivacyUsageError(f"the checkpoint {checkpoint} holds no dpkit privacy state ({PRIVACY_STATE}): "
                                    "resuming from it would restart the privacy count at zero. Resume from a "
                                    "checkpoint that DPTrainer saved.")
        self.private.load_state_dict(torch.load(path, weights_only=True))
