#!/usr/bin/env bash
# The R1 distillation finding at our scale (issue 6, part 4; DeepSeek-R1 §4.1, Table 6): a small student
# distilled from a GRPO-trained teacher vs the same student trained with GRPO directly, at equal wall-clock.
#
#   bash experiments/r1_distill_vs_rl.sh            # after `make run` (the teacher is runs/speedrun/grpo)
#
# Student: the `tiny` architecture at half width (d=64, 2 heads; ~0.6M params without embeddings), pretrained
# briefly on Shakespeare with the teacher's tokenizer, then given the same kind of SFT cold start the teacher
# had (R1-Zero-style RL from a model that never writes <think>/<answer> would see only zero rewards).
# Then two arms from that same checkpoint:
#   distill: sample K completions per problem from the teacher, keep the verified-correct ones, SFT the student
#   grpo:    GRPO on the student itself, for as many minutes as the distill arm took end to end
# Both report held-out greedy pass@1 / sampled pass@k on the same 200 test problems. Results: docs/post_training.md.
set -euo pipefail
OUT=${OUT:-runs/r1_distill}
TEACHER=${TEACHER:-runs/speedrun/grpo}
TASK=${TASK:-add:digits=3}
NS=${NS:-.venv/bin/nanoseek}
PROBLEMS=${PROBLEMS:-2000}   # teacher problems for rejection sampling
K=${K:-4}                    # teacher samples per problem
EPOCHS=${EPOCHS:-2}          # student passes over the kept traces
ARM=${ARM:-}                 # suffix for the two arms' folders (rerun them at another size, same student)
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -d "$TEACHER" ] || { echo "no teacher at $TEACHER: run 'make run' first (or set TEACHER=)" >&2; exit 2; }

$PY - "$OUT/student.json" <<'PYEOF'
import sys
from nanoseek.config import get_preset
get_preset("tiny").replace(
    name="student", hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_attention_heads=2
).save(sys.argv[1])
PYEOF

echo "== student base: pretrain, then SFT cold start"
[ -d "$OUT/base/checkpoints" ] || $NS train --config "$OUT/student.json" --tokenizer "$TEACHER/tokenizer.json" \
  --steps 600 --out "$OUT/base" --no-progress --eval-every 200
[ -d "$OUT/sft/checkpoints" ] || $NS sft --init "$OUT/base" --task "$TASK" --examples 30000 --steps 400 \
  --seq-len 256 --batch-size 32 --lr 3e-3 --warmup-steps 20 --schedule cosine --eval-problems 200 \
  --out "$OUT/sft" --no-progress | tail -1

echo "== arm 1: distillation from $TEACHER"
t0=$(date +%s)
$NS distill --teacher "$TEACHER" --task "$TASK" --student-init "$OUT/sft" --problems "$PROBLEMS" \
  --samples-per-problem "$K" --epochs "$EPOCHS" --lr 1e-3 --eval-problems 200 --pass-k 8 --out "$OUT/distill$ARM" \
  --no-progress | tail -1 | tee "$OUT/distill$ARM.json"
minutes=$(( ($(date +%s) - t0 + 59) / 60 ))

echo "== arm 2: GRPO on the student for the same $minutes min"
$NS grpo --init "$OUT/sft" --task "$TASK" --steps 100000 --max-minutes "$minutes" --prompts-per-step 8 \
  --group-size 8 --max-new-tokens 64 --lr 1e-4 --eval-every 100000 --eval-problems 200 --pass-k 8 \
  --out "$OUT/grpo$ARM" --no-progress | tail -3 | tee "$OUT/grpo$ARM.txt"
