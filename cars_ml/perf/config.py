"""The ``benchmark`` step's configuration: each field that a user sets is also its parameter."""

from __future__ import annotations

from dataclasses import dataclass

from cars_ml.modeling.backbones import get_backbone
from cars_ml.params import comma_list, param, positive_float, positive_int

SECTIONS = ("inference", "serve", "edge", "pipeline", "tuning", "cpu_kernels")
MODEL_SECTIONS = ("inference", "serve", "edge")
MIN_IMAGE_SIZE = 32  # MobileNet's smallest input


def parse_sections(text: str) -> tuple[str, ...]:
    """``all`` or a comma list such as ``inference,edge`` (order is always SECTIONS order)."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names or names == ["all"]:
        return SECTIONS
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(
            f"unknown benchmark section(s) {unknown}; choose 'all' or a comma list of "
            f"{', '.join(SECTIONS)}."
        )
    return tuple(s for s in SECTIONS if s in names)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What the ``benchmark`` entry point controls, plus budget knobs for tiny runs."""

    model_uri: str = param(
        "", "model to measure (models:/name@alias); empty: a MobileNet built here"
    )
    image_size: int = param(224, "pixels (built model, data)", parse=positive_int)
    runs: int = param(100, "timed calls per latency median", parse=positive_int)
    serve_seconds: float = param(
        10.0, "seconds of load per client count against the served endpoint", parse=positive_float
    )
    pipeline_images: int = param(
        4000, "images for the input pipeline and tuning comparisons", parse=positive_int
    )
    sections: tuple[str, ...] = param(
        SECTIONS,
        f"all, or a comma list of {','.join(SECTIONS)}",
        parse=parse_sections,
        text="all",
    )
    warmup: int = 10
    serve_clients: tuple[int, ...] = (1, 8)
    train_image_size: int = 96
    train_steps: int = 0  # 0: whole epochs
    rounds: int = param(
        2,
        "turns each side of the pipeline and CPU-kernel comparisons takes (best kept)",
        parse=positive_int,
    )
    tuning_epochs: int = 1
    tuning_cached_trials: int = 3
    data_dir: str = ""
    # Backbones whose training step runs with oneDNN off and on (each at its demo image size).
    kernel_models: tuple[str, ...] = param(
        ("resnet", "vgg16"),
        "backbones whose training step runs with oneDNN off and on (cpu_kernels)",
        parse=comma_list,
    )
    kernel_steps: int = 6

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(
                f"unknown benchmark section(s) {unknown or self.sections}; choose 'all' or a "
                f"comma list of {', '.join(SECTIONS)}."
            )
        if self.image_size < MIN_IMAGE_SIZE or self.train_image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size={self.image_size} and train_image_size={self.train_image_size} must "
                f"be >= {MIN_IMAGE_SIZE} px (MobileNet's minimum)."
            )
        positive = (
            "runs",
            "pipeline_images",
            "rounds",
            "tuning_epochs",
            "tuning_cached_trials",
            "kernel_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.train_steps < 0:
            raise ValueError(f"train_steps must be >= 0 (0: whole epochs), got {self.train_steps}.")
        if "cpu_kernels" in self.sections and not self.kernel_models:
            raise ValueError("kernel_models is empty; pass e.g. kernel_models=resnet,vgg16.")
        for name in self.kernel_models:
            get_backbone(name)  # An unknown name fails now, with the list of valid ones.
        if self.serve_seconds <= 0 or self.warmup < 0 or not self.serve_clients:
            raise ValueError("serve_seconds must be > 0, warmup >= 0 and serve_clients non-empty.")
