"""Hugging Face `Trainer`: `WtTrainerCallback` prunes inside `Trainer.train` (group lasso, gradual pruning to a
cost target, physical pruning at the end) and logs wt's metrics with the trainer's own logs.

The work is `wtfront.train.pruner.TrainingPruner`'s; this module maps the `TrainerCallback` events onto it:
trace and schedule at `on_train_begin` (from `state.max_steps`, which follows `num_train_epochs`/`max_steps`),
the group-lasso gradient in `on_pre_optimizer_step` (after accumulation and gradient clipping), the schedule
in `on_step_end`, the metrics in `on_log` (every `logging_steps`: they join the trainer's `logs`, hence
`state.log_history` and every `report_to` integration that comes after this callback), physical pruning in
`on_train_end`.

`Trainer` puts its `report_to` callbacks (TensorBoard, W&B, ...) before the ones passed as `callbacks=`, and
a callback cannot move itself; `cb.add_to(trainer)` inserts it right after the trainer's flow callback so
that those integrations see the metrics too.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..train.pruner import TrainingPruner

__all__ = ["WtTrainerCallback"]


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (its `step` is what the hooks see)."""
    return getattr(optimizer, "optimizer", optimizer)


class WtTrainerCallback(TrainerCallback):
    """Prune the trainer's model to a cost target during `Trainer.train`.

    ```
    cb = WtTrainerCallback(example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)}, target_macs=0.6)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    cb.add_to(trainer)          # or Trainer(..., callbacks=[cb]): then report_to integrations miss wt/ keys
    trainer.train()
    ```

    Arguments are `TrainingPruner`'s (one of `target_macs=`/`target_params=`/`target_bops=`, `group_lasso=`,
    `schedule=`, `start=`/`end=` as fractions of the run, `prune_at=`, `trackers=`, `submodule=`, controller
    options). `example_inputs` is what the model's forward takes (a mapping for keyword arguments). Metrics
    (`wt/active_macs/ratio`, `wt/target`, `wt/group_lasso`, ...) join the trainer's logs at `logging_steps`;
    after physical pruning they are appended to `state.log_history`.
    """

    def __init__(self, example_inputs: Any, **options: Any) -> None:
        self.pruner = TrainingPruner(example_inputs, **options)
        self._optimizer: Any = None

    @property
    def structure(self) -> Any:
        return self.pruner.structure

    def add_to(self, trainer: Trainer) -> WtTrainerCallback:
        """Register with `trainer`, before its `report_to` integrations (right after its flow callback)."""
        callbacks = trainer.callback_handler.callbacks
        if self not in callbacks:
            callbacks.insert(min(1, len(callbacks)), self)
        return self

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.pruner.controller is not None:
            return
        if model is None:
            raise ValueError("WtTrainerCallback: the trainer passed no model to on_train_begin")
        self.pruner.setup(model, int(state.max_steps))
        self._optimizer = _torch_optimizer(optimizer) if optimizer is not None else None
        self.pruner.attach([self._optimizer] if self._optimizer is not None else [])

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        self.pruner.add_group_lasso_grad()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.global_step > 0:
            self.pruner.step(state.global_step - 1, self._optimizers())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or self.pruner.controller is None or "loss" not in logs:
            return  # evaluation and final-summary logs carry no training step's metrics
        metrics = self.pruner.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.pruner.controller is None:
            return
        if self.pruner.finish(self._optimizers()) is not None or self.pruner.physically_pruned:
            state.log_history.append({**self.pruner.metrics(), "step": state.global_step})

    def _optimizers(self) -> list[Any]:
        return [self._optimizer] if self._optimizer is not None else []
