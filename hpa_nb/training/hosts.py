"""Several hosts training one model: a Cloud TPU pod slice, or processes that simulate one.

Every host runs the same ``train`` program. `Hosts` says how many there are and which one this is, from
``--coordinator/--num-processes/--process-id``, Keras's own ``KERAS_DISTRIBUTION_*`` variables, or the TPU slice
the host belongs to (`from_environment`). `start` joins them (``jax.distributed`` through
``keras.distribution.initialize``) before JAX touches a device; ``jax.devices()`` then lists every chip of every
host, and `hpa_nb.training.accelerator` trains data-parallel over all of them.

How the work is divided:

- **Data.** Each host feeds its own rows of every global batch: the training stream with
  ``Stream(num_workers=, worker_index=)`` (`hpa_nb.data.pipeline`, which decodes only those rows), validation
  batches with `local_rows`. Keras joins the hosts' rows into the global batch (``auto_shard_dataset=False``).
- **One writer.** Only host 0 (`Hosts.writer`) writes the run folder; the others read it (config, split,
  checkpoints), so the folder must be one that every host sees. What one host would otherwise decide alone
  (the deadline) is taken from host 0 (`agree`), and the weights every host starts from are host 0's (`share_weights`).
- **Predictions.** `predictor` runs a model over a batch that every host holds, each host computing its rows,
  and gives every host all the answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

# Keras's own variables for keras.distribution.initialize (coordinator address, process count, this process's id).
KERAS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
# A GKE TPU slice names its workers in the environment; a Cloud TPU VM slice in its metadata server.
SLICE_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
TRACE_VARIABLE = "HPA_TRACE_IDS"  # a folder: each host writes the training images it feeds (pipeline.read_trace)


@dataclass(frozen=True)
class Hosts:
    """The processes of one training run: `count` of them, this one `index`; `coordinator` is host 0's
    ``ADDRESS:PORT`` (None on a TPU slice, where JAX finds it)."""

    count: int = 1
    index: int = 0
    coordinator: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"process id {self.index} is outside 0..{self.count - 1}")

    @property
    def several(self) -> bool:
        return self.count > 1

    @property
    def writer(self) -> bool:
        """Whether this host writes the run folder (host 0 alone)."""
        return self.index == 0

    def rows(self, count):
        """This host's rows of a global batch of `count` rows (a multiple of the host count; an int, or a tensor)."""
        width = count // self.count
        return slice(self.index * width, (self.index + 1) * width)

    def describe(self) -> str:
        if not self.several:
            return "one host"
        where = f", coordinator {self.coordinator}" if self.coordinator else ", the TPU slice's coordinator"
        return f"host {self.index} of {self.count}{where}; " + (
            "writes the run folder" if self.writer else "host 0 writes the run folder"
        )


def from_options(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Hosts:
    """The hosts of this run: the options given (all three, or none), else `from_environment`."""
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a run over several processes needs --coordinator, --num-processes and --process-id together")
    if all(given):
        return Hosts(int(num_processes), int(process_id), coordinator)
    return from_environment(environ)


def from_environment(
    environ: Mapping[str, str] = os.environ, metadata: Callable[[str], str | None] | None = None
) -> Hosts:
    """The hosts Keras's ``KERAS_DISTRIBUTION_*`` variables name, else the TPU slice this host belongs to (its
    workers from ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` or the TPU VM's metadata server), else one."""
    address, count, index = (environ.get(name) for name in KERAS_VARIABLES)
    if count and int(count) > 1:
        if address is None or index is None:
            raise ValueError(f"{KERAS_VARIABLES[1]}={count} needs {KERAS_VARIABLES[0]} and {KERAS_VARIABLES[2]} too")
        return Hosts(int(count), int(index), address.split(",")[0])
    workers = next((environ[name] for name in SLICE_VARIABLES if environ.get(name)), None)
    worker = environ.get("TPU_WORKER_ID")
    if workers is None and (metadata is not None or _on_cloud_tpu_vm(environ)):
        metadata = metadata or _metadata
        workers, worker = metadata("worker-network-endpoints"), metadata("agent-worker-number")
    names = [name for name in (workers or "").split(",") if name]
    if len(names) > 1:
        return Hosts(len(names), int(worker or 0))
    return Hosts()


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
    """A Cloud TPU VM outside Kaggle (Kaggle's v5e-8 is one host): its chips appear as /dev/accel* or /dev/vfio."""
    if environ.get("KAGGLE_KERNEL_RUN_TYPE") or environ.get("KAGGLE_URL_BASE"):
        return False
    return Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()


def _metadata(key: str) -> str | None:
    request = urllib.request.Request(METADATA + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return answer.read().decode()
    except OSError:
        return None


def start(hosts: Hosts, seed: int) -> None:
    """Join the hosts into one JAX system (nothing for one host). Call it before JAX touches a device.

    The Keras seed is set first, so that Keras does not draw a shared one. Collectives on CPUs (all of a
    simulated slice's) go over gloo.
    """
    if not hosts.several:
        return
    import jax  # jax: on the JAX backend only, not installed with TensorFlow alone

    if keras.backend.backend() != "jax":
        raise ValueError(f"training over {hosts.count} hosts needs KERAS_BACKEND=jax, not {keras.backend.backend()}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # what runs on CPUs (all, on a simulated slice)
    keras.utils.set_random_seed(seed)
    keras.distribution.initialize(
        hosts.coordinator, hosts.count if hosts.coordinator else None, hosts.index if hosts.coordinator else None
    )
    if jax.process_count() != hosts.count:
        raise RuntimeError(f"JAX joined {jax.process_count()} processes, not the {hosts.count} asked for")
    logger.info(f"hosts: {hosts.describe()}; {jax.device_count()} devices in all, {jax.local_device_count()} here")


# --- what the hosts do together -------------------------------------------------------------------------------------
def local_rows(dataset: tf.data.Dataset, hosts: Hosts) -> tf.data.Dataset:
    """Global batches → this host's rows of each (every batch a multiple of the host count, as padded)."""
    if not hosts.several:
        return dataset

    def rows(*tensors):
        mine = hosts.rows(tf.shape(tensors[0])[0])
        return tuple(tensor[mine] for tensor in tensors)

    return dataset.map(rows)


def place(local: np.ndarray, sharding) -> Any:
    """This host's rows as its part of a global array sharded by `sharding` (one host: the whole batch)."""
    import jax  # jax: on the JAX backend only

    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, local)
    return jax.device_put(local, sharding)


def replicated(distribution) -> Any:
    """The sharding of a value every device holds whole, on `distribution`'s mesh: what every host can read."""
    import jax  # jax: on the JAX backend only

    return jax.sharding.NamedSharding(distribution.device_mesh.backend_mesh, jax.sharding.PartitionSpec())


def agree(value: Any, hosts: Hosts) -> Any:
    """Host 0's `value` (a number, an array, or a list of them) on every host, in one collective."""
    if not hosts.several:
        return value
    import jax  # jax: on the JAX backend only
    from jax.experimental import multihost_utils  # jax: on the JAX backend only

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, value)))


def share_weights(model, hosts: Hosts) -> None:
    """Give every host host 0's weights and optimizer state (a fresh model's initial weights, or a checkpoint's)."""
    if not hosts.several:
        return
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables += list(optimizer.variables)
    values = agree([variable.value for variable in variables], hosts)
    for variable, value in zip(variables, values):
        variable.assign(value)


@contextlib.contextmanager
def alone(hosts: Hosts) -> Iterator[None]:
    """Work that host 0 does by itself (saving a model): without the distribution, under which every new Keras
    variable (Keras's saving makes one) would be a collective step that the other hosts never join."""
    if not hosts.several:
        yield
        return
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def barrier(name: str, hosts: Hosts) -> None:
    """Wait until every host gets here (host 0 has written what the others read next)."""
    if hosts.several:
        from jax.experimental import multihost_utils  # jax: on the JAX backend only

        multihost_utils.sync_global_devices(name)


def predictor(model, hosts: Hosts) -> Callable[[np.ndarray], np.ndarray]:
    """``batch → probabilities`` for a batch every host holds (rows a multiple of the devices): each host computes
    its rows on its own devices, and every host gets every row's answer."""
    import jax  # jax: on the JAX backend only

    distribution = keras.distribution.distribution()

    def call(trainable, non_trainable, images):
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    compiled = jax.jit(call, out_shardings=replicated(distribution))

    def predict_batch(batch: np.ndarray) -> np.ndarray:
        sharding = distribution.get_data_layout(batch.shape).backend_layout
        images = place(batch[hosts.rows(len(batch))], sharding)
        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]
        return np.asarray(compiled(trainable, non_trainable, images), np.float32)

    return predict_batch


def trace_path(hosts: Hosts, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where this host writes the IDs of the training images it feeds (``HPA_TRACE_IDS``), or None."""
    folder = environ.get(TRACE_VARIABLE)
    return Path(folder) / f"train-ids-host{hosts.index}.txt" if folder else None
