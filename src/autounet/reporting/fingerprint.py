"""Report section 1: the dataset fingerprint (cases, channels, labels and their components,
spacing and shape, CT intensities), read from the typed ``fingerprint.json``."""

from __future__ import annotations

import statistics

from autounet.reporting.common import class_key, count, dims, note, num, table
from autounet.reporting.context import ReportContext


def fingerprint_section(ctx: ReportContext) -> list[str]:
    fp = ctx.fingerprint
    if fp is None:
        return note(f"Skipped: no readable {ctx.ws.fingerprint_json.name} (run `autounet plan`).")
    names = {str(k): str(v) for k, v in fp.labels.items()}
    out = [
        f"Dataset `{fp.dataset_name}` ({fp.layout} layout): **{fp.num_cases} training cases**, "
        f"{fp.num_channels} channel(s), {len(names)} label values.",
        "",
    ]
    # Channels, with the normalisation the plans chose for each.
    norm: dict[int, str] = {}
    if ctx.plans is not None and ctx.plans.configurations:
        first = next(iter(ctx.plans.configurations.values()))
        norm = {n.channel: n.scheme + (" in nonzero mask" if n.use_nonzero_mask else "") for n in first.normalization}
    out += table(
        ["channel", "modality", "normalisation"],
        [[i, name, norm.get(i, "-")] for i, name in enumerate(fp.channel_names)],
        "lll",
    )
    out.append("")

    # Labels: how often, how large, how many components.
    total = [sum(int(v) for v in c.label_voxel_counts.values()) for c in fp.cases]
    rows = []
    for key in sorted(names, key=class_key):
        counts = [int(c.label_voxel_counts.get(key, 0)) for c in fp.cases]
        present = [n for n in counts if n > 0]
        all_voxels = sum(total)
        share = f"{100 * sum(counts) / all_voxels:.3f} %" if all_voxels else "-"
        if key == "0":
            rows.append([key, names[key], f"{len(present)}/{fp.num_cases}", share, "-", "-", "-"])
            continue
        fg_voxels = sum(sum(int(v) for k, v in c.label_voxel_counts.items() if k != "0") for c in fp.cases)
        fg_share = f"{100 * sum(counts) / fg_voxels:.2f} %" if fg_voxels else "-"
        comps = [int(c.components_per_class.get(key, 0)) for c in fp.cases if c.components_per_class.get(key, 0)]
        comp_text = f"{statistics.median(comps):g} ({min(comps)}-{max(comps)})" if comps else "-"
        single = ("yes" if all(n == 1 for n in comps) else "no") if comps else "-"
        rows.append([key, names[key], f"{len(present)}/{fp.num_cases}", share, fg_share, comp_text, single])
    out += table(
        [
            "value",
            "name",
            "cases with it",
            "share of all voxels",
            "share of foreground",
            "components per case: median (min-max)",
            "one component in every case",
        ],
        rows,
        "llrrrrl",
    )
    out.append("")
    out.append(
        f"Components are counted with {fp.component_connectivity}-connectivity in the cases where the class occurs; "
        "a class with one component in every case is a candidate for 'keep the largest component' post-processing."
    )
    if fp.regions:
        out.append("")
        out.append(
            "Regions declared: "
            + "; ".join(f"{name} = {', '.join(map(str, labels))}" for name, labels in fp.regions.items())
            + "."
        )
    out.append("")

    # Geometry.
    spacings = [c.spacing for c in fp.cases]
    before = [c.shape_before_crop for c in fp.cases]
    after = [c.shape_after_crop for c in fp.cases]

    def stats(values: list[list[float]]) -> list[str]:
        axes = list(zip(*values))
        return [dims(statistics.median(a) for a in axes), dims(min(a) for a in axes), dims(max(a) for a in axes)]

    fractions = [c.crop_voxel_fraction for c in fp.cases]
    out += table(
        ["(z, y, x)", "median", "min", "max"],
        [
            ["spacing (mm)", *stats(spacings)],
            ["shape before cropping (voxels)", *stats(before)],
            ["shape after cropping (voxels)", *stats(after)],
            [
                "voxels kept by cropping",
                num(statistics.median(fractions), 3),
                num(min(fractions), 3),
                num(max(fractions), 3),
            ],
        ],
    )
    out.append("")
    orientations: dict[str, int] = {}
    for c in fp.cases:
        orientations[c.orientation] = orientations.get(c.orientation, 0) + 1
    out.append("Orientations: " + ", ".join(f"{o} ({count(n, 'case')})" for o, n in sorted(orientations.items())) + ".")
    out.append("")

    # Intensities of CT channels (the only ones normalised with dataset-wide statistics).
    ct = [i for i, name in enumerate(fp.channel_names) if str(name).strip().upper() == "CT"]
    if ct:
        rows = []
        for i in ct:
            s = fp.foreground_intensity_per_channel[i]
            rows.append(
                [
                    f"{i} ({fp.channel_names[i]})",
                    num(s.mean, 3),
                    num(s.std, 3),
                    num(s.median, 3),
                    num(s.percentile_00_5, 3),
                    num(s.percentile_99_5, 3),
                    num(s.min, 3),
                    num(s.max, 3),
                    s.num_samples,
                ]
            )
        out.append("Foreground intensities of the CT channels (pooled sample of labelled voxels):")
        out.append("")
        out += table(["channel", "mean", "std", "median", "0.5 %", "99.5 %", "min", "max", "samples"], rows)
    else:
        out.append(
            "No CT channel: every channel is normalised per case, so no dataset-wide intensity statistics apply."
        )
    out.append("")
    return out
