"""The network as plain data: a checkpoint stores this and rebuilds the network without trainer code."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from autounet.errors import AutounetError
from autounet.planning.plans import ConfigurationPlan
from autounet.planning.topology import extra_pool, max_stages

DOWNSAMPLING = ("pool", "strided_conv")

# seed 004 §2.3: the deeper encoder of the BraTS recipe


@dataclass
class NetworkSpec:
    """A U-Net: per stage two conv -> instance norm -> leaky ReLU blocks (seed 001 §2.1).

    ``pool_kernel_sizes[s]`` is the down-sampling between stage ``s`` and ``s + 1`` (1 along an
    axis: not down-sampled there). ``deep_supervision_heads`` extra 1x1 output heads sit on the
    decoder levels below the full-resolution one (seed 004 uses 2; 0 turns deep supervision off).

    The ablation switches of seed 004 §3.3 (Table 2) default to off, which is the plain U-Net, so
    stored specs without them load unchanged: ``residual_encoder`` / ``residual_decoder``
    (residual conv blocks, Fig. 6b), ``attention_gates`` (decoder attention, Oktay et al. 2018)
    and ``drop_block_prob`` / ``drop_block_size`` (DropBlock, Ghiasi et al. 2018; 0 is off).

    nnU-Net v2's residual-encoder U-Net (the ResEnc presets) is the same spec with
    ``encoder_blocks_per_stage`` set (one count per stage, e.g. 1, 3, 4, 6, 6, 6): a stem
    convolution, then that many basic residual blocks per encoder stage, the first of a stage
    strided (``downsampling`` ``strided_conv``); ``decoder_convs_per_stage`` conv blocks per
    decoder level (2 in the plain U-Net, 1 in the ResEnc presets). Both default to the plain
    U-Net, so specs stored without them load unchanged.
    """

    dims: int
    in_channels: int
    num_outputs: int  # classes (softmax) or regions (sigmoid)
    features_per_stage: list[int]
    conv_kernel_sizes: list[list[int]]
    pool_kernel_sizes: list[list[int]]
    downsampling: str = "pool"  # "pool" (seed 001) or "strided_conv" (seed 004)
    deep_supervision_heads: int = 0
    residual_encoder: bool = False
    residual_decoder: bool = False
    attention_gates: bool = False
    drop_block_prob: float = 0.0
    drop_block_size: int = 5  # seed 004's public code uses 5
    negative_slope: float = 0.01
    he_init: bool = True
    encoder_blocks_per_stage: list[int] = field(default_factory=list)  # empty: the plain encoder
    decoder_convs_per_stage: int = 2
    notes: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.features_per_stage)

    def validate(self) -> None:
        n = self.num_stages
        if self.dims not in (2, 3):
            raise AutounetError(f"network dims must be 2 or 3, got {self.dims}")
        if n < 1 or len(self.conv_kernel_sizes) != n or len(self.pool_kernel_sizes) != n - 1:
            raise AutounetError(
                f"network needs one conv kernel per stage ({n}) and one pooling kernel between stages ({n - 1}); "
                f"got {len(self.conv_kernel_sizes)} and {len(self.pool_kernel_sizes)}"
            )
        if any(len(k) != self.dims for k in self.conv_kernel_sizes + self.pool_kernel_sizes):
            raise AutounetError(f"every kernel needs {self.dims} values")
        if self.downsampling not in DOWNSAMPLING:
            raise AutounetError(f"downsampling must be one of {DOWNSAMPLING}, got {self.downsampling!r}")
        if not 0 <= self.deep_supervision_heads <= max(0, n - 2):
            raise AutounetError(f"deep_supervision_heads must be between 0 and {max(0, n - 2)} for {n} stages")
        if self.in_channels < 1 or self.num_outputs < 1:
            raise AutounetError("a network needs at least one input channel and one output")
        if any(c < 1 for c in self.features_per_stage):
            raise AutounetError(f"features_per_stage must all be at least 1, got {self.features_per_stage}")
        if isinstance(self.drop_block_prob, bool) or not 0.0 <= self.drop_block_prob < 1.0:
            raise AutounetError(f"drop_block_prob must be in [0, 1) (0: no DropBlock), got {self.drop_block_prob!r}")
        if (
            isinstance(self.drop_block_size, bool)
            or not isinstance(self.drop_block_size, int)
            or self.drop_block_size < 1
        ):
            raise AutounetError(f"drop_block_size must be an integer >= 1, got {self.drop_block_size!r}")
        if isinstance(self.decoder_convs_per_stage, bool) or self.decoder_convs_per_stage not in range(1, 9):
            raise AutounetError(f"decoder_convs_per_stage must be an integer 1-8, got {self.decoder_convs_per_stage!r}")
        if self.residual_decoder and self.decoder_convs_per_stage != 2:
            raise AutounetError("residual_decoder blocks have two convolutions: decoder_convs_per_stage must be 2")
        if self.encoder_blocks_per_stage:
            self._validate_residual_encoder(n)

    def _validate_residual_encoder(self, n: int) -> None:
        blocks = self.encoder_blocks_per_stage
        if len(blocks) != n or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise AutounetError(f"encoder_blocks_per_stage needs one count >= 1 per stage ({n}), got {blocks}")
        if self.downsampling != "strided_conv":
            raise AutounetError("a residual encoder (encoder_blocks_per_stage) down-samples with strided_conv")
        if self.residual_encoder or self.drop_block_prob > 0:
            raise AutounetError("encoder_blocks_per_stage cannot be combined with residual_encoder or DropBlock")

    def output_strides(self) -> list[list[int]]:
        """Down-sampling factor of each output (main first, then the deep-supervision heads)."""
        strides, current = [], [1] * self.dims
        for level in range(self.deep_supervision_heads + 1):
            if level:
                current = [c * k for c, k in zip(current, self.pool_kernel_sizes[level - 1])]
            strides.append(list(current))
        return strides


def default_deep_supervision_heads(num_stages: int) -> int:
    """Extra heads on every decoder level except the two lowest, as the public nnU-Net weights them."""
    return max(0, num_stages - 3)


SPEC_OVERRIDES = (
    "num_outputs",
    "in_channels",
    "features_per_stage",
    "deep_supervision_heads",
    "downsampling",
    "residual_encoder",
    "residual_decoder",
    "attention_gates",
    "drop_block_prob",
    "drop_block_size",
    "width_multiplier",
    "encoder_blocks_per_stage",
    "decoder_convs_per_stage",
)


def spec_from_plan(
    plan: ConfigurationPlan,
    num_outputs: int | None = None,
    in_channels: int | None = None,
    features_per_stage: list[int] | None = None,
    deep_supervision_heads: int | None = None,
    downsampling: str | None = None,
    residual_encoder: bool | None = None,
    residual_decoder: bool | None = None,
    attention_gates: bool | None = None,
    drop_block_prob: float | None = None,
    drop_block_size: int | None = None,
    width_multiplier: float | None = None,
    encoder_blocks_per_stage: list[int] | None = None,
    decoder_convs_per_stage: int | None = None,
) -> NetworkSpec:
    """The network for a configuration of plans.json, with optional overrides.

    Each argument left None takes the plan's ``network`` entry (the recipe's choices, e.g. seed
    004's encoder), else the default: the plan's features, max pooling, deep supervision on all
    but the two lowest levels, no ablation switch; ``num_outputs`` is the number of regions for a
    region plan, else of classes; ``in_channels`` the plan's ``num_input_channels``.

    ``features_per_stage`` may be longer than the plan's stages (seed 004's deeper encoder):
    the extra stages are added with 2x down-sampling along axes whose feature map allows it.
    ``width_multiplier`` scales every stage's features (rounded, at least 1): the "wider" encoder
    of seed 004 Table 3. The other switches are the :class:`NetworkSpec` fields of the same name.
    """
    stored = dict(plan.network or {})
    unknown = sorted(set(stored) - set(SPEC_OVERRIDES))
    if unknown:
        raise AutounetError(
            f"plan {plan.name}: unknown network setting(s) {unknown}; known: {', '.join(SPEC_OVERRIDES)}"
        )

    def pick(value, key: str, default):
        if value is not None:
            return value
        return stored[key] if stored.get(key) is not None else default

    default_outputs = len(plan.regions.regions) if plan.regions else plan.num_classes
    num_outputs = pick(num_outputs, "num_outputs", default_outputs)
    in_channels = pick(in_channels, "in_channels", plan.num_input_channels)
    features_per_stage = pick(features_per_stage, "features_per_stage", None)
    deep_supervision_heads = pick(deep_supervision_heads, "deep_supervision_heads", None)
    downsampling = pick(downsampling, "downsampling", "pool")
    residual_encoder = pick(residual_encoder, "residual_encoder", False)
    residual_decoder = pick(residual_decoder, "residual_decoder", False)
    attention_gates = pick(attention_gates, "attention_gates", False)
    drop_block_prob = pick(drop_block_prob, "drop_block_prob", 0.0)
    drop_block_size = pick(drop_block_size, "drop_block_size", 5)
    width_multiplier = pick(width_multiplier, "width_multiplier", 1.0)
    encoder_blocks = list(pick(encoder_blocks_per_stage, "encoder_blocks_per_stage", []))
    decoder_convs = pick(decoder_convs_per_stage, "decoder_convs_per_stage", 2)

    pools = [list(k) for k in plan.pool_op_kernel_sizes]
    convs = [list(k) for k in plan.conv_kernel_sizes]
    features = list(features_per_stage) if features_per_stage else list(plan.features_per_stage)
    notes = []
    if isinstance(width_multiplier, bool) or not width_multiplier > 0:
        raise AutounetError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
    if width_multiplier != 1:
        features = [max(1, round(c * width_multiplier)) for c in features]
        notes.append(f"features x{width_multiplier:g}")
    if len(features) != len(convs):
        if len(features) < len(convs):
            raise AutounetError(f"{len(features)} feature sizes for a plan with {len(convs)} stages")
        size = list(plan.patch_size)
        for k in pools:
            size = [s // p for s, p in zip(size, k)]
        while len(convs) < len(features):
            k = extra_pool(size)
            if k == [1] * len(k):
                raise AutounetError(
                    f"the patch {plan.patch_size} cannot be down-sampled {len(features) - 1} times "
                    f"(at most {max_stages(plan)} stages)"
                )
            pools.append(k)
            convs.append([3] * len(k))
            size = [s // p for s, p in zip(size, k)]
        notes.append(f"encoder deepened to {len(features)} stages")
    spec = NetworkSpec(
        dims=plan.network_dims,
        in_channels=int(in_channels),
        num_outputs=int(num_outputs),
        features_per_stage=features,
        conv_kernel_sizes=convs,
        pool_kernel_sizes=pools,
        downsampling=downsampling,
        deep_supervision_heads=default_deep_supervision_heads(len(features))
        if deep_supervision_heads is None
        else deep_supervision_heads,
        residual_encoder=residual_encoder,
        residual_decoder=residual_decoder,
        attention_gates=attention_gates,
        drop_block_prob=float(drop_block_prob),
        drop_block_size=drop_block_size,
        encoder_blocks_per_stage=encoder_blocks,
        decoder_convs_per_stage=decoder_convs,
        notes=notes,
    )
    spec.validate()
    return spec


def with_overrides(spec: NetworkSpec, **changes) -> NetworkSpec:
    out = replace(spec, **changes)
    out.validate()
    return out
