"""PyTorch Lightning: `WtLightningCallback` prunes inside `Trainer.fit` (group lasso, gradual pruning to a cost
target, physical pruning at the end) and logs wt's metrics through the trainer's loggers.

The work is `wtfront.train.pruner.TrainingPruner`'s; this module maps Lightning's hooks onto it: trace at
`on_fit_start`, schedule from `trainer.estimated_stepping_batches` (which follows `max_epochs`/`max_steps`)
at `on_train_start`, the group-lasso gradient in `on_before_optimizer_step` (after Lightning's unscaling and
gradient accumulation), the schedule and logging in `on_train_batch_end` (every `log_every_n_steps` optimizer
steps, to every logger of `trainer.loggers`), physical pruning in `on_train_end`. Works with `lightning` (and
with the `pytorch_lightning` package where `lightning` is not installed).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ModuleNotFoundError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]

from ..train.pruner import TrainingPruner

__all__ = ["WtLightningCallback"]


class WtLightningCallback(Callback):
    """Prune the LightningModule (or its `submodule`) to a cost target during `Trainer.fit`.

    ```
    cb = WtLightningCallback(example_inputs=torch.randn(1, 3, 32, 32), target_macs=0.6, group_lasso=1e-4)
    lightning.Trainer(max_epochs=10, callbacks=[cb]).fit(module, loader)
    ```

    Arguments are `TrainingPruner`'s (one of `target_macs=`/`target_params=`/`target_bops=`, `group_lasso=`,
    `schedule=`, `start=`/`end=` as fractions of the run, `prune_at=`, `trackers=`, `submodule=`, controller
    options). The LightningModule's forward must accept `example_inputs` (or name the network with
    `submodule=`). After `fit`, `cb.structure` is the pruned model's structure and `cb.pruner.controller.history`
    the pruning steps. Metrics (`wt/active_macs/ratio`, `wt/target`, `wt/group_lasso`, ...) go to
    `trainer.loggers` at `log_every_n_steps`, and once more after physical pruning.
    """

    def __init__(self, example_inputs: Any, **options: Any) -> None:
        super().__init__()
        self.pruner = TrainingPruner(example_inputs, **options)
        self._last_logged = -1
        self._restored: dict[str, Any] | None = None

    @property
    def structure(self) -> Any:
        return self.pruner.structure

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pruner.controller is not None:  # a second fit on the same callback: continue where it was
            return
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("WtLightningCallback schedules pruning within the run: set max_epochs or max_steps")
        self.pruner.setup(pl_module, int(total))
        if self._restored is not None:  # resumed from a checkpoint: the units removed so far, the history
            assert self.pruner.controller is not None
            self.pruner.controller.load_state_dict(self._restored)
            self._restored = None
        self.pruner.attach(trainer.optimizers)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.pruner.add_group_lasso_grad()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done
        if step == 0:
            return
        self.pruner.step(step - 1, trainer.optimizers)
        every = max(1, trainer.log_every_n_steps)
        if step % every == 0 and step - 1 != self._last_logged:
            self._log(trainer, step - 1)  # the step index Lightning logs this step's metrics under

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pruner.controller is None:
            return
        if self.pruner.finish(trainer.optimizers) is not None or self.pruner.physically_pruned:
            self._log(trainer, max(trainer.global_step - 1, 0))

    def _log(self, trainer: Trainer, step: int) -> None:
        self._last_logged = step
        metrics = self.pruner.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The controller's JSON state, saved in Lightning checkpoints (resume with `fit(ckpt_path=...)` from a
        checkpoint taken before physical pruning: the same decisions follow)."""
        ctrl = self.pruner.controller
        return {"controller": ctrl.state_dict()} if ctrl is not None and not self.pruner.physically_pruned else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("controller")
