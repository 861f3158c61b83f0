"""Every training option, in one frozen dataclass per section (data, model, optimisation, validation, cells,
runtime) gathered in `TrainConfig`, shared by the CLI, the notebooks and ``RUN/config.json`` (flat), with the quick
sizes that CI and smoke runs use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from hpa_nb.core.labels import CHANNEL_SETS
from hpa_nb.training.backbones import BACKBONES, is_preset, normalize_weights

LOSSES = ("bce", "focal")  # both with per-class positive weights; focal uses focal_gamma
LEVELS = ("image", "cell")


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """What is read, and how the images are split."""

    data_dir: str | None = None  # None: the folder `hpa_nb.sample.sources.find_data` discovers
    # Compact shards elsewhere (a folder, or OWNER/KERNEL of the prepare kernel attached as input), paired with
    # data_dir's train.csv. None: data_dir/shards when it exists, else on Kaggle any attached shards.
    shards: str | None = None
    image_size: int = 384
    channels: str = "rgb"  # "rgb" or "rgby"
    val_fraction: float = 0.2
    seed: int = 0
    split_from: str | None = None  # a run folder (or split CSV) whose split to use, instead of drawing one
    # K-fold training: `folds` multi-label stratified folds of data_dir's images (the same for a seed), fold `fold`
    # held out and the others trained on; None: one split by val_fraction. Every run writes its held-out
    # predictions (RUN/oof.csv), and `hpa_nb.training.folds` gathers a set of fold runs' into out-of-fold figures.
    folds: int | None = None
    fold: int = 0
    # More folders in the competition layout (e.g. public HPA images as train.csv + PNGs), read beside data_dir
    # (`hpa_nb.data.combined`): their images are only ever trained on, never held out. IDs must not collide.
    extra_data: list[str] = dataclasses.field(default_factory=list)
    augment: bool = True
    cache: bool = False  # cache decoded images in memory (small data sets only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_data", [str(folder) for folder in self.extra_data or ()])


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The network: its backbone, the weights it starts from, the head's dropout."""

    backbone: str = (
        "efficientnetb0"  # a key of hpa_nb.training.model.BACKBONES, or a KerasHub preset (handle or folder)
    )
    weights: str | None = (
        "imagenet"  # "imagenet", None ("none" too), or a weights file (see hpa_nb.training.model.build)
    )
    dropout: float = 0.3

    def __post_init__(self) -> None:
        # "none" (the CLI's spelling) becomes None here, so config.json and every reader see one form.
        if isinstance(self.weights, str) and self.weights.lower() in ("none", ""):
            object.__setattr__(self, "weights", None)


@dataclass(frozen=True, kw_only=True)
class OptimisationSettings:
    """Adam with linear warmup → sustain → exponential decay (`hpa_nb.training.schedule`), and the loss."""

    epochs: int = 20
    batch_size: int = 16  # per replica; the global batch is this × replicas
    steps_per_epoch: int | None = None  # None: one pass over the training split
    max_lr: float = 1e-3  # peak for a global batch of 64, scaled linearly with the actual global batch
    initial_lr: float = 1e-5
    warmup_epochs: float = 1.0
    sustain_epochs: float = 0.0
    lr_decay: float = 0.8  # per epoch after the sustain phase
    min_lr: float = 1e-6
    loss: str = "bce"  # "bce" or "focal", both with per-class positive weights
    focal_gamma: float = 2.0
    max_positive_weight: float = 20.0


@dataclass(frozen=True, kw_only=True)
class ValidationSettings:
    """Early stopping, the validation cache and batch-norm re-estimation."""

    patience: int = 5  # early stopping on val_auc, best weights restored
    val_cache_gib: float = 4.0  # keep the decoded validation images in memory when they take at most this
    # Re-estimate batch-norm statistics over training batches (see hpa_nb.training.batch_norm):
    # "epoch" before every validation (so val metrics, checkpoints and early stopping see the
    # statistics the saved model will have), "end" once after training, or "off".
    bn_recalibration: str = "epoch"
    bn_recalibration_steps: int = 20


@dataclass(frozen=True, kw_only=True)
class CellSettings:
    """Image or cell runs, and a cell run's tiles and targets."""

    # "image": one record per image, its label the target; "cell": one cell tile per record (`hpa_nb.data.tiles`),
    # its image's label the weak target, split by image as the image run is.
    level: str = "image"
    tiles: str | None = None  # the cell tiles of a cell run (a folder, or OWNER/KERNEL attached); None: data_dir/tiles
    # A cell run's targets: False, each cell its image's label; True, the targets.csv that the relabel step
    # (hpa_nb.cells.relabel) wrote from out-of-fold cell models trained on `relabel_folds` parts of the training images.
    relabel: bool = False
    relabel_folds: int = 2


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """Where a run runs, how it stops and resumes."""

    out_dir: str | None = None  # the run folder; None: hpa_nb.training.run.default_dir() (<working dir>/run)
    quick: bool = False
    resume: bool = False
    resume_from: str | None = None  # a run folder, or OWNER/KERNEL attached as input: copied to out_dir, resumed
    precision: str | None = None  # None: by device (mixed_bfloat16 on TPU, mixed_float16 on GPU, float32 on CPU)
    steps_per_execution: int | None = None  # None: 32 on TPU, 8 on GPU, 1 on CPU
    cpu_replicas: int | None = None  # TF only: MirroredStrategy over this many logical CPUs (tests)
    verbose: int | str = "auto"  # Keras fit verbosity: progress bar by default
    keep_checkpoints: int = 2
    # A time.time() value: stop after the epoch in hand (its checkpoint written) when the next one would end past
    # it, so a Kaggle version ends cleanly with its output saved (HOURS in 03/07); None: no deadline.
    deadline: float | None = None
    # On Kaggle a full run stops before training on the synthetic sample or on a CPU (hpa_nb.training.preflight).
    allow_sample_data: bool = False
    allow_cpu: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every training option, in frozen sections (`SECTIONS`): ``config.data.image_size``,
    ``config.optimisation.max_lr``. Made from flat option names (`of`, `make`, `quick_variant`), as the CLI, the
    notebooks and ``RUN/config.json`` give them, and saved flat (`to_json`); `replace` changes options by name."""

    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    optimisation: OptimisationSettings = dataclasses.field(default_factory=OptimisationSettings)
    validation: ValidationSettings = dataclasses.field(default_factory=ValidationSettings)
    cells: CellSettings = dataclasses.field(default_factory=CellSettings)
    runtime: RuntimeSettings = dataclasses.field(default_factory=RuntimeSettings)

    @classmethod
    def of(cls, **options: Any) -> "TrainConfig":
        """The configuration with `options` (flat names, e.g. ``max_lr=1e-3``) and the defaults for the rest."""
        unknown = sorted(set(options) - CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"unknown training option{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
        return cls(
            **{
                section: kind(**{name: options[name] for name in SECTIONS[section] if name in options})
                for section, kind in SECTION_TYPES.items()
            }
        )

    @classmethod
    def quick_variant(cls, **overrides: Any) -> "TrainConfig":
        """The quick configuration (tiny CNN from scratch, 64 px, 5 epochs), with `overrides` applied on top."""
        return cls.of(**{**QUICK, **overrides})

    @classmethod
    def make(cls, quick: bool, **options: Any) -> "TrainConfig":
        """The quick or the full configuration with `options` on top; an option given as None keeps its default."""
        given = {name: value for name, value in options.items() if value is not None}
        return cls.quick_variant(**given) if quick else cls.of(**given)

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> "TrainConfig":
        """A saved ``config.json`` (flat, as every version wrote it): its options, the run's own facts beside them
        (replicas, history, ...) left out; an option an older file lacks takes its default."""
        return cls.of(**{name: value for name, value in saved.items() if name in CONFIG_FIELDS})

    def replace(self, **options: Any) -> "TrainConfig":
        """A copy with `options` (flat names) changed."""
        return type(self).of(**{**self.to_json(), **options})

    def to_json(self) -> dict[str, Any]:
        """Every option by its flat name, in the sections' order: what ``config.json`` holds."""
        return {name: value for section in SECTION_TYPES for name, value in self.section(section).items()}

    def section(self, name: str) -> dict[str, Any]:
        """The options of one section, e.g. ``config.section("optimisation")``."""
        return dataclasses.asdict(getattr(self, name))


# The sections, by the name `TrainConfig` gives each (``config.optimisation.max_lr``), and each option's section in
# the sections' order: the flat names of the CLI, the notebooks and config.json. Read from TrainConfig's own fields.
SECTION_TYPES: dict[str, type] = {field.name: field.default_factory for field in dataclasses.fields(TrainConfig)}
SECTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in dataclasses.fields(kind)) for name, kind in SECTION_TYPES.items()
}
SECTION_OF = {option: name for name, options in SECTIONS.items() for option in options}
CONFIG_FIELDS = set(SECTION_OF)


# Sized so the default sample trains in about a minute on two CPU cores and still learns (the docs'
# "Models and cells on the default sample" gives the validation AUC over seeds).
QUICK: dict[str, Any] = {
    "quick": True,
    "backbone": "tiny",
    "weights": None,
    "image_size": 64,
    "epochs": 5,
    "batch_size": 16,
    "max_lr": 8e-3,
    "initial_lr": 1e-4,
    "warmup_epochs": 0.5,
    "lr_decay": 0.7,
    "dropout": 0.2,
    "patience": 3,
    "cache": True,
}
BN_RECALIBRATION = ("epoch", "end", "off")


def validate(config: TrainConfig) -> None:
    normalize_weights(config.model.weights)  # a missing weights file fails now, not after the data is read
    if config.model.backbone not in BACKBONES and not is_preset(config.model.backbone):
        raise ValueError(
            f"unknown backbone {config.model.backbone!r}; choose from {', '.join(BACKBONES)}, or a KerasHub "
            "preset (kaggle://OWNER/MODEL/keras/VARIATION, or its folder)"
        )
    if config.data.channels not in CHANNEL_SETS:
        raise ValueError(f"channels must be one of {', '.join(CHANNEL_SETS)}, got {config.data.channels!r}")
    if config.validation.bn_recalibration not in BN_RECALIBRATION:
        raise ValueError(
            f"bn_recalibration must be one of {', '.join(BN_RECALIBRATION)}, got {config.validation.bn_recalibration!r}"
        )
    if config.cells.relabel and config.cells.level != "cell":
        raise ValueError("relabel is for cell runs (level='cell')")
    if config.cells.relabel_folds < 2:
        raise ValueError(f"relabel_folds must be at least 2, got {config.cells.relabel_folds}")
    if config.data.folds is not None and (config.data.folds < 2 or not 0 <= config.data.fold < config.data.folds):
        raise ValueError(
            f"folds must be at least 2 and fold one of 0..folds-1, got folds={config.data.folds}, fold={config.data.fold}"
        )
    if config.data.extra_data and config.data.shards:
        raise ValueError("extra data sources are read from their PNGs beside data_dir's; leave shards out")
    if config.cells.level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {config.cells.level!r}")
    if config.optimisation.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {config.optimisation.loss!r}")
    if not 0 < config.data.val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {config.data.val_fraction}")
    for name, value in (
        ("image_size", config.data.image_size),
        ("epochs", config.optimisation.epochs),
        ("batch_size", config.optimisation.batch_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.data.image_size < 32:
        raise ValueError(f"image_size must be at least 32 px, got {config.data.image_size}")
