"""Training: the progressive trainer and its parts.

``trainer`` (the loop: stages, ``train_step``, epoch end), ``state`` (everything stateful of a stage,
its checkpoint state), ``objective`` (losses -> total, logged sums), ``critics`` (trainable parts of
losses), ``sampling`` (data order, RNG states), ``interrupt`` (Ctrl-C), ``cascade`` (earlier stages
feeding ``prev``), ``logbook`` (the run folder's metrics files).
"""
