"""A Hugging Face ``Trainer`` that trains with DP-SGD through dpkit, keeping Trainer's own loop and features.

``DPTrainer`` changes five things and leaves the rest (callbacks, logging, evaluation, schedulers, saving) to
``Trainer``:

* **Batches.** Training batches are Poisson-sampled by a ``dpkit.DPDataLoader`` with expected logical batch size
  ``per_device_train_batch_size * gradient_accumulation_steps`` per process. Each logical batch is cut into
  ``gradient_accumulation_steps`` micro-batches, declared to dpkit as pieces of that one batch
  (``private.micro_batches()``): gradient accumulation never adds up several sampled batches. The collator must
  give one row per sampled example.
* **Loss.** One loss per example (``private.criterion``: per-token cross-entropy averaged over each example's
  labelled tokens, shifted for causal language models), never the model's batch-averaged ``labels=`` loss. A
  subclass's ``compute_loss`` must return such a loss too; any other is refused.
* **Privacy.** ``dpkit.make_private`` runs on Trainer's own optimizer when Trainer creates it; with
  ``target_epsilon`` the noise is calibrated to Trainer's number of steps (``max_steps``, or
  ``num_train_epochs`` epochs). ``epsilon`` is logged with the other metrics.
* **Processes.** Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` before ``make_private``
  sees it, and the Poisson sample is global: the core's distributed DP-SGD, with one noise draw per step.
* **Checkpoints** hold dpkit's state (ledger, noise and sampler generators), written atomically, in the checkpoint
  or in ``PrivacyArguments.state_dir``; resuming restores it. A checkpoint without it, or left incomplete by a
  killed save, is refused, and so is a push to the Hub that would carry it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import dpkit
from dpkit import DPDataLoader, PrivateTraining
from dpkit.criterion import DPLoss
from dpkit.errors import PrivacyUsageError
from dpkit_transformers._batches import OneRowPerExample, PoissonMicroBatches, check_dataset, rows
from dpkit_transformers._checkpoints import (
    PRIVACY_STATE,
    check_complete,
    check_outside,
    save_atomic,
    state_path,
)

__all__ = ["DPTrainer", "PrivacyArguments", "PRIVACY_STATE"]


@dataclasses.dataclass
class PrivacyArguments:
    """dpkit's settings for :class:`DPTrainer`; Trainer's own stay in ``TrainingArguments``.

    Give ``noise_multiplier``, or ``target_epsilon`` to calibrate it to the run's steps. ``target_delta`` is the δ
    of that target and of the logged ``epsilon``; keep it below 1/N. ``state_dir``: a private folder, outside
    ``output_dir``, for each checkpoint's privacy state (``state_dir/checkpoint-N/dpkit_privacy.pt``) instead of
    the checkpoint itself; needed with ``push_to_hub``, since the state lets its holder subtract the noise.
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
    state_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give PrivacyArguments exactly one of noise_multiplier= and target_epsilon=")


def _per_example_loss(compute_loss: Callable[..., Any]) -> Callable[..., Any]:
    """``compute_loss`` checked, in training, to return dpkit's per-example loss over the micro-batch's rows."""

    @functools.wraps(compute_loss)
    def checked(self: DPTrainer, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        out = compute_loss(self, model, inputs, *args, **kwargs)
        if self.private is not None and model.training and torch.is_grad_enabled():
            loss = out[0] if isinstance(out, tuple) else out
            if not isinstance(loss, DPLoss) or loss.per_row.shape[0] != rows(inputs):
                what = (f"a {type(loss).__name__}" if not isinstance(loss, DPLoss) else
                        f"a loss over {loss.per_row.shape[0]} rows for a micro-batch of {rows(inputs)}")
                raise PrivacyUsageError(
                    f"{type(self).__name__}.compute_loss returned {what}, not one loss per example from "
                    "trainer.private.criterion (a DPLoss). A loss normalised over the batch (the model's own "
                    "labels= loss, or one divided by num_items_in_batch) lets each example change every other "
                    "example's gradient, which per-example clipping does not bound. Return "
                    "super().compute_loss(...), or self.private.criterion(logits, labels).")
        return out

    return checked


class DPTrainer(Trainer):
    """``Trainer`` with DP-SGD: Poisson batches, per-example clipping and noise, ε in the logs and checkpoints.

    ``DPTrainer(model=..., args=TrainingArguments(...), train_dataset=..., privacy=PrivacyArguments(...))``;
    ``criterion`` (default ``nn.CrossEntropyLoss``, with ``args.label_smoothing_factor``) gives each example's
    loss from the logits and labels. ``private`` is the dpkit controller once training started.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "compute_loss" in cls.__dict__:  # a subclass's own loss: checked to be per example
            cls.compute_loss = _per_example_loss(cls.__dict__["compute_loss"])

    def __init__(self, *args: Any, privacy: PrivacyArguments, criterion: nn.Module | None = None, **kwargs: Any):
        if not isinstance(privacy, PrivacyArguments):
            raise PrivacyUsageError(
                f"DPTrainer(privacy=...) takes a dpkit_transformers.PrivacyArguments, got {type(privacy).__name__}: "
                "give PrivacyArguments(noise_multiplier=...) or PrivacyArguments(target_epsilon=...) (from a dict: "
                "PrivacyArguments(**d)); for training without DP, use transformers.Trainer.")
        # Before Trainer's __init__, which creates the Hub repository with push_to_hub, and asks an unsized
        # dataset for max_steps.
        given = inspect.signature(Trainer.__init__).bind_partial(self, *args, **kwargs).arguments
        if given.get("args") is not None:
            check_outside(privacy.state_dir, given["args"].output_dir, given["args"].push_to_hub)
        if given.get("train_dataset") is not None:
            check_dataset(given["train_dataset"])
        super().__init__(*args, **kwargs)
        if not hasattr(self, "loss_is_scaled_for_ga"):
            raise ImportError("DPTrainer needs a transformers Trainer with `loss_is_scaled_for_ga`; upgrade transformers")
        if self.compute_loss_func is not None:
            raise ValueError("DPTrainer computes one loss per example itself; give criterion= instead of "
                             "compute_loss_func= (a batch-level loss cannot be clipped per example)")
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size"):
            value = getattr(self.args, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingArguments({name}={value!r}): DPTrainer's expected batch is "
                                 "per_device_train_batch_size * gradient_accumulation_steps examples per process; "
                                 f"give {name} an int >= 1")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.n_gpu > 1:
            raise PrivacyUsageError("DPTrainer runs in one process per device (torchrun, DistributedDataParallel); "
                                    "DeepSpeed, FSDP and nn.DataParallel through Trainer are not supported. Use "
                                    "dpkit.make_private with FSDP2's fully_shard directly (docs/distributed.md).")
        check_outside(privacy.state_dir, self.args.output_dir, self.args.push_to_hub)  # Trainer's default args
        self.privacy = privacy
        self.criterion = criterion or nn.CrossEntropyLoss(label_smoothing=self.args.label_smoothing_factor)
        self.private: PrivateTraining | None = None
        self._micro_batches: PoissonMicroBatches | None = None
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        # dpkit clips each example; Trainer's clip of the summed gradient would act on gradients dpkit has not
        # written yet. The loss of each micro-batch is a mean over its rows, as dpkit expects: Trainer must not
        # divide it by the accumulation steps. Skipping ahead in a resumed epoch would draw and waste Poisson
        # batches: the restored sampler state continues the stream instead.
        self.args.max_grad_norm = 0.0
        self.args.ignore_data_skip = True
        self.loss_is_scaled_for_ga = True

    # -- data ---------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> PoissonMicroBatches:
        """Poisson batches of expected size ``per_device_train_batch_size * gradient_accumulation_steps`` per
        process (one global sample over all processes), each cut into ``gradient_accumulation_steps`` pieces."""
        if self._micro_batches is not None:
            return self._micro_batches
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        check_dataset(self.train_dataset)
        dataset, collator = self.train_dataset, self._get_collator_with_removed_columns(self.data_collator, "training")
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):  # a datasets.Dataset
            dataset, collator = self._remove_unused_columns(dataset, description="training"), self.data_collator
        G, world = self.args.gradient_accumulation_steps, self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = None if self.privacy.secure_mode else torch.Generator().manual_seed(seed)
        loader = DPDataLoader(dataset, min(1.0, self._train_batch_size * G * world / len(dataset)),
                              collate_fn=OneRowPerExample(collator, _name(self.data_collator)), generator=generator,
                              secure_mode=self.privacy.secure_mode, distributed=world > 1,
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
        module: nn.Module = self.model
        if self.args.world_size > 1:  # dpkit must see the wrapper that the forward passes go through
            module = self._ddp = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=bool(self.args.ddp_find_unused_parameters))
        common = dict(module=module, optimizer=optimizer, data_loader=micro.loader, max_grad_norm=p.max_grad_norm,
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

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        """Under torchrun, the ``DistributedDataParallel`` that dpkit was made private with (Trainer's own
        wrapping would come after ``make_private`` and hide the forward passes from it)."""
        if training and self._ddp is not None:
            return self._ddp
        return super()._wrap_model(model, training, dataloader)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | DPLoss | tuple:
        """The mean of one loss per example (a ``DPLoss`` in training, which dpkit clips per example)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if _causal_lm(model):
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
        """Trainer's step on one micro-batch; the loss it reports is divided by the micro-batches per batch.

        ``compute_loss`` gets ``num_items_in_batch=None``: a count over the whole batch has no place in a
        per-example loss.
        """
        return super().training_step(model, inputs, None) / self.current_gradient_accumulation_steps

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
        if self.private is not None:
            state = self.private.state_dict()  # a collective under torch.distributed: every rank takes part
            if self.args.should_save:
                save_atomic(state, state_path(output_dir, self.privacy.state_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        check_complete(resume_from_checkpoint, self.privacy.state_dir)  # before Trainer reads anything from it
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.private is None:
            return
        step = check_complete(checkpoint, self.privacy.state_dir)
        self.private.load_state_dict(torch.load(state_path(checkpoint, self.privacy.state_dir), weights_only=True))
        if self.private.steps != step:
            raise PrivacyUsageError(f"the privacy state of {checkpoint} has counted {self.private.steps} steps, and "
                                    f"the checkpoint is at step {step}: it belongs to another checkpoint. Resume "
                                    "from a checkpoint with its own privacy state.")

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        check_outside(self.privacy.state_dir, self.args.output_dir, push_to_hub=True)  # never push the noise state
        super()._push_from_checkpoint(checkpoint_folder)


def _name(collator: Any) -> str:
    return getattr(collator, "__name__", type(collator).__name__)


def _causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (under its DDP, ``torch.compile`` and peft wrappers) is a causal LM, whose labels shift."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            inner = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        else:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
        if inner is model:
            return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        model = inner
