"""Hook specifications of x2ct-framework.

Every hook is prefixed by what it does; registration hooks receive a `register(name, factory)`
callable so that the core can refuse duplicates and remember which plugin gave which component.
Order between plugins is expressed with ``tryfirst``/``trylast`` on the implementation, never by
registration order.
"""

import pluggy

PROJECT_NAME = "x2ct_framework"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_models(register):
    """Register model factories.

    ``register(name, factory)``: ``factory(**options)`` returns an ``nn.Module`` called as
    ``model(xrays, geometry, prev=None) -> volume [B, 1, R, R, R]``.
    """


@hookspec
def register_losses(register):
    """Register loss factories.

    ``register(name, factory)``: ``factory(**options)`` returns an ``nn.Module`` called as
    ``loss(pred, target, batch) -> scalar tensor``.
    """


@hookspec
def register_datasets(register):
    """Register dataset factories.

    ``register(name, factory)``: ``factory(split=..., stage=..., **options)`` returns a
    ``torch.utils.data.Dataset`` whose items are the batch dict of the design (unbatched).
    """


@hookspec
def register_metrics(register):
    """Register metric factories.

    ``register(name, factory)``: ``factory(**options)`` returns a callable
    ``metric(pred, target, batch) -> tensor [B]`` (one value per case).
    """


@hookspec
def register_protocols(register):
    """Register metric protocols (named sets of metrics with fixed conventions).

    ``register(name, factory)``: ``factory(hu_window, **options)`` returns a
    :class:`x2ct_framework.evaluation.protocols.Protocol` (or a dict ``{metric: callable}``, wrapped
    into one); every number it gives is keyed ``<name>/<metric>``.
    """


@hookspec
def register_evaluators(register):
    """Register evaluators: components that score a whole split (``x2ct_framework.evaluation.evaluators``).

    ``register(name, factory)``: ``factory(**options)`` returns an object with ``start(context)``,
    ``update(pred, target, batch)`` (every batch of the split, in case order) and ``result()`` giving an
    ``EvaluatorResult`` (per-case columns, summary numbers with intervals, notes, or why it was skipped).
    """


@hookspec
def register_segmenters(register):
    """Register segmenters for the ``organ_consistency`` evaluator.

    ``register(name, factory)``: ``factory(**options)`` returns a callable
    ``segmenter(pred_hu, target_hu, batch) -> (pred_labels, target_labels)``, label maps ``[B, 1, D, H, W]``
    (integers), with a ``names`` attribute ``{code: structure name}``; a factory raises
    ``EvaluatorSkipped`` when it cannot run here (its library or weights are absent).
    """


@hookspec
def register_optimizers(register):
    """Register optimizers.

    ``register(name, factory)``: ``factory(params, lr=..., weight_decay=..., **options)`` returns a
    ``torch.optim.Optimizer``; ``options`` come from the stage's ``optimizer_options``.
    """


@hookspec
def register_schedules(register):
    """Register learning-rate schedules.

    ``register(name, factory)``: ``factory(total, lr, min_lr, warmup, **options)`` returns a callable
    ``lr(step) -> float`` for optimizer update ``step`` (0-based) of ``total``; ``options`` come from the
    stage's ``scheduler_options``.
    """


@hookspec
def register_trackers(register):
    """Register experiment trackers (beside accelerate's built-in ``tensorboard``, ``wandb``, ...).

    ``register(name, factory)``: ``factory(**options)`` returns an ``accelerate.tracking.GeneralTracker``;
    ``options`` come from ``[train.tracker_options.<name>]``, and a factory may declare ``logging_dir``
    (the run folder) and ``run_name`` (the recipe's name). A recipe selects it in ``train.trackers``.
    """


@hookspec
def on_stage_start(trainer, stage):
    """Called on every process before the first epoch of a stage."""


@hookspec
def on_train_step_end(trainer, stage, step, metrics):
    """Called on every process after each optimizer update; ``step`` counts the stage's updates (1-based).

    ``metrics``: that update's scalars on this process (``lr``, ``train/loss``, ``train/<term>``,
    ``train/grad_norm`` unless the update was skipped), averaged over its micro-batches.
    """


@hookspec
def on_validation_end(trainer, stage, epoch, metrics):
    """Called on every process after each validation; ``epoch`` is 0-based, ``metrics`` a dict of floats."""


@hookspec
def on_epoch_end(trainer, stage, epoch, metrics):
    """Called on every process after each epoch; ``metrics`` is a dict of floats."""


@hookspec
def on_checkpoint_saved(trainer, stage, path, kind):
    """Called on the main process after a checkpoint is written; ``kind`` is last/best/periodic."""


@hookspec
def on_stage_end(trainer, stage, metrics):
    """Called on every process after the last epoch of a stage."""


@hookspec
def on_run_end(trainer, results):
    """Called on the main process after the last stage; ``results`` maps stage name to its metrics."""
