"""Re-estimating batch-norm statistics after (or during) training, as one compiled forward pass per batch.

In short runs the moving averages (momentum 0.99) lag far behind weights that change fast, and
inference-mode predictions fall to near chance. `recalibrate` replaces every batch norm's moving
mean and variance with the plain average of the statistics of `steps` batches, computed in
training mode with no gradient step. Each batch runs through one compiled function (``jax.jit``
or ``tf.function``) that returns the batch statistics without touching the model; on JAX the
batch is sharded over the devices exactly as Keras shards a training batch, so 8 TPU chips share
the work instead of each computing it all, op by op.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from hpa_nb.training import hosts

_COMPILED: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested models included, in order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += batch_norm_layers(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def _statistics_function(model, layers: list) -> Callable:
    """A compiled ``images → [mean, variance, mean, variance, ...]`` of each layer's batch statistics."""
    index = {id(variable): position for position, variable in enumerate(model.non_trainable_variables)}
    positions = [index[id(variable)] for layer in layers for variable in (layer.moving_mean, layer.moving_variance)]

    def statistics(trainable, non_trainable, images):
        # With momentum 0 a training-mode call sets the moving statistics to the batch's own.
        _, updated = model.stateless_call(trainable, non_trainable, images, training=True)
        return [updated[position] for position in positions]

    if keras.backend.backend() == "jax":
        import jax  # jax: on the JAX backend only

        distribution = keras.distribution.distribution()
        # The statistics come back whole on every device, so every host reads the same values.
        compiled = jax.jit(
            statistics, **({} if distribution is None else {"out_shardings": hosts.replicated(distribution)})
        )

        def place(images):  # shard the batch over the devices like Keras's own training step does
            if distribution is None:
                return images
            # over several hosts, `images` are this host's rows of the batch
            return hosts.place(images, distribution.get_data_layout(images.shape).backend_layout)
    else:
        compiled = tf.function(statistics, reduce_retracing=True)
        place = tf.convert_to_tensor

    def run(images):
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.momentum = 0.0  # read whenever the function is traced (its first call, a new batch shape)
        try:
            trainable = [variable.value for variable in model.trainable_variables]
            non_trainable = [variable.value for variable in model.non_trainable_variables]
            return compiled(trainable, non_trainable, place(images))
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum

    return run


def recalibrate(model, dataset, steps: int) -> int:
    """Set every batch norm's moving statistics to the average over `steps` batches of `dataset`.

    `dataset` yields ``(images, ...)`` batches (a tf.data pipeline or any iterable of tuples).
    The average is the same as a training-mode pass with momentum ``k/(k+1)`` at the k-th batch.
    Returns the number of batches used (0 when the model has no batch norm).
    """
    layers = batch_norm_layers(model)
    if not layers or steps <= 0:
        return 0
    if model not in _COMPILED:
        _COMPILED[model] = _statistics_function(model, layers)
    statistics = _COMPILED[model]
    batches = dataset.take(steps).as_numpy_iterator() if hasattr(dataset, "take") else iter(dataset)
    totals, used = None, 0
    for batch in batches:
        values = [np.asarray(value, np.float64) for value in statistics(batch[0])]
        totals = values if totals is None else [total + value for total, value in zip(totals, values)]
        used += 1
        if used == steps:
            break
    if totals is None:
        return 0
    for layer, mean, variance in zip(layers, totals[0::2], totals[1::2]):
        layer.moving_mean.assign((mean / used).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((variance / used).astype(layer.moving_variance.dtype))
    return used
