"""Which hardware trains the model, and how: TPU, GPUs or CPU, on the TensorFlow or the JAX backend.

`detect()` picks one path from what the process can see:

=========================================  ========================================================
TF backend, ``tensorflow-tpu`` installed   ``TPUStrategy`` on the local TPU (only with an explicit
                                           ``KERAS_BACKEND=tensorflow``: a TPU VM defaults to JAX)
JAX backend, JAX sees TPU devices          ``keras.distribution.DataParallel`` over all of them
                                           (Kaggle's TPU v5e-8: its image has JAX, not tensorflow-tpu)
TF backend, several GPUs                   ``MirroredStrategy``
JAX backend, several devices of any kind   ``DataParallel`` (also 8 CPU devices simulated with
                                           ``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
JAX backend, several hosts                 ``DataParallel`` over every device of every host, each
(`hpa_nb.training.hosts`)                  host feeding its rows of each batch (a TPU pod slice)
TF backend, ``cpu_replicas`` / env         ``MirroredStrategy`` over that many logical CPU devices,
``HPA_CPU_REPLICAS`` > 1                   to exercise the multi-replica path without a GPU
otherwise                                  one device, no strategy
=========================================  ========================================================

Mixed precision follows the device: bfloat16 on TPU, float16 on GPU, float32 on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import keras
import tensorflow as tf

from hpa_nb.core.env import tensorflow_sees_tpu
from hpa_nb.training.hosts import Hosts

logger = logging.getLogger(__name__)

PRECISION = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16", "cpu": "float32"}
# Steps run per compiled call: on an accelerator, one host round trip per step would idle it.
STEPS_PER_EXECUTION = {"tpu": 32, "gpu": 8, "cpu": 1}
CPU_REPLICAS_VARIABLE = "HPA_CPU_REPLICAS"
JAX_PLATFORMS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


@dataclass(frozen=True)
class Accelerator:
    """What `detect` found: where training runs and how the model must be built to use all of it.

    Build and compile the model inside ``with accelerator.scope():``; size batches with
    `global_batch_size`. On JAX the distribution is set process-wide by `detect` (Keras's fit
    reads it to shard each batch), so there the scope only sets the precision policy.
    """

    backend: str  # "tensorflow" or "jax"
    device_kind: str  # "tpu", "gpu" or "cpu"
    device_name: str  # e.g. "TPU v5 lite", "NVIDIA H200", "cpu"
    replicas: int  # every device of every host
    precision: str  # Keras dtype policy name
    strategy: Any = field(default=None, repr=False)  # tf.distribute.Strategy, TF paths only
    distribution: Any = field(default=None, repr=False)  # keras.distribution.DataParallel, JAX paths only
    hosts: Hosts = Hosts()  # the processes training together (`hpa_nb.training.hosts`)

    @property
    def path(self) -> str:
        """A short description of the chosen path, for logs and config.json."""
        if self.strategy is not None:
            return type(self.strategy).__name__
        return "DataParallel" if self.distribution is not None else "single device"

    @property
    def steps_per_execution(self) -> int:
        return STEPS_PER_EXECUTION[self.device_kind]

    def global_batch_size(self, per_replica: int) -> int:
        """Images per training step across all replicas (of all hosts)."""
        return per_replica * self.replicas

    def local_batch_size(self, global_batch: int) -> int:
        """The rows of each global batch that this host feeds."""
        return global_batch // self.hosts.count

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Set the precision policy and enter the TF strategy (if any); restore the policy on exit."""
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def describe(self) -> str:
        hosts = f" over {self.hosts.count} hosts" if self.hosts.several else ""
        return (
            f"{self.backend} on {self.replicas} × {self.device_kind} ({self.device_name}){hosts}, {self.path}, "
            f"precision {self.precision}"
        )


def detect(
    cpu_replicas: int | None = None,
    precision: str | None = None,
    environ: Mapping[str, str] = os.environ,
    hosts: Hosts = Hosts(),
) -> Accelerator:
    """Find the accelerator and prepare it (connect the TPU, set the JAX distribution).

    ``cpu_replicas`` (default: env ``HPA_CPU_REPLICAS``) splits the CPU into that many logical
    devices on the TF backend; it must be given before TensorFlow first touches its devices. On
    JAX, simulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before
    JAX starts instead. `precision` (a Keras dtype policy such as "float32" or "mixed_bfloat16")
    replaces the device's default. With several `hosts` (joined by `hpa_nb.training.hosts.start` first) the
    devices are those of every host.
    """
    if cpu_replicas is None:
        cpu_replicas = int(environ.get(CPU_REPLICAS_VARIABLE, "1") or 1)
    backend = keras.backend.backend()
    finder = {"tensorflow": _detect_tensorflow, "jax": _detect_jax}.get(backend)
    if finder is None:
        raise ValueError(f"Keras backend {backend!r} is not supported: use KERAS_BACKEND=tensorflow or jax")
    found = dataclasses.replace(finder(cpu_replicas), hosts=hosts)
    if precision is not None:
        found = dataclasses.replace(found, precision=precision)
    return found


def _detect_tensorflow(cpu_replicas: int) -> Accelerator:
    if tensorflow_sees_tpu():
        # "local": the TPU of this TPU VM; the default looks for a remote TPU node and fails on a VM.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
        return Accelerator("tensorflow", "tpu", "TPU", strategy.num_replicas_in_sync, PRECISION["tpu"], strategy)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else None
        return Accelerator("tensorflow", "gpu", name, len(gpus), PRECISION["gpu"], strategy)
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        except RuntimeError:  # devices already initialised: keep whatever split exists
            pass
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        if len(devices) > 1:
            strategy = tf.distribute.MirroredStrategy(devices)
            return Accelerator("tensorflow", "cpu", "cpu", len(devices), PRECISION["cpu"], strategy)
        logger.info(
            f"accelerator: cannot split the CPU into {cpu_replicas} devices once TensorFlow has started; "
            "using one (call detect() first)"
        )
    return Accelerator("tensorflow", "cpu", "cpu", 1, PRECISION["cpu"])


def _detect_jax(cpu_replicas: int) -> Accelerator:
    import jax  # jax: on the JAX backend only, not installed with TensorFlow alone

    devices = jax.devices()  # the default platform: TPU, else GPU, else CPU; every host's, once they are joined
    kind = JAX_PLATFORMS.get(devices[0].platform, "cpu")
    name = getattr(devices[0], "device_kind", kind)
    distribution = None
    if len(devices) > 1:
        # Each host feeds its own rows of every batch (`hpa_nb.data.pipeline.Stream`): Keras must not shard the data
        # (on one host it never does).
        distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        keras.distribution.set_distribution(distribution)
    return Accelerator("jax", kind, name, len(devices), PRECISION[kind], distribution=distribution)
