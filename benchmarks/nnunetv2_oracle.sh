#!/usr/bin/env bash
# Regenerates tests/fixtures/nnunetv2/: nnU-Net v2.8.1's own fingerprints and plans for four
# datasets, the oracle of tests/test_planner_v2.py. nnU-Net is never a dependency of autounet:
# it lives in a separate virtual environment, made once with
#
#   python3 -m venv /work/nnunet_oracle
#   /work/nnunet_oracle/bin/pip install torch==2.13.0            # the CPU wheel first
#   /work/nnunet_oracle/bin/pip install nnunetv2==2.8.1 torch==2.13.0
#
# Usage: benchmarks/nnunetv2_oracle.sh [ORACLE_VENV] [DATA] [SCRATCH]
# (defaults: /work/nnunet_oracle, /work/shared/data, a new temporary folder). Only planning:
# no preprocessing or training.
set -euo pipefail
ORACLE=${1:-/work/nnunet_oracle}
DATA=${2:-/work/shared/data}
SCRATCH=${3:-$(mktemp -d)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT="$REPO/tests/fixtures/nnunetv2"
AUTOUNET="$REPO/.venv/bin/autounet"
export nnUNet_raw="$SCRATCH/raw" nnUNet_preprocessed="$SCRATCH/preprocessed" nnUNet_results="$SCRATCH/results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$SCRATCH/msd" "$OUT"

# The two real datasets are MSD-style folders; nnU-Net's converter reads the task id from the
# name and wants an imagesTs folder (empty here).
for pair in Task04_Hippocampus:hippocampus Task90_BratsMini:brats2015-mini; do
  task="$SCRATCH/msd/${pair%%:*}"
  mkdir -p "$task/imagesTs"
  for f in imagesTr labelsTr dataset.json; do ln -sfn "$DATA/${pair#*:}/$f" "$task/$f"; done
done
"$ORACLE/bin/nnUNetv2_convert_MSD_dataset" -i "$SCRATCH/msd/Task04_Hippocampus" -np 2
"$ORACLE/bin/nnUNetv2_convert_MSD_dataset" -i "$SCRATCH/msd/Task90_BratsMini" -np 2

# Two synthetic datasets in nnU-Net v2's layout: CT-like (HU intensities, fine in-plane spacing,
# large enough for a cascade) and anisotropic MRI-like (5 mm slices, spacing varying per case).
"$AUTOUNET" make-synthetic "$nnUNet_raw/Dataset901_SynthCT" --layout nnunetv2 --modality CT \
  --cases 8 --shape 144 256 256 --spacing 1.25 0.8 0.8 --spacing-jitter 0.1 --classes 3 --seed 1
"$AUTOUNET" make-synthetic "$nnUNet_raw/Dataset902_SynthAniso" --layout nnunetv2 --modality MRI \
  --cases 12 --shape 20 160 160 --spacing 5 0.7 0.7 --spacing-jitter 0.3 --classes 3 --seed 2

# A fifth case for the cascade (3d_lowres), which needs cases far larger than a CPU can fingerprint
# here: a tiny make-synthetic dataset whose fingerprint is replaced by a CT-like one of 20 cases
# of about 400x512x512 voxels at ~0.8x0.78x0.78 mm (seeded, so the same every time). nnU-Net plans
# from the fingerprint only; the images merely let it pick a reader.
"$AUTOUNET" make-synthetic "$nnUNet_raw/Dataset903_LargeCTFingerprint" --layout nnunetv2 --modality CT \
  --cases 20 --shape 8 8 8 --classes 3 --seed 3
mkdir -p "$nnUNet_preprocessed/Dataset903_LargeCTFingerprint"
"$ORACLE/bin/python" - "$nnUNet_preprocessed/Dataset903_LargeCTFingerprint/dataset_fingerprint.json" <<'PY'
import json, sys
import numpy as np
rng = np.random.default_rng(903)
n = 20
spacing = np.stack([rng.uniform(0.5, 1.25, n), *(2 * [rng.uniform(0.6, 0.95, n)])], 1)
shape = np.stack([rng.integers(250, 560, n), rng.integers(480, 513, n), rng.integers(480, 513, n)], 1)
stats = {"max": 3071.0, "mean": 95.5, "median": 101.0, "min": -1024.0, "percentile_00_5": -72.0,
         "percentile_99_5": 295.0, "std": 63.2}
json.dump({"foreground_intensity_properties_per_channel": {"0": stats},
           "median_relative_size_after_cropping": 1.0,
           "shapes_after_crop": shape.tolist(), "spacings": spacing.round(6).tolist()},
          open(sys.argv[1], "w"), indent=2)
PY

for pair in 4:Dataset004_Hippocampus 90:Dataset090_BratsMini 901:Dataset901_SynthCT 902:Dataset902_SynthAniso \
  903:Dataset903_LargeCTFingerprint; do
  id=${pair%%:*}
  name=${pair#*:}
  if [ "$id" != 903 ]; then "$ORACLE/bin/nnUNetv2_extract_fingerprint" -d "$id" -np 2; fi
  for planner in ExperimentPlanner nnUNetPlannerResEncM nnUNetPlannerResEncL nnUNetPlannerResEncXL; do
    "$ORACLE/bin/nnUNetv2_plan_experiment" -d "$id" -pl "$planner"
  done
  # a memory target other than the preset's (v2's -gpu_memory_target)
  "$ORACLE/bin/nnUNetv2_plan_experiment" -d "$id" -pl ExperimentPlanner -gpu_memory_target 12 \
    -overwrite_plans_name nnUNetPlans_12GB
  mkdir -p "$OUT/$name"
  cp "$nnUNet_raw/$name/dataset.json" "$OUT/$name/dataset.json"
  cp "$nnUNet_preprocessed/$name/dataset_fingerprint.json" "$OUT/$name/"
  cp "$nnUNet_preprocessed/$name"/nnUNet*Plans*.json "$OUT/$name/"
done
"$ORACLE/bin/python" -c "import nnunetv2, importlib.metadata as m; print('nnunetv2', m.version('nnunetv2'))" \
  >"$OUT/VERSION"
echo "fixtures written to $OUT (scratch: $SCRATCH)"
