#!/usr/bin/env bash
# One-shot GPU run (issue 7): retrain the demo model with its GPU recipe, then profile it and run
# the e2e experiment on CUDA, timing each stage. Run from the repo root on a CUDA machine whose
# python3 has torch; wheels for what it lacks may sit in .whl/. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/bitplan-gpu}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}                      # seconds for the whole script
TRAIN=${TRAIN:-1}                        # 0: profile + experiment on the committed model
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
BP="python3 -m service.cli"
start=$(date +%s); stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

if [ "$TRAIN" = 1 ]; then
stamp train
$BP train-demo --recipe gpu --out /tmp/model --tokenizer-from models/bitplan-demo || exit 1
stamp trained
# weights come back in two halves (the device tool returns files of at most 16 MiB)
python3 - "$OUT" <<'PY'
import sys
from safetensors.torch import load_file, save_file
sd = load_file("/tmp/model/model.safetensors"); keys = sorted(sd); half = len(keys) // 2
for i, part in enumerate((keys[:half], keys[half:])):
    save_file({k: sd[k] for k in part}, f"{sys.argv[1]}/weights-{i}.safetensors", {"format": "pt"})
PY
cp /tmp/model/config.json /tmp/model/training.json "$OUT"/

# profile + experiment on the new weights, on CUDA (the profile resumes linear by linear)
cp /tmp/model/model.safetensors /tmp/model/config.json models/bitplan-demo/
fi
rm -f models/bitplan-demo/bitplan_profile.json
export BITPLAN_DEVICE=cuda BITPLAN_DATA_DIR=/tmp/var
left=$(( LIMIT - ($(date +%s) - start) ))
stamp "profile (${left} s left)"
timeout $(( left / 2 )) $BP profile models/bitplan-demo --json > /dev/null
stamp profiled
cp /tmp/var/profiles/*/profile.json "$OUT/bitplan_profile.json" 2>/dev/null
left=$(( LIMIT - ($(date +%s) - start) ))
timeout "$left" $BP bench e2e --json --out "$OUT/e2e.json" > /dev/null
stamp "e2e done (rc $?)"
cp /tmp/var/profiles/*/profile.json "$OUT/bitplan_profile.json" 2>/dev/null
tar czf "$OUT/report.tgz" -C /tmp/var reports 2>/dev/null
stamp end
